"""The search step on tiny models, a real `mlflow server` and real Optuna storages: trials are
pipeline runs nested in the study run, winners are exactly the argmax / argmin and load through
models:/, workers share one study, a killed worker's trial is retried, failing and pruned trials
are recorded as such, trials reuse each other's steps, and bad spaces are refused up front."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import mlflow_client
from mlproject import cli
from mlproject.models import loading

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent


def make_pipeline(tmp_path, tiny_dirs, ppl_text_file):
    """prune → RTN quantize on the tiny Llama (and an evaluate step that feeds nothing); the
    search scores the quantized model."""
    path = tmp_path / "tinychain.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tinychain
        params:
          model: {tiny_dirs['llama']}
          tasks: mlp_nonce
          ppl_dataset: {ppl_text_file}
          seqlen: 32
          batch_size: 16
        steps:
          pruned:
            step: prune
            ratio: 0.2
            calibration_samples: 2
            calibration_seqlen: 32
          quant:
            step: quantize
            model: ${{pruned.model_uri}}
            method: rtn
            w_bits: 4
            granularity: per_channel
          base:
            step: evaluate
            role: base
        """))
    return path


@pytest.fixture
def pipeline_file(tmp_path, tiny_dirs, ppl_text_file):
    return make_pipeline(tmp_path, tiny_dirs, ppl_text_file)


def write_space(tmp_path, pipeline_file, params: dict, **extra) -> Path:
    doc = {"name": "tiny", "pipeline": str(pipeline_file), "target": "quant", "params": params,
           "objectives": ["best_acc", "best_ppl"], "n_trials": 4, "sampler": {"type": "tpe", "seed": 0},
           **extra}
    path = tmp_path / f"space-{len(list(tmp_path.glob('space-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def search(uri, experiment, space, storage, *argv):
    # winners registered as logged (test_export tests their export as weights): no 14.5 GB-style copies here
    weights = [] if "--register-weights" in argv else ["--register-weights", "false"]
    return cli.main(["search", str(space), "--tracking-uri", uri, "--experiment", experiment, "--storage", storage,
                     "--study", experiment, *weights, *map(str, argv)])


def runs_of(uri, experiment):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def study_run(uri, experiment):
    (run,) = [r for r in runs_of(uri, experiment) if r.data.tags.get("mlproject.step") == "search"]
    return run


def trial_runs(uri, experiment):
    return {int(r.data.tags["mlproject.trial"]): r for r in runs_of(uri, experiment)
            if "mlproject.trial" in r.data.tags}


