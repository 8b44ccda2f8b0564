"""The compare entry point on a real server: a compress -> fine-tune study recorded by hand
with known numbers, compared through the CLI; outputs logged as artifacts of a compare run."""

import time

import pytest

from conftest import mlflow_client
from mlproject import cli

EXP = "cmp-step-study"


def _log(client, exp_id, name, tags, metrics):
    from mlflow.entities import Metric, RunTag

    run = client.create_run(exp_id, run_name=name)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def study(mlflow_uri):
    client = mlflow_client(mlflow_uri)
    exp_id = client.create_experiment(EXP)
    fam = {"mlproject.family": "Tiny", "mlproject.base_model": "tiny"}
    base = _log(client, exp_id, "evaluate:tiny", {**fam, "mlproject.step": "evaluate", "mlproject.role": "base"},
                {"ppl/offline": 6.10, "avg_acc": 0.70, "params_b": 8.03,
                 "mlp_capitals/acc_norm": 0.80, "mlp_capitals/acc_norm_stderr": 0.01,
                 "mlp_nonce/acc_norm": 0.60, "mlp_nonce/acc_norm_stderr": 0.01})
    pruned = _log(client, exp_id, "prune:tiny", {**fam, "mlproject.step": "prune", "mlproject.role": "pruned",
                                                  "mlproject.upstream_run": base},
                  {"ppl/offline": 13.39, "avg_acc": 0.5946, "params_b": 6.42,
                   "mlp_capitals/acc_norm": 0.70, "mlp_nonce/acc_norm": 0.4892})
    tuned = _log(client, exp_id, "finetune:tiny", {**fam, "mlproject.step": "finetune", "mlproject.role": "best_acc",
                                                   "mlproject.upstream_run": pruned},
                 {"ppl/offline": 10.78, "avg_acc": 0.6492, "params_b": 6.42,
                  "before/ppl/offline": 13.39, "before/avg_acc": 0.5946,
                  "mlp_capitals/acc_norm": 0.75, "mlp_nonce/acc_norm": 0.5484})
    return {"base": base, "pruned": pruned, "tuned": tuned}


def test_compare_run_holds_every_format_and_the_right_numbers(study, mlflow_uri, capsys, tmp_path):
    rc = cli.main(["compare", "--experiment", EXP, "--baseline", "role:base", "--tracking-uri", mlflow_uri])
    out = capsys.readouterr().out
    assert rc == 0, out
    # PPL change (10.78 - 13.39) / 13.39 = -19.49 %; accuracy (0.6492 - 0.5946) / 0.5946 = +9.18 %
    assert "-19.49" in out and "9.18" in out
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name(EXP)
    (crun,) = client.search_runs([exp.experiment_id], "tags.`mlproject.step` = 'compare'")
    assert crun.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(crun.info.run_id)}
    assert {"compare.md", "compare.html", "compare.json", "tidy.csv", "report.md"} <= names
    assert any(n.endswith(".png") for n in names)
    md = open(client.download_artifacts(crun.info.run_id, "report.md", str(tmp_path))).read()
    assert "-19.49" in md
    assert crun.data.metrics["system/compare/runs"] == 3
    # a second compare leaves the first compare run out of its tables
    assert cli.main(["compare", "--experiment", EXP, "--view", "ranking", "--tracking-uri", mlflow_uri]) == 0
    out = capsys.readouterr().out
    assert "finetune:tiny" in out and "| compare:" not in out


@pytest.mark.parametrize("argv,needle", [
    (["--experiment", EXP, "--baseline", "name:no-such-run"], "no-such-run"),
    (["--experiment", "no-such-experiment"], "no-such-experiment"),
    (["--experiment", EXP, "--view", "sideways"], "sideways"),
    (["--experiment", EXP, "--format", "docx"], "docx"),
    (["--experiment", EXP, "--directions", "avg_time=fastest"], "fastest"),
])
def test_bad_compare_input(argv, needle, study, mlflow_uri, capsys):
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name(EXP)
    before = len(client.search_runs([exp.experiment_id]))
    rc = cli.main(["compare", *argv, "--tracking-uri", mlflow_uri])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: ") and needle in err
    assert len(client.search_runs([exp.experiment_id])) == before
