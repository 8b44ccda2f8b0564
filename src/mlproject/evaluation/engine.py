"""The evaluation engine: plan → load → perplexity + lm-eval tasks → metrics, with no run.

Every step measures a model through this module (evaluate, and quantize / prune / finetune on
their outputs), pipelines and the search call it too, and :func:`evaluate_model` runs it
without any tracking at all::

    from mlproject.evaluation.options import EvalOptions
    from mlproject.evaluation.engine import evaluate_model
    out = evaluate_model("smollm2", EvalOptions(tasks="mlp_nonce", limit="50", ppl_windows=4))
    out.metrics  # {"ppl/offline": …, "mlp_nonce/acc_norm": …, "avg_acc": …, "eval_seconds": …}

Metric names are the run conventions' (ARCHITECTURE.md, tracking.names): ``ppl/<dataset>``, ``nll/<dataset>``,
``<task>/<metric>``, ``avg_acc``, ``eval_seconds``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlproject import distributed
from mlproject.evaluation import harness, perplexity
from mlproject.evaluation.options import EvalOptions
from mlproject.progress import progress


@dataclass
class EvalPlan:
    """EvalOptions checked and expanded; built before anything heavy happens."""

    opts: EvalOptions
    tasks: list[str]
    limit: int | float | None
    batch_size: int | str
    ppl_name: str | None
    num_fewshot: int | None
    code: Any = None  # evaluation.code.scoring.CodeSettings when code tasks are requested

    def params(self) -> dict[str, Any]:
        return {
            "tasks": ",".join(self.tasks) or "none", "limit": self.limit if self.limit is not None else "all",
            "num_fewshot": self.num_fewshot if self.num_fewshot is not None else "task default",
            "batch_size": self.batch_size, "ppl_dataset": self.opts.ppl_dataset,
            "seqlen": self.opts.seqlen, "ppl_batch_size": self.opts.ppl_batch_size,
            "ppl_windows": self.ppl_windows_setting, "seed": self.opts.seed,
            **self.code_params(),
        }

    def code_params(self) -> dict[str, Any]:
        """Code tasks: how they were scored and the unsafe-code gates opened (params + report)."""
        if self.code is None:
            return {}
        from mlproject.evaluation.code.lmeval import gates_for

        # not the pool size: it changes no number
        return {**{f"code.{k}": v for k, v in self.code.describe().items() if k != "workers"},
                **{f"code.gate.{k}": v for k, v in gates_for(self.tasks).items()}}

    @property
    def ppl_windows_setting(self) -> str | int:
        """``ppl_windows`` as logged: ``all``, ``N``, or ``auto (…)`` saying what auto follows."""
        n = self.opts.ppl_windows
        if n == 0:
            return "all"
        if n > 0:
            return n
        return "auto (all)" if self.limit is None else f"auto (limit {self.limit:g})"

    def windows(self, available: int) -> int:
        """How many of the text's ``available`` windows to score (see ``EvalOptions.ppl_windows``).
        With ``ppl_windows=-1`` a quick run stays quick: ``limit`` shortens the PPL too."""
        n = self.opts.ppl_windows
        if n > 0:
            return min(n, available)
        if n == 0 or self.limit is None:
            return available
        if isinstance(self.limit, float):
            return max(1, min(available, math.ceil(self.limit * available)))
        return max(1, min(available, int(self.limit)))

    def settings(self, out: "EvalOutcome | None" = None) -> dict[str, Any]:
        """The evaluation settings a reader needs to compare two runs' numbers (run descriptions)."""
        ppl = None
        if self.ppl_name:
            ppl = f"{self.opts.ppl_dataset}"
            if out is not None and out.ppl:
                res = out.ppl[0]
                of = f" of {out.ppl_available}" if out.ppl_available > res.windows else ""
                ppl += f", {res.windows}{of} windows × {res.seqlen} tokens"
        return {"tasks": ",".join(self.tasks) or "none", "limit": self.limit if self.limit is not None else "all",
                "num_fewshot": self.num_fewshot if self.num_fewshot is not None else "task default",
                "lm-eval batch": self.batch_size if self.tasks else None, "PPL": ppl, "seed": self.opts.seed}

    @property
    def empty(self) -> bool:
        """Nothing to measure (tasks=none and ppl_dataset=none)."""
        return not self.tasks and not self.ppl_name