def children(uri, run):
    client = mlflow_client(uri)
    kids = client.search_runs([run.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return {k.data.tags.get("mlproject.pipeline_step"): k for k in kids}


def load_study(storage, name):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


class LoadCounter:
    def __init__(self, monkeypatch):
        self.calls = []
        original = loading.load_model

        def load(ref, *a, **k):
            self.calls.append(ref.raw)
            return original(ref, *a, **k)

        monkeypatch.setattr(loading, "load_model", load)


# --------------------------------------------------------------------------- a whole search
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dirs, ppl_text_file, mlflow_uri):
    """A 4-trial Pareto search (best_acc + best_ppl) over the RTN bits and the prune ratio."""
    tmp = tmp_path_factory.mktemp("search")
    pipe = make_pipeline(tmp, tiny_dirs, ppl_text_file)
    space = write_space(tmp, pipe, {"quant.w_bits": {"int": [2, 8]}, "pruned.ratio": [0.1, 0.2]})
    storage = f"sqlite:///{tmp}/optuna.db"
    assert search(mlflow_uri, "search-full", space, storage) == 0
    return {"storage": storage, "tmp": tmp, "space": space}


def test_search_records_a_study_of_pipeline_trials(finished, mlflow_uri):
    from optuna.trial import TrialState

    srun = study_run(mlflow_uri, "search-full")
    assert srun.info.status == "FINISHED" and srun.info.run_name == "search:search-full"
    trials = trial_runs(mlflow_uri, "search-full")
    study = load_study(finished["storage"], "search-full")
    assert sorted(trials) == [t.number for t in study.trials] == [0, 1, 2, 3]
    for t in study.trials:
        run = trials[t.number]
        assert t.state == TrialState.COMPLETE and run.data.tags["mlproject.trial_state"] == "COMPLETE"
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == srun.info.run_id and run.info.status == "FINISHED"
        # the trial run is the pipeline run: the target and what it depends on are its children
        kids = children(mlflow_uri, run)
        assert set(kids) == {"pruned", "quant"}  # `base` does not feed the target: not run
        # the steps ran without their own evaluation; the trial scored the target's model
        assert "avg_acc" not in kids["quant"].data.metrics and kids["quant"].data.params["evaluate"] == "false"
        assert run.data.params["trial.quant.w_bits"] == str(t.params["quant.w_bits"])
        assert kids["quant"].data.params["w_bits"] == str(t.params["quant.w_bits"])
        assert t.values == [run.data.metrics["avg_acc"], run.data.metrics["ppl/sample"]]
        # every mlp_nonce document (no pruner in a Pareto study), or none when the sampler proposed
        # a configuration again and the earlier trial's scores were taken
        copied = run.data.tags.get("mlproject.eval_reused_trial")
        assert run.data.metrics["system/search/documents"] == (200 if copied is None else 0)
        if copied is not None:
            assert study.trials[int(copied)].params == t.params and study.trials[int(copied)].values == t.values
    client = mlflow_client(mlflow_uri)
    files = {a.path for a in client.list_artifacts(srun.info.run_id)}
    assert {"trials.csv", "trials.md", "pareto.csv", "pareto.md", "pareto.png", "history.png", "importances.csv",
            "report.md", "space.yaml"} <= files
    assert srun.data.metrics["system/search/trials_complete"] == 4
    # the run page's description names the study, its counts and the winners' runs
    note = srun.data.tags["mlflow.note.content"]
    assert note.startswith("**search search-full**") and "4 complete" in note and "### Trials" not in note
    assert "best_acc" in note and "best_ppl" in note
    import pandas as pd

    table = pd.read_csv(client.download_artifacts(srun.info.run_id, "trials.csv"))
    assert list(table["trial"]) == [0, 1, 2, 3] and set(table["state"]) == {"COMPLETE"}
    assert list(table["avg_acc"]) == [trials[n].data.metrics["avg_acc"] for n in range(4)]
    imp = pd.read_csv(client.download_artifacts(srun.info.run_id, "importances.csv"))
    assert set(imp["objective"]) == {"best_acc", "best_ppl"}
    assert set(imp["parameter"]) == {"quant.w_bits", "pruned.ratio"}


def test_winners_are_exactly_the_argmax_and_argmin(finished, mlflow_uri):
    trials = trial_runs(mlflow_uri, "search-full")
    done = {n: r for n, r in trials.items() if r.data.tags["mlproject.trial_state"] == "COMPLETE"}
    best_acc = min(done, key=lambda n: (-done[n].data.metrics["avg_acc"], n))
    best_ppl = min(done, key=lambda n: (done[n].data.metrics["ppl/sample"], n))
    for n, run in trials.items():
        roles = [r for r, w in (("best_acc", best_acc), ("best_ppl", best_ppl)) if w == n]
        assert run.data.tags["mlproject.role"] == (",".join(roles) or "trial")
        assert run.data.tags.get("mlproject.best_acc", "false") == str(n == best_acc).lower()
    client = mlflow_client(mlflow_uri)
    for role, n in (("best_acc", best_acc), ("best_ppl", best_ppl)):
        mv = client.get_model_version_by_alias("search-full", role)
        assert mv.run_id == done[n].data.tags["mlproject.target_run"]
        assert mv.tags["mlproject.trial"] == str(n) and mv.tags["mlproject.study"] == "search-full"
        assert float(mv.tags["metric.avg_acc"]) == pytest.approx(done[n].data.metrics["avg_acc"], rel=1e-5)


def test_the_winner_loads_through_models_uri_in_evaluate(finished, mlflow_uri, ppl_text_file, capsys):
    trials = trial_runs(mlflow_uri, "search-full")
    winner = next(r for r in trials.values() if "best_acc" in r.data.tags["mlproject.role"])
    rc = cli.main(["evaluate", "--model", "models:/search-full@best_acc", "--tasks", "mlp_nonce",
                   "--ppl-dataset", str(ppl_text_file), "--seqlen", "32", "--batch-size", "16",
                   "--tracking-uri", mlflow_uri, "--experiment", "search-full-eval"])
    assert rc == 0
    (run,) = runs_of(mlflow_uri, "search-full-eval")
    # the search scored every document and window, as the evaluate step does: same numbers
    assert run.data.metrics["avg_acc"] == pytest.approx(winner.data.metrics["avg_acc"], abs=1e-9)
    assert run.data.metrics["ppl/sample"] == pytest.approx(winner.data.metrics["ppl/sample"], rel=1e-5)
    assert run.data.tags["mlproject.upstream_run"] == winner.data.tags["mlproject.target_run"]


def test_same_study_name_resumes_and_extends(finished, mlflow_uri):
    srun = study_run(mlflow_uri, "search-full")
    assert search(mlflow_uri, "search-full", finished["space"], finished["storage"], "--n-trials", 5) == 0
    study = load_study(finished["storage"], "search-full")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert study_run(mlflow_uri, "search-full").info.run_id == srun.info.run_id  # the same study run
    assert trial_runs(mlflow_uri, "search-full")[4].data.tags["mlflow.parentRunId"] == srun.info.run_id


# --------------------------------------------------------------------------- reuse, pruning, failure
def test_trials_sharing_a_prefix_reuse_its_step(tmp_path, pipeline_file, mlflow_uri, tiny_dirs, monkeypatch):
    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.2], "quant.w_bits": [3, 4]},
                        objectives=["best_ppl"], n_trials=2, sampler={"type": "bruteforce", "seed": 0},
                        pruner={"type": "none"})
    loads = LoadCounter(monkeypatch)
    monkeypatch.setattr(loading, "LOADS", [])
    # (winners registered as recipes: materializing them as weights would load them again)
    assert search(mlflow_uri, "search-reuse", space, f"sqlite:///{tmp_path}/optuna.db",
                  "--register-weights", "false") == 0
    trials = trial_runs(mlflow_uri, "search-reuse")
    first, second = children(mlflow_uri, trials[0]), children(mlflow_uri, trials[1])
    assert "mlproject.reused_from" not in first["pruned"].data.tags
    assert second["pruned"].data.tags["mlproject.reused_from"] == first["pruned"].info.run_id
    assert "mlproject.reused_from" not in second["quant"].data.tags  # other bits: recomputed
    # each trial asked for the pruned model (quantize) and its quantized model (scoring); the
    # checkpoint was read once per trial: by the first trial's prune step (its outputs were handed
    # on in memory), and by the second trial's quantize, re-making the reused pruned model's recipe
    pruned_uri = f"runs:/{first['pruned'].info.run_id}/model"
    assert loads.calls.count(pruned_uri) == 2
    assert loading.LOADS == [str(tiny_dirs["llama"])] * 2


