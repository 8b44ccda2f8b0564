"""Compare views without a server: RunSet.from_records → compute → render (pure pandas)."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest

from mlproject.compare import CompareSpec, RunSet, compute
from mlproject.compare import directions as dirs
from mlproject.compare.tables.baseline import resolve_baseline
from mlproject.compare.tables.lineage import lineage
from mlproject.compare.tables.scores import select_metrics, task_scores
from mlproject.compare.views.pareto import pareto_front
from mlproject.compare.views.ranking import ALL_BETTER, ALL_WORSE
from mlproject.compare.views.summary import summary
from mlproject.errors import UserError


def rid(i: int) -> str:
    return f"{i:032x}"


def runset(*runs: dict, order=()) -> RunSet:
    recs = []
    for i, r in enumerate(runs):
        r = dict(r)
        r.setdefault("run_id", rid(i + 1))
        r.setdefault("start_time", 1000 + i)
        tags = {f"mlproject.{k}": v for k, v in r.pop("tags", {}).items()}
        recs.append({**r, "tags": tags})
    return RunSet.from_records(recs, order=order)


def spec(**kw) -> CompareSpec:
    return CompareSpec.from_params(**kw)


# ----------------------------------------------------------------------------- spec

@pytest.mark.parametrize("kw, bad", [
    ({"view": "sumary"}, "'sumary'"),
    ({"format": "md,pdf"}, "'pdf'"),
    ({"directions": "avg_time=fast"}, "'fast'"),
    ({"directions": "avg_time"}, "'avg_time'"),
])
def test_spec_rejects_bad_values_naming_them(kw, bad):
    with pytest.raises(UserError) as e:
        spec(**kw)
    assert bad in str(e.value) and "\n" not in str(e.value)


def test_spec_parses_mlproject_strings():
    s = spec(experiment="a, b", runs="x,y", view="versus,ranking", metrics="pass@1,avg_time",
             directions="avg_time=min,novelty=higher", format="md,CSV")
    assert s.experiments == ("a", "b") and s.runs == ("x", "y")
    assert s.view == ("versus", "ranking") and s.formats == ("md", "csv")
    assert s.directions == {"avg_time": "min", "novelty": "max"}
    assert spec().view == ("summary", "versus", "ranking")


# ----------------------------------------------------------------------------- directions

@pytest.mark.parametrize("key, want", [
    ("avg_time", "min"), ("mbpp/avg_time", "min"), ("mbpp/pass_at_1", "max"),
    ("ppl/wikitext2", "min"), ("nll/offline", "min"), ("boolq/acc_norm", "max"),
    ("avg_acc", "max"), ("eval_seconds", "min"), ("peak_vram_mb", "min"),
    ("gen/tokens_per_second", "max"), ("gsm8k/exact_match_flexible-extract", "max"),
    ("drop/f1", "max"), ("params_b", "min"), ("novelty", None),
])
def test_known_directions(key, want):
    assert dirs.known_direction(key) == want


def test_direction_overrides_match_leaf_and_loose_names():
    d = dirs.Directions(dirs.parse_overrides("avg_time=max,pass@1=min,x/y=max"))
    assert d("mbpp/avg_time") == "max"
    assert d("humaneval/pass_at_1") == "min"  # '@' is illegal in MLflow names
    assert d("x/y") == "max" and d("ppl/a") == "min"


def test_score_preference_without_tag():
    r = runset({"metrics": {"piqa/acc": 0.7, "piqa/acc_norm": 0.8,
                            "gsm8k/exact_match.strict-match": 0.2,
                            "gsm8k/exact_match.flexible-extract": 0.3,
                            "delta/piqa/acc_norm": 0.1, "before/piqa/acc_norm": 0.7,
                            "math/exact_match": 0.1, "math/math_verify": 0.15,
                            "drop/f1": 0.2, "drop/em": 0.1, "boolq/acc": 0.6,
                            "boolq/acc_stderr": 0.01}})
    s = task_scores(r.runs, r.metrics)
    keys = s.keys.iloc[0].to_dict()
    assert keys == {"boolq": "boolq/acc", "drop": "drop/f1", "gsm8k":
                    "gsm8k/exact_match.flexible-extract", "math": "math/math_verify",
                    "piqa": "piqa/acc_norm"}
    assert s.stderr.iloc[0]["boolq"] == 0.01


def test_task_metric_tag_wins_and_orders_tasks():
    tag = json.dumps({"piqa": "acc,none", "boolq": "acc"})  # lm-eval's key or ours
    r = runset({"metrics": {"piqa/acc": 0.7, "piqa/acc_norm": 0.8, "boolq/acc": 0.6,
                            "boolq/acc_norm": 0.9, "mmlu_x/acc": 0.3},
                "tags": {"avg_acc_metrics": tag}})
    s = task_scores(r.runs, r.metrics)
    assert s.tasks == ["piqa", "boolq"]  # tagged tasks only (no mmlu subject), tag order
    assert s.values.iloc[0].tolist() == [0.7, 0.6]


# ----------------------------------------------------------------------------- versus

def test_versus_significance_threshold_is_two_combined_stderr():
    se = 0.01
    two_se = 2 * math.sqrt(2) * se  # 0.028284…
    base = {"a/acc": 0.5, "b/acc": 0.5, "c/acc": 0.5, "d/acc": 0.5}
    cand = {"a/acc": 0.5 + two_se - 1e-4, "b/acc": 0.5 + two_se + 1e-4,
            "c/acc": 0.5 - two_se - 1e-4, "d/acc": 0.51}
    for m in (base, cand):
        m.update({f"{k}_stderr": se for k in list(m) if k != "d/acc"})
    r = runset({"run_name": "base", "metrics": base}, {"run_name": "ft", "metrics": cand})
    res = compute(r, spec(view="versus", baseline="name:base"))
    vs = res.tables["versus"].set_index("task")
    assert vs.loc["a", "significant"] is False or not vs.loc["a", "significant"]
    assert bool(vs.loc["b", "significant"]) and bool(vs.loc["c", "significant"])
    assert vs.loc["d", "significant"] is pd.NA  # no stderr logged
    assert bool(vs.loc["c", "improved"]) is False
    md = res.markdown()
    assert "no (n.s.)" in md and "▼" in md and "▲" in md
    summ = res.tables["versus_summary"].iloc[0]
    assert summ["improvements"] == ["b", "a", "d"] and summ["regressions"] == ["c"]


def test_versus_two_runs_without_baseline_uses_first_listed():
    r = runset({"run_name": "x", "metrics": {"t/acc": 0.4}},
               {"run_name": "y", "metrics": {"t/acc": 0.5}}, order=[rid(2), rid(1)])
    res = compute(r, spec(view="versus"))
    assert res.baseline.label == "y"
    with pytest.raises(UserError, match="needs baseline"):
        compute(runset({"metrics": {"t/acc": 1}}, {"metrics": {"t/acc": 1}},
                       {"metrics": {"t/acc": 1}}), spec(view="versus"))


def test_versus_lower_is_better_metric():
    r = runset({"run_name": "a", "metrics": {"ppl/wiki": 10.0, "eval_seconds": 5.0}},
               {"run_name": "b", "metrics": {"ppl/wiki": 9.0, "eval_seconds": 6.0}})
    vs = compute(r, spec(view="versus", baseline="a", metrics="ppl,eval_seconds")
                 ).tables["versus"].set_index("metric")
    assert bool(vs.loc["wiki", "improved"]) and not bool(vs.loc["eval_seconds", "improved"])


# ----------------------------------------------------------------------------- ranking

def _rank_runs():
    vals = [("r1", 10.0, 0.5), ("r2", 20.0, 0.6), ("r3", 30.0, 0.7), ("r4", 40.0, 0.8),
            ("r5", 20.0, 0.1)]
    return runset(*({"run_name": n, "metrics": {"b/avg_time": t, "b/pass_at_1": p}}
                    for n, t, p in vals))


def test_ranking_medals_worst_and_ties_respect_direction():
    rk = compute(_rank_runs(), spec(view="ranking")).tables["ranking"]
    t = rk[rk["metric"] == "avg_time"].set_index("run")
    assert t.loc["r1", "medal"] == "gold"
    assert t.loc["r2", "medal"] == t.loc["r5", "medal"] == "silver"  # tie shares the rank
    assert t.loc["r3", "medal"] == "" and t.loc["r3", "rank"] == 4
    assert t["worst"].tolist() == [False, False, False, True, False]  # r4: slowest
    p = rk[rk["metric"] == "pass_at_1"].set_index("run")
    assert p.loc["r4", "medal"] == "gold" and bool(p.loc["r5", "worst"])


def test_direction_override_flips_ranking():
    rk = compute(_rank_runs(), spec(view="ranking", directions="avg_time=max")
                 ).tables["ranking"]
    t = rk[rk["metric"] == "avg_time"].set_index("run")
    assert t.loc["r4", "medal"] == "gold" and bool(t.loc["r1", "worst"])


def test_no_worst_flag_with_three_runs_and_no_medal_without_direction():
    r = runset(*({"run_name": f"r{i}", "metrics": {"b/novelty": float(i), "b/acc": i / 10}}
                 for i in range(3)))
    res = compute(r, spec(view="ranking", metrics="novelty,acc"))
    rk = res.tables["ranking"]
    assert not rk["worst"].any()
    assert set(rk.loc[rk["metric"] == "novelty", "medal"]) == {""}
    assert any("direction unknown" in n for n in res.notes)


def test_speedup_and_categories():
    r = runset({"run_name": "base", "metrics": {"b/avg_time": 100.0, "b/pass_at_1": 0.5}},
               {"run_name": "fast_bad", "metrics": {"b/avg_time": 50.0, "b/pass_at_1": 0.4}},
               {"run_name": "slow_good", "metrics": {"b/avg_time": 200.0, "b/pass_at_1": 0.6}},
               {"run_name": "win", "metrics": {"b/avg_time": 80.0, "b/pass_at_1": 0.6}},
               {"run_name": "lose", "metrics": {"b/avg_time": 120.0, "b/pass_at_1": 0.4}})
    res = compute(r, spec(view="ranking", baseline="name:base"))
    d = res.tables["ranking_delta"]
    sp = d[d["metric"] == "avg_time"].set_index("run")["speedup"]
    assert sp["fast_bad"] == 2.0 and sp["slow_good"] == 0.5
    cats = res.tables["ranking_lists"].set_index("run")["category"]
    assert cats["fast_bad"] == "faster but less accurate"
    assert cats["slow_good"] == "more accurate but slower"
    assert cats["win"] == ALL_BETTER and cats["lose"] == ALL_WORSE
    md = res.markdown()
    assert "🟢 2.00x" in md and "🔴 0.50x" in md


# ----------------------------------------------------------------------------- summary

def test_summary_before_sources_and_computed_mean():
    tag = json.dumps({"a": "acc", "b": "acc"})
    r = runset(
        {"run_name": "base", "metrics": {"a/acc": 0.8, "b/acc": 0.6, "ppl/w": 5.0},
         "tags": {"role": "base", "family": "F", "avg_acc_metrics": tag, "step": "evaluate"}},
        {"run_id": rid(10), "run_name": "pruned-eval",
         "metrics": {"a/acc": 0.5, "b/acc": 0.3, "ppl/w": 20.0},
         "tags": {"family": "F", "step": "evaluate", "role": "eval"}},
        {"run_name": "ft", "metrics": {"a/acc": 0.7, "b/acc": 0.5, "ppl/w": 10.0,
                                       "before/ppl/w": 25.0},
         "tags": {"role": "best_acc", "family": "F", "upstream_run": rid(10),
                  "avg_acc_metrics": tag, "step": "finetune"}},
    )
    summ, per_task = summary(r.runs, r.metrics, task_scores(r.runs, r.metrics),
                             lineage(r.runs))
    assert list(summ["role"]) == ["base", "best_acc"]  # the pruned eval is a before source
    ft = summ.set_index("role").loc["best_acc"]
    assert ft["ppl_before[w]"] == 25.0  # before/ on the run wins over the upstream run
    assert ft["ppl_change_pct[w]"] == pytest.approx(-60.0)
    assert ft["acc_before"] == pytest.approx(0.4) and ft["acc_after"] == pytest.approx(0.6)
    assert ft["acc_change_pct"] == pytest.approx(50.0)
    row = per_task[(per_task["task"] == "a") & (per_task["role"] == "best_acc")].iloc[0]
    assert (row["before"], row["after"]) == (0.5, 0.7)
    assert row["change"] == pytest.approx(0.2)


def test_partial_data_is_na_not_a_crash(tmp_path):
    r = runset({"run_name": "full", "metrics": {"a/acc": 0.5, "b/acc": 0.5, "ppl/w": 9.0,
                                                "params_b": 1.0, "avg_time": 3.0}},
               {"run_name": "half", "metrics": {"a/acc": 0.6}},
               {"run_name": "none", "metrics": {}, "status": "FAILED"})
    summ = compute(r, spec(view="summary")).tables["summary"].set_index("run")
    assert math.isnan(summ.loc["half", "acc_after"])  # mean over 1 of 2 tasks: N/A
    assert "none" not in summ.index
    res = compute(r, spec(baseline="full"))
    assert "summary" not in res.tables and any("summary view skipped" in n for n in res.notes)
    md = res.markdown()
    assert "N/A" in md
    paths = res.write(tmp_path)
    assert {p.name for p in paths} >= {"compare.md", "compare.html", "compare.json",
                                       "tidy.csv", "acc_vs_ppl.png"}
    json.loads((tmp_path / "compare.json").read_text())


def test_empty_runset_renders():
    res = compute(RunSet.from_records([]), spec())
    assert "no runs matched" in res.markdown()


# ----------------------------------------------------------------------------- baseline

def test_baseline_selectors_and_errors():
    r = runset({"run_name": "a", "metrics": {"t/acc": 0.1}, "tags": {"role": "base",
                                                                     "family": "X"}},
               {"run_name": "b", "metrics": {"t/acc": 0.2}, "tags": {"family": "X"}},
               {"run_name": "c", "metrics": {"t/acc": 0.3}, "tags": {"family": "Y"}},
               {"run_name": "b", "metrics": {"t/acc": 0.4}, "tags": {"family": "Y"}})
    assert resolve_baseline(rid(1), r.runs).run_ids == [rid(1)]
    assert resolve_baseline(f"id:{rid(3)}", r.runs).run_ids == [rid(3)]
    amb = resolve_baseline("name:b", r.runs)
    assert amb.run_ids == [rid(4)] and "latest" in amb.notes[0]
    fam = resolve_baseline("role:base", r.runs)
    assert fam.mode == "run"  # one run with the role: everyone's baseline
    best = resolve_baseline("a|c", r.runs)
    assert best.mode == "best_of" and best.run_ids == [rid(1), rid(3)]
    with pytest.raises(UserError, match="baseline 'role:nope' matches no run"):
        resolve_baseline("role:nope", r.runs)
    with pytest.raises(UserError, match="'zzz'"):
        compute(r, spec(baseline="zzz"))


def test_role_baseline_per_family_notes_missing_family():
    r = runset({"run_name": "bx", "metrics": {"t/acc": 0.1}, "tags": {"role": "base",
                                                                      "family": "X"}},
               {"run_name": "by", "metrics": {"t/acc": 0.2}, "tags": {"role": "base",
                                                                      "family": "Y"}},
               {"run_name": "x1", "metrics": {"t/acc": 0.3}, "tags": {"family": "X"}},
               {"run_name": "z1", "metrics": {"t/acc": 0.4}, "tags": {"family": "Z"}})
    res = compute(r, spec(view="versus", baseline="role:base"))
    vs = res.tables["versus"]
    assert set(vs["candidate"]) == {"x1"} and set(vs["baseline"]) == {"bx"}
    assert any("'Z'" in n for n in res.notes)


# ----------------------------------------------------------------------------- pareto

def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    x = pd.Series([rng.randint(0, 20) for _ in range(200)], dtype=float)
    y = pd.Series([rng.randint(0, 20) for _ in range(200)], dtype=float)
    front = pareto_front(x, y, "min", "max")
    for i in range(len(x)):
        dominated = any((x[j] <= x[i] and y[j] >= y[i]) and (x[j] < x[i] or y[j] > y[i])
                        for j in range(len(x)))
        if dominated:
            assert not front[i]
        elif not front[i]:  # only exact duplicates of a front point may be left out
            assert any(front[j] and x[j] == x[i] and y[j] == y[i] for j in range(len(x)))


def test_metric_selection():
    r = runset({"metrics": {"mbpp/pass_at_1": 0.1, "mbpp/avg_time": 3.0, "he/pass_at_1": 0.2,
                            "ppl/a": 1.0, "ppl/b": 2.0, "boolq/acc": 0.5,
                            "boolq/acc_norm": 0.6}})
    s = task_scores(r.runs, r.metrics)
    pick = select_metrics
    assert pick(["pass@1"], r.metrics.columns, s) == ["he/pass_at_1", "mbpp/pass_at_1"]
    assert pick(["ppl"], r.metrics.columns, s) == ["ppl/a", "ppl/b"]
    assert pick(["boolq"], r.metrics.columns, s) == ["boolq/acc_norm"]
    assert pick(["mbpp/avg_time"], r.metrics.columns, s) == ["mbpp/avg_time"]
    with pytest.raises(UserError, match="'pass@2'"):
        pick(["pass@2"], r.metrics.columns, s)


def test_build_needs_something_to_compare():
    from mlproject.compare import build

    with pytest.raises(UserError, match="nothing to compare"):
        build("http://127.0.0.1:9", spec())


def test_query_without_a_server_uses_the_client(tmp_path, monkeypatch):
    """A ``sqlite:///`` tracking URI goes through MlflowClient.search_runs (no REST)."""
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from mlproject.compare import build

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("local", artifact_location=str(tmp_path / "a"))
    ids = []
    for i, v in enumerate((0.4, 0.5, 0.6)):
        tags = {"mlproject.upstream_run": ids[-1], "mlproject.role": f"ft{i}"} if ids else {}
        run = client.create_run(exp, run_name=f"r{i}", tags=tags, start_time=1000 + i)
        client.log_batch(run.info.run_id, [Metric("t/acc", v, 0, 0)])
        client.set_terminated(run.info.run_id)  # compare leaves RUNNING runs out by default
        ids.append(run.info.run_id)
    res = build(uri, CompareSpec(experiments=("local",), filter="attributes.run_name != 'r0'",
                                 baseline="name:r1", page_size=1))
    assert res.stats["runs"] == 2 and res.stats["lineage_runs"] == 1  # r0 fetched as upstream
    summ = res.tables["summary"].set_index("run")
    assert summ.loc["r2", "acc_before"] == 0.5 and summ.loc["r1", "acc_before"] == 0.4
    assert list(res.tables["versus"]["candidate"]) == ["r2", "r2"]  # t/acc and the mean


