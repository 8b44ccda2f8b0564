"""A tracking server that goes away in the middle of a step (issue 12, finding 1).

Each scenario runs a real `mlproject evaluate` on a tiny model in a child process against a
real `mlflow server`. The child waits at the start of its perplexity pass until the test has
done its damage to the server (a gate file), so nothing depends on timing:

* the server is killed for good: the step ends within the retry budget, prints its summary,
  says where its results are and how to send them (exit 75); `mlproject runs sync` sends them
  to a server restarted on the same store, and sending twice duplicates nothing;
* the server hangs (a socket that never answers) and the step gets SIGTERM: it exits within
  seconds, the run's final status KILLED waits in the spool;
* the server comes back (same port) within the budget: nothing is lost, no spool is left.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import mlflow_client, subprocess_env
from mlflow_server import start_server
from victim import launch

pytestmark = pytest.mark.slow


def only_run(uri, experiment):
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def as_printed(value: str):
    """The number a summary line shows, with the tolerance its rounding implies (the CLI rounds
    what it prints: PPL to 0.001, scores to 0.0001, seconds to 0.1)."""
    text = value.replace(",", "")
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    return pytest.approx(float(text), abs=0.5 * 10 ** -decimals + 1e-12)


def pending(spool_dir: Path) -> list[dict]:
    journal = [json.loads(line) for line in (spool_dir / "journal.jsonl").read_text().splitlines()]
    sent_file = spool_dir / "sent"
    sent = {int(x) for x in sent_file.read_text().split()} if sent_file.exists() else set()
    return [r for r in journal if r["seq"] not in sent]


def test_server_gone_for_good_then_sync(tmp_path, tiny_dirs, ppl_text_file):
    store = tmp_path / "store"
    store.mkdir()
    backend = f"sqlite:///{store / 'mlflow.db'}"
    budget = 6
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(start_server(store / "server", backend_store_uri=backend,
                                               artifacts=store / "artifacts"))
        proc, go = launch(tmp_path, uri, tiny_dirs["llama"], ppl_text_file, "loss",
                          MLPROJECT_TRACKING_RETRY_SECONDS=str(budget))
        run_id = only_run(uri, "loss").info.run_id
    # the server is gone (its context closed); let the step go on
    go.touch()
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=budget + 240)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 75, err[-3000:]
    assert elapsed < budget + 180  # bounded by the budget, not by MLflow's minutes of retries

    # The summary is printed: every score, including lm-eval's, measured after the server died.
    printed = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert printed["run_id"] == run_id
    assert {"ppl/sample", "nll/sample", "mlp_capitals/acc", "avg_acc", "eval_seconds"} <= set(printed)
    spool_dir = tmp_path / "spool" / run_id
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: results not delivered") and str(spool_dir) in last
    assert "mlproject runs sync" in last

    # Everything the step logged after the loss waits in the spool, with the final status.
    left = pending(spool_dir)
    metrics = {m[0]: m[1] for r in left if r["op"] == "metrics" for m in r["metrics"]}
    assert metrics["ppl/sample"] == as_printed(printed["ppl/sample"])
    assert metrics["mlp_capitals/acc"] == as_printed(printed["mlp_capitals/acc"])
    assert "eval_seconds" in metrics and "model_size_mb" in metrics
    names = {r["name"] for r in left if r["op"] == "artifact"}
    assert {"report.md", "results.json"} <= names
    assert all((spool_dir / "files" / str(r["seq"]) / r["name"]).is_file() for r in left if r["op"] == "artifact")
    assert [r["status"] for r in left if r["op"] == "status"] == ["FINISHED"]
    copy = tmp_path / "spool-copy"
    shutil.copytree(spool_dir, copy)

    # A server back on the same store; `mlproject runs sync` sends it all.
    with start_server(store / "server2", backend_store_uri=backend, artifacts=store / "artifacts") as uri2:
        client = mlflow_client(uri2)
        assert client.get_run(run_id).info.status == "RUNNING"
        sync = subprocess.run([sys.executable, "-m", "mlproject", "runs", "sync", "--tracking-uri", uri2],
                              capture_output=True, text=True, timeout=300,
                              env=subprocess_env(MLPROJECT_SPOOL=str(tmp_path / "spool")))
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert not spool_dir.exists()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in ("ppl/sample", "mlp_capitals/acc", "avg_acc", "eval_seconds"):
            assert run.data.metrics[key] == as_printed(printed[key])
        arts = {a.path for a in client.list_artifacts(run_id)}
        assert {"report.md", "env.json", "lm_eval"} <= arts
        history = {k: len(client.get_metric_history(run_id, k)) for k in ("ppl/sample", "mlp_capitals/acc")}
        assert history == {"ppl/sample": 1, "mlp_capitals/acc": 1}

        # Idempotent: nothing left to send, and a second copy of the same spool adds no point.
        again = subprocess.run([sys.executable, "-m", "mlproject", "runs", "sync", str(copy), "--tracking-uri", uri2],
                               capture_output=True, text=True, timeout=300, env=subprocess_env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert {k: len(client.get_metric_history(run_id, k)) for k in history} == history
        assert client.get_run(run_id).info.status == "FINISHED"


def test_sigterm_while_the_server_hangs(tmp_path, tiny_dirs, ppl_text_file):
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(start_server(tmp_path / "server"))
        proc, go = launch(tmp_path, uri, tiny_dirs["llama"], ppl_text_file, "hang",
                          MLPROJECT_TRACKING_RETRY_SECONDS="600")
        run_id = only_run(uri, "hang").info.run_id
    # A socket on the server's port that accepts nothing: requests hang instead of failing.
    port = int(uri.rsplit(":", 1)[1])
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    black_hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    black_hole.bind(("127.0.0.1", port))
    black_hole.listen(1)
    try:
        go.touch()
        time.sleep(3)  # the step is now blocked on a request that will never be answered
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)  # seconds, where MLflow alone takes minutes
    finally:
        black_hole.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    left = pending(tmp_path / "spool" / run_id)
    assert [r["status"] for r in left if r["op"] == "status"] == ["KILLED"]
    assert any(r["op"] == "metrics" and any(m[0] == "ppl/sample" for m in r["metrics"]) for r in left)
    assert "Traceback" not in err


def test_server_back_within_the_budget_loses_nothing(tmp_path, tiny_dirs, ppl_text_file):
    store = tmp_path / "store"
    store.mkdir()
    backend = f"sqlite:///{store / 'mlflow.db'}"
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(start_server(store / "server", backend_store_uri=backend,
                                               artifacts=store / "artifacts"))
        proc, go = launch(tmp_path, uri, tiny_dirs["llama"], ppl_text_file, "blip",
                          MLPROJECT_TRACKING_RETRY_SECONDS="240")
        run_id = only_run(uri, "blip").info.run_id
    port = int(uri.rsplit(":", 1)[1])
    go.touch()
    time.sleep(2)  # the step's first calls fail now
    with start_server(store / "server", backend_store_uri=backend, artifacts=store / "artifacts", port=port):
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        assert "not answering" in err and "answers again" in err
        run = mlflow_client(uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert {"ppl/sample", "mlp_capitals/acc", "eval_seconds"} <= set(run.data.metrics)
        assert "report.md" in {a.path for a in mlflow_client(uri).list_artifacts(run_id)}
    assert not (tmp_path / "spool" / run_id).exists()