def test_a_trial_that_raises_fails_and_the_study_goes_on(tmp_path, pipeline_file, mlflow_uri, monkeypatch):
    from optuna.trial import TrialState

    from mlproject.compression import rtn

    original = rtn.quantize_model

    def sometimes(model, cfg):
        if cfg.w_bits == 3:
            raise RuntimeError("NaN in the 3-bit grid")
        return original(model, cfg)

    monkeypatch.setattr(rtn, "quantize_model", sometimes)
    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.2], "quant.w_bits": [3, 4, 8]},
                        objectives=["best_acc"], n_trials=3, sampler={"type": "bruteforce", "seed": 0},
                        pruner={"type": "none"})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert search(mlflow_uri, "search-fail", space, storage) == 0
    study = load_study(storage, "search-fail")
    assert len(study.trials) == 3
    (failed,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed.params["quant.w_bits"] == 3 and "NaN in the 3-bit grid" in failed.user_attrs["error"]
    run = trial_runs(mlflow_uri, "search-fail")[failed.number]
    assert run.info.status == "FAILED" and run.data.tags["mlproject.trial_state"] == "FAIL"
    assert "NaN in the 3-bit grid" in run.data.tags["mlproject.error"]
    assert children(mlflow_uri, run)["quant"].info.status == "FAILED"
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert study.user_attrs["winners"]["best_acc"]["trial"] != failed.number
    assert not [r for r in runs_of(mlflow_uri, "search-fail") if r.info.status == "RUNNING"]


def test_a_poor_trial_is_pruned_after_its_first_level(tmp_path, pipeline_file, mlflow_uri):
    from optuna.trial import TrialState

    # median pruner: a trial worse than the median of the completed ones at a level stops there;
    # 2-bit RTN ruins the tiny model's PPL, 8-bit barely changes it
    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.2], "quant.w_bits": [8, 2]},
                        objectives=["best_ppl"], n_trials=3, sampler={"type": "random", "seed": 6},
                        pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                        fidelity={"levels": [0.25, 1.0], "seed": 0})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert search(mlflow_uri, "search-prune", space, storage) == 0
    study = load_study(storage, "search-prune")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and len(study.trials) == 3
    runs = trial_runs(mlflow_uri, "search-prune")
    full = runs[complete[0].number].data.metrics["system/search/documents"]
    for t in pruned:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["mlproject.trial_state"] == "PRUNED"
        assert t.params["quant.w_bits"] == 2 and list(t.intermediate_values) == [25]
        assert run.data.metrics["system/search/documents"] == 50 < full == 200  # a quarter of the documents
        assert "ppl/sample" not in run.data.metrics  # a pruned trial has estimates only
        assert run.data.metrics["fidelity/ppl/sample"] == pytest.approx(t.intermediate_values[25])
        # it was worse than the completed trials at that level: the median pruner's rule
        earlier = [c.intermediate_values[25] for c in complete if c.number < t.number]
        assert earlier and t.intermediate_values[25] > min(earlier)
    assert study.user_attrs["winners"]["best_ppl"]["trial"] in [t.number for t in complete]


