"""The project's own files: MLproject in sync, conda.yaml vs pyproject, every shipped YAML loads,
and `mlflow run .` end to end from a copy on tmpfs (where the MLproject/mlproject trap bites)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import mlflow_client, subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_mlproject_file_matches_the_step_configs():
    out = subprocess.run([sys.executable, "scripts/write_mlproject.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_conda_env_lists_the_pyproject_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_deps) == sorted(deps)


def test_no_top_level_entry_clashes_with_MLproject():
    clashes = [p.name for p in ROOT.iterdir() if p.name.lower() == "mlproject" and p.name != "MLproject"]
    assert clashes == []


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_every_shipped_yaml_loads():
    files = [f for f in tracked_files() if f.endswith((".yaml", ".yml")) or f == "MLproject"]
    assert "MLproject" in files and "conda.yaml" in files
    for f in files:
        assert yaml.safe_load((ROOT / f).read_text()) is not None, f


@pytest.mark.slow
def test_mlflow_run_evaluate_from_a_tmpfs_copy(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else tmp_path
    clone = base / f"mlproject-clone-{os.getpid()}"
    shutil.rmtree(clone, ignore_errors=True)
    try:
        for f in tracked_files():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
        bindir = Path(sys.executable).parent
        # subprocess_env drops the MLFLOW_EXPERIMENT_ID that mlflow.set_experiment in earlier
        # in-process tests exported, and keeps PYTHONPATH
        env = {**subprocess_env(), "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{bindir}:{os.environ['PATH']}"}
        # `python -m mlflow`: the console script need not sit beside the interpreter
        cmd = [sys.executable, "-m", "mlflow", "run", ".", "-e", "evaluate", "--env-manager", "local",
               "--experiment-name", "mlflow-run-e2e",
               "-P", f"model={tiny_dirs['qwen2']}", "-P", "tasks=mlp_capitals", "-P", "limit=4",
               "-P", f"ppl_dataset={ppl_text_file}", "-P", "seqlen=32", "-P", "batch_size=4"]
        out = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    client = mlflow_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mlflow-run-e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlproject.step"] == "evaluate"
    assert run.data.tags.get("mlflow.project.entryPoint") == "evaluate"  # the run MLflow created
    assert {"ppl/sample", "mlp_capitals/acc", "avg_acc"} <= set(run.data.metrics)
    assert run.data.params["resolved.adapter"] == "none"  # mlflow logged the raw '' itself
    assert re.search(r"^\d+", run.data.params["ppl.windows"])
