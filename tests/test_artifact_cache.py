"""The artifact cache of ``tracking.download``: a size cap with least-recently-used eviction,
artifacts larger than the cap kept out of it, and local artifact stores read in place.

Real ``mlflow server`` processes (tests/mlflow_server.py) and real logged artifacts of ~100 KB;
the cap is made tiny through ``MLPROJECT_ARTIFACT_CACHE_GB``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import subprocess_env
from mlflow_server import start_server

KB100 = 100_000
GIB = 1024**3
LOGGER = "mlproject.tracking.artifacts"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private MLPROJECT_CACHE per test; a helper to set the cap in bytes."""
    monkeypatch.setenv("MLPROJECT_CACHE", str(tmp_path / "cache"))

    def cap(nbytes: float) -> int:
        monkeypatch.setenv("MLPROJECT_ARTIFACT_CACHE_GB", repr(nbytes / GIB))
        from mlproject.tracking.artifacts import cache_cap_bytes

        return cache_cap_bytes()

    return cap


@pytest.fixture
def use_server():
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")

    def use(uri: str) -> None:
        mlflow.set_tracking_uri(uri)

    yield use
    mlflow.set_tracking_uri(before)  # None unsets it


@pytest.fixture
def downloads(monkeypatch):
    """Every call of mlflow.artifacts.download_artifacts (what a cache hit does not do)."""
    import mlflow

    calls: list[str] = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts",
                        lambda **k: calls.append(k["artifact_uri"]) or real(**k))
    return calls


