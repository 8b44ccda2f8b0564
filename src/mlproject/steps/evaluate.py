"""`evaluate`: perplexity + lm-eval tasks of one model, one MLflow run.

`evaluate_loaded` is the reusable part: finetune, quantize and prune call it on their
models (with a metric prefix such as ``before/``), so every step measures the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mlproject import tracking
from mlproject.config import CodeEvalOptions, EvalOptions, EvaluateConfig
from mlproject.evaluation import harness, perplexity
from mlproject.models import loading
from mlproject.report import render
from mlproject.steps import common

log = logging.getLogger(__name__)


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
            "seqlen": self.opts.seqlen, "ppl_batch_size": self.opts.ppl_batch_size, "seed": self.opts.seed,
            **self.code_params(),
        }

    def code_params(self) -> dict[str, Any]:
        """Code tasks: how they were scored and the unsafe-code gates opened (params + report)."""
        if self.code is None:
            return {}
        from mlproject.evaluation.code.lmeval import gates_for

        # not the pool size: it changes no number, and params feed the cache key
        return {**{f"code.{k}": v for k, v in self.code.describe().items() if k != "workers"},
                **{f"code.gate.{k}": v for k, v in gates_for(self.tasks).items()}}


def plan_eval(opts: EvalOptions) -> EvalPlan:
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

    @property
    def avg_acc(self) -> float | None:
        return self.harness.avg_acc if self.harness else None


def measure(loaded: loading.LoadedModel, plan: EvalPlan,
            on_metrics: Callable[[dict[str, float]], None] | None = None) -> EvalOutcome:
    """Compute PPL and task metrics of a loaded model; each part goes to `on_metrics` as
    soon as it is known, so a later failure loses nothing already measured."""
    on_metrics = on_metrics or (lambda metrics: None)
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
        n_windows = max(1, ids.numel() // seqlen)
        with common.progress(f"perplexity ({plan.ppl_name})", n_windows) as advance:
            res = perplexity.perplexity(model, ids, seqlen, plan.opts.ppl_batch_size,
                                        dataset=plan.ppl_name, on_batch=advance)
        out.ppl.append(res)
        out.metrics[f"ppl/{res.dataset}"] = res.ppl
        out.metrics[f"nll/{res.dataset}"] = res.nll
        out.ppl_params = {"ppl.dataset": res.dataset, "ppl.seqlen": res.seqlen,
                          "ppl.windows": res.windows, "ppl.tokens": res.tokens}
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
    out.seconds = time.perf_counter() - start
    out.metrics["eval_seconds"] = out.seconds
    on_metrics({"eval_seconds": out.seconds})
    return out


def evaluate_loaded(loaded: loading.LoadedModel, plan: EvalPlan, run: tracking.Run, prefix: str = "",
                    step: int = 0) -> EvalOutcome:
    """measure() and log the result on `run`, metric names prefixed (e.g. 'before/'), at `step`
    (finetune logs the trained model's scores at its optimizer step)."""
    out = measure(loaded, plan,
                  lambda metrics: run.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step))
    run.log_params({prefix + k: v for k, v in out.ppl_params.items()})
    if out.harness is not None:
        run.log_dict(out.harness.raw, f"lm_eval/{prefix.strip('/') or 'results'}{'_results' if prefix else ''}.json")
        import json

        run.set_tags({f"{tracking.TAG_PREFIX}{prefix.replace('/', '.')}avg_acc_metrics": json.dumps(out.harness.avg_metrics)})
        if out.harness.code is not None:  # per-problem results: compare reads them back
            for task, res in out.harness.code.results.items():
                run.log_dict(res.artifact(plan.code), f"code/{prefix}{task}.json")
            run.set_tags({f"{tracking.TAG_PREFIX}unsafe_code": "lm-eval gates opened on purpose ("
                          + "; ".join(f"{k}={v}" for k, v in out.harness.code.gates.items()) + ")"})
    return out


def model_metrics(model) -> dict[str, float]:
    from mlproject.compression.bnb import model_size_mb

    return {"params_b": loading.count_params(model) / 1e9, "model_size_mb": model_size_mb(model)}


def report(title: str, run: tracking.Run, step: str, params: dict, plan: EvalPlan, out: EvalOutcome,
           system: dict, extra_sections: dict | None = None) -> str:
    import json

    from mlproject import envinfo

    # The snapshot step_run logged as env.json: report and artifact agree, collected once.
    env = run.env or envinfo.collect()
    if out.harness is not None and out.harness.code is not None:
        from mlproject.evaluation.code.lmeval import report_section

        extra_sections = {"Code execution": report_section(out.harness.code, plan.code),
                          **(extra_sections or {})}
    return render(
        title=title,
        run_info={"run id": run.run_id, "step": step, "started": env["time"],
                  "command": f"`{tracking.command_line()}`"},
        datasets={"PPL dataset": plan.opts.ppl_dataset, "lm-eval tasks": ", ".join(plan.tasks) or "none",
                  "limit": plan.limit if plan.limit is not None else "all",
                  "calibration": params.get("calibration", "N/A")},
        parameters=params,
        ppl=out.ppl,
        task_results=out.harness.raw.get("results") if out.harness else None,
        avg_acc=out.avg_acc,
        avg_metrics=out.harness.avg_metrics if out.harness else None,
        system=system,
        environment=json.loads(json.dumps(env, default=str)),
        extra_sections=extra_sections,
    )


@dataclass
class EvaluateResult:
    run_id: str
    metrics: dict[str, float]
    avg_acc: float | None
    ppl: dict[str, float]


def run(cfg: EvaluateConfig) -> EvaluateResult:
    # Everything cheap first: a bad value fails here, before a run or weights exist.
    ref, device, _ = common.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    plan = plan_eval(cfg)
    common.check_tracking(cfg.tracking_uri, ref, cfg.adapter)

    params = {"model": cfg.model, "adapter": cfg.adapter or "none", "dtype": cfg.dtype,
              "device": device, **plan.params()}
    key = common.cache_key(step="evaluate", **params)
    with tracking.step_run(
        "evaluate", experiment=cfg.experiment or None, run_name=common.run_name("evaluate", cfg.run_name, ref),
        tags={f"{tracking.TAG_PREFIX}cache_key": key},
    ) as run:
        run.log_params(params)
        common.reset_peak_memory()
        loaded = loading.load_model(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter or None,
                                    fetch=tracking.download)
        run.set_tags(common.lineage_tags(ref, loaded, cfg.role))
        run.log_params({"resolved_model": loaded.ref.target, "model_dtype": str(loaded.model.dtype)})
        out = evaluate_loaded(loaded, plan, run)
        system = {**model_metrics(loaded.model), **common.peak_memory(), "eval_seconds": out.seconds}
        run.log_metrics(system)
        md = report(f"evaluate: {ref.label}", run, "evaluate", params, plan, out, system)
        run.log_text(md, "report.md")
        return EvaluateResult(run_id=run.run_id, metrics=out.metrics, avg_acc=out.avg_acc,
                              ppl={p.dataset: p.ppl for p in out.ppl})
