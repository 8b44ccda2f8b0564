"""Multi-fidelity scoring and the search's pure pieces: nested random document subsets that are
the same for every trial, a last level that equals one full evaluation, per-document instances
that average to avg_acc, winners / Pareto fronts / trial counting by hand."""

import math

import pytest

from mlproject.evaluation.options import EvalOptions
from mlproject.errors import UserError
from mlproject.evaluation import harness
from mlproject.evaluation.engine import measure, plan_eval
from mlproject.models import loading
from mlproject.models.reference import resolve
from mlproject.search import fidelity, report
from mlproject.search import space as space_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory):
    import tiny

    other = tiny.save_tiny(tmp_path_factory.mktemp("other") / "llama", "llama", seed=1)
    return [loading.load_model(resolve(str(d)), dtype="float32", device="cpu") for d in (tiny_dirs["llama"], other)]


def eval_plan(ppl_text_file, **kw):
    return plan_eval(EvalOptions(tasks="mlp_nonce,mlp_arith", ppl_dataset=str(ppl_text_file), seqlen=16,
                                 batch_size="16", **kw))


def scored_sets(scorer):
    """After each level: {task: set of documents scored so far}."""
    out = []
    for level in scorer.levels():
        out.append((level, {leaf: set(s) for leaf, s in scorer.scores.items()}))
    return out


def test_levels_are_nested_random_subsets_the_same_for_every_model(models, ppl_text_file):
    plan = eval_plan(ppl_text_file)
    docs = fidelity.task_documents(plan.tasks, plan.limit)
    assert {td.name: td.leaves for td in docs} == {"mlp_nonce": {"mlp_nonce": 200}, "mlp_arith": {"mlp_arith": 240}}
    runs = [scored_sets(fidelity.LevelScorer(m, plan, docs, [0.1, 0.5, 1.0], seed=7)) for m in models]
    for (la, sa), (lb, sb) in zip(*runs):
        assert sa == sb  # the same documents for both models at every level
        assert la.documents == lb.documents == sum(map(len, sa.values()))
    sizes = [{k: len(v) for k, v in s.items()} for _, s in runs[0]]
    assert sizes == [{"mlp_nonce": 20, "mlp_arith": 24}, {"mlp_nonce": 100, "mlp_arith": 120},
                     {"mlp_nonce": 200, "mlp_arith": 240}]
    first, second = runs[0][0][1], runs[0][1][1]
    assert all(first[k] < second[k] for k in first)  # nested
    assert first["mlp_nonce"] != set(range(20))  # a shuffle, not lm-eval's prefix
    assert first["mlp_nonce"] == set(fidelity.shuffled(200, 7, "mlp_nonce")[:20])
    # another seed draws other documents
    other = scored_sets(fidelity.LevelScorer(models[0], plan, docs, [0.1, 1.0], seed=8))
    assert other[0][1]["mlp_nonce"] != first["mlp_nonce"]


def test_the_last_level_equals_one_full_evaluation_scoring_each_document_once(models, ppl_text_file, monkeypatch):
    plan = eval_plan(ppl_text_file)
    docs = fidelity.task_documents(plan.tasks, plan.limit)
    asked = []
    original = harness.run_tasks

    def spy(*a, samples=None, **k):
        asked.append({t: list(ids) for t, ids in samples.items()})
        return original(*a, samples=samples, **k)

    monkeypatch.setattr(harness, "run_tasks", spy)
    levels = list(fidelity.LevelScorer(models[0], plan, docs, [0.1, 0.3, 1.0], seed=0).levels())
    monkeypatch.undo()
    for task, n in (("mlp_nonce", 200), ("mlp_arith", 240)):
        ids = [i for call in asked for i in call[task]]
        assert sorted(ids) == list(range(n))  # every document exactly once over the three levels
    full = measure(models[0], plan)
    last = levels[-1]
    assert last.last and last.documents == 440
    assert last.metrics["avg_acc"] == full.metrics["avg_acc"]
    for task in ("mlp_nonce", "mlp_arith"):
        metric = full.harness.avg_metrics[task]
        assert last.metrics[f"{task}/{metric}"] == pytest.approx(full.metrics[f"{task}/{metric}"], abs=1e-12)
        assert last.metrics[f"{task}/{metric}_stderr"] == pytest.approx(full.metrics[f"{task}/{metric}_stderr"],
                                                                       rel=1e-9)
    assert last.metrics["ppl/sample"] == pytest.approx(full.metrics["ppl/sample"], rel=1e-6)
    assert last.windows == full.ppl[0].windows
    # per-document instances (what the Wilcoxon pruner pairs) average to avg_acc, windows to the NLL
    acc = [v for level in levels for _, v in level.acc_instances]
    assert len(acc) == 440 and sum(acc) / len(acc) == pytest.approx(last.metrics["avg_acc"], rel=1e-12)
    nll = [v for level in levels for _, v in level.ppl_instances]
    assert math.exp(sum(nll) / len(nll)) == pytest.approx(full.metrics["ppl/sample"], rel=1e-6)
    # intermediate levels are estimates on fewer documents
    assert levels[0].documents == 20 + 24 and levels[0].windows < last.windows