def log_folder(uri: str, experiment: str, name: str, nbytes: int = KB100) -> str:
    """A finished run holding ``data/`` (``nbytes`` of random bytes and its name); its URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        (folder / "blob.bin").write_bytes(os.urandom(nbytes))
        (folder / "name.txt").write_text(name)
        client.log_artifacts(run.info.run_id, str(folder), "data")
    client.set_terminated(run.info.run_id)
    return f"runs:/{run.info.run_id}/data"


def entries() -> set[Path]:
    from mlproject.paths import artifacts_root

    root = artifacts_root()
    return {p for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def test_the_cap_evicts_the_least_recently_used_entry(mlflow_uri, cache, use_server, downloads, caplog):
    from mlproject import tracking
    from mlproject.paths import artifacts_root
    from mlproject.tracking.artifacts import cache_bytes

    use_server(mlflow_uri)
    cap = cache(3.5 * KB100)  # three entries fit, four do not
    a, b, c, d = (log_folder(mlflow_uri, "cache-lru", n) for n in "abcd")
    got = {}
    for uri in (a, b, c):
        got[uri] = tracking.download(uri)
        assert artifacts_root() in got[uri].parents
    assert tracking.download(a) == got[a] and len(downloads) == 3  # a hit: a is now the most recent
    assert cache_bytes() <= cap and len(entries()) == 3
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got[d] = tracking.download(d)
    assert not got[b].exists()  # the least recently used went
    for uri, name in ((a, "a"), (c, "c"), (d, "d")):
        assert (got[uri] / "name.txt").read_text() == name
        assert (got[uri] / "blob.bin").stat().st_size == KB100
    assert entries() == {got[a].parent, got[c].parent, got[d].parent}
    assert cache_bytes() <= cap
    evicted = [r for r in caplog.records if r.levelno == logging.INFO and "evicted" in r.getMessage()]
    assert len(evicted) == 1 and b in evicted[0].getMessage()
    # b comes back by downloading it again; c (now the least recently used) makes room
    assert (tracking.download(b) / "name.txt").read_text() == "b" and len(downloads) == 5
    assert not got[c].exists() and got[a].exists() and got[d].exists()
    assert cache_bytes() <= cap


def test_an_entry_in_use_is_not_evicted(mlflow_uri, cache, use_server):
    from filelock import FileLock

    from mlproject import tracking
    from mlproject.tracking.artifacts import cache_bytes

    use_server(mlflow_uri)
    cap = cache(2.5 * KB100)
    a, b, c = (log_folder(mlflow_uri, "cache-in-use", n) for n in "abc")
    pa, pb = tracking.download(a), tracking.download(b)
    with FileLock(str(pa.parent) + ".lock"):  # another process is reading a's entry
        pc = tracking.download(c)
    assert pa.exists() and not pb.exists() and pc.exists()  # b went though a was older
    assert cache_bytes() <= cap


def test_an_artifact_larger_than_the_cap_is_not_cached(mlflow_uri, cache, use_server, downloads, caplog, tmp_path):
    from mlproject import tracking
    from mlproject.paths import artifacts_root, cache_root
    from mlproject.tracking.artifacts import cache_bytes

    use_server(mlflow_uri)
    cap = cache(1.5 * KB100)
    small = log_folder(mlflow_uri, "cache-big", "small")
    big = log_folder(mlflow_uri, "cache-big", "big", nbytes=3 * KB100)
    kept = tracking.download(small)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got = tracking.download(big)
        again = tracking.download(big)  # the same process reuses its copy
    assert (got / "name.txt").read_text() == "big" and (got / "blob.bin").stat().st_size == 3 * KB100
    assert artifacts_root() not in got.parents and cache_root() / "artifacts-uncached" in got.parents
    assert again == got and downloads.count(big) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert f"is {(3 * KB100 + 3) / 2**20:.1f} MB" in warned[0] and f"cap of {cap / 2**20:.1f} MB" in warned[0]
    assert "MLPROJECT_ARTIFACT_CACHE_GB" in warned[0] and big in warned[0]
    assert not [r for r in caplog.records if "evicted" in r.getMessage()]  # nothing made room for nothing
    assert kept.exists() and entries() == {kept.parent}
    assert cache_bytes() <= cap

    # a process that fetched it removes its copy at exit
    script = ("import sys, mlflow\nmlflow.set_tracking_uri(sys.argv[1])\nfrom mlproject import tracking\n"
              "p = tracking.download(sys.argv[2])\nassert (p / 'blob.bin').is_file()\nprint(p)\n")
    out = subprocess.run([sys.executable, "-c", script, mlflow_uri, big], capture_output=True, text=True,
                         timeout=300, env=subprocess_env(MLPROJECT_CACHE=os.environ["MLPROJECT_CACHE"],
                                                         MLPROJECT_ARTIFACT_CACHE_GB=os.environ[
                                                             "MLPROJECT_ARTIFACT_CACHE_GB"]))
    assert out.returncode == 0, out.stderr[-3000:]
    child = Path(out.stdout.strip().splitlines()[-1])
    assert cache_root() / "artifacts-uncached" in child.parents and child != got
    assert not child.exists() and not child.parent.exists()
    assert got.exists()  # ours is still there while we run


def test_the_uncached_folder_of_a_killed_process_goes_on_the_next_download(mlflow_uri, cache, use_server):
    import socket

    from mlproject import tracking
    from mlproject.paths import cache_root

    use_server(mlflow_uri)
    cache(10 * KB100)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = cache_root() / "artifacts-uncached" / f"{socket.gethostname()}-{os.getpid()}-alive"
    left = cache_root() / "artifacts-uncached" / f"{socket.gethostname()}-{dead.pid}-killed"
    for folder in (mine, left):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "blob.bin").write_bytes(b"x")
    tracking.download(log_folder(mlflow_uri, "cache-killed", "any"))
    assert not left.exists() and mine.exists()


def test_a_logged_model_is_sized_through_the_run_and_the_registry(mlflow_uri, cache, use_server, tmp_path):
    """runs:/<id>/model is the run's LoggedModel (MLflow 3): its files, subfolders included, are
    what the cap weighs, through the run and through a registered version (models:/<model_id>)."""
    from mlproject import tracking
    from mlproject.paths import artifacts_root
    from mlproject.tracking.artifacts import _remote_size, cache_bytes

    use_server(mlflow_uri)
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(os.urandom(2 * KB100))
    with tracking.step_run("prune", experiment="cache-logged-model", log_env=False) as run:
        run.log_model_dir(model, "model")  # writes MLmodel into the folder
    on_disk = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    uri = f"runs:/{run.run_id}/model"
    assert _remote_size(uri) == on_disk
    assert _remote_size(f"{uri}/sub/weights.bin") == 2 * KB100
    tracking.register_model(run.run_id, "cache-sized", alias="a")
    assert _remote_size(f"models:/{tracking.logged_model(run.run_id).model_id}") == on_disk

    cache(10 * KB100)
    cached = tracking.download("models:/cache-sized@a")
    assert artifacts_root() in cached.parents and (cached / "sub" / "weights.bin").stat().st_size == 2 * KB100
    cap = cache(1.5 * KB100)  # lowered: the entry no longer fits, and goes on the next download
    for ref in (uri, "models:/cache-sized@a"):
        got = tracking.download(ref)
        assert (got / "sub" / "weights.bin").stat().st_size == 2 * KB100
        assert artifacts_root() not in got.parents and cache_bytes() <= cap
    assert not cached.exists() and entries() == set()


def test_a_download_larger_than_its_listing_leaves_the_cache(mlflow_uri, cache, use_server, monkeypatch):
    from mlproject import tracking
    from mlproject.paths import cache_root
    from mlproject.tracking import artifacts
    from mlproject.tracking.artifacts import cache_bytes

    use_server(mlflow_uri)
    cap = cache(1.5 * KB100)
    big = log_folder(mlflow_uri, "cache-underlisted", "big", nbytes=3 * KB100)
    monkeypatch.setattr(artifacts, "_remote_size", lambda uri: 0)  # a store that lists no sizes
    got = tracking.download(big)
    assert (got / "blob.bin").stat().st_size == 3 * KB100
    assert cache_root() / "artifacts-uncached" in got.parents
    assert entries() == set() and cache_bytes() <= cap


def test_a_bad_cap_is_one_line(cache, monkeypatch):
    from mlproject import tracking
    from mlproject.errors import UserError

    monkeypatch.setenv("MLPROJECT_ARTIFACT_CACHE_GB", "lots")
    with pytest.raises(UserError, match="MLPROJECT_ARTIFACT_CACHE_GB"):
        tracking.download("runs:/0123/model")


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """A server that does not proxy artifacts: its artifact root is a folder on this machine."""
    root = tmp_path_factory.mktemp("mlflow-local-store")
    with start_server(root, serve_artifacts=False, artifacts=root / "store") as uri:
        yield uri, (root / "store").resolve()


def test_a_local_artifact_store_is_read_in_place(local_store, cache, use_server, downloads, tmp_path):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking import MlflowClient

    from mlproject import tracking
    from mlproject.errors import UserError
    from mlproject.tracking.artifacts import cache_bytes

    uri, store = local_store
    use_server(uri)
    cache(0)  # nothing could be cached: anything served comes from the store
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("notes")
    with tracking.step_run("prune", experiment="in-place", log_env=False) as run:
        run.log_model_dir(model, "model")
        run.log_artifacts(data, "data")
    logged = tracking.logged_model(run.run_id, "model")
    assert logged is not None

    got = tracking.download(f"runs:/{run.run_id}/model")  # through the LoggedModel, as MLflow resolves it
    assert store in got.parents and (got / "config.json").read_text() == '{"model_type": "llama"}'
    assert got == Path(get_artifact_repository(logged.artifact_location).artifact_dir)  # the model's own folder
    config = tracking.download(f"runs:/{run.run_id}/model/config.json")
    assert config == got / "config.json"
    notes = tracking.download(f"runs:/{run.run_id}/data")
    assert store in notes.parents and (notes / "notes.txt").read_text() == "notes"
    assert Path(MlflowClient(uri).get_run(run.run_id).info.artifact_uri.removeprefix("file://")) in notes.parents
    tracking.register_model(run.run_id, "in-place-tiny", alias="best")
    assert tracking.download("models:/in-place-tiny@best") == got
    assert tracking.download("models:/in-place-tiny/1") == got
    assert downloads == [] and entries() == set() and cache_bytes() == 0

    with pytest.raises(UserError, match="cannot fetch"):
        tracking.download(f"runs:/{run.run_id}/nothing-here")
    assert entries() == set()


def test_the_local_sqlite_store_is_read_in_place(tmp_path, cache, use_server, downloads, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mlproject import tracking

    monkeypatch.chdir(tmp_path)  # ./mlflow.db with ./mlruns, the default store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    use_server(uri)
    cache(0)
    ref = log_folder(uri, "local-sqlite", "local")
    got = tracking.download(ref)
    assert (tmp_path / "mlruns") in got.parents and (got / "name.txt").read_text() == "local"
    run_id = ref.split("/")[1]
    assert got == Path(MlflowClient(uri).get_run(run_id).info.artifact_uri.removeprefix("file://")) / "data"
    assert downloads == [] and entries() == set()


def test_a_proxied_store_on_this_machine_is_still_downloaded(mlflow_uri, cache, use_server, downloads):
    """``--artifacts-destination`` (``mlflow-artifacts:/``): the files are the server's to serve."""
    from mlproject import tracking
    from mlproject.paths import artifacts_root

    use_server(mlflow_uri)
    cache(10 * KB100)
    ref = log_folder(mlflow_uri, "cache-proxied", "proxied")
    got = tracking.download(ref)
    assert artifacts_root() in got.parents and downloads == [ref]
