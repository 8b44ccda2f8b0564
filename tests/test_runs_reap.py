"""SIGKILL leaves a RUNNING run (mlflow#3932): the heartbeat, `mlproject runs reap`, and
compare leaving unfinished runs out (issue 12, finding 8)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import mlflow_client, subprocess_env
from victim import launch


def reap(uri, *args):
    out = subprocess.run([sys.executable, "-m", "mlproject", "runs", "reap", "--tracking-uri", uri, *args],
                         capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_killed_step_is_reaped_with_its_reason(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    client = mlflow_client(mlflow_uri)
    proc, go = launch(tmp_path, mlflow_uri, tiny_dirs["llama"], ppl_text_file, "reap-kill",
                      MLPROJECT_HEARTBEAT_SECONDS="1")
    exp = client.get_experiment_by_name("reap-kill").experiment_id
    (run,) = client.search_runs([exp])
    tags = run.data.tags
    assert tags["mlproject.host"] == socket.gethostname() and tags["mlproject.pid"] == str(proc.pid)
    first = int(tags["mlproject.heartbeat"])
    deadline = time.monotonic() + 60
    while int(client.get_run(run.info.run_id).data.tags["mlproject.heartbeat"]) == first:
        assert time.monotonic() < deadline, "the heartbeat was never refreshed"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run_id = run.info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # what SIGKILL leaves behind

    from mlproject.compare import CompareSpec, build

    res = build(mlflow_uri, CompareSpec(experiments=("reap-kill",), view="ranking"))
    assert res.stats["runs"] == 0 and res.runset.left_out == {"RUNNING": 1}
    shown = build(mlflow_uri, CompareSpec(experiments=("reap-kill",), view="ranking", statuses="all"))
    assert "1 runs (1 RUNNING)" in shown.markdown()

    out = reap(mlflow_uri, "--experiment", "reap-kill", "--dry-run")
    assert f"{run_id}  would fail" in out and client.get_run(run_id).info.status == "RUNNING"
    out = reap(mlflow_uri, "--experiment", "reap-kill")
    assert f"{run_id}  failed" in out and "1 RUNNING run(s) looked at, 1 marked FAILED" in out
    after = client.get_run(run_id)
    assert after.info.status == "FAILED"
    reason = after.data.tags["mlproject.reaped"]
    assert reason.startswith(f"process {proc.pid} on {socket.gethostname()} is gone")
    assert after.data.tags["mlproject.error"] == f"reaped: {reason}"
    assert after.info.end_time == int(after.data.tags["mlproject.heartbeat"]) * 1000


def test_reap_decides_by_pid_here_and_heartbeat_elsewhere(mlflow_uri):
    import mlflow

    from mlproject import tracking

    mlflow.set_tracking_uri(mlflow_uri)
    client = mlflow_client(mlflow_uri)
    exp = client.create_experiment("reap-rules")
    now = int(time.time())
    remote_dead = client.create_run(exp, run_name="remote-dead", tags={
        "mlproject.host": "gpu-node-7", "mlproject.pid": "4242", "mlproject.heartbeat": str(now - 5000)}).info.run_id
    remote_alive = client.create_run(exp, run_name="remote-alive", tags={
        "mlproject.host": "gpu-node-7", "mlproject.pid": "4242", "mlproject.heartbeat": str(now - 30)}).info.run_id
    foreign = client.create_run(exp, run_name="not-ours").info.run_id
    # a pid on this host that exists but started after the run: a reused pid, so dead
    reused = client.create_run(exp, run_name="reused-pid", start_time=1000, tags={
        "mlproject.host": socket.gethostname(), "mlproject.pid": str(os.getpid()),
        "mlproject.heartbeat": str(now)}).info.run_id
    with tracking.step_run("evaluate", experiment="reap-rules", log_env=False) as live:
        rows = {r["run_id"]: r for r in tracking.reap_runs(["reap-rules"], stale_seconds=600)}
        assert rows[live.run_id]["action"] == "kept" and "is alive" in rows[live.run_id]["reason"]
    assert rows[remote_dead]["action"] == "failed" and "no heartbeat from gpu-node-7 for 5" in rows[remote_dead]["reason"]
    assert rows[remote_alive]["action"] == "kept"
    assert rows[foreign]["action"] == "kept" and "no heartbeat tag" in rows[foreign]["reason"]
    assert rows[reused]["action"] == "failed"
    status = {rid: client.get_run(rid).info.status for rid in rows}
    assert status == {live.run_id: "FINISHED", remote_dead: "FAILED", remote_alive: "RUNNING",
                      foreign: "RUNNING", reused: "FAILED"}
