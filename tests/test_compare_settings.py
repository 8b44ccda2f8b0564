"""compare flags runs scored with other evaluation settings in every view, and `compare --runs`
records its run beside the runs compared, never in an experiment nobody named (issue 11, item 6)."""

import time

from conftest import mlflow_client
from mlproject import cli
from mlproject.compare import CompareSpec, RunSet, compute

SCORES = {"ppl/offline": 4.0, "avg_acc": 0.40, "mlp_nonce/acc_norm": 0.30, "mlp_nonce/acc_norm_stderr": 0.03,
          "mlp_arith/acc_norm": 0.50, "mlp_arith/acc_norm_stderr": 0.03}
FULL = {"limit": "all", "batch_size": "16", "num_fewshot": "task default", "ppl.seqlen": "512", "ppl.windows": "41"}


def record(run_id, name, metrics, params, lm_eval="0.4.13", role="eval"):
    return {"run_id": run_id, "run_name": name, "metrics": metrics, "params": params, "start_time": int(run_id, 16),
            "tags": {"mlproject.step": "evaluate", "mlproject.family": "SmolLM2", "mlproject.role": role,
                     "env.pkg.lm_eval": lm_eval,
                     "mlproject.avg_acc_metrics": '{"mlp_nonce": "acc_norm", "mlp_arith": "acc_norm"}'}}


def runset():
    better = {k: (v * 0.9 if k.startswith("ppl/") else v + 0.1 if "stderr" not in k else v) for k, v in SCORES.items()}
    return RunSet.from_records([
        record("a" * 32, "full", SCORES, FULL, role="base"),
        # the same model scored on the first 20 documents and 8 windows: "better on every metric"
        record("b" * 32, "quick", better, {**FULL, "limit": "20", "ppl.windows": "8"}),
        record("c" * 32, "same-settings", better, FULL),
        # mlflow run logged the raw value; the step logged what it resolved beside it
        record("d" * 32, "other-lm-eval", SCORES, {**FULL, "limit": "''", "resolved.limit": "all"}, lm_eval="0.4.9"),
    ])


def test_settings_that_differ_are_found_against_the_baseline():
    result = compute(runset(), CompareSpec(baseline="name:full", view="versus,ranking"))
    flags = result.setting_flags
    assert flags == {"b" * 32: "limit 20 (vs all), PPL windows 8 (vs 41)", "d" * 32: "lm-eval 0.4.9 (vs 0.4.13)"}
    assert "c" * 32 not in flags and "a" * 32 not in flags


def test_every_view_marks_the_runs():
    md = compute(runset(), CompareSpec(baseline="name:full", view="all")).markdown()
    assert "## ⚠ Evaluation settings differ" in md
    assert "| quick ⚠ | limit 20 (vs all), PPL windows 8 (vs 41) | full |" in md
    assert "⚠ Scored with other settings: limit 20 (vs all), PPL windows 8 (vs 41)." in md  # versus
    assert "| quick ⚠ |" in md.split("## Ranking", 1)[1]  # ranking tables
    lists = md.split("Better than baseline on every metric", 1)[1].split("\n\n", 1)[0]
    assert "quick ⚠" in lists and "same-settings" in lists and "same-settings ⚠" not in lists
    summary = compute(runset(), CompareSpec(view="summary")).markdown()
    assert "⚠ Evaluation settings differ" in summary and "| quick |" not in summary


def test_without_baseline_the_most_common_settings_are_the_reference():
    flags = compute(runset(), CompareSpec(view="ranking")).setting_flags
    assert set(flags) == {"b" * 32, "d" * 32}


def _log(client, exp_id, name, params):
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(exp_id, run_name=name)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in SCORES.items()],
                     params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag("mlproject.step", "evaluate"), RunTag("env.pkg.lm_eval", "0.4.13")])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_compare_runs_records_beside_them_and_creates_no_experiment(mlflow_uri, capsys):
    client = mlflow_client(mlflow_uri)
    exp_id = client.create_experiment("cmp-runs-only")
    a = _log(client, exp_id, "full", FULL)
    b = _log(client, exp_id, "quick", {**FULL, "limit": "20"})
    experiments = {e.name for e in client.search_experiments()}
    assert cli.main(["compare", "--runs", f"{a},{b}", "--view", "versus", "--format", "md",
                     "--tracking-uri", mlflow_uri]) == 0
    out = capsys.readouterr().out
    assert "⚠ Evaluation settings differ" in out and "limit 20 (vs all)" in out
    assert {e.name for e in client.search_experiments()} == experiments  # nothing created
    (crun,) = client.search_runs([exp_id], "tags.`mlproject.step` = 'compare'")
    assert crun.data.params["runs"] == f"{a},{b}" and crun.data.params["baseline"] == "none"
    note = crun.data.tags["mlflow.note.content"]
    assert "⚠ evaluation settings differ: quick: limit 20 (vs all)" in note