def plan_eval(opts: EvalOptions) -> EvalPlan:
    """Validate and expand the options (unknown tasks / PPL text fail here, cheaply)."""
    from mlproject.evaluation.options import CodeEvalOptions
    from mlproject.evaluation.code import lmeval, tasks as code_tasks

    tasks = harness.expand_tasks(opts.tasks)
    harness.validate_tasks(tasks)
    code = None
    if any(code_tasks.is_code_task(t) for t in tasks):
        lmeval.check_requirements(tasks)
        # Steps without code parameters (quantize, prune, finetune) score with the defaults.
        code = (opts if isinstance(opts, CodeEvalOptions) else CodeEvalOptions()).code_settings()
    return EvalPlan(
        opts=opts, tasks=tasks, limit=harness.parse_limit(opts.limit),
        batch_size=harness.parse_batch_size(opts.batch_size),
        ppl_name=perplexity.check_dataset(opts.ppl_dataset),
        num_fewshot=None if opts.num_fewshot < 0 else opts.num_fewshot, code=code,
    )


@dataclass
class EvalOutcome:
    ppl: list[perplexity.PPLResult] = field(default_factory=list)
    harness: harness.HarnessResult | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # as logged, without prefix
    seconds: float = 0.0
    ppl_params: dict[str, Any] = field(default_factory=dict)
    ppl_available: int = 0  # windows the text holds at this seqlen (ppl[0].windows of them scored)
    ppl_rows: list[dict] = field(default_factory=list)  # the scored windows' text

    @property
    def avg_acc(self) -> float | None:
        return self.harness.avg_acc if self.harness else None


