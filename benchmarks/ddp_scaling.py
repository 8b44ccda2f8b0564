"""Data-parallel scaling of the finetune step (1 vs N processes under torchrun) and the cost
of the main process's MLflow logging, against bare trl doing the same training.

For each process count N (default 1 and 2), the same global batch (``--global-batch``,
split as ``global / N`` per process), LoRA settings, data and steps:
  bare  = trl.SFTTrainer on a peft LoRA model under ``torchrun --nproc_per_node N`` (this
          script with ``--bare-worker``), no tracking at all
  step  = ``torchrun --nproc_per_node N -m mlproject finetune …`` (one MLflow run in a SQLite
          store: params, batched curves, env snapshot, the trainer's save + reload, artifact)
Both report transformers' own ``train_samples_per_second`` (global samples per second of the
training loop); the step's comes back from its run (``train/samples_per_second``). Printed:
samples/s per (variant, N), the scaling N vs 1 of each, step/bare throughput at each N (how
much rank 0's logging slows the loop every rank waits on at the next all-reduce) and each
launch's wall time (start-up, loading, saving and logging included).

Threads: ``--configs`` lists ``<processes>x<threads per process>``; the default splits the
machine's cores (2 cores: ``1x2,2x1``). On a 2-core machine two processes get one thread each:
the figure says what data parallelism costs or saves *on the same cores*, not what N GPUs
give (those each bring their own compute). Add ``1x1`` to see one process on one core: on a
busy machine an OpenMP team of 2 threads can be far slower than 1 (its threads wait on each
other while the cores are taken), which is not a data-parallel effect.

    python benchmarks/ddp_scaling.py                              # SmolLM2-135M, 20 LoRA steps, 1x2 and 2x1
    python benchmarks/ddp_scaling.py --configs 1x1,1x2,2x1 --steps 30 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "src"))


def bare_worker(args) -> int:
    """One rank of the bare trl launch; rank 0 prints its result as JSON on the last line."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = datasets.load_dataset("json", data_files=args.data_file, split="train")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type=TaskType.CAUSAL_LM))
    sft_args = SFTConfig(
        output_dir=args.out, learning_rate=args.lr, max_steps=args.steps,
        per_device_train_batch_size=args.per_device, max_length=512, seed=args.seed, data_seed=args.seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, bf16=False, use_cpu=True,
        packing=False, dataloader_num_workers=0, dataloader_pin_memory=False, logging_nan_inf_filter=False,
        activation_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=ds, processing_class=tok)
    out = trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(Path(args.out) / "adapter")
        print(json.dumps({"samples_per_second": out.metrics["train_samples_per_second"]}), flush=True)
    return 0


def launch(cmd: list[str], threads: int, env_extra: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src"), **env_extra}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:8])} … failed:\n{out.stderr[-3000:]}")
    return out, elapsed


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def run_bare(n: int, args, model_dir: str, data_file: Path, root: Path, threads: int) -> tuple[float, float]:
    cmd = [*torchrun(n), __file__, "--bare-worker", "--model-dir", model_dir, "--data-file", str(data_file),
           "--out", str(root / f"bare-{n}"), "--steps", str(args.steps), "--per-device", str(args.global_batch // n),
           "--lora-r", str(args.lora_r), "--lr", str(args.lr), "--seed", str(args.seed)]
    out, wall = launch(cmd, threads, {})
    return json.loads(out.stdout.strip().splitlines()[-1])["samples_per_second"], wall


def run_step(n: int, args, data_file: Path, root: Path, threads: int) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    cmd = [*torchrun(n), "-m", "mlproject", "finetune", "--model", args.model, "--dataset", str(data_file),
           "--max-steps", str(args.steps), "--train-batch-size", str(args.global_batch // n),
           "--lora-r", str(args.lora_r), "--lora-alpha", str(2 * args.lora_r), "--lr", str(args.lr),
           "--seed", str(args.seed), "--save-steps", "0", "--eval-after", "false", "--tasks", "none",
           "--ppl-dataset", "none", "--output-dir", str(root / f"step-{n}"), "--experiment", "bench-ddp",
           "--tracking-uri", uri]
    out, wall = launch(cmd, threads, {})
    run_id = next(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("run_id:"))
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == str(n)
    return run.data.metrics["train/samples_per_second"], wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="offline:sft_mlp_nonce")
    cores = os.cpu_count() or 1
    ap.add_argument("--configs", default=f"1x{cores},{cores}x1" if cores > 1 else "1x1",
                    help="<processes>x<threads each>, comma-separated; the first is the scaling baseline")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step, all processes")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=1)
    # the bare worker's own arguments (this script under torchrun)
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--per-device", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_worker:
        return bare_worker(args)

    from mlproject.models import loading
    from mlproject.models.reference import resolve
    from mlproject.training.datasets import resolve_spec

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    if any(args.global_batch % n for n, _ in configs):
        raise SystemExit(f"--global-batch {args.global_batch} must divide by every process count in {args.configs}")
    ref = resolve(args.model)
    model_dir = str(loading.local_source(ref, None) or ref.target)  # converts a GGUF alias once
    data_file = Path(resolve_spec(args.dataset)[1]["data_files"])
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{root}/mlflow.db").create_experiment("bench-ddp", artifact_location=str(root / "art"))
    print(f"machine: {os.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[tuple[str, tuple[int, int]], list[tuple[float, float]]] = {}
    for rep in range(args.repeats):
        for n, threads in configs:  # alternate bare and step to spread machine noise over both
            print(f"repeat {rep + 1}: {n} process(es) x {threads} thread(s)", flush=True)
            for name, fn in (("bare", lambda: run_bare(n, args, model_dir, data_file, root, threads)),
                             ("step", lambda: run_step(n, args, data_file, root, threads))):
                sps, wall = fn()
                results.setdefault((name, (n, threads)), []).append((sps, wall))
                print(f"  {name}: {sps:.2f} samples/s, launch wall {wall:.1f}s", flush=True)

    def med(name: str, c: tuple[int, int], i: int) -> float:
        return statistics.median(r[i] for r in results[(name, c)])

    print(f"\nmodel={args.model} steps={args.steps} global batch={args.global_batch} lora_r={args.lora_r} "
          f"repeats={args.repeats} load average after {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    print(f"{'NxT':>5} {'bare samples/s':>15} {'step samples/s':>15} {'step/bare':>10} {'bare wall s':>12} "
          f"{'step wall s':>12}")
    for c in configs:
        print(f"{c[0]}x{c[1]:<3} {med('bare', c, 0):>15.2f} {med('step', c, 0):>15.2f} "
              f"{med('step', c, 0) / med('bare', c, 0):>10.3f} {med('bare', c, 1):>12.1f} {med('step', c, 1):>12.1f}")
    base = configs[0]
    for c in configs[1:]:
        print(f"{c[0]}x{c[1]} vs {base[0]}x{base[1]}: bare {med('bare', c, 0) / med('bare', base, 0):.2f}x, "
              f"step {med('step', c, 0) / med('step', base, 0):.2f}x samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