def test_two_finetunes_of_one_model_plot_one_series_each(tmp_path):
    """Two runs sharing family and role (two fine-tunes of one base, no baseline) used to crash
    the per-task change chart (duplicate labels); each run is its own bar series, named."""
    base = {"run_name": "evaluate:m", "tags": {"family": "M", "role": "base", "step": "evaluate"},
            "metrics": {"a/acc": 0.50, "b/acc": 0.40}}
    fts = [{"run_name": f"finetune:m:{n}", "tags": {"family": "M", "role": "finetuned", "step": "finetune",
                                                  "upstream_run": rid(1)},
            "metrics": {"a/acc": 0.50 + d, "b/acc": 0.40 + d}} for n, d in (("lr1", 0.1), ("lr2", 0.2))]
    res = compute(runset(base, *fts), spec(view="summary"))
    per_task = res.tables["summary_tasks"].dropna(subset=["change"])
    assert sorted(round(c, 6) for c in per_task["change"]) == [0.1, 0.1, 0.2, 0.2]
    import matplotlib
    matplotlib.use("Agg")
    from mlproject.compare.views.summary import delta_bars

    fig = delta_bars(res)
    legend = sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert legend == ["M finetuned (finetune:m:lr1)", "M finetuned (finetune:m:lr2)"]
    heights = sorted(round(b.get_height(), 6) for b in fig.axes[0].patches)
    assert heights == [10.0, 10.0, 20.0, 20.0]
    assert "delta_bars.png" in {p.name for p in res.write(tmp_path, formats=["png", "html"])}