# --------------------------------------------------------------------------- workers and faults
def _cli_env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_workers_share_one_study(tmp_path, pipeline_file, mlflow_uri):
    from optuna.trial import TrialState

    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.1, 0.2], "quant.w_bits": {"int": [2, 8]}},
                        objectives=["best_acc"], n_trials=5, pruner={"type": "none"})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert search(mlflow_uri, "search-workers", space, storage, "--workers", 2) == 0
    study = load_study(storage, "search-workers")
    counted = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert len(counted) == 5 and all(t.state == TrialState.COMPLETE for t in counted)
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers)
    runs = trial_runs(mlflow_uri, "search-workers")
    assert sorted(runs) == sorted(t.number for t in counted)  # one run per trial, none lost
    srun = study_run(mlflow_uri, "search-workers")
    assert all(r.data.tags["mlflow.parentRunId"] == srun.info.run_id for r in runs.values())
    assert all(r.info.status == "FINISHED" for r in runs.values()) and srun.info.status == "FINISHED"


def test_a_killed_worker_is_failed_by_heartbeat_and_its_trial_retried(tmp_path, pipeline_file, mlflow_uri):
    from optuna.trial import TrialState

    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.1, 0.2], "quant.w_bits": {"int": [2, 8]}},
                        objectives=["best_acc"], n_trials=3, pruner={"type": "none"})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    argv = [sys.executable, "-m", "mlproject", "search", str(space), "--tracking-uri", mlflow_uri,
            "--experiment", "search-kill", "--storage", storage, "--study", "search-kill", "--heartbeat", "1"]
    proc = subprocess.Popen(argv, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                study = load_study(storage, "search-kill")
            except Exception:  # not created yet
                time.sleep(0.5)
                continue
            running = [t for t in study.trials if t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")]
            if running:
                killed = running[0]
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed is not None, "the worker never started a trial"
    client = mlflow_client(mlflow_uri)
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # what SIGKILL leaves
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    assert search(mlflow_uri, "search-kill", space, storage, "--heartbeat", 1) == 0
    study = load_study(storage, "search-kill")
    stale = study.trials[killed.number]
    assert stale.state == TrialState.FAIL and "error" not in stale.user_attrs
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == killed.params
    counted = [t for t in study.trials if t.state != TrialState.FAIL]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "heartbeat" in dead.data.tags["mlproject.error"]
    assert dead.data.tags["mlproject.trial_state"] == "FAIL"
    assert trial_runs(mlflow_uri, "search-kill")[retry[0].number].data.tags["mlproject.retry_of"] == str(killed.number)
    assert not [r for r in runs_of(mlflow_uri, "search-kill") if r.info.status == "RUNNING"]


def test_journal_storage(tmp_path, pipeline_file, mlflow_uri):
    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.2], "quant.w_bits": [4, 8]},
                        objectives=["best_acc"], n_trials=2, sampler={"type": "bruteforce", "seed": 0},
                        pruner={"type": "none"})
    storage = f"journal:{tmp_path}/optuna.log"
    assert search(mlflow_uri, "search-journal", space, storage) == 0
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    import optuna

    study = optuna.load_study(study_name="search-journal",
                              storage=JournalStorage(JournalFileBackend(f"{tmp_path}/optuna.log")))
    assert len(study.trials) == 2 and study.user_attrs["winners"]["best_acc"]["registered"] == \
        "models:/search-journal@best_acc"


