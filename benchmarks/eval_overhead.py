"""Overhead of the evaluate step over the bare libraries doing the same work.

Same model, tasks, limit, PPL text and window length, in one process:
  bare  = AutoModelForCausalLM.from_pretrained + a plain PPL loop + lm_eval.simple_evaluate
  step  = mlproject.steps.evaluate.run (validation, MLflow run, env snapshot, batched
          logging, artifacts, report.md) against a local SQLite tracking store
Prints both wall times and the ratio step / bare (target <= 1.10).

    python benchmarks/eval_overhead.py                       # SmolLM2, offline tasks
    python benchmarks/eval_overhead.py --limit 100 --repeats 3
"""

from __future__ import annotations

import argparse
import math
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


def bare(model_dir: Path, tasks: list[str], limit, text: str, seqlen: int, batch_size: int) -> float:
    import lm_eval
    import torch
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlproject.evaluation.tasks import OFFLINE_TASKS, include_path

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seqlen
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in ids[: n * seqlen].view(n, seqlen):
            logits = model(w[None]).logits[0, :-1].float()
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += seqlen - 1
    ppl = math.exp(nll / count)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False,
                            task_manager=TaskManager(include_path=str(include_path()), 
                                                          include_defaults=not set(tasks) <= set(OFFLINE_TASKS)))
    elapsed = time.perf_counter() - start
    print(f"  bare: {elapsed:.2f}s (ppl {ppl:.4f})", flush=True)
    return elapsed


def step(model: str, tasks: str, limit, seqlen: int, batch_size: int, store: Path) -> float:
    from mlproject.config import EvaluateConfig
    from mlproject.steps import evaluate

    start = time.perf_counter()
    # ppl_windows=0: every window, as the bare loop scores (auto would follow the limit)
    res = evaluate.run(EvaluateConfig(model=model, tasks=tasks, limit=str(limit), seqlen=seqlen, ppl_windows=0,
                                      batch_size=str(batch_size), experiment="bench",
                                      tracking_uri=f"sqlite:///{store}/mlflow.db"))
    elapsed = time.perf_counter() - start
    print(f"  step: {elapsed:.2f}s (ppl {res.ppl})", flush=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="offline")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from mlproject.evaluation import harness, perplexity
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    ref = resolve(args.model)
    model_dir = loading.local_source(ref, None) or ref.target  # converts the GGUF once
    tasks = harness.expand_tasks(args.tasks)
    text = perplexity.load_text("offline")
    store = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    # Warm both paths once (imports, lm-eval's task index, the SQLite schema) before timing.
    print("warm-up", flush=True)
    step(args.model, args.tasks, args.limit, args.seqlen, args.batch_size, store)
    bare(model_dir, tasks, args.limit, text, args.seqlen, args.batch_size)
    b, s = [], []
    for i in range(args.repeats):  # alternate to spread machine noise over both
        print(f"repeat {i + 1}", flush=True)
        b.append(bare(model_dir, tasks, args.limit, text, args.seqlen, args.batch_size))
        s.append(step(args.model, args.tasks, args.limit, args.seqlen, args.batch_size, store))
    ratio = statistics.median(s) / statistics.median(b)
    print(f"model={args.model} tasks={','.join(tasks)} limit={args.limit} seqlen={args.seqlen} "
          f"batch={args.batch_size}")
    print(f"bare median {statistics.median(b):.2f}s  step median {statistics.median(s):.2f}s  "
          f"ratio step/bare = {ratio:.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
