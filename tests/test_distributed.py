"""Many processes, one MLflow run: finetune and evaluate under torchrun (two gloo processes on CPU).

The `slow` tests start real launches (`python -m torch.distributed.run --standalone`, 2 ranks,
tiny models, a few steps, under `nice`) against the session's `mlflow server`; each asserts on
the runs the server holds afterwards. The others check the pieces in one process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tiny
from conftest import assert_bad_input, mlflow_client

torch = pytest.importorskip("torch")

from mlproject import distributed, tracking  # noqa: E402
from mlproject.config import EvaluateConfig, FinetuneStepConfig  # noqa: E402
from mlproject.errors import UserError  # noqa: E402
from mlproject.evaluation import perplexity  # noqa: E402
from mlproject.models import loading  # noqa: E402
from mlproject.models.reference import resolve  # noqa: E402
from mlproject.steps import evaluate, finetune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers

def launch_env(uri: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}
    # in-process tests before may have exported these through mlflow.set_experiment / mlflow run
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        if var not in extra:
            env.pop(var, None)
    return env


def torchrun(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Two ranks on this machine, niced (the machine is shared)."""
    cmd = ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def runs_of(uri: str, experiment: str):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow_client(uri).get_metric_history(run_id, key))


def curve(uri: str, run_id: str, key: str = "train/loss") -> list[float]:
    return [m.value for m in sorted(mlflow_client(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def logits(model, tokenizer, text="the quick brown fox jumps over"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp-data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny.SFT_ROWS * 4))
    return path


# --------------------------------------------------------------------------- in one process

def test_windows_split_over_ranks_sum_to_the_single_process_ppl(tiny_dirs, tiny_tokenizer, ppl_text_file):
    model = loading.load_model(resolve(str(tiny_dirs["llama"])), device="cpu").model
    ids = tiny_tokenizer(ppl_text_file.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    whole = perplexity.perplexity(model, ids, seqlen=16)
    assert whole.windows >= 5  # an odd count: the ranks get 3 and 2 windows

    partial: list[list[float]] = []
    for r in range(2):  # each rank's own sums, as the all-reduce would receive them
        perplexity.perplexity(model, ids, 16, shard=(r, 2), reduce_sum=lambda v: partial.append(v) or v)
    total = [a + b for a, b in zip(*partial)]
    shards = [perplexity.perplexity(model, ids, 16, shard=(r, 2), reduce_sum=lambda v: total) for r in range(2)]
    assert shards[0] == shards[1]
    assert shards[0].tokens == whole.tokens and shards[0].windows == whole.windows
    assert shards[0].ppl == pytest.approx(whole.ppl, rel=1e-12)


def test_step_gang_reports_the_first_failure_to_the_main_process():
    """The coordination protocol on a real c10d store, two "ranks" as threads."""
    from datetime import timedelta

    store = torch.distributed.HashStore()
    store.set_timeout(timedelta(seconds=30))
    main = distributed.StepGang(distributed._Store(store), rank_=0, world=2)
    other = distributed.StepGang(distributed._Store(store), rank_=1, world=2)
    other.ns = main.ns  # both name the same step (each process counts its own steps)
    seen: list[tuple[int, str]] = []
    got: dict[str, object] = {}

    def rank1():
        got["run"] = other.wait_run()
        other.fail(ValueError("boom"))

    with main.watch(lambda r, err: seen.append((r, err)), interval=0.05):
        t = threading.Thread(target=rank1)
        t.start()
        main.publish_run(("run-id", "exp-id"))
        t.join(10)
        assert main.wait_all() == (1, "ValueError: boom")
        for _ in range(200):  # the watcher thread reports on its own, within a poll interval
            if seen:
                break
            threading.Event().wait(0.05)
    assert got["run"] == ("run-id", "exp-id") and seen == [(1, "ValueError: boom")]
    main.fail(RuntimeError("Connection closed by peer"))  # a consequence, recorded second
    assert main.first_failure() == (1, "ValueError: boom")
    main.publish_final("FAILED", 1, "ValueError: boom")
    assert other.wait_final() == ("FAILED", 1, "ValueError: boom")


def test_torchrun_command_leaves_nproc_to_the_launcher():
    cmd = distributed.torchrun_command(["finetune", "--nproc", "4", "--model", "x", "--nproc=4", "--lr", "1"], 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert cmd[6:] == ["mlproject", "finetune", "--model", "x", "--lr", "1"]


def test_bad_input_with_nproc_fails_before_any_process_starts(mlflow_uri, capsys, monkeypatch):
    def must_not_launch(*a, **k):
        raise AssertionError("torchrun started despite bad input")

    monkeypatch.setattr(distributed, "relaunch", must_not_launch)
    assert_bad_input(["evaluate", "--nproc", "2", "--model", "no-such-alias"], "no-such-alias", mlflow_uri,
                     "ddp-bad", capsys, monkeypatch)
    assert_bad_input(["finetune", "--nproc", "0"], "nproc", mlflow_uri, "ddp-bad", capsys, monkeypatch)


def test_nproc_in_process_needs_a_launcher(mlflow_uri, tiny_dirs):
    with pytest.raises(UserError, match="nproc=2 needs a launcher"):
        evaluate.run(EvaluateConfig(model=str(tiny_dirs["llama"]), nproc=2, tracking_uri=mlflow_uri))


def accelerate_env(config_file: str) -> dict[str, str]:
    """What `accelerate launch --config_file <file> -m mlproject finetune` puts in the workers'
    environment (accelerate's own launch code, stopped before it starts anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "-m", "mlproject", "finetune"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_launch_files_are_what_accelerate_reads(monkeypatch):
    """launch/fsdp.yaml and launch/zero3.yaml (+ ds_zero3.json), read by accelerate as `accelerate
    launch` would, turn into the plugins the trainer builds (no GPU here: nothing is launched)."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    monkeypatch.chdir(ROOT)  # the files name each other relative to the repository root
    env = accelerate_env("launch/fsdp.yaml")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    fsdp = FullyShardedDataParallelPlugin()
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(fsdp.state_dict_type)  # a saved model is whole weights
    assert fsdp.cpu_ram_efficient_loading is False  # mlproject loads one copy per rank itself
    for k in env:
        monkeypatch.delenv(k)

    env = accelerate_env("launch/zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ds = DeepSpeedPlugin()
    assert ds.zero_stage == 3 and ds.zero3_init_flag is False
    config = ds.hf_ds_config.config
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # the batch comes from --train-batch-size / --grad-accum (transformers fills the "auto"s)
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"


# --------------------------------------------------------------------------- real launches

@pytest.mark.slow
def test_torchrun_lora_sft_is_one_run_equal_to_one_process(mlflow_uri, tiny_dirs, sft_file, ppl_text_file, tmp_path):
    """torchrun --nproc_per_node 2 -m mlproject finetune … (LoRA SFT, 2 ranks x batch 2)."""
    common = dict(model=str(tiny_dirs["llama"]), dataset=str(sft_file), max_steps=4, lr=1e-2, lora_r=4,
                  lora_alpha=8, lora_dropout=0.0, tasks="mlp_nonce", limit="6", ppl_dataset=str(ppl_text_file),
                  seqlen=16, save_steps=0)
    args = ["-m", "mlproject", "finetune", "--experiment", "ddp-sft", "--train-batch-size", "2",
            "--output-dir", str(tmp_path / "ddp")]
    for k, v in common.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    out = torchrun(args, launch_env(mlflow_uri))
    assert out.returncode == 0, out.stderr[-4000:]

    (run,) = runs_of(mlflow_uri, "ddp-sft")  # exactly one run for the launch
    assert run.info.status == "FINISHED"
    assert out.stdout.count("run_id: ") == 1 and f"run_id: {run.info.run_id}" in out.stdout  # rank 0 prints
    p, m = run.data.params, run.data.metrics
    assert p["world_size"] == "2" and p["effective_batch_size"] == "4" and p["distributed"] == "ddp"
    assert p["train_batch_size"] == "2" and p["grad_accum"] == "1"
    for key in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert steps_of(mlflow_uri, run.info.run_id, key) == [1, 2, 3, 4], key
    assert steps_of(mlflow_uri, run.info.run_id, "ppl/sample") == [4]
    results = Path(mlflow_client(mlflow_uri).download_artifacts(run.info.run_id, "lm_eval/results.json"))
    assert json.loads(results.read_text())["results"]["mlp_nonce"]["sample_len"] == 6  # lm-eval gathered the 3 + 3 documents of both ranks
    assert m["peak_rss_mb"] > 0 and m["train/peak_rss_mb"] > 0 and m["train_steps"] == 4

    # One process with the same effective batch (4) trains the same adapter: the logged
    # adapter reloads with the single process's logits, up to float rounding.
    single = finetune.run(FinetuneStepConfig(**common, train_batch_size=4, output_dir=str(tmp_path / "one"),
                                             tracking_uri=mlflow_uri, experiment="ddp-sft-single"))
    reloaded = loading.load_model(resolve(f"runs:/{run.info.run_id}/model"), fetch=tracking.download)
    tok = reloaded.tokenizer
    assert torch.allclose(logits(reloaded.model, tok), logits(single.model, tok), atol=1e-5)
    base = loading.load_model(resolve(str(tiny_dirs["llama"]))).model
    assert not torch.allclose(logits(base, tok), logits(single.model, tok), atol=1e-3)  # it did train
    # the same loss curve, and the same PPL of the trained model
    assert curve(mlflow_uri, run.info.run_id) == pytest.approx(curve(mlflow_uri, single.run_id), rel=1e-4)
    assert m["ppl/sample"] == pytest.approx(single.metrics["ppl/sample"], rel=1e-4)


@pytest.mark.slow
def test_nproc_dpo_on_a_fresh_sqlite_store(tiny_dirs, tmp_path):
    """mlproject finetune --nproc 2 --method dpo: the CLI starts torchrun; the two ranks share a
    SQLite store that does not exist yet (only rank 0 ever touches it, so nothing races)."""
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    args = ["nice", "-n", "10", sys.executable, "-m", "mlproject", "finetune", "--nproc", "2", "--method", "dpo",
            "--model", str(tiny_dirs["llama"]), "--max-steps", "3", "--train-batch-size", "2", "--tasks", "none",
            "--ppl-dataset", "none", "--output-dir", str(tmp_path / "ckpt"), "--experiment", "ddp-dpo"]
    out = subprocess.run(args, env=launch_env(uri), cwd=db.parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert db.is_file()
    (run,) = runs_of(uri, "ddp-dpo")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies"):
        assert steps_of(uri, run.info.run_id, key) == [1, 2, 3], key
    first = min(mlflow_client(uri).get_metric_history(run.info.run_id, "train/loss"), key=lambda x: x.step)
    assert first.value == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert "mlproject.error" not in run.data.tags


@pytest.mark.slow
def test_mlflow_run_evaluate_with_nproc_equals_one_process(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    """mlflow run . -e evaluate -P nproc=2: the entry point starts torchrun itself, rank 0 records
    into the run MLflow created, and lm-eval's data-parallel numbers equal one process's."""
    params = dict(model=str(tiny_dirs["qwen2"]), tasks="mlp_nonce,mlp_capitals", limit="5",
                  ppl_dataset=str(ppl_text_file), seqlen="16", batch_size="4")
    cmd = ["nice", "-n", "10", str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "evaluate",
           "--env-manager", "local", "--experiment-name", "ddp-eval", "-P", "nproc=2"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    out = subprocess.run(cmd, env=launch_env(mlflow_uri), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = runs_of(mlflow_uri, "ddp-eval")
    assert run.info.status == "FINISHED" and run.data.tags.get("mlflow.project.entryPoint") == "evaluate"
    assert run.data.params["nproc"] == "2" and run.data.params["world_size"] == "2"

    single = evaluate.run(EvaluateConfig(**params, tracking_uri=mlflow_uri, experiment="ddp-eval-single"))
    m = run.data.metrics
    assert m["ppl/sample"] == pytest.approx(single.metrics["ppl/sample"], rel=1e-9)
    assert m["nll/sample"] == pytest.approx(single.metrics["nll/sample"], rel=1e-9)
    tasks = {k: v for k, v in single.metrics.items() if k.startswith(("mlp_", "avg_acc"))}
    assert {"mlp_nonce/acc", "mlp_capitals/acc_norm", "avg_acc"} <= set(tasks)
    for key, value in tasks.items():
        assert m[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_one_run(mlflow_uri, tiny_dirs, sft_file, tmp_path):
    """Rank 1 raises after optimizer step 2 while rank 0 waits in the next gradient all-reduce."""
    args = [str(ROOT / "tests" / "fail_on_rank.py"), "1", "finetune", "--experiment", "ddp-fail",
            "--model", str(tiny_dirs["llama"]), "--dataset", str(sft_file), "--max-steps", "4",
            "--train-batch-size", "2", "--tasks", "none", "--ppl-dataset", "none", "--save-steps", "0",
            "--output-dir", str(tmp_path / "ckpt")]
    out = torchrun(args, launch_env(mlflow_uri))
    assert out.returncode != 0
    (run,) = runs_of(mlflow_uri, "ddp-fail")
    assert run.info.status == "FAILED"
    assert run.data.tags["mlproject.error"] == "rank 1: ValueError: boom on rank 1"
    assert steps_of(mlflow_uri, run.info.run_id, "train/loss") == [1]  # what was logged before stays
