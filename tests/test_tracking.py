import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import mlflow_client, subprocess_env
from mlproject import tracking


@pytest.mark.parametrize("raw,secret", [
    ("http://alice:hunter2@mlflow.internal:5000", "hunter2"),
    ("postgresql://mlflow:pa55word@db:5432/mlflow", "pa55word"),
    ("--token hf_abcdefghijklmnopqrstuvwxyz123456", "hf_abcdefghijklmnopqrstuvwxyz123456"),
    ("https://bucket.s3.amazonaws.com/x?X-Amz-Signature=deadbeef&sig=abc", "deadbeef"),
])
def test_redact_removes_credentials(raw, secret):
    assert secret not in tracking.redact(raw)


def test_secret_named_params_are_hidden():
    cleaned = tracking.clean_mapping({"hf_token": "abc", "api_key": "xyz", "lr": 0.1, "empty_token": "",
                                      "ppl.tokens": 24000, "db_password": "pw"}, 100)
    assert cleaned == {"hf_token": "***", "api_key": "***", "lr": "0.1", "empty_token": "",
                       "ppl.tokens": "24000", "db_password": "***"}


def test_metric_names_are_made_legal():
    assert tracking.metric_key("boolq/acc,none") == "boolq/acc_none"
    assert tracking.metric_key("gsm8k/exact_match.flexible-extract") == "gsm8k/exact_match.flexible-extract"


def _runs(uri, exp):
    client = mlflow_client(uri)
    e = client.get_experiment_by_name(exp)
    return client.search_runs([e.experiment_id]) if e else []


def test_exception_ends_failed_and_interrupt_ends_killed(mlflow_uri):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    with pytest.raises(ValueError):
        with tracking.step_run("evaluate", experiment="t-status", run_name="a", log_env=False):
            raise ValueError("bad things\nsecond line")
    with pytest.raises(KeyboardInterrupt):
        with tracking.step_run("evaluate", experiment="t-status", run_name="b", log_env=False):
            raise KeyboardInterrupt
    runs = {r.info.run_name: r for r in _runs(mlflow_uri, "t-status")}
    assert runs["a"].info.status == "FAILED"
    assert runs["a"].data.tags["mlproject.error"] == "ValueError: bad things"
    assert runs["b"].info.status == "KILLED"


def test_metrics_go_in_batches(mlflow_uri, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_uri)
    monkeypatch.setenv("MLPROJECT_SYSTEM_METRICS", "off")  # counts this run's requests and metrics
    calls = []
    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    with tracking.step_run("evaluate", experiment="t-batch", log_env=False) as run:
        calls.clear()
        run.log_metrics({f"task{i}/acc": i / 1500 for i in range(1500)})
        assert len(calls) == 2  # 1000 + 500, not 1500 requests
    got = mlflow_client(mlflow_uri).get_run(run.run_id).data.metrics
    assert len(got) == 1500 and got["task750/acc"] == pytest.approx(0.5)


def test_metrics_and_tags_in_one_request_spooled_as_two_records(mlflow_uri, monkeypatch, tmp_path):
    """A search trial's result: one log_batch; when the server does not take it, the spool holds
    the tags and the metrics records, and `runs sync` delivers both."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLPROJECT_SPOOL", str(tmp_path / "spool"))
    mlflow.set_tracking_uri(mlflow_uri)
    calls = []
    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    with tracking.step_run("search", experiment="t-combined", log_env=False) as run:
        calls.clear()
        run.log_metrics_and_tags({"avg_acc": 0.5, "fidelity/documents": 7}, {"mlproject.trial_state": "COMPLETE"},
                                 step=2)
        assert len(calls) == 1 and len(calls[0]["metrics"]) == 2 and len(calls[0]["tags"]) == 1
        assert run.spool.pending() == []  # both records acknowledged
        # the server does not take the next one: both records stay in the spool
        monkeypatch.setattr(tracking._LINK, "send", lambda fn, what: False)
        run.log_metrics_and_tags({"avg_acc": 0.75}, {"mlproject.trial_state": "PRUNED"}, step=3)
        pending = run.spool.pending()
        monkeypatch.undo()
        monkeypatch.setenv("MLPROJECT_SPOOL", str(tmp_path / "spool"))
        assert [r["op"] for r in pending] == ["tags", "metrics"]
        spool_path = run.spool.path
    got = mlflow_client(mlflow_uri).get_run(run.run_id).data
    assert got.metrics["avg_acc"] == 0.5 and got.tags["mlproject.trial_state"] == "COMPLETE"
    assert tracking.sync_spool(spool_path, mlflow_uri) == {"tags": 1, "metrics": 1}
    got = mlflow_client(mlflow_uri).get_run(run.run_id).data
    assert got.metrics["avg_acc"] == 0.75 and got.tags["mlproject.trial_state"] == "PRUNED"
    history = mlflow_client(mlflow_uri).get_metric_history(run.run_id, "avg_acc")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.5), (3, 0.75)]


def test_attaches_to_the_run_mlflow_run_created(mlflow_uri, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    client = mlflow_client(mlflow_uri)
    exp_id = client.create_experiment("t-attach")
    created = client.create_run(exp_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    with tracking.step_run("evaluate", log_env=False) as run:
        assert run.run_id == created.info.run_id
        with tracking.step_run("child", log_env=False) as child:  # an active run is its parent
            pass
    assert "MLFLOW_RUN_ID" not in os.environ
    assert client.get_run(created.info.run_id).info.status == "FINISHED"
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == created.info.run_id


def test_sigterm_leaves_no_run_running(mlflow_uri, tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time, mlflow
        from mlproject import tracking
        from mlproject.cli import _terminate
        signal.signal(signal.SIGTERM, _terminate)
        mlflow.set_tracking_uri({mlflow_uri!r})
        with tracking.step_run("evaluate", experiment="t-sigterm", log_env=False):
            print("started", flush=True)
            time.sleep(60)
    """))
    # subprocess_env keeps PYTHONPATH (a machine whose packages come from it must still find mlflow)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    (run,) = _runs(mlflow_uri, "t-sigterm")
    assert run.info.status == "KILLED"