def measure(loaded, plan: EvalPlan, on_metrics: Callable[[dict[str, float]], None] | None = None) -> EvalOutcome:
    """Compute PPL and task metrics of a loaded model (``models.loading.LoadedModel``); each
    part goes to `on_metrics` as soon as it is known, so a later failure loses nothing
    already measured. ``eval_seconds`` leaves out the time `on_metrics` took (handing results
    to a slow or vanished tracking server is not evaluation time)."""
    sink = on_metrics or (lambda metrics: None)
    stalled = 0.0

    def on_metrics(metrics: dict[str, float]) -> None:
        nonlocal stalled
        t0 = time.perf_counter()
        try:
            sink(metrics)
        finally:
            stalled += time.perf_counter() - t0

    import torch

    torch.manual_seed(plan.opts.seed)
    out = EvalOutcome()
    start = time.perf_counter()
    model, tok = loaded.model, loaded.tokenizer
    if plan.ppl_name:
        text = perplexity.load_text(plan.opts.ppl_dataset)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        ctx = perplexity.context_length(model) or plan.opts.seqlen
        seqlen = min(plan.opts.seqlen, ctx)
        available = max(1, ids.numel() // seqlen)
        n_windows = plan.windows(available)
        # Under a distributed launch each rank scores its share of the windows; the sums meet.
        shard = (distributed.rank(), distributed.world_size())
        with progress(f"perplexity ({plan.ppl_name})", -(-n_windows // shard[1]), unit="windows") as advance:
            res = perplexity.perplexity(model, ids, seqlen, plan.opts.ppl_batch_size,
                                        dataset=plan.ppl_name, on_batch=advance, max_windows=n_windows,
                                        shard=shard,
                                        reduce_sum=distributed.sum_over_ranks if distributed.active() else None)
        out.ppl.append(res)
        out.ppl_available = available
        out.metrics[f"ppl/{res.dataset}"] = res.ppl
        out.metrics[f"nll/{res.dataset}"] = res.nll
        out.ppl_params = {"ppl.dataset": res.dataset, "ppl.seqlen": res.seqlen,
                          "ppl.windows": res.windows, "ppl.windows_total": available, "ppl.tokens": res.tokens}
        # What was scored, for the run's dataset inputs: the text of each window.
        scored = perplexity.make_windows(ids, res.seqlen)[:res.windows]
        out.ppl_rows = [{"window": i, "text": t} for i, t in enumerate(tok.batch_decode(scored))]
        on_metrics({f"ppl/{res.dataset}": res.ppl, f"nll/{res.dataset}": res.nll})
    if plan.tasks:
        hr = harness.run_tasks(
            model, tok, plan.tasks, limit=plan.limit, num_fewshot=plan.num_fewshot,
            batch_size=plan.batch_size, seed=plan.opts.seed, code=plan.code,
        )
        out.harness = hr
        out.metrics.update(hr.metrics)
        if hr.avg_acc is not None:
            out.metrics["avg_acc"] = hr.avg_acc
        on_metrics({k: v for k, v in out.metrics.items() if not k.startswith(("ppl/", "nll/"))})
    out.seconds = time.perf_counter() - start - stalled
    out.metrics["eval_seconds"] = out.seconds
    on_metrics({"eval_seconds": out.seconds})
    return out


def scored_datasets(plan: EvalPlan, out: EvalOutcome) -> list[dict[str, Any]]:
    """What an evaluation scored, as dataset specs for ``tracking.Run.log_datasets`` (the runs
    table's Dataset column): the PPL text's scored windows, and per requested task the documents
    scored (``limit`` shows in the name: ``mlp_nonce (100 of 200 docs)``). Bundled tasks carry
    their rows; hub tasks are named by their Hugging Face dataset, path and split."""
    specs: list[dict[str, Any]] = []
    if out.ppl:
        res = out.ppl[0]
        of = f" of {out.ppl_available}" if out.ppl_available > res.windows else ""
        spec = plan.opts.ppl_dataset
        source = ({"kind": "hf", "path": "wikitext", "config_name": "wikitext-2-raw-v1", "split": "test"}
                  if spec == "wikitext2" else {"kind": "file", "path": str(perplexity.text_path(spec))})
        specs.append({"name": f"ppl {res.dataset} ({res.windows}{of} × {res.seqlen} tokens)", "context": "evaluation",
                      "source": source, "rows": out.ppl_rows or None,
                      "tags": {"metrics": f"ppl/{res.dataset}, nll/{res.dataset}", "windows": f"{res.windows}{of}",
                               "seqlen": res.seqlen}})
    if out.harness is not None:
        raw = out.harness.raw
        configs, counts = raw.get("configs", {}), raw.get("n-samples", {})
        for task in plan.tasks:
            members = [task] if task in configs else list((raw.get("group_subtasks") or {}).get(task, []))
            members = [m for m in members if m in configs]
            if not members:
                continue
            n = sum(int((counts.get(m) or {}).get("effective", 0)) for m in members)
            total = sum(int((counts.get(m) or {}).get("original", 0)) for m in members)
            docs = f"{n} of {total} docs" if n < total else f"{total} docs"
            name = f"{task} ({docs})" if len(members) == 1 else f"{task} ({len(members)} tasks, {docs})"
            cfg = configs[members[0]]
            split = cfg.get("test_split") or cfg.get("validation_split")
            files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
            local = files.get(split) if isinstance(files, dict) else None
            tags = {"limit": plan.limit if plan.limit is not None else "all", "documents": docs,
                    "num_fewshot": cfg.get("num_fewshot", "task default"), "split": split}
            if local and len(members) == 1 and Path(local).is_file():
                rows = _first_rows(Path(local), n)
                specs.append({"name": name, "context": "evaluation", "source": {"kind": "file", "path": local},
                              "rows": rows, "tags": tags})
            else:
                specs.append({"name": name, "context": "evaluation", "digest": _digest(task, cfg, n),
                              "source": {"kind": "hf", "path": cfg.get("dataset_path") or task,
                                         "config_name": cfg.get("dataset_name"), "split": split},
                              "tags": tags})
    return specs


def _first_rows(path: Path, n: int) -> list[dict]:
    """The first ``n`` JSONL records (lm-eval's ``limit`` takes the first documents)."""
    import json

    rows = []
    with path.open() as f:
        for line in f:
            if len(rows) >= n:
                break
            if line.strip():
                rows.append({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                             for k, v in json.loads(line).items()})
    return rows


def _digest(task: str, cfg: dict, n: int) -> str:
    import hashlib
    import json

    keep = {k: cfg.get(k) for k in ("dataset_path", "dataset_name", "test_split", "validation_split", "num_fewshot")}
    return hashlib.sha256(json.dumps([task, keep, n], sort_keys=True, default=str).encode()).hexdigest()[:8]


def model_metrics(model) -> dict[str, float]:
    """``params_b`` and ``model_size_mb`` (real bytes held: a quantized checkpoint's method
    family counts its packed weights and quant state)."""
    from mlproject.compression.methods import model_size_mb
    from mlproject.models.loading import count_params

    return {"params_b": count_params(model) / 1e9, "model_size_mb": model_size_mb(model)}


def evaluate_model(model: str, opts: EvalOptions | None = None, *, adapter: str = "", dtype: str = "auto",
                   device: str = "auto", fetch: Callable | None = None) -> EvalOutcome:
    """Resolve, load and measure ``model`` (any model reference) with no tracking run.

    ``fetch`` materializes ``runs:/`` / ``models:/`` references (default: the tracking
    server's, through ``tracking.download``); aliases, hub ids and local dirs need none.
    """
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    opts = opts or EvalOptions()
    plan = plan_eval(opts)
    ref = resolve(model)
    if ref.kind in ("hub", "alias") and not ref.gguf:
        from mlproject.models import hub

        hub.check_model(ref.raw, ref.target)  # seconds, not minutes of retries
    if fetch is None:  # runs:/ and models:/ references (also inside a logged adapter's lineage)
        from mlproject.tracking import download as fetch
    device = loading.pick_device(device)
    loaded = loading.load_model(ref, dtype=dtype, device=device, adapter=adapter or None, fetch=fetch)
    out = measure(loaded, plan)
    out.metrics.update(model_metrics(loaded.model))
    return out