def test_limit_takes_a_random_sample_of_that_size(models, ppl_text_file):
    plan = eval_plan(ppl_text_file, limit="30")
    docs = fidelity.task_documents(plan.tasks, plan.limit)
    assert docs[0].leaves == {"mlp_nonce": 30} and docs[0].total == {"mlp_nonce": 200}
    (only,) = scored_sets(fidelity.LevelScorer(models[0], plan, docs, [1.0], seed=0))
    assert only[1]["mlp_nonce"] == set(fidelity.shuffled(200, 0, "mlp_nonce")[:30]) != set(range(30))


def test_level_counts_and_fractions():
    assert fidelity.level_counts(200, [0.1, 0.3, 1.0]) == [20, 60, 200]
    assert fidelity.level_counts(5, [0.01, 0.5, 1.0]) == [1, 3, 5]  # at least one document per level
    assert fidelity.check_fractions([0.25, 1]) == [0.25, 1.0]
    for bad, needle in (([0.5, 0.2, 1.0], "increase"), ([0.1, 0.5], "last level must be 1.0"), ([], "list"),
                        ([0, 1.0], "increase")):
        with pytest.raises(UserError, match=needle):
            fidelity.check_fractions(bad)


def test_a_metric_that_is_not_a_mean_is_refused():
    class Task:
        task_name = "corpus_bleu_task"

        class config:
            filter_list = None

        @staticmethod
        def aggregation():
            def bleu(items):
                return 0.0

            return {"f1": bleu}

    with pytest.raises(UserError, match="aggregates by 'bleu', not a mean"):
        fidelity._preferred(Task())


# --------------------------------------------------------------------------- winners and fronts
ROWS = [
    {"trial": 0, "state": "COMPLETE", "avg_acc": 0.50, "ppl/x": 9.0, "model_size_mb": 80},
    {"trial": 1, "state": "COMPLETE", "avg_acc": 0.60, "ppl/x": 12.0, "model_size_mb": 70},
    {"trial": 2, "state": "PRUNED", "avg_acc": None, "estimate/avg_acc": 0.9},
    {"trial": 3, "state": "COMPLETE", "avg_acc": 0.60, "ppl/x": 11.0, "model_size_mb": 90},
    {"trial": 4, "state": "FAIL"},
    {"trial": 5, "state": "COMPLETE", "avg_acc": 0.40, "ppl/x": 9.0, "model_size_mb": 60},
]


def test_winners_are_argmax_and_argmin_over_completed_trials_lowest_number_on_ties():
    winners = report.pick_winners(ROWS, "ppl/x")
    assert winners["best_acc"]["trial"] == 1  # 0.60 twice: the earlier trial; the pruned 0.9 never wins
    assert winners["best_ppl"]["trial"] == 0  # 9.0 twice: the earlier trial
    assert report.pick_winners(ROWS, None).keys() == {"best_acc"}


def test_pareto_fronts():
    front = report.pareto_front(ROWS, "avg_acc", "ppl/x")
    assert [r["trial"] for r in front] == [0, 3]  # 5 is dominated by 0, 1 by 3
    front = report.pareto_front(ROWS, "avg_acc", "model_size_mb")
    assert [r["trial"] for r in front] == [5, 1]


