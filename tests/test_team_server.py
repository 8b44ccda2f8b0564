"""The team server and credentials (issue 12, findings 2-4).

* `tracking/team-server.sh` with the basic-auth app, started for real from an env file on a real
  PostgreSQL 15 cluster (runs and users) and a real S3 HTTP endpoint (moto's server mode) for
  artifacts, both on loopback: an unauthenticated write is refused, an authenticated one works,
  MLflow's old default admin password does not; a search of pipelines driven through it with
  credentials (its Optuna study in the same PostgreSQL) lands its runs, metrics, artifacts (in the
  bucket, none on the server's disk) and registry aliases, and its winner loads back through S3;
* the team env file is git-ignored, and the script refuses placeholder values;
* credentials in the tracking URI, in MLFLOW_TRACKING_USERNAME/PASSWORD or in
  MLFLOW_TRACKING_TOKEN pass the pre-check and never appear in params, tags, artifacts or output;
* a server that refuses the client's host name (MLflow 3's allowed-hosts check) is caught by
  the pre-check with one line, although its /health answers 200.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import mlflow_client, subprocess_env
from mlflow_server import _healthy, _tail, free_port, start_server
from services import have_moto, have_postgres, postgres_cluster, require, s3_endpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tracking" / "team-server.sh"


def test_team_env_is_git_ignored():
    out = subprocess.run(["git", "check-ignore", "tracking/team.env", "tracking/local/basic_auth.ini"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert out.returncode == 0 and out.stdout.split() == ["tracking/team.env", "tracking/local/basic_auth.ini"]


def test_team_server_refuses_placeholders():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TEAM_ENV": str(ROOT / "tracking" / "team.env.example"),
                              "PYTHON": sys.executable})
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: set MLFLOW_BACKEND_STORE_URI")


def test_team_server_names_a_missing_database_driver(tmp_path):
    """A plain postgresql:// is psycopg 3 to SQLAlchemy 2.1: a psycopg2-only host gets one line."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg 3 is installed: a plain postgresql:// works here")
    env_file = tmp_path / "team.env"
    env_file.write_text((ROOT / "tracking" / "team.env.example").read_text()
                        .replace("postgresql+psycopg2://", "postgresql://").replace("CHANGE_ME", "x" * 16))
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TEAM_ENV": str(env_file), "PYTHON": sys.executable,
                              "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini")})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: MLFLOW_BACKEND_STORE_URI needs the postgresql "
                                                         "driver psycopg")
    assert "postgresql+psycopg2://" in out.stderr and "xxxxxxxx" not in out.stderr


class Team(typing.NamedTuple):
    uri: str
    password: str   # the admin's
    root: Path      # the server's working folder
    pg: object
    s3: object


