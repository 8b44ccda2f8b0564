"""compare ranks code runs by pass@1 and by run time on the problems all of them solved.

Runs are written to a real mlflow server the way `evaluate` writes them: code metrics plus the
per-problem artifact ``code/<task>.json`` built by the scoring code itself.
"""

from __future__ import annotations

import pytest

from conftest import mlflow_client
from mlproject.evaluation.code.scoring import CodeSettings, CodeTaskResult, task_metrics

TASK = "code_offline"
# problem -> (model A time, model B time, model C time); None = not solved. Reference times
# are 1.0 for every problem. B solves only the easy problems p1, p2 (and is slower than A on
# them) but its own average is the lowest; C solves p1, p2 and the hard p4.
TIMES = {
    "p1": (0.10, 0.12, 0.20),
    "p2": (0.20, 0.24, 0.40),
    "p3": (5.00, None, None),
    "p4": (9.00, None, 7.00),
    "p5": (None, None, None),
}
NAMES = ("model-A", "model-B", "model-C")


def _records(col: int) -> list[dict]:
    out = []
    for pid, times in TIMES.items():
        t = times[col]
        out.append({"id": pid, "n": 1, "c": int(t is not None), "pass_at_1": float(t is not None),
                    "status": "passed" if t is not None else "wrong_answer", "time_s": t,
                    "ref_time_s": 1.0 if t is not None else None,
                    "time_ratio": t / 1.0 if t is not None else None})
    return out


@pytest.fixture(scope="module")
def code_exp(mlflow_uri):
    from mlflow.entities import Metric

    client = mlflow_client(mlflow_uri)
    exp = client.create_experiment("code-study-common")
    ids = {}
    for col, name in enumerate(NAMES):
        recs = _records(col)
        res = CodeTaskResult(task=TASK, metrics=task_metrics(recs), problems=recs, statuses={})
        run = client.create_run(exp, run_name=name, tags={"mlproject.step": "evaluate"})
        rid = run.info.run_id
        client.log_batch(rid, metrics=[Metric(f"{TASK}/{k}", v, 0, 0)
                                       for k, v in res.metrics.items()])
        client.log_dict(rid, res.artifact(CodeSettings()), f"code/{TASK}.json")
        client.set_terminated(rid)
        ids[name] = rid
    # a run logged before per-problem artifacts existed: metrics only
    old = client.create_run(exp, run_name="model-old", tags={"mlproject.step": "evaluate"})
    client.log_batch(old.info.run_id, metrics=[Metric(f"{TASK}/{k}", v, 0, 0) for k, v in
                                               {"pass_at_1": 0.2, "avg_time_s": 0.01,
                                                "time_ratio": 0.01, "timed": 1}.items()])
    client.set_terminated(old.info.run_id)
    ids["model-old"] = old.info.run_id
    return mlflow_uri, ids


def _build(uri, **params):
    from mlproject.compare import CompareSpec, build

    return build(uri, CompareSpec.from_params(**params))


def test_logged_averages_would_let_the_easy_solver_win():
    logged = {n: task_metrics(_records(i))["avg_time_s"] for i, n in enumerate(NAMES)}
    assert min(logged, key=logged.get) == "model-B"


def test_ranking_compares_times_on_the_problems_all_runs_solved(code_exp):
    uri, ids = code_exp
    res = _build(uri, runs=",".join(ids[n] for n in NAMES), view="ranking",
                 baseline="name:model-B", metrics="pass_at_1,avg_time_s,time_ratio")
    rk = res.tables["ranking"].set_index(["metric", "run"])
    # common set = {p1, p2}: A 0.15 s, B 0.18 s, C 0.30 s (means); ratios are geometric means
    assert rk.loc[("avg_time_s", "model-A"), "value"] == pytest.approx(0.15)
    assert rk.loc[("avg_time_s", "model-B"), "value"] == pytest.approx(0.18)
    assert rk.loc[("avg_time_s", "model-C"), "value"] == pytest.approx(0.30)
    assert rk.loc[("time_ratio", "model-A"), "value"] == pytest.approx((0.1 * 0.2) ** 0.5)
    assert [rk.loc[("avg_time_s", n), "medal"] for n in NAMES] == ["gold", "silver", "bronze"]
    # pass@1 still counts every problem: A 4/5 gold, C 3/5, B 2/5
    assert [rk.loc[("pass_at_1", n), "medal"] for n in NAMES] == ["gold", "bronze", "silver"]
    delta = res.tables["ranking_delta"].set_index(["metric", "run"])
    assert delta.loc[("avg_time_s", "model-A"), "speedup"] == pytest.approx(0.18 / 0.15)
    lists = res.tables["ranking_lists"].set_index("run")
    assert lists.loc["model-A", "category"] == "better than baseline on every metric"
    assert lists.loc["model-C", "category"] == "more accurate but slower"
    common = res.tables["code_common"].iloc[0]
    assert (common["common_problems"], common["runs"], common["problems_seen"]) == (2, 3, 5)
    md = res.markdown()
    assert "avg_time_s ↓ (on 2 common)" in md and "time_ratio ↓ (on 2 common)" in md
    assert "compare the 2 problems that all 3 runs solved (of 5 seen)" in md
    # the tidy table keeps what the runs logged
    tidy = res.tidy.set_index(["run_name", "metric"])
    assert tidy.loc[("model-B", f"{TASK}/avg_time_s"), "value"] == pytest.approx(0.18)
    assert tidy.loc[("model-A", f"{TASK}/avg_time_s"), "value"] == pytest.approx(3.575)


def test_a_run_without_per_problem_results_falls_back_and_says_so(code_exp):
    uri, ids = code_exp
    res = _build(uri, experiment="code-study-common", view="ranking",
                 metrics="pass_at_1,avg_time_s")
    rk = res.tables["ranking"].set_index(["metric", "run"])
    assert rk.loc[("avg_time_s", "model-A"), "value"] == pytest.approx(3.575)  # logged
    assert rk.loc[("avg_time_s", "model-old"), "medal"] == "gold"
    md = res.markdown()
    assert "no per-problem results (artifact code/code_offline.json) for 1 of 4 runs" in md
    assert "(on " not in md


def test_no_common_problem_gives_na(code_exp, mlflow_uri):
    from mlflow.entities import Metric

    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name("code-study-common").experiment_id
    recs = [{"id": "p5", "n": 1, "c": 1, "pass_at_1": 1.0, "status": "passed", "time_s": 1.0,
             "ref_time_s": 1.0, "time_ratio": 1.0}]
    run = client.create_run(exp, run_name="model-D")
    client.log_batch(run.info.run_id, metrics=[Metric(f"{TASK}/{k}", v, 0, 0)
                                               for k, v in task_metrics(recs).items()])
    client.log_dict(run.info.run_id, {"problems": recs}, f"code/{TASK}.json")
    client.set_terminated(run.info.run_id)
    _, ids = code_exp
    res = _build(mlflow_uri, runs=f"{ids['model-A']},{run.info.run_id}", view="ranking",
                 metrics="avg_time_s")
    assert res.tables["ranking"]["value"].isna().all() or res.tables["ranking"].empty
    assert "no problem was solved by all 2 runs" in res.markdown()