def test_trials_that_take_a_slot():
    import optuna
    from optuna.trial import TrialState, create_trial

    from mlproject.search.trials import counted, tally

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, params={"x": 0.1}, distributions=dist))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"x": 0.2}, distributions=dist))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.3}, distributions=dist,
                                 user_attrs={"error": "boom"}))  # raised: counts
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.4}, distributions=dist))  # heartbeat: no
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist,
                                 user_attrs={"surplus": True}))
    study.ask()  # running (asked before the waiting trial exists: ask() would pop it)
    study.add_trial(create_trial(state=TrialState.WAITING, params={"x": 0.4}, distributions=dist))  # its retry
    assert [counted(t) for t in study.get_trials()] == [True, True, True, False, False, True, True]
    assert tally(study) == {"done": 3, "running": 1, "waiting": 1}


def test_space_overrides_objectives_and_names_the_study_after_them(tmp_path, tiny_dirs):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"params: {{model: {tiny_dirs['llama']}}}\nsteps:\n  q: {{step: quantize, group_size: 32}}\n")
    raw = {"name": "s", "pipeline": str(pipe), "params": {"q.w_bits": {"int": [3, 8], "step": 2}},
           "objectives": ["best_acc", "best_ppl"]}
    pareto = space_mod.parse(raw)
    assert pareto.pareto and not pareto.pruning and pareto.fractions == [1.0]
    assert space_mod.study_name(pareto) == "s-llama"
    one = space_mod.parse(raw, objectives="best_ppl")
    assert one.pruner == {"type": "wilcoxon"} and one.fractions == space_mod.DEFAULT_LEVELS
    assert space_mod.study_name(one) == "s-llama-best_ppl" and one.fingerprint() != pareto.fingerprint()
    assert pareto.params["q.w_bits"].check_values() == [3, 7]  # the top end on the step grid
    assert space_mod.assignments(pareto) == [{"q.w_bits": 3}, {"q.w_bits": 7}]
    assert pareto.trial_overrides({"q.w_bits": 5})[-2:] == ["q.w_bits=5", "q.evaluate=false"]


def test_the_study_is_named_after_the_model_at_the_root_of_the_target_chain(tmp_path, tiny_dirs):
    pipe = tmp_path / "chain.yaml"
    pipe.write_text(f"params: {{model: {tiny_dirs['llama']}}}\nsteps:\n  p: {{step: prune}}\n"
                    "  q: {step: quantize, model: '${p.model_uri}', group_size: 32}\n")
    space = space_mod.parse({"name": "chain", "pipeline": str(pipe), "params": {"q.w_bits": [3, 4]}})
    assert space.target == "q" and space.steps == ["p", "q"]
    assert space.model == str(tiny_dirs["llama"]) and space_mod.study_name(space) == "chain-llama"


def test_local_workers_sample_with_their_own_seeds(tmp_path, tiny_dirs):
    """Two workers with one seed drew the same first configurations at the same time."""
    from mlproject.search import workers

    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"params: {{model: {tiny_dirs['llama']}}}\nsteps:\n  q: {{step: quantize, group_size: 32}}\n")
    space = space_mod.parse({"name": "s", "pipeline": str(pipe), "params": {"q.w_bits": {"int": [2, 8]}},
                             "sampler": {"type": "tpe", "seed": 5}})
    spaces = [workers.worker_space(space, i) for i in range(3)]
    assert [s.sampler["seed"] for s in spaces] == [5, 6, 7] and spaces[0] is space
    assert len({s.fingerprint() for s in spaces}) == 1  # still one study
    import optuna

    firsts = [optuna.create_study(sampler=s.sampler_object()).ask().suggest_int("x", 0, 10_000) for s in spaces]
    assert len(set(firsts)) == 3  # the seeds draw different first values
    unseeded = space_mod.parse({"name": "s", "pipeline": str(pipe), "params": {"q.w_bits": {"int": [2, 8]}},
                                "sampler": {"type": "random"}})
    assert workers.worker_space(unseeded, 1) is unseeded
