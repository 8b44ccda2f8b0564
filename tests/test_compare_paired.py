"""Flips and paired significance in compare: two runs scored on the same documents are compared
document by document (``compare.tables.paired``) instead of by two independent standard errors.

RunSets are built with ``RunSet.from_records`` and given ``documents`` by hand (what
``query.fetch_documents`` reads from ``eval/documents.parquet``); the p-values are checked against
an independent computation (the exact binomial sum with ``math.comb``; scipy's ``ttest_rel`` on
hand-built differences). The last tests download real artifacts from a real ``mlflow server``.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mlproject.compare import CompareSpec, RunSet, compute
from mlproject.compare import directions as dirs
from mlproject.compare.tables.paired import ALPHA, MCNEMAR, PAIRED_T, STDERR, paired_tests

PNG = b"\x89PNG\r\n\x1a\n"


def rid(i: int) -> str:
    return f"{i:032x}"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar: 2 · P(X ≤ min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def outcomes(both_right: int, both_wrong: int, c2w: int, w2c: int) -> tuple[list[int], list[int]]:
    """Baseline and candidate 0/1 answers with exactly these counts (in a mixed order)."""
    pairs = ([(1, 1)] * both_right + [(0, 0)] * both_wrong + [(1, 0)] * c2w + [(0, 1)] * w2c)
    pairs = pairs[::2] + pairs[1::2]
    return [b for b, _ in pairs], [c for _, c in pairs]


def docs(run: str, task: str, values, *, group: str | None = None, metric: str = "acc",
         hashes=None, start: int = 0) -> list[dict]:
    return [{"run_id": run, "task": task, "group": group or task, "doc_id": start + i,
             "doc_hash": (hashes[i] if hashes else f"{task}-{start + i:04d}"), "metric": metric,
             "value": float(v)} for i, v in enumerate(values)]


def runset(runs: list[dict], documents: list[dict] | None) -> RunSet:
    recs = []
    for i, r in enumerate(runs):
        r = dict(r)
        r.setdefault("run_id", rid(i + 1))
        r.setdefault("start_time", 1000 + i)
        r["tags"] = {f"mlproject.{k}": v for k, v in r.pop("tags", {}).items()}
        recs.append(r)
    rs = RunSet.from_records(recs)
    if documents is not None:
        rs.documents = pd.DataFrame(documents)
    return rs


def spec(**kw) -> CompareSpec:
    return CompareSpec.from_params(**kw)


def mean(values) -> float:
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- McNemar

def test_flips_and_mcnemar_equal_a_hand_computation():
    """boolq: 10 c→w, 1 w→c (p = 2·12/2048 ≈ 0.0117: significant) although the logged standard
    errors call the 18-point drop n.s.; piqa: 3 c→w, 9 w→c (p ≈ 0.146: not significant)."""
    b1, c1 = outcomes(30, 9, 10, 1)
    b2, c2 = outcomes(40, 8, 3, 9)
    se = {"boolq/acc_stderr": 0.1, "piqa/acc_stderr": 0.1}
    rs = runset([
        {"run_name": "base", "metrics": {"boolq/acc": mean(b1), "piqa/acc": mean(b2), **se}},
        {"run_name": "q4", "metrics": {"boolq/acc": mean(c1), "piqa/acc": mean(c2), **se}},
    ], docs(rid(1), "boolq", b1) + docs(rid(2), "boolq", c1)
       + docs(rid(1), "piqa", b2) + docs(rid(2), "piqa", c2))
    res = compute(rs, spec(view="versus", baseline="name:base"))
    vs = res.tables["versus"].set_index("task")

    boolq = vs.loc["boolq"]
    assert (boolq["n_pairs"], boolq["both_right"], boolq["both_wrong"]) == (50, 30, 9)
    assert (boolq["correct_to_wrong"], boolq["wrong_to_correct"]) == (10, 1)
    assert boolq["correct_to_wrong_rate"] == pytest.approx(10 / 50)
    assert boolq["wrong_to_correct_rate"] == pytest.approx(1 / 50)
    assert boolq["flip_rate"] == pytest.approx(11 / 50)
    assert boolq["p_value"] == pytest.approx(mcnemar_exact(10, 1), rel=1e-12)
    assert mcnemar_exact(10, 1) < ALPHA
    assert boolq["test"] == MCNEMAR and bool(boolq["significant"]) is True
    # the independent-stderr rule would have called it n.s.: |Δ| = 0.18 < 2·√2·0.1 ≈ 0.28
    assert abs(boolq["delta"]) < 2 * boolq["stderr"]

    piqa = vs.loc["piqa"]
    assert (piqa["n_pairs"], piqa["correct_to_wrong"], piqa["wrong_to_correct"]) == (60, 3, 9)
    assert piqa["p_value"] == pytest.approx(mcnemar_exact(3, 9), rel=1e-12)
    assert piqa["test"] == MCNEMAR and bool(piqa["significant"]) is False
    # the mean accuracy keeps the standard-error rule (here: no stderr, so N/A)
    assert vs.loc["mean", "significant"] is pd.NA and vs.loc["mean", "test"] is None

    summ = res.tables["versus_summary"].iloc[0]
    assert (summ["n_pairs"], summ["correct_to_wrong"], summ["wrong_to_correct"]) == (110, 13, 10)
    assert summ["n_significant"] == 1

    md = res.markdown()
    assert "| Flips (c→w / w→c) | Significant |" in md
    assert f"| 10 / 1 | yes (McNemar p={mcnemar_exact(10, 1):.3f}) |" in md
    assert f"| 3 / 9 | no (McNemar p={mcnemar_exact(3, 9):.3f}) |" in md
    assert "Flips over 110 paired documents: 13 correct → wrong, 10 wrong → correct" in md
    assert "McNemar test on the discordant documents" in md
    assert "<th>Flips (c→w / w→c)</th>" in res.html()


@pytest.mark.parametrize("counts, p, significant", [
    ((25, 5, 0, 0), 1.0, False),   # every answer the same: b = c = 0 → p = 1, not significant
    ((0, 0, 6, 0), 2 / 64, True),  # every answer flipped to wrong
    ((0, 0, 0, 6), 2 / 64, True),  # every answer flipped to right
    ((0, 0, 3, 3), 1.0, False),    # every answer flipped, as many each way
])
def test_mcnemar_edges(counts, p, significant):
    b, c = outcomes(*counts)
    assert mcnemar_exact(counts[2], counts[3]) == pytest.approx(p)
    rs = runset([{"run_name": "base", "metrics": {"boolq/acc": mean(b)}},
                 {"run_name": "q4", "metrics": {"boolq/acc": mean(c)}}],
                docs(rid(1), "boolq", b) + docs(rid(2), "boolq", c))
    got = compute(rs, spec(view="versus", baseline="name:base")).tables["versus"].iloc[0]
    assert got["task"] == "boolq" and got["n_pairs"] == sum(counts)
    assert (got["both_right"], got["both_wrong"], got["correct_to_wrong"],
            got["wrong_to_correct"]) == counts
    assert got["p_value"] == pytest.approx(p, rel=1e-12) and got["test"] == MCNEMAR
    assert bool(got["significant"]) is significant


def test_documents_pair_only_when_their_hashes_agree():
    """The candidate scored 4 of the 10 documents in another version of the data set (other
    hashes): only the 6 that agree are paired."""
    b = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    c = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    hashes = [f"h{i}" for i in range(10)]
    other = hashes[:6] + [f"x{i}" for i in range(6, 10)]
    pairs = pd.DataFrame({"candidate_id": [rid(2)], "baseline_id": [rid(1)], "key": ["boolq/acc"]})
    d = pd.DataFrame(docs(rid(1), "boolq", b, hashes=hashes) + docs(rid(2), "boolq", c, hashes=other))
    got = paired_tests(d, pairs).iloc[0]
    assert got["n_pairs"] == 6
    assert (got["both_right"], got["correct_to_wrong"], got["wrong_to_correct"]) == (4, 2, 0)
    assert got["p_value"] == pytest.approx(mcnemar_exact(2, 0))
    # no hash agrees at all: nothing paired, nothing tested
    none = paired_tests(pd.DataFrame(docs(rid(1), "boolq", b, hashes=hashes)
                                     + docs(rid(2), "boolq", c, hashes=[f"y{i}" for i in range(10)])),
                        pairs).iloc[0]
    assert none["n_pairs"] == 0 and none["test"] is None and math.isnan(none["p_value"])


def test_a_group_pairs_its_subtasks_documents_and_metric_names_match_loosely():
    """MMLU: the run logs ``mmlu/acc``; its documents are per subject, with doc ids that repeat
    across subjects (pairs are per (subject, doc_id)). A run that logged a subject as its own
    task (``mmlu_anatomy/acc``) pairs that subject's documents. lm-eval's filtered metric
    ``exact_match.flexible-extract`` matches the logged ``exact_match_flexible-extract``."""
    ana_b, ana_c = outcomes(5, 1, 3, 0)
    ast_b, ast_c = outcomes(4, 2, 0, 1)
    gsm_b, gsm_c = outcomes(2, 2, 2, 0)
    d = pd.DataFrame(
        docs(rid(1), "mmlu_anatomy", ana_b, group="mmlu") + docs(rid(2), "mmlu_anatomy", ana_c, group="mmlu")
        + docs(rid(1), "mmlu_astronomy", ast_b, group="mmlu")
        + docs(rid(2), "mmlu_astronomy", ast_c, group="mmlu")
        + docs(rid(1), "gsm8k", gsm_b, metric="exact_match.flexible-extract")
        + docs(rid(2), "gsm8k", gsm_c, metric="exact_match.flexible-extract"))
    pairs = pd.DataFrame({"candidate_id": rid(2), "baseline_id": rid(1),
                          "key": ["mmlu/acc", "mmlu_anatomy/acc", "gsm8k/exact_match_flexible-extract",
                                  "mmlu/acc_norm"]})
    got = paired_tests(d, pairs)
    assert list(got["n_pairs"]) == [16, 9, 6, 0]  # no acc_norm documents
    assert list(got["correct_to_wrong"].iloc[:3]) == [3, 3, 2]
    assert list(got["wrong_to_correct"].iloc[:3]) == [1, 0, 0]
    assert got["p_value"].iloc[0] == pytest.approx(mcnemar_exact(3, 1))


# ----------------------------------------------------------------------------- other scores

def test_a_non_binary_metric_uses_the_paired_t_test():
    from scipy import stats

    b = [0.2, 0.5, 0.9, 0.4, 0.0, 1.0, 0.75, 0.3]
    c = [0.1, 0.45, 0.7, 0.5, 0.0, 0.8, 0.5, 0.2]
    rs = runset([{"run_name": "base", "metrics": {"drop/f1": mean(b)}},
                 {"run_name": "q4", "metrics": {"drop/f1": mean(c)}}],
                docs(rid(1), "drop", b, metric="f1") + docs(rid(2), "drop", c, metric="f1"))
    vs = compute(rs, spec(view="versus", baseline="name:base")).tables["versus"]
    row = vs.set_index("task").loc["drop"]
    want = stats.ttest_rel(c, b).pvalue
    # and by hand: t = mean(d) / (sd(d) / √n) on the differences
    d = [x - y for x, y in zip(c, b, strict=True)]
    md = mean(d)
    sd = math.sqrt(sum((x - md) ** 2 for x in d) / (len(d) - 1))
    t = md / (sd / math.sqrt(len(d)))
    assert want == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1), rel=1e-9)
    assert row["test"] == PAIRED_T and row["n_pairs"] == 8
    assert row["p_value"] == pytest.approx(want, rel=1e-9)
    assert bool(row["significant"]) is bool(want < ALPHA)
    assert row["correct_to_wrong"] is pd.NA and math.isnan(row["flip_rate"])  # no right/wrong here


def test_no_difference_at_all_is_p_one():
    b = [0.2, 0.5, 0.9, 0.4]
    pairs = pd.DataFrame({"candidate_id": [rid(2)], "baseline_id": [rid(1)], "key": ["drop/f1"]})
    same = docs(rid(1), "drop", b, metric="f1") + docs(rid(2), "drop", b, metric="f1")
    got = paired_tests(pd.DataFrame(same), pairs).iloc[0]
    assert got["test"] == PAIRED_T and got["p_value"] == 1.0


# ----------------------------------------------------------------------------- fallback

def test_a_run_without_documents_falls_back_to_the_stderr_rule():
    """q4 has per-document results, q8 has none: q8's rows use |Δ| ≥ 2·√(se₁² + se₂²) and say
    so."""
    b, c = outcomes(30, 10, 9, 1)
    se = {"boolq/acc_stderr": 0.01}
    rs = runset([
        {"run_name": "base", "metrics": {"boolq/acc": 0.6, **se}},
        {"run_name": "q4", "metrics": {"boolq/acc": 0.44, **se}},
        {"run_name": "q8", "metrics": {"boolq/acc": 0.5, **se}},
        {"run_name": "q2", "metrics": {"boolq/acc": 0.59}},  # no stderr either: N/A
    ], docs(rid(1), "boolq", b) + docs(rid(2), "boolq", c))
    res = compute(rs, spec(view="versus", baseline="name:base"))
    vs = res.tables["versus"]
    rows = vs[vs["task"] == "boolq"].set_index("candidate")
    assert rows.loc["q4", "test"] == MCNEMAR and rows.loc["q4", "n_pairs"] == 50
    assert rows.loc["q8", "test"] == STDERR and rows.loc["q8", "n_pairs"] == 0
    assert bool(rows.loc["q8", "significant"]) is (0.1 >= 2 * math.sqrt(2) * 0.01)
    assert rows.loc["q8", "correct_to_wrong"] is pd.NA and math.isnan(rows.loc["q8", "p_value"])
    assert rows.loc["q2", "test"] is None and rows.loc["q2", "significant"] is pd.NA
    md = res.markdown()
    q8 = md.split("### q8 vs base")[1].split("###")[0]
    assert "| boolq | acc | 60.00% | 50.00% | -10.00 pts | -16.7% | 🔴 ▼ | N/A | yes |" in q8
    assert "test `stderr` in versus.csv" in md


def test_without_any_documents_the_report_is_as_before():
    rs = runset([{"run_name": "base", "metrics": {"boolq/acc": 0.6, "boolq/acc_stderr": 0.01}},
                 {"run_name": "q4", "metrics": {"boolq/acc": 0.5, "boolq/acc_stderr": 0.01}}], None)
    res = compute(rs, spec(baseline="name:base"))
    md = res.markdown()
    assert "Flips" not in md and "McNemar" not in md
    assert set(res.tables["versus"]["test"].dropna()) == {STDERR}
    assert res.tables["ranking_delta"]["correct_to_wrong"].isna().all()


# ----------------------------------------------------------------------------- summary, ranking

def test_summary_and_ranking_count_flips_against_the_baseline():
    """A prune → recover lineage with role:base as the baseline: the per-task summary and the
    ranking's delta table show each run's flips against the base on its documents."""
    base_b, _ = outcomes(20, 10, 0, 0)
    _, pruned = outcomes(12, 10, 8, 0)  # lost 8 answers
    _, ft = outcomes(18, 8, 2, 2)       # recovered most of them
    runs = [
        {"run_name": "evaluate:m", "tags": {"family": "M", "role": "base", "step": "evaluate"},
         "metrics": {"boolq/acc": mean(base_b)}},
        {"run_name": "prune:m", "tags": {"family": "M", "role": "pruned", "step": "prune",
                                         "upstream_run": rid(1)},
         "metrics": {"boolq/acc": mean(pruned)}},
        {"run_name": "finetune:m", "tags": {"family": "M", "role": "finetuned", "step": "finetune",
                                            "upstream_run": rid(2)},
         "metrics": {"boolq/acc": mean(ft)}},
    ]
    rs = runset(runs, docs(rid(1), "boolq", base_b) + docs(rid(2), "boolq", pruned)
                + docs(rid(3), "boolq", ft))
    res = compute(rs, spec(view="summary,ranking", baseline="role:base"))
    per = res.tables["summary_tasks"].set_index("run")
    assert (per.loc["finetune:m", "correct_to_wrong"], per.loc["finetune:m", "wrong_to_correct"]) == (2, 2)
    assert per.loc["finetune:m", "p_value"] == pytest.approx(1.0)
    delta = res.tables["ranking_delta"].set_index("run")
    assert (delta.loc["prune:m", "correct_to_wrong"], delta.loc["prune:m", "wrong_to_correct"]) == (8, 0)
    assert delta.loc["prune:m", "p_value"] == pytest.approx(mcnemar_exact(8, 0))
    assert delta.loc["prune:m", "flip_rate"] == pytest.approx(8 / 30)
    md = res.markdown()
    assert "| Flips vs baseline (c→w / w→c) |" in md and "| 2 / 2 |" in md
    assert "| acc Δ | acc flips (c→w / w→c) |" in md and "| 8 / 0 |" in md


# ----------------------------------------------------------------------------- KL, plots

def test_kl_directions():
    for key in ("kl/wikitext", "kl_median/wikitext", "kl_p99/wikitext"):
        assert dirs.known_direction(key) == dirs.LOWER
    assert dirs.known_direction("top1_agree/wikitext") == dirs.HIGHER


def _kl_runs():
    b, c = outcomes(30, 10, 6, 2)
    runs = [{"run_name": "base", "metrics": {"boolq/acc": 0.60, "ppl/wiki": 10.0}},
            {"run_name": "q8", "metrics": {"boolq/acc": 0.59, "ppl/wiki": 10.1, "kl/wiki": 0.01,
                                           "kl_p99/wiki": 0.2, "top1_agree/wiki": 0.97}},
            {"run_name": "q4", "metrics": {"boolq/acc": 0.52, "ppl/wiki": 11.0, "kl/wiki": 0.08,
                                           "kl_p99/wiki": 0.9, "top1_agree/wiki": 0.90}},
            {"run_name": "q3", "metrics": {"boolq/acc": 0.50, "ppl/wiki": 12.0, "kl/wiki": 0.05,
                                           "kl_p99/wiki": 1.1, "top1_agree/wiki": 0.85}}]
    return runset(runs, docs(rid(1), "boolq", b) + docs(rid(3), "boolq", c))


def test_kl_rows_show_the_candidates_value_without_a_delta():
    res = compute(_kl_runs(), spec(view="versus", baseline="name:base"))
    vs = res.tables["versus"]
    q4 = vs[vs["candidate"] == "q4"].set_index("key")
    assert {"kl/wiki", "kl_p99/wiki", "top1_agree/wiki"} <= set(q4.index)
    assert q4.loc["kl/wiki", "candidate_value"] == 0.08 and math.isnan(q4.loc["kl/wiki", "delta"])
    assert q4.loc["kl/wiki", "direction"] == dirs.LOWER
    assert q4.loc["kl/wiki", "test"] is None and q4.loc["kl/wiki", "n_pairs"] == 0
    assert "| kl | wiki | N/A | 0.0800 | N/A | N/A |" in res.markdown()
    # the KL rows are not tasks: they do not count as improvements or regressions
    summ = res.tables["versus_summary"].set_index("candidate")
    assert summ.loc["q4", "n_tasks"] == 1


def test_kl_vs_accuracy_front_and_the_plots_render():
    res = compute(_kl_runs(), spec(view="versus", baseline="name:base"))
    par = res.tables["pareto"].set_index("run")
    # lower KL and higher accuracy are better: q8 dominates q3 and q4; base has no KL
    assert par["front_acc_kl"].to_dict() == {"base": False, "q8": True, "q4": False, "q3": False}
    assert par.loc["q3", "kl"] == 0.05
    from mlproject.compare import document

    images = document.plots(res)
    assert {"flips.png", "kl_vs_acc.png"} <= set(images)
    assert images["flips.png"].startswith(PNG) and images["kl_vs_acc.png"].startswith(PNG)
    from mlproject.compare.views.versus import flips_chart

    fig = flips_chart(res)
    widths = sorted(round(p.get_width()) for p in fig.axes[0].patches)
    assert widths == [-6, 2]  # q4 on boolq: 6 correct → wrong (left), 2 wrong → correct
    assert "accuracy vs mean KL from the reference (kl/wiki): q8 (0.5900, KL 0.0100)" in res.markdown()


# ----------------------------------------------------------------------------- fetching

def test_document_runs_skip_runs_without_task_scores_and_compares_without_a_baseline():
    from mlproject.compare.core import document_runs

    rs = runset([{"run_name": "base", "metrics": {"boolq/acc": 0.6}},
                 {"run_name": "q4", "metrics": {"boolq/acc": 0.5, "ppl/wiki": 3.0}},
                 {"run_name": "ppl-only", "metrics": {"ppl/wiki": 3.0}}], None)
    assert document_runs(rs, spec(baseline="name:base")) == [rid(1), rid(2)]
    assert document_runs(rs, spec()) is None                 # three runs, no baseline: no pairing
    assert document_runs(rs, spec(baseline="name:base", view="summary")) == [rid(1), rid(2)]
    two = runset([{"metrics": {"boolq/acc": 0.6}}, {"metrics": {"boolq/acc": 0.5}}], None)
    assert document_runs(two, spec()) == [rid(1), rid(2)]   # two runs: versus pairs them


def test_fetch_documents_from_a_real_server(mlflow_uri, tmp_path, monkeypatch):
    """Two evaluations log ``eval/documents.parquet`` (as the evaluation writes it: categorical
    strings, int32 ids, float32 values), a third logs none: compare downloads one artifact per
    run and pairs the two."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from mlproject.compare import build, core, query

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("paired-docs")
    b, c = outcomes(30, 10, 9, 1)
    ids = []
    for name, values in (("base", b), ("q4", c), ("old", None)):
        run = client.create_run(exp, run_name=name)
        rid_ = run.info.run_id
        client.log_batch(rid_, [Metric("boolq/acc", mean(values or b), 0, 0),
                                Metric("boolq/acc_stderr", 0.05, 0, 0)])
        if values is not None:
            df = pd.DataFrame(docs(rid_, "boolq", values)).drop(columns="run_id").astype(
                {"task": "category", "group": "category", "doc_id": "int32", "doc_hash": "string",
                 "metric": "category", "value": "float32"})
            path = tmp_path / name / "documents.parquet"
            path.parent.mkdir()
            df.to_parquet(path, index=False)
            client.log_artifact(rid_, str(path), "eval")
        client.set_terminated(rid_)
        ids.append(rid_)

    rs = RunSet.from_records([{"run_id": i} for i in ids])
    assert query.fetch_documents(mlflow_uri, rs, ids, parallel=2) == 3
    assert rs.documents.groupby("run_id").size().to_dict() == {ids[0]: 50, ids[1]: 50}
    assert list(rs.documents.columns) == query.DOCUMENT_COLUMNS

    res = build(mlflow_uri, CompareSpec(experiments=("paired-docs",), baseline="name:base",
                                        view=("versus",)))
    rows = res.tables["versus"]
    rows = rows[rows["task"] == "boolq"].set_index("candidate")
    assert rows.loc["q4", "test"] == MCNEMAR and rows.loc["q4", "correct_to_wrong"] == 9
    assert rows.loc["q4", "p_value"] == pytest.approx(mcnemar_exact(9, 1))
    assert rows.loc["old", "test"] == STDERR

    monkeypatch.setattr(core, "MAX_DOCUMENT_RUNS", 2)
    capped = build(mlflow_uri, CompareSpec(experiments=("paired-docs",), baseline="name:base",
                                           view=("versus",)))
    assert capped.runset.documents is None
    assert set(capped.tables["versus"]["test"].dropna()) == {STDERR}
    assert any("per-document results not fetched: 3 runs" in n for n in capped.notes)


def test_ranking_medals_kl_but_shows_no_baseline_section_for_it():
    md = compute(_kl_runs(), spec(view="ranking", baseline="name:base")).markdown()
    assert "### kl\n" in md and "### top1_agree\n" in md  # closest to the reference wins
    assert "### kl vs baseline" not in md and "### top1_agree vs baseline" not in md
    assert "### ppl vs baseline" in md
