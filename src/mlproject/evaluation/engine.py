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
from mlproject.errors import UserError
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
            "reference": self.opts.reference if self.ppl_name else "none", "kl_topk": self.opts.kl_topk,
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
    ppl_name = perplexity.check_dataset(opts.ppl_dataset)
    if opts.reference not in ("auto", "none"):
        from mlproject.models.reference import resolve

        resolve(opts.reference)  # an unknown alias / malformed reference fails here, cheaply
        if ppl_name is None:
            raise UserError(f"reference={opts.reference} measures KL over the PPL windows: "
                            "set ppl_dataset (or reference=none)")
        if opts.kl_topk == 0:
            raise UserError(f"reference={opts.reference} needs kl_topk > 0")
    return EvalPlan(
        opts=opts, tasks=tasks, limit=harness.parse_limit(opts.limit),
        batch_size=harness.parse_batch_size(opts.batch_size),
        ppl_name=ppl_name,
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
    #: per-document results (evaluation.documents): one row per (task, document, metric)
    documents: Any = None
    #: KL to the reference over the PPL windows (divergence.KLMeter.result()), when measured
    kl: dict[str, float] | None = None
    #: this model's own top-k distributions over the PPL windows, when asked to record them
    topk: Any = None

    @property
    def avg_acc(self) -> float | None:
        return self.harness.avg_acc if self.harness else None


def measure(loaded, plan: EvalPlan, on_metrics: Callable[[dict[str, float]], None] | None = None, *,
            reference: Callable[[dict[str, str], Any], Any] | None = None,
            record_topk: bool = False) -> EvalOutcome:
    """Compute PPL and task metrics of a loaded model (``models.loading.LoadedModel``); each
    part goes to `on_metrics` as soon as it is known, so a later failure loses nothing
    already measured. ``eval_seconds`` leaves out the time `on_metrics` took (handing results
    to a slow or vanished tracking server is not evaluation time).

    KL to a reference (``plan.opts.kl_topk`` > 0): ``reference(meta, windows)`` is called once the
    PPL windows are known (``meta``: :func:`windows_meta`; ``windows``: the ``[W, seqlen]`` token
    ids) and returns the reference's ``divergence.TopK`` on them, or None (no KL); it is given the
    windows so it can score them with a reference model it loads. ``record_topk``: keep this
    model's own top-k on the windows in ``out.topk`` (a base model's evaluation stores them for
    its candidates)."""
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
        hooks = _kl_hooks(plan, ids, seqlen, n_windows, reference, record_topk)
        with progress(f"perplexity ({plan.ppl_name})", -(-n_windows // shard[1]), unit="windows") as advance:
            res = perplexity.perplexity(model, ids, seqlen, plan.opts.ppl_batch_size,
                                        dataset=plan.ppl_name, on_batch=advance, max_windows=n_windows,
                                        shard=shard,
                                        reduce_sum=distributed.sum_over_ranks if distributed.active() else None,
                                        on_logits=hooks.on_logits if hooks else None)
        if hooks is not None:
            out.kl, out.topk = hooks.finish()
        out.ppl.append(res)
        out.ppl_available = available
        out.metrics[f"ppl/{res.dataset}"] = res.ppl
        out.metrics[f"nll/{res.dataset}"] = res.nll
        out.ppl_params = {"ppl.dataset": res.dataset, "ppl.seqlen": res.seqlen,
                          "ppl.windows": res.windows, "ppl.windows_total": available, "ppl.tokens": res.tokens}
        # What was scored, for the run's dataset inputs: the text of each window.
        scored = perplexity.make_windows(ids, res.seqlen)[:res.windows]
        out.ppl_rows = [{"window": i, "text": t} for i, t in enumerate(tok.batch_decode(scored))]
        ppl_metrics = {f"ppl/{res.dataset}": res.ppl, f"nll/{res.dataset}": res.nll}
        if out.kl:
            kl = kl_metrics(res.dataset, out.kl)
            ppl_metrics.update(kl)
            out.metrics.update(kl)
        on_metrics(ppl_metrics)
    if plan.tasks:
        hr = harness.run_tasks(
            model, tok, plan.tasks, limit=plan.limit, num_fewshot=plan.num_fewshot,
            batch_size=plan.batch_size, seed=plan.opts.seed, code=plan.code,
            log_samples=True,  # per-document results: flips and paired tests in compare
        )
        out.harness = hr
        from mlproject.evaluation import documents

        out.documents = documents.from_harness(hr, plan.tasks)
        out.metrics.update(hr.metrics)
        if hr.avg_acc is not None:
            out.metrics["avg_acc"] = hr.avg_acc
        on_metrics({k: v for k, v in out.metrics.items() if not k.startswith(PPL_FAMILIES)})
    out.seconds = time.perf_counter() - start - stalled
    out.metrics["eval_seconds"] = out.seconds
    on_metrics({"eval_seconds": out.seconds})
    return out


def windows_meta(dataset: str, windows, k: int) -> dict[str, str]:
    """What identifies a set of scored PPL windows for KL: the text's name, the windows' count and
    length, a digest of their token ids (the same text tokenized by the same tokenizer), and k."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(np.ascontiguousarray(windows.cpu().numpy().astype("int64")).tobytes()).hexdigest()
    return {"dataset": dataset, "windows": str(windows.size(0)), "seqlen": str(windows.size(1)),
            "tokens_sha256": digest[:16], "k": str(k)}


#: the logged KL metric families (tracking.names) ← the divergence summary's keys
KL_FAMILIES = {"kl/": "kl_mean", "kl_median/": "kl_median", "kl_p99/": "kl_p99", "top1_agree/": "top1_agree"}
#: the metric families of the PPL pass, logged as soon as it ends (and not again after the tasks)
PPL_FAMILIES = ("ppl/", "nll/", *KL_FAMILIES)


def kl_metrics(dataset: str, kl: dict[str, float]) -> dict[str, float]:
    """The logged KL metrics: ``kl/<dataset>`` (mean), ``kl_median/``, ``kl_p99/``, ``top1_agree/``."""
    return {f"{family}{dataset}": kl[key] for family, key in KL_FAMILIES.items()}


class _KLHooks:
    """The per-batch logits consumers of one PPL pass: the KL meter and / or the top-k recorder."""

    def __init__(self, meter, recorder, meta):
        self.meter, self.recorder, self.meta = meter, recorder, meta

    def on_logits(self, window_indices, logits) -> None:
        if self.meter is not None:
            self.meter(window_indices, logits)
        if self.recorder is not None:
            self.recorder(window_indices, logits)

    def finish(self):
        kl = topk = None
        if self.meter is not None:
            if distributed.active():  # every rank scored its share of the windows: pool the tokens
                import torch

                from mlproject.evaluation import divergence

                # a rank with no window (fewer windows than ranks) sends None
                parts = [p for p in distributed.gather_object(self.meter.per_token() if self.meter.windows else None)
                         if p is not None]
                kl = divergence.kl_summary(*(torch.cat([p[key].cpu().reshape(-1) for p in parts])
                                             for key in ("kl", "top1_agree", "kl_bound")))
            else:
                kl = self.meter.result()
        if self.recorder is not None:
            if distributed.active():  # each rank holds its share of the windows: not stored (yet)
                import logging

                logging.getLogger(__name__).warning(
                    "top-k distributions are not stored under a distributed launch: evaluate the base model "
                    "with nproc=1 for its candidates' KL")
            else:
                topk = self.recorder.result(self.meta)
        return kl, topk


def _kl_hooks(plan: EvalPlan, ids, seqlen: int, n_windows: int, reference, record_topk: bool):
    k = plan.opts.kl_topk
    if k <= 0 or (reference is None and not record_topk):
        return None
    from mlproject.evaluation import divergence

    if ids.numel() < 2:
        return None  # perplexity() refuses the text in one line
    seqlen = min(seqlen, ids.numel())  # perplexity() shortens the one window of a short text the same way
    windows = perplexity.make_windows(ids, seqlen)[:n_windows]
    meta = windows_meta(plan.ppl_name, windows, k)
    meter = None
    if reference is not None:
        ref = reference(meta, windows)
        if ref is not None:
            meter = divergence.KLMeter(ref)
    recorder = divergence.TopKRecorder(k) if record_topk else None
    if meter is None and recorder is None:
        return None
    return _KLHooks(meter, recorder, meta)


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
