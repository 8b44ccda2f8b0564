"""`evaluate`: perplexity + lm-eval tasks of one model, one MLflow run.

The measuring itself is the evaluation engine (``evaluation.engine``, usable with no run);
`evaluate_loaded` runs it on a loaded model and logs the result on a run: finetune, quantize
and prune call it on their models (with a metric prefix such as ``before/``), so every step
measures the same way.
"""

from __future__ import annotations

import logging

from mlproject import distributed, tracking
from mlproject.config import EvaluateConfig
from mlproject.evaluation.engine import (EvalOutcome, EvalPlan, measure, model_metrics, plan_eval,  # noqa: F401
                                         scored_datasets)
from mlproject.models import loading
from mlproject.report import description, render
from mlproject.steps import StepResult, common

log = logging.getLogger(__name__)


def evaluate_loaded(loaded: loading.LoadedModel, plan: EvalPlan, run: tracking.Run, prefix: str = "",
                    step: int = 0) -> EvalOutcome:
    """measure() and log the result on `run`, metric names prefixed (e.g. 'before/'), at `step`
    (finetune logs the trained model's scores at its optimizer step)."""
    out = measure(loaded, plan,
                  lambda metrics: run.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step))
    run.log_params({prefix + k: v for k, v in out.ppl_params.items()})
    run.log_datasets(scored_datasets(plan, out))
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
        datasets={"PPL dataset": plan.opts.ppl_dataset, "PPL windows": plan.ppl_windows_setting,
                  "lm-eval tasks": ", ".join(plan.tasks) or "none",
                  "limit": plan.limit if plan.limit is not None else "all",
                  "calibration": params.get("calibration", "N/A")},
        parameters=params,
        ppl=out.ppl,
        ppl_windows_total=out.ppl_available or None,
        task_results=out.harness.raw.get("results") if out.harness else None,
        avg_acc=out.avg_acc,
        avg_metrics=out.harness.avg_metrics if out.harness else None,
        system=system,
        environment=json.loads(json.dumps(env, default=str)),
        extra_sections=extra_sections,
    )


def describe(run: tracking.Run, title: str, plan: EvalPlan, out: EvalOutcome, metrics: dict, *,
             settings: dict | None = None, before: dict | None = None, notes: tuple = (),
             evaluated: bool = True) -> None:
    """The run's description: headline numbers, then the settings that make them comparable."""
    avg = out.harness.avg_metrics if out.harness else None
    evaluation = plan.settings(out) if evaluated and not plan.empty else {}
    run.set_description(description(title, metrics, avg_metrics=avg, before=before, notes=notes,
                                    settings={**(settings or {}), **evaluation}))


def check(cfg: EvaluateConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()):
    """Every cheap check, before a run or weights exist: (ref, device, plan)."""
    ref, device, dtype = common.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    plan = plan_eval(cfg)
    common.check_tracking(cfg.tracking_uri, ref, cfg.adapter, parent=parent, pending=pending)
    common.check_model_sources(ref, cfg.adapter, device, dtype, pending)
    return ref, device, plan


def run(cfg: EvaluateConfig, parent: tracking.Run | None = None) -> StepResult:
    common.check_launch(cfg)
    ref, device, plan = check(cfg, parent)
    key = common.step_key("evaluate", cfg)
    # world_size: processes sharing the requests and PPL windows (lm-eval's data-parallel mode).
    params = {"model": cfg.model, "adapter": cfg.adapter or "none", "dtype": cfg.dtype,
              "device": device, **plan.params(), "world_size": distributed.world_size()}
    with tracking.step_run(
        "evaluate", experiment=cfg.experiment or None, run_name=common.run_name("evaluate", cfg.run_name, ref),
        tags={f"{tracking.TAG_PREFIX}cache_key": key}, parent=parent,
    ) as run, common.PeakMemory() as memory:
        run.log_params(params)
        loaded = loading.load_model(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter or None,
                                    fetch=tracking.download)
        run.set_tags(common.lineage_tags(ref, loaded, cfg.role))
        run.log_params({"resolved_model": loaded.ref.target, "model_dtype": str(loaded.model.dtype)})
        out = evaluate_loaded(loaded, plan, run)
        system = {**model_metrics(loaded.model), **memory.peak(), "eval_seconds": out.seconds}
        run.log_metrics(system)
        md = report(f"evaluate: {ref.label}", run, "evaluate", params, plan, out, system)
        run.log_text(md, "report.md")
        describe(run, f"evaluate · {ref.raw}" + (f" + adapter {cfg.adapter}" if cfg.adapter else ""), plan, out,
                 {**out.metrics, **system},
                 settings={"dtype": str(loaded.model.dtype).removeprefix("torch."), "device": device})
        return StepResult(step="evaluate", run_id=run.run_id, metrics={**out.metrics, **system},
                          model_uri=ref.raw, key=key)
