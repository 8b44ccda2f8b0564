"""`evaluate`: perplexity + lm-eval tasks of one model, one MLflow run.

The measuring itself is the evaluation engine (``evaluation.engine``, usable with no run);
``steps.shared.evaluation`` runs it on a loaded model and logs the result on a run — this step
on its input, finetune, quantize and prune on their models (with a metric prefix such as
``before/``), so every step measures the same way.
"""

from __future__ import annotations

import logging

from mlproject import distributed, tracking
from mlproject.config import EvaluateConfig
from mlproject.evaluation.engine import model_metrics, plan_eval
from mlproject.models import loading
from mlproject.steps import StepResult
from mlproject.steps.shared import checks, runs
from mlproject.steps.shared.evaluation import describe, evaluate_loaded, report
from mlproject.tracking import names

log = logging.getLogger(__name__)


def check(cfg: EvaluateConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()):
    """Every cheap check, before a run or weights exist: (ref, device, plan)."""
    ref, device, dtype = checks.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    plan = plan_eval(cfg)
    checks.check_tracking(cfg.tracking_uri, ref, cfg.adapter, parent=parent, pending=pending)
    checks.check_model_sources(ref, cfg.adapter, device, dtype, pending, plan=plan, strict=cfg.strict_memory)
    checks.check_data_sources({"ppl_dataset": cfg.ppl_dataset})
    checks.check_eval_fits(ref, plan, pending)
    return ref, device, plan


def run(cfg: EvaluateConfig, parent: tracking.Run | None = None) -> StepResult:
    checks.check_launch(cfg)
    ref, device, plan = check(cfg, parent)
    key = runs.step_key("evaluate", cfg)
    # world_size: processes sharing the requests and PPL windows (lm-eval's data-parallel mode).
    params = {"model": cfg.model, "adapter": cfg.adapter or "none", "dtype": cfg.dtype,
              "device": device, **plan.params(), "world_size": distributed.world_size()}
    with tracking.step_run(
        "evaluate", experiment=cfg.experiment or None, run_name=runs.run_name("evaluate", cfg.run_name, ref),
        tags={names.CACHE_KEY_TAG: key}, parent=parent,
    ) as run, runs.PeakMemory() as memory:
        run.log_params(params)
        loaded = loading.load_model(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter or None,
                                    fetch=tracking.download)
        run.set_tags(runs.lineage_tags(ref, loaded, cfg.role))
        run.log_params({"resolved_model": loaded.ref.target, "model_dtype": str(loaded.model.dtype)})
        # A lineage's root, unchanged (no upstream run, no adapter): its distributions over the PPL
        # windows are stored for the KL of every model derived from it.
        root = (not (loaded.meta.get("run_id") or ref.run_id or loaded.adapter or cfg.adapter)
                and loaded.base_model == (ref.alias or ref.target)
                and not hasattr(loaded.model, "peft_config"))  # an adapter folder from elsewhere
        out = evaluate_loaded(loaded, plan, run, is_root=root)
        system = {**model_metrics(loaded.model), **memory.peak(), "eval_seconds": out.seconds}
        run.log_metrics(system)
        md = report(f"evaluate: {ref.label}", run, "evaluate", params, plan, out, system)
        run.log_text(md, "report.md")
        describe(run, f"evaluate · {ref.raw}" + (f" + adapter {cfg.adapter}" if cfg.adapter else ""), plan, out,
                 {**out.metrics, **system},
                 settings={"dtype": str(loaded.model.dtype).removeprefix("torch."), "device": device})
        return StepResult(step="evaluate", run_id=run.run_id, metrics={**out.metrics, **system},
                          model_uri=ref.raw, key=key)
