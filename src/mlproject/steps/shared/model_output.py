"""A step's output model as MLflow keeps it: saved with its lineage and logged as the run's
``model`` (transformers flavor, fetched by the next step as ``runs:/<run_id>/model``), the tags
of that MLflow model, and the caveat for lineages that start at a GGUF-shipped alias."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlproject import tracking
from mlproject.models import loading
from mlproject.models.reference import ModelRef, alias_table
from mlproject.tracking import names



def gguf_caveat(loaded: loading.LoadedModel) -> str:
    """The Q4_1 caveat when the lineage starts at a GGUF-shipped alias (its weights already sit on a 4-bit grid)."""
    entry = alias_table().get(loaded.base_model or "") or {}
    if not entry.get("gguf"):
        return ""
    return (f"Caveat: `{loaded.base_model}` comes from a Q4_1 GGUF file ({entry['gguf']['file']}); its "
            "dequantized weights already sit on a 4-bit grid (asymmetric, blocks of 32), so a 4-bit result here "
            "measures re-rounding onto a second grid, not the loss from the original bf16 weights, and is not "
            "comparable with published 4-bit figures.")


def log_model(run: tracking.Run, loaded: loading.LoadedModel, ref: ModelRef, step: str = "",
              saved: Path | None = None) -> str:
    """Save the (compressed) model with its lineage and log it as the run's MLflow model `model`
    (transformers flavor; fetched by the next step as ``runs:/<run_id>/model``). ``saved``: a folder
    already holding the checkpoint in its method's own format (packed quantization), logged as
    written with the tokenizer and lineage added."""
    upstream = ref.target if ref.kind == "local" else ref.raw
    meta = dict(base_model=loaded.base_model, family=loaded.family, instruct=loaded.instruct, run_id=run.run_id,
                kind="full", upstream=upstream)
    with tempfile.TemporaryDirectory(prefix="mlproject-model-") as tmp:
        if saved is not None:
            out = Path(saved)
            loaded.tokenizer.save_pretrained(out)
            loading.write_meta(out, **meta)
        else:
            out = loading.save_model_dir(loaded.model, loaded.tokenizer, Path(tmp) / "model", **meta)
        flavor = loading.mlflow_flavor(loaded.model, loaded.tokenizer, out, source=source_model(loaded))
        run.log_model_dir(out, "model", flavor=flavor, tags=model_tags(loaded, step, upstream))
    return run.model_uri("model")


def source_model(loaded: loading.LoadedModel) -> str:
    """The hub id at the root of the lineage (``smollm2`` → its hub id), for the MLmodel record."""
    entry = alias_table().get(loaded.base_model or "") or {}
    return entry.get("hf_id") or loaded.base_model or ""


def model_tags(loaded: loading.LoadedModel, step: str, upstream: str) -> dict[str, str]:
    """Tags of the MLflow model (the Models tab): where it comes from."""
    return {names.STEP_TAG: step, names.BASE_MODEL_TAG: loaded.base_model or "", names.FAMILY_TAG: loaded.family or "",
            names.MODEL_UPSTREAM_TAG: upstream}
