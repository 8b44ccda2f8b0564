"""Overhead of the finetune step over the bare trl trainer doing the same training.

Same model, data, LoRA settings, schedule and steps, in one process:
  bare  = datasets.load_dataset + AutoModelForCausalLM.from_pretrained + peft.get_peft_model
          + trl.SFTTrainer(...).train() + save_pretrained of the adapter
  step  = mlproject.steps.finetune.run (validation, MLflow run, env snapshot, batched curve
          logging, checkpoint folder, adapter + metadata logged as an artifact, report.md),
          no evaluation, against a local SQLite tracking store
Prints both wall times and the ratio step / bare (target <= 1.05).

    python benchmarks/finetune_overhead.py                          # SmolLM2, 40 LoRA steps
    python benchmarks/finetune_overhead.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def bare(model_dir: Path, data_file: Path, args, out: Path) -> float:
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data_file), split="train")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type=TaskType.CAUSAL_LM))
    cuda = torch.cuda.is_available()
    sft_args = SFTConfig(
        output_dir=str(out), learning_rate=args.lr, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        max_length=512, seed=args.seed, data_seed=args.seed, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, bf16=cuda, use_cpu=not cuda, packing=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, logging_nan_inf_filter=False,
        activation_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=ds, processing_class=tok)
    trainer.train()
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    elapsed = time.perf_counter() - start
    print(f"  bare: {elapsed:.2f}s (last loss {trainer.state.log_history[-2].get('loss')})", flush=True)
    return elapsed


def step(model: str, data_file: Path, args, store: Path, out: Path) -> float:
    from mlproject.config import FinetuneStepConfig
    from mlproject.steps import finetune

    start = time.perf_counter()
    res = finetune.run(FinetuneStepConfig(
        model=model, dataset=str(data_file), max_steps=args.steps, train_batch_size=args.batch_size, lr=args.lr,
        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, seed=args.seed, save_steps=0, eval_after=False,
        output_dir=str(out), experiment="bench", tracking_uri=f"sqlite:///{store}/mlflow.db"))
    elapsed = time.perf_counter() - start
    print(f"  step: {elapsed:.2f}s (last loss {res.details['final_loss']})", flush=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="offline:sft_mlp_nonce")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from mlproject.models import loading
    from mlproject.models.reference import resolve
    from mlproject.training.datasets import resolve_spec

    ref = resolve(args.model)
    model_dir = loading.local_source(ref, None) or ref.target  # converts the GGUF once
    data_file = Path(resolve_spec(args.dataset)[1]["data_files"])
    root = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    from mlflow.tracking import MlflowClient

    # Artifacts beside the store, not in ./mlruns of whatever the working directory is.
    MlflowClient(f"sqlite:///{root}/mlflow.db").create_experiment("bench", artifact_location=str(root / "artifacts"))
    # Warm both paths once (imports, the SQLite schema, datasets' cache) before timing.
    print("warm-up (2 steps)", flush=True)
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    step(args.model, data_file, warm, root, root / "step")
    bare(model_dir, data_file, warm, root / "bare")
    b, s = [], []
    for i in range(args.repeats):  # alternate to spread machine noise over both
        print(f"repeat {i + 1}", flush=True)
        b.append(bare(model_dir, data_file, args, root / "bare"))
        s.append(step(args.model, data_file, args, root, root / "step"))
    ratio = statistics.median(s) / statistics.median(b)
    print(f"model={args.model} data={args.dataset} steps={args.steps} batch={args.batch_size} lora_r={args.lora_r}")
    print(f"bare median {statistics.median(b):.2f}s  step median {statistics.median(s):.2f}s  "
          f"ratio step/bare = {ratio:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