@pytest.fixture(scope="module")
def team_services(tmp_path_factory):
    """PostgreSQL (databases mlflow, mlflow_auth, optuna; password logins over TCP) and an S3
    endpoint with the bucket, as a team's server host has them."""
    require(have_postgres() or have_moto())
    root = tmp_path_factory.mktemp("team-services")
    with postgres_cluster(("mlflow", "mlflow_auth", "optuna"), password="pg-" + secrets.token_hex(8)) as pg, \
            s3_endpoint("team-artifacts", root=root) as s3:
        yield pg, s3


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, team_services):
    """tracking/team-server.sh from a real env file."""
    pg, s3 = team_services
    root = tmp_path_factory.mktemp("team")
    port = free_port()
    password = secrets.token_urlsafe(16)
    env_file = root / "team.env"
    env_file.write_text("\n".join([
        f"MLFLOW_BACKEND_STORE_URI={pg.uri('mlflow')}",
        f"MLFLOW_ARTIFACTS_DESTINATION=s3://{s3.bucket}/",
        *(f"{k}={v}" for k, v in s3.env.items()),
        "MLFLOW_HOST=127.0.0.1",
        f"MLFLOW_PORT={port}",
        "MLFLOW_WORKERS=1",
        f"MLFLOW_ALLOWED_HOSTS=127.0.0.1:{port},localhost:{port}",
        "MLFLOW_CORS_ALLOWED_ORIGINS=https://dashboards.example.internal",
        f"MLFLOW_AUTH_DATABASE_URI={pg.uri('mlflow_auth')}",
        "MLFLOW_AUTH_ADMIN_USERNAME=admin",
        f"MLFLOW_AUTH_ADMIN_PASSWORD={password}",
        "MLFLOW_AUTH_DEFAULT_PERMISSION=READ",
        f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(16)}",
    ]) + "\n")
    env = subprocess_env(TEAM_ENV=str(env_file), PYTHON=sys.executable,
                         MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
                         MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                *s3.env):  # the script's env file is the only source of the bucket's settings
        env.pop(var, None)
    log = root / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"team server did not come up:\n{_tail(log)}")
            time.sleep(0.3)
        assert oct((root / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
        yield Team(uri, password, root, pg, s3)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _create_experiment(uri: str, name: str, auth: tuple[str, str] | None) -> int:
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/create", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unauthenticated_write_is_refused_authenticated_works(team_server):
    uri, password = team_server.uri, team_server.password
    assert _create_experiment(uri, "anon", None) == 401
    assert _create_experiment(uri, "default-password", ("admin", "password1234")) == 401
    assert _create_experiment(uri, "admin", ("admin", password)) == 200
    assert mlflow_client(uri.replace("://", f"://admin:{password}@")).get_experiment_by_name("admin") is not None
    assert mlflow_client(uri.replace("://", f"://admin:{password}@")).get_experiment_by_name("anon") is None


def test_admin_adds_a_user_as_the_readme_says(team_server, monkeypatch):
    from mlflow.server import get_app_client

    uri, password = team_server.uri, team_server.password
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    get_app_client("basic-auth", tracking_uri=uri).create_user("alice", "alice-password-123")
    assert _create_experiment(uri, "alice-exp", ("alice", "alice-password-123")) == 200
    assert _create_experiment(uri, "alice-wrong", ("alice", "not-her-password")) == 401


def _leaks(secret: str, uri_with_creds: str, run_id: str, tmp_path: Path) -> list[str]:
    client = mlflow_client(uri_with_creds)
    run = client.get_run(run_id)
    found = [f"param {k}" for k, v in run.data.params.items() if secret in v]
    found += [f"tag {k}" for k, v in run.data.tags.items() if secret in v]
    found += [f"metric {k}" for k in run.data.metrics if secret in k]
    dest = tmp_path / f"arts-{run_id}"
    client.download_artifacts(run_id, "", str(dest))
    found += [f"artifact {p}" for p in dest.rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]
    return found


@pytest.mark.parametrize("how", ["uri", "env"])
def test_credentials_work_and_never_leak(how, team_server, tiny_dirs, ppl_text_file, tmp_path):
    uri, password = team_server.uri, team_server.password
    creds_uri = uri.replace("://", f"://admin:{password}@")
    extra = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password} if how == "env" else {}
    cmd = [sys.executable, "-m", "mlproject", "evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none",
           "--ppl-dataset", str(ppl_text_file), "--seqlen", "32", "--device", "cpu",
           "--experiment", f"creds-{how}", "--tracking-uri", creds_uri if how == "uri" else uri]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(**extra))
    assert out.returncode == 0, out.stderr[-3000:]
    assert password not in out.stdout and password not in out.stderr
    run_id = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("run_id: "))
    run = mlflow_client(creds_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "ppl/sample" in run.data.metrics
    assert _leaks(password, creds_uri, run_id, tmp_path) == []
    if how == "uri":
        assert "--tracking-uri http://***@127.0.0.1" in run.data.tags["mlproject.command"]


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for info in client.list_artifacts(run_id, path):
        files += _artifact_files(client, run_id, info.path) if info.is_dir else [info.path]
    return files


@pytest.mark.slow
def test_a_search_through_the_team_server_lands_everything(team_server, tiny_dirs, ppl_text_file, tmp_path):
    """What a team does with the server: a search of pipelines (prune -> quantize -> score) with
    its study in the team's PostgreSQL, then the registered winner evaluated by name. Everything
    lands: runs FINISHED, metrics, every artifact as an object in the bucket (and no file on the
    server's disk), the registry alias; no password in a param, tag or output."""
    from test_search import make_pipeline, write_space

    uri, password, pg, s3 = team_server.uri, team_server.password, team_server.pg, team_server.s3
    pipe = make_pipeline(tmp_path, tiny_dirs, ppl_text_file)
    space = write_space(tmp_path, pipe, {"pruned.ratio": [0.2], "quant.w_bits": [4, 8]}, objectives=["best_acc"],
                        n_trials=2, sampler={"type": "bruteforce", "seed": 0}, pruner={"type": "none"})
    env = subprocess_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password, OMP_NUM_THREADS="1")
    for var in s3.env:  # clients hold no bucket credentials: the server proxies artifacts
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "mlproject", "search", str(space), "--tracking-uri", uri,
                          "--experiment", "team-search", "--study", "team-search", "--storage", pg.uri("optuna")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    out2 = subprocess.run([sys.executable, "-m", "mlproject", "evaluate", "--model", "models:/team-search@best_acc",
                           "--tasks", "none", "--ppl-dataset", str(ppl_text_file), "--seqlen", "32", "--device", "cpu",
                           "--experiment", "team-search", "--tracking-uri", uri],
                          capture_output=True, text=True, timeout=600, env=env)
    assert out2.returncode == 0, out2.stderr[-3000:]
    for text in (out.stdout, out.stderr, out2.stdout, out2.stderr):
        assert password not in text and pg.password not in text

    client = mlflow_client(uri.replace("://", f"://admin:{password}@"))
    exp = client.get_experiment_by_name("team-search")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    steps = {r.data.tags.get("mlproject.step") for r in runs}
    assert {"search", "pipeline", "prune", "quantize", "evaluate"} <= steps
    assert [r.info.status for r in runs] == ["FINISHED"] * len(runs)
    trials = [r for r in runs if "mlproject.trial" in r.data.tags]
    assert len(trials) == 2 and all("avg_acc" in t.data.metrics for t in trials)
    winner = client.get_model_version_by_alias("team-search", "best_acc")
    assert winner.run_id in {r.data.tags.get("mlproject.target_run") for r in trials}
    (scored,) = [r for r in runs if r.info.run_id == next(line.split(": ", 1)[1] for line in out2.stdout.splitlines()
                                                            if line.startswith("run_id: "))]
    assert "ppl/sample" in scored.data.metrics

    keys = set(s3.keys())
    for run in runs:  # every artifact of every run is an object in the bucket
        files = _artifact_files(client, run.info.run_id)
        assert files or "mlproject.reused_from" in run.data.tags, run.data.tags.get("mlproject.step")
        missing = [f for f in files if f"{exp.experiment_id}/{run.info.run_id}/artifacts/{f}" not in keys]
        assert not missing, (run.data.tags.get("mlproject.step"), missing[:5])
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if pg.password in v or password in v]
    assert any(k.endswith(".safetensors") for k in keys)  # the models too (the quantize and prune outputs)
    on_disk = [p for p in team_server.root.rglob("*") if p.is_file() and p.suffix in (".md", ".safetensors", ".parquet")]
    assert not on_disk and not (team_server.root / "mlartifacts").exists()