# --------------------------------------------------------------------------- bad spaces
BAD_SPACES = {
    "unknown step": ({"params": {"quantt.w_bits": [3, 4]}}, "no step 'quantt' (did you mean 'quant'?)"),
    "unknown parameter": ({"params": {"quant.w_bit": [3, 4]}}, "has no parameter 'w_bit' (did you mean 'w_bits'?)"),
    "empty range": ({"params": {"quant.w_bits": {"int": [6, 3]}}}, "empty range [6, 3]"),
    "empty choices": ({"params": {"quant.w_bits": []}}, "non-empty list"),
    "refused value": ({"params": {"quant.w_bits": [3, 9]}}, "quant.w_bits=9"),
    # the prune step's own pre-run check against the tiny model's 2 layers (no weights loaded)
    "refused by a step's check": ({"params": {"pruned.keep_layers": {"int": [0, 1]}}}, "keeps all 2 decoder layers"),
    "refused range end": ({"params": {"pruned.ratio": {"float": [0.1, 1.5]}}}, "ratio"),
    "step not feeding the target": ({"params": {"base.seqlen": [16, 32]}}, "does not feed the target"),
    "pruner in a Pareto study": ({"pruner": {"type": "wilcoxon"}}, "pruners are single-objective"),
    "unknown objective": ({"objectives": ["best_loss"]}, "objective 'best_loss'"),
    "unknown key": ({"paramz": {}}, "unknown key 'paramz' (did you mean 'params'?)"),
    "bad levels": ({"fidelity": {"levels": [0.5, 0.2, 1.0]}}, "fractions must increase"),
    "bad sampler argument": ({"sampler": {"type": "tpe", "n_startup": 3}}, "sampler tpe"),
    "target without a model": ({"target": "base"}, "produces no model"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_bad_space_exit_2_before_any_trial_or_run(case, tmp_path, pipeline_file, mlflow_uri, capsys, monkeypatch):
    change, needle = BAD_SPACES[case]
    doc = {"name": "bad", "pipeline": str(pipeline_file), "target": "quant",
           "params": {"quant.w_bits": [3, 4]}, "objectives": ["best_acc", "best_ppl"], **change}
    doc = {k: v for k, v in doc.items() if not (k == "params" and "paramz" in change)}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))

    def must_not_load(*a, **k):
        raise AssertionError("weights loaded despite a bad space")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    exp = "search-bad-" + case.replace(" ", "-")
    assert search(mlflow_uri, exp, path, f"sqlite:///{tmp_path}/optuna.db") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    assert runs_of(mlflow_uri, exp) == []
    assert not (tmp_path / "optuna.db").exists()  # no study either


