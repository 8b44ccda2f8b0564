"""Faults a hostile-but-fair user finds (issue 12, findings 5-7 and 10): bad tracking URIs and
hub ids, refusals under `mlflow run`, secrets in file names, concurrent first use of a SQLite
store, Ctrl-C, shared cache folders, the artifact download cache, malformed JSONL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny
from conftest import assert_bad_input, mlflow_client, subprocess_env


# -- finding 7: bad tracking URIs, unknown hub ids, refusals under `mlflow run` ---------------
@pytest.mark.parametrize("uri,needle", [
    ("garbage://x", "garbage://x"),
    ("not_a_uri", "not_a_uri"),
    ("sqlite:////proc/nope/m.db", "/proc/nope"),
    ("http://127.0.0.1:notaport", "127.0.0.1:notaport"),
])
def test_bad_tracking_uri_is_one_line(uri, needle, tiny_dirs, capsys):
    import mlflow

    from mlproject import cli

    before = mlflow.get_tracking_uri()
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none", "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and needle in err[0]
    assert mlflow.get_tracking_uri() == before  # a refused URI does not stick to the process


def test_uncached_hub_id_offline_fails_before_any_run(mlflow_uri, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_bad_input(["evaluate", "--model", "nosuchorg/nosuchmodel"], "not in the local Hugging Face cache",
                     mlflow_uri, "hub-offline", capsys, monkeypatch)
    assert mlflow_client(mlflow_uri).get_experiment_by_name("hub-offline") is None


def test_unknown_hub_id_online_fails_before_any_run(mlflow_uri, capsys, monkeypatch, tmp_path):
    """A reachable hub that does not know the id: one line, no run, no experiment. The "hub" is a
    real HTTP server on localhost answering 404 the way huggingface.co does for a missing repo."""
    import http.server
    import threading

    import huggingface_hub.constants as hub_constants

    asked = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            asked.append(self.path)
            self.send_response(200 if self.path == "/" else 404)
            if self.path != "/":
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert_bad_input(["evaluate", "--model", "nosuchorg/nosuchmodel"], "no such repository",
                         mlflow_uri, "hub-online", capsys, monkeypatch)
    finally:
        server.shutdown()
    assert any("nosuchorg/nosuchmodel" in path for path in asked)  # the hub was asked, once reachable
    assert mlflow_client(mlflow_uri).get_experiment_by_name("hub-online") is None


def test_refusal_under_mlflow_run_names_and_tags_its_run(mlflow_uri, tiny_dirs, capsys, monkeypatch):
    """`mlflow run` creates the run before the step starts; a refusal is recorded on it."""
    import mlflow

    from mlproject import cli

    client = mlflow_client(mlflow_uri)
    created = client.create_run(client.create_experiment("refused"))  # what `mlflow run` does first
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    mlflow.set_tracking_uri(mlflow_uri)
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--limit", "abc"])
    assert rc == 2 and "abc" in capsys.readouterr().err
    run = client.get_run(created.info.run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "evaluate:refused"
    assert run.data.tags["mlproject.step"] == "evaluate"
    assert "limit 'abc'" in run.data.tags["mlproject.error"]


# -- finding 5: secrets in names derived from user input ----------------------------------
def test_secret_in_ppl_file_name_stays_out_of_metric_names(mlflow_uri, tiny_dirs, tmp_path, capsys):
    from mlproject import cli

    secret = "S3CRET"
    text = tmp_path / f"ppl?token={secret}&x=1.txt"
    text.write_text(" ".join(tiny.corpus()[:12]))
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none", "--ppl-dataset", str(text),
                   "--seqlen", "32", "--device", "cpu", "--tracking-uri", mlflow_uri, "--experiment", "secret-name"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert secret not in out.out and secret not in out.err
    client = mlflow_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("secret-name").experiment_id])
    assert "ppl/ppl_token_____x_1" in run.data.metrics  # ?token=*** → _token____
    assert not [k for k in run.data.metrics if secret in k]
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v]
    dest = tmp_path / "arts"
    client.download_artifacts(run.info.run_id, "", str(dest))
    assert not [p for p in dest.rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]


# -- finding 6: concurrent first use of a fresh SQLite store -------------------------------
@pytest.mark.slow
def test_four_concurrent_first_runs_on_a_new_sqlite_store(tiny_dirs, ppl_text_file, tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    cmd = [sys.executable, "-m", "mlproject", "evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "none",
           "--ppl-dataset", str(ppl_text_file), "--seqlen", "32", "--device", "cpu", "--tracking-uri", uri,
           "--experiment", "first-use"]
    env = subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, cwd=db.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(err[-2000:] for _, err in results)
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("first-use").experiment_id])
    everywhere = {e.name: len(client.search_runs([e.experiment_id])) for e in client.search_experiments()}
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}, everywhere
    assert all("ppl/sample" in r.data.metrics for r in runs)


def test_the_loser_of_a_race_to_create_the_experiment_runs_in_it(tmp_path, monkeypatch):
    # The interleaving behind a lost run in the test above, made deterministic: another process
    # created the experiment just after this one looked it up. MLflow's set_experiment then
    # returns the experiment without making it active, and a run started without its id
    # landed in "Default".
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from mlproject import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.check_server(uri)
    winner = MlflowClient(uri).create_experiment("raced")
    real, looks = TrackingServiceClient.get_experiment_by_name, []

    def stale_first_look(self, name):
        looks.append(name)
        return None if len(looks) == 1 else real(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", stale_first_look)
    with tracking.step_run("evaluate", experiment="raced", log_env=False) as run:
        pass
    assert looks and run.experiment_id == winner
    assert MlflowClient(uri).get_run(run.run_id).info.experiment_id == winner


# -- finding 10: Ctrl-C, shared cache folders, artifact downloads, JSONL errors ------------
@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_kills_the_run(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    from victim import launch

    proc, go = launch(tmp_path, mlflow_uri, tiny_dirs["llama"], ppl_text_file, "ctrl-c")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted (Ctrl-C); a run in progress was marked KILLED"
    client = mlflow_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert run.info.status == "KILLED"


def test_converted_model_folder_follows_the_umask(tmp_path, monkeypatch, tiny_dirs):
    """The GGUF conversion's output is shared: not mkdtemp's 0700."""
    import transformers

    from mlproject.models import loading
    from mlproject.models.reference import resolve

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv("MLPROJECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "gguf_path", lambda package, filename: fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: tiny.make_model("llama"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.make_tokenizer())
    old = os.umask(0o022)
    try:
        out = loading.converted_gguf_dir(resolve("smollm2"))
    finally:
        os.umask(old)
    assert (out / "config.json").is_file()
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert oct(out.parent.stat().st_mode & 0o777) == "0o755"


def test_artifact_downloads_are_cached_per_uri_and_cleaned(mlflow_uri, tmp_path, monkeypatch):
    import tempfile

    import mlflow

    from mlproject import tracking
    from mlproject.paths import artifacts_root

    monkeypatch.setenv("MLPROJECT_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(mlflow_uri)
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with tracking.step_run("prune", experiment="artifact-cache", log_env=False) as run:
        run.log_artifacts(src, "model")
    calls = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **k: calls.append(k) or real(**k))
    first = tracking.download(f"runs:/{run.run_id}/model")
    second = tracking.download(f"runs:/{run.run_id}/model")
    assert first == second and (first / "config.json").read_text() == "{}"
    assert len(calls) == 1  # the second one came from the cache
    assert artifacts_root() in first.parents and not str(first).startswith(tempfile.gettempdir() + "/mlproject-artifacts-")
    # an entry unused for longer than MLPROJECT_ARTIFACT_CACHE_DAYS goes, and so do old /tmp downloads
    legacy = Path(tempfile.mkdtemp(prefix="mlproject-artifacts-"))
    old = time.time() - 3 * 86400
    os.utime(legacy, (old, old))
    entry = first.parent
    os.utime(entry / ".mlproject-download.json", (old, old))
    monkeypatch.setenv("MLPROJECT_ARTIFACT_CACHE_DAYS", "2")
    config = tracking.download(f"runs:/{run.run_id}/model/config.json")
    assert config.read_text() == "{}"
    assert not entry.exists() and not legacy.exists()
    assert [p for p in artifacts_root().iterdir() if p.is_dir()] == [config.parent]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from mlproject.errors import UserError
    from mlproject.training.datasets import load_training_data

    path = tmp_path / "train.jsonl"
    rows = [json.dumps(r) for r in tiny.SFT_ROWS[:3]]
    path.write_text("\n".join([rows[0], rows[1], '{"prompt": "x", "completion": oops}', rows[2]]) + "\n")
    with pytest.raises(UserError) as err:
        load_training_data(str(path), "sft")
    assert str(path) in str(err.value) and "line 3" in str(err.value)


# -- finding 1 (part): eval_seconds does not count time stalled on the tracking server ------
def test_eval_seconds_leaves_out_tracking_stalls(tiny_dirs, ppl_text_file, monkeypatch):
    import types

    from mlproject.evaluation.options import EvalOptions
    from mlproject.models import loading
    from mlproject.models.reference import resolve
    from mlproject.evaluation import engine as evaluate  # the evaluation engine measures; steps log

    loaded = loading.load_model(resolve(str(tiny_dirs["llama"])), device="cpu")
    plan = evaluate.plan_eval(EvalOptions(tasks="none", ppl_dataset=str(ppl_text_file), seqlen=32))
    # A clock the "server" moves by 1000 s per call: no sleeping, no dependence on machine load.
    skew = {"s": 0.0}
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skew["s"])
    monkeypatch.setattr(evaluate, "time", clock)
    seen = []

    def stalled_server(metrics):
        seen.append(dict(metrics))
        skew["s"] += 1000.0

    out = evaluate.measure(loaded, plan, stalled_server)
    assert [sorted(m) for m in seen] == [["nll/sample", "ppl/sample"], ["eval_seconds"]]
    assert 0 < out.seconds < 500  # the 1000 s stall of the PPL hand-off is not eval time
    assert out.metrics["eval_seconds"] == out.seconds == seen[1]["eval_seconds"]