def test_missing_credentials_are_one_line(team_server, tiny_dirs, capsys):
    from mlproject import cli

    uri = team_server.uri
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none", "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "needs credentials (401)" in err[-1]
    assert "MLFLOW_TRACKING_USERNAME" in err[-1]


def test_wrong_password_is_one_line(team_server, tiny_dirs, capsys):
    from mlproject import cli

    uri = team_server.uri
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none",
                   "--tracking-uri", uri.replace("://", "://admin:wrong-password-123@")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "401" in err[-1] and "wrong-password-123" not in err[-1]


class _TokenServer(http.server.BaseHTTPRequestHandler):
    """A stand-in for a tracking server behind a token-checking gateway (every path, /health too)."""

    token = ""

    def _reply(self):
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"experiments": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args):  # quiet
        pass


def test_token_passes_the_precheck(monkeypatch):
    from mlproject import tracking
    from mlproject.errors import UserError

    token = "tok-" + secrets.token_hex(8)
    _TokenServer.token = token
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
        with pytest.raises(UserError, match="needs credentials"):
            tracking.check_server(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
        assert tracking.check_server(uri) == uri
    finally:
        server.shutdown()


def test_disallowed_host_name_is_caught_before_the_run(tmp_path, tiny_dirs, capsys):
    from mlproject import cli

    with start_server(tmp_path / "srv", extra_args=["--allowed-hosts", "mlflow.example.internal"]) as uri:
        assert _healthy(uri)  # what the old pre-check looked at
        rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none", "--tracking-uri", uri,
                       "--experiment", "hosts"])
        err = capsys.readouterr().err.strip().splitlines()
        host = uri.split("://", 1)[1]
        assert rc == 2 and err[-1].startswith("error: ")
        assert "Invalid Host header" in err[-1] and f"--allowed-hosts {host}" in err[-1]