def test_malformed_space_file(tmp_path, mlflow_uri, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("params: {a: [1, 2\n")
    assert search(mlflow_uri, "search-bad-yaml", path, f"sqlite:///{tmp_path}/optuna.db") == 2
    assert "malformed YAML" in capsys.readouterr().err


SHIPPED = sorted((ROOT / "pipelines" / "spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_space_loads_and_dry_runs_offline(path, tmp_path, mlflow_uri, tiny_dirs, ppl_text_file, capsys,
                                                  monkeypatch):
    from mlproject.search import space as space_mod

    raw = yaml.safe_load(path.read_text())
    assert path.read_text().startswith(f"# {path.stem} — ") and "mlproject search" in path.read_text()
    shipped = space_mod.load(str(path))  # as shipped: names, distributions, objectives
    assert shipped.params and shipped.objectives
    overrides = [f"model={tiny_dirs['llama']}", "tasks=mlp_nonce", f"ppl_dataset={ppl_text_file}", "seqlen=32"]
    overrides += [f"{n}.dataset=offline:sft_mlp_nonce" for n in shipped.steps
                  if shipped.pipe.steps[n].step == "finetune"]
    overrides += [f"{n}.calibration=offline" for n in shipped.steps
                  if shipped.pipe.steps[n].step in ("prune", "quantize")]
    monkeypatch.chdir(ROOT)
    LoadCounter(monkeypatch)
    assert cli.main(["search", str(path), "--dry-run", "--set", " ".join(overrides), "--tracking-uri", mlflow_uri,
                     "--storage", f"sqlite:///{tmp_path}/optuna.db", "--experiment", "search-shipped"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and all(f"| {name} |" in out for name in raw["params"])
    assert runs_of(mlflow_uri, "search-shipped") == []


@pytest.mark.slow
def test_mlflow_run_search_entry_point(tmp_path, pipeline_file, mlflow_uri):
    """`mlflow run . -e search` from a copy of the project: the study run is the run MLflow created."""
    import shutil

    from test_project import mlflow_run, tracked_files

    clone = tmp_path / "clone"
    for f in tracked_files():
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, clone / f)
    space = write_space(tmp_path, pipeline_file, {"pruned.ratio": [0.2], "quant.w_bits": [4, 8]},
                        objectives=["best_acc"], n_trials=2, sampler={"type": "bruteforce", "seed": 0},
                        pruner={"type": "none"})
    out = mlflow_run(clone, mlflow_uri, "search-mlflow-run", "search", space=space,
                     storage=f"sqlite:///{tmp_path}/optuna.db", study="search-mlflow-run")
    assert out.returncode == 0, out.stderr[-3000:]
    srun = study_run(mlflow_uri, "search-mlflow-run")
    assert srun.info.status == "FINISHED" and srun.data.params["space"] == str(space)
    trials = trial_runs(mlflow_uri, "search-mlflow-run")
    assert sorted(trials) == [0, 1]
    assert all(r.data.tags["mlflow.parentRunId"] == srun.info.run_id for r in trials.values())
    mv = mlflow_client(mlflow_uri).get_model_version_by_alias("search-mlflow-run", "best_acc")
    assert mv.tags["mlproject.study"] == "search-mlflow-run"


def test_hub_data_of_the_pipeline_is_checked_before_any_trial(tmp_path, mlflow_uri, tiny_dirs, ppl_text_file,
                                                               capsys, monkeypatch):
    # compress_recover's defaults calibrate on wikitext2 and recover on yahma/alpaca-cleaned, both
    # from the hub: offline and not cached, the search refuses up front instead of failing every
    # trial after its pruning (the hub is never asked: offline mode, and a cache of our own).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.chdir(ROOT)

    def must_not_load(*a, **k):
        raise AssertionError("weights loaded despite data that cannot be had")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    space = ROOT / "pipelines" / "spaces" / "compress_recover.yaml"
    base = [f"model={tiny_dirs['llama']}", "tasks=mlp_nonce", f"ppl_dataset={ppl_text_file}", "seqlen=32"]
    cases = (([], "step 'pruned' (prune): calibration 'wikitext2' (wikitext, wikitext-2-raw-v1) is not in the "
                  "local datasets cache"),
             (["pruned.calibration=offline"], "step 'recovered' (finetune): dataset 'yahma/alpaca-cleaned' is not "
                                              "in the local datasets cache"))
    for extra, needle in cases:
        exp = f"search-hubdata-{len(extra)}"
        storage = tmp_path / f"optuna-{len(extra)}.db"
        assert cli.main(["search", str(space), "--set", " ".join(base + extra), "--tracking-uri", mlflow_uri,
                         "--storage", f"sqlite:///{storage}", "--experiment", exp]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1] and "HF_HUB_OFFLINE=1" in err[-1], err[-1]
        assert runs_of(mlflow_uri, exp) == [] and not storage.exists()


def test_the_targets_own_scoring_data_is_checked_before_any_trial(tmp_path, mlflow_uri, tiny_dirs, capsys,
                                                                 monkeypatch):
    # Trials run their steps with the steps' own evaluation off and score the target themselves,
    # so the target's PPL text is checked by the search's plan (wikitext2 offline, not cached).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    space = ROOT / "pipelines" / "spaces" / "compress_recover.yaml"
    sets = [f"model={tiny_dirs['llama']}", "tasks=mlp_nonce", "ppl_dataset=wikitext2", "seqlen=32",
            "pruned.calibration=offline", "recovered.dataset=offline:sft_mlp_nonce"]
    storage = tmp_path / "optuna.db"
    assert cli.main(["search", str(space), "--set", " ".join(sets), "--tracking-uri", mlflow_uri,
                     "--storage", f"sqlite:///{storage}", "--experiment", "search-target-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "ppl_dataset 'wikitext2'" in err and "not in the local datasets cache" in err
    assert runs_of(mlflow_uri, "search-target-data") == [] and not storage.exists()


def test_a_target_generation_task_longer_than_the_context_is_refused_before_any_trial(
        tmp_path, mlflow_uri, ppl_text_file, tiny_dirs, capsys, monkeypatch):
    # The tiny model has 256 positions; the trial's own scoring would generate up to 256 tokens.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    space = ROOT / "pipelines" / "spaces" / "compress_recover.yaml"
    sets = [f"model={tiny_dirs['llama']}", "tasks=code_offline", f"ppl_dataset={ppl_text_file}", "seqlen=32",
            "pruned.calibration=offline", "recovered.dataset=offline:sft_mlp_nonce"]
    storage = tmp_path / "optuna.db"
    assert cli.main(["search", str(space), "--set", " ".join(sets), "--tracking-uri", mlflow_uri,
                     "--storage", f"sqlite:///{storage}", "--experiment", "search-target-context"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "has a context of 256 tokens, but task code_offline generates up to 256" in err
    assert runs_of(mlflow_uri, "search-target-context") == [] and not storage.exists()


def test_a_failed_heartbeat_write_does_not_stop_the_beating(tmp_path, monkeypatch):
    """Optuna's heartbeat thread has no try around its write: one error (a database restart)
    would end it and get a live trial failed as stale. The storage search opens keeps beating."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.storages._heartbeat import get_heartbeat_thread

    from mlproject.search.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/hb.db", heartbeat=1)
    study = optuna.create_study(storage=storage, study_name="hb")
    trial = study.ask()
    calls = []
    original = RDBStorage.record_heartbeat

    def flaky(self, trial_id):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("server closed the connection unexpectedly")
        return original(self, trial_id)

    monkeypatch.setattr(RDBStorage, "record_heartbeat", flaky)
    thread = get_heartbeat_thread(trial._trial_id, storage)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        thread.join()
    assert len(calls) >= 3  # the thread survived the failed first write and went on beating
    assert not storage._get_stale_trial_ids(study._study_id)
