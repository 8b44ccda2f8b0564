"""What the compression steps (quantize, prune) share: cheap pre-run checks on the model's
config, loading the input as one plain model, logging the result as the run's ``model``
artifact with its lineage, and the run's final metrics / report.md."""

from __future__ import annotations

import gc
import logging
import tempfile
from pathlib import Path
from typing import Any

from mlproject import tracking
from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.models.reference import ModelRef, alias_table, resolve
from mlproject.steps import StepResult, common
from mlproject.steps.evaluate import EvalOutcome, EvalPlan, evaluate_loaded, report
from mlproject.steps.evaluate import describe as describe_run

log = logging.getLogger(__name__)

T = tracking.TAG_PREFIX


def peek_config(ref: ModelRef, step: str):
    """The input's config when it is cheap to read (else None), refusing already-quantized input."""
    config = loading.peek_config(ref, fetch=tracking.download)
    if config is not None and getattr(config, "quantization_config", None):
        qc = config.quantization_config
        kind = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise UserError(f"model {ref.raw!r} is already quantized ({kind}); {step} needs a float model")
    return config


def meta_model(config):
    """A weightless model from `config` for shape checks; None where transformers cannot build one."""
    try:
        return loading.meta_model(config)
    except (ValueError, KeyError, TypeError, ImportError) as exc:
        log.debug("no meta model for %s: %s", getattr(config, "model_type", "?"), exc)
        return None


def load_input(ref: ModelRef, *, dtype: str, device: str, adapter: str,
               quantization_config: Any = None) -> loading.LoadedModel:
    """Load the input as one plain model: a PEFT adapter (given, or an adapter-only artifact) is
    merged into its base; with `quantization_config` the merged float weights are quantized."""
    loaded = loading.load_model(ref, dtype=dtype, device=device, adapter=adapter or None,
                                fetch=tracking.download, quantization_config=quantization_config)
    if not _is_peft(loaded.model):
        return loaded
    if quantization_config is not None:
        # The base came back quantized under a float adapter; merging that would bake the
        # adapter into rounded weights. Merge in float first, then quantize the merged model.
        del loaded
        gc.collect()
        flo = load_input(ref, dtype=dtype, device=device, adapter=adapter)
        with tempfile.TemporaryDirectory(prefix="mlproject-merged-") as tmp:
            loading.save_model_dir(flo.model, flo.tokenizer, Path(tmp) / "merged", base_model=flo.base_model,
                                   family=flo.family, instruct=flo.instruct)
            del flo.model
            gc.collect()
            q = loading.load_model(resolve(str(Path(tmp) / "merged")), dtype=dtype, device=device,
                                   quantization_config=quantization_config)
        q.ref, q.meta, q.adapter, q.local_dir = flo.ref, flo.meta, flo.adapter, flo.local_dir
        return q
    log.info("merging the PEFT adapter into the base weights before compressing")
    loaded.model = loaded.model.merge_and_unload()
    loaded.model.eval()
    return loaded


def _is_peft(model) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)


def gguf_caveat(loaded: loading.LoadedModel) -> str:
    """The Q4_1 caveat (DESIGN.md) when the lineage starts at a GGUF-shipped alias."""
    entry = alias_table().get(loaded.base_model or "") or {}
    if not entry.get("gguf"):
        return ""
    return (f"Caveat: `{loaded.base_model}` comes from a Q4_1 GGUF file ({entry['gguf']['file']}); its "
            "dequantized weights already sit on a 4-bit grid (asymmetric, blocks of 32), so a 4-bit result here "
            "measures re-rounding onto a second grid, not the loss from the original bf16 weights, and is not "
            "comparable with published 4-bit figures.")


def log_model(run: tracking.Run, loaded: loading.LoadedModel, ref: ModelRef, step: str = "") -> str:
    """Save the (compressed) model with its lineage and log it as the run's MLflow model `model`
    (transformers flavor; fetched by the next step as ``runs:/<run_id>/model``)."""
    upstream = ref.target if ref.kind == "local" else ref.raw
    with tempfile.TemporaryDirectory(prefix="mlproject-model-") as tmp:
        out = loading.save_model_dir(
            loaded.model, loaded.tokenizer, Path(tmp) / "model", base_model=loaded.base_model,
            family=loaded.family, instruct=loaded.instruct, run_id=run.run_id, kind="full", upstream=upstream,
        )
        flavor = loading.mlflow_flavor(loaded.model, loaded.tokenizer, out, source=source_model(loaded))
        run.log_model_dir(out, "model", flavor=flavor, tags=model_tags(loaded, step, upstream))
    return run.model_uri("model")


def source_model(loaded: loading.LoadedModel) -> str:
    """The hub id at the root of the lineage (``smollm2`` → its hub id), for the MLmodel record."""
    entry = alias_table().get(loaded.base_model or "") or {}
    return entry.get("hf_id") or loaded.base_model or ""


def model_tags(loaded: loading.LoadedModel, step: str, upstream: str) -> dict[str, str]:
    """Tags of the MLflow model (the Models tab): where it comes from."""
    return {f"{T}step": step, f"{T}base_model": loaded.base_model or "", f"{T}family": loaded.family or "",
            f"{T}upstream": upstream}


def finish(run: tracking.Run, *, step: str, title: str, loaded: loading.LoadedModel, plan: EvalPlan,
           evaluate: bool, report_params: dict, metrics: dict[str, float], section: tuple[str, str],
           model_uri: str, memory: common.PeakMemory, key: str, headline: str = "",
           notes: tuple[str, ...] = ()) -> StepResult:
    """Evaluate (unless told not to), log the metrics and write report.md."""
    out = evaluate_loaded(loaded, plan, run) if evaluate else EvalOutcome()
    system = {**metrics, **memory.peak()}
    if evaluate:
        system["eval_seconds"] = out.seconds
    run.log_metrics(system)
    heading, body = section
    if not evaluate:
        body += "\n\nNot evaluated (evaluate=false); run `evaluate` on the model artifact later."
    md = report(title, run, step, report_params, plan, out, system, extra_sections={heading: body})
    run.log_text(md, "report.md")
    caveat = gguf_caveat(loaded)
    describe_run(run, headline or title, plan, out, {**out.metrics, **system}, evaluated=evaluate,
                 settings={"dtype": str(loaded.model.dtype).removeprefix("torch."),
                           "device": str(next(loaded.model.parameters()).device)},
                 notes=(*notes, "Not evaluated (evaluate=false)." if not evaluate else "",
                        "Caveat: the base is a Q4_1 GGUF (weights already on a 4-bit grid); see report.md."
                        if caveat and step == "quantize" else ""))
    return StepResult(step=step, run_id=run.run_id, model_uri=model_uri, metrics={**out.metrics, **system},
                      key=key)
