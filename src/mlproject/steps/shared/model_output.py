"""A step's output model as MLflow keeps it: saved with its lineage and logged as the run's
``model`` (transformers flavor, fetched by the next step as ``runs:/<run_id>/model``), the tags
of that MLflow model, and the caveat for lineages that start at a GGUF-shipped alias."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject import tracking
from mlproject.models import loading, recipes
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


@dataclass
class Recipe:
    """How a step's output follows from its input (``models.recipes``): the operation
    (``quantize``, ``prune``), its JSON parameters, tensors to store beside them (prune's kept
    indices), the adapter merged into the input, and the working dtype and device."""

    op: str
    params: dict[str, Any]
    adapter: str
    dtype: Any
    device: str
    tensors: dict[str, Any] = field(default_factory=dict)


def log_model(run: tracking.Run, loaded: loading.LoadedModel, ref: ModelRef, step: str = "",
              saved: Path | None = None, recipe: Recipe | None = None, store: str = "weights") -> str:
    """Log the step's output as the run's MLflow model `model` (fetched by the next step as
    ``runs:/<run_id>/model``): a recipe (``recipe`` given, ``store=recipe``: KBs, re-made when
    loaded), else the weights with their lineage (transformers flavor). ``saved``: a folder
    already holding the checkpoint in its method's own format (packed quantization), logged as
    written with the tokenizer and lineage added. The run's tag ``mlproject.store`` says which."""
    upstream = ref.target if ref.kind == "local" else ref.raw
    meta = dict(base_model=loaded.base_model, family=loaded.family, instruct=loaded.instruct, run_id=run.run_id,
                kind="full", upstream=upstream)
    kind = "recipe" if recipe is not None and store == "recipe" and saved is None else "weights"
    run.set_tags({names.STORE_TAG: kind})
    tags = {**model_tags(loaded, step, upstream), names.STORE_TAG: kind}
    with tempfile.TemporaryDirectory(prefix="mlproject-model-") as tmp:
        if kind == "recipe":
            out = recipes.write(
                Path(tmp) / "model", model=loaded.model,
                input_ref=ref.target if ref.kind == "local" else ref.raw, adapter=_pinned_adapter(recipe.adapter),
                identity=input_identity(ref), op=recipe.op, params=recipe.params,
                dtype=str(recipe.dtype).removeprefix("torch."), device=recipe.device,
                digest=recipes.weights_digest(loaded.model), versions=loading.recipe_versions(),
                meta=meta, tensors=recipe.tensors)
            run.log_model_dir(out, "model", flavor=None, tags=tags)
            loaded.meta = {**meta, "kind": "recipe"}  # what the model in memory now is (the hand-off carries it)
            return run.model_uri("model")
        if saved is not None:
            out = Path(saved)
            loaded.tokenizer.save_pretrained(out)
            loading.write_meta(out, **meta)
        else:
            out = loading.save_model_dir(loaded.model, loaded.tokenizer, Path(tmp) / "model", **meta)
        flavor = loading.mlflow_flavor(loaded.model, loaded.tokenizer, out, source=source_model(loaded))
        run.log_model_dir(out, "model", flavor=flavor, tags=tags)
    loaded.meta = dict(meta)
    return run.model_uri("model")


def _pinned_adapter(adapter: str) -> str:
    """A local adapter folder by its absolute path (a recipe is loaded from other directories)."""
    if adapter and Path(adapter).expanduser().is_dir():
        return str(Path(adapter).expanduser().resolve())
    return adapter or ""


def input_identity(ref: ModelRef) -> dict[str, str]:
    """What pins a recipe's input: the upstream run and its reuse key (``runs:/``, ``models:/``),
    the hub commit in the local cache, the GGUF file of an alias, or a local directory's content digest."""
    if ref.kind in ("run", "registry"):
        ident = {"run": ref.run_id or ""} if ref.kind == "run" else {}
        key = tracking.upstream_key(ref.raw)
        return {**ident, **({"key": key} if key else {})}
    if ref.kind == "local":
        return {"dir": recipes.dir_digest(Path(ref.target))}
    if ref.gguf:
        from importlib import metadata

        try:
            version = metadata.version(ref.gguf[0])
        except metadata.PackageNotFoundError:
            version = "none"
        return {"gguf": f"{ref.gguf[0]}:{ref.gguf[1]}", "version": version}
    commit = recipes.hub_commit(ref.target)
    return {"hub": ref.target, **({"commit": commit} if commit else {})}


def source_model(loaded: loading.LoadedModel) -> str:
    """The hub id at the root of the lineage (``smollm2`` → its hub id), for the MLmodel record."""
    entry = alias_table().get(loaded.base_model or "") or {}
    return entry.get("hf_id") or loaded.base_model or ""


def model_tags(loaded: loading.LoadedModel, step: str, upstream: str) -> dict[str, str]:
    """Tags of the MLflow model (the Models tab): where it comes from."""
    return {names.STEP_TAG: step, names.BASE_MODEL_TAG: loaded.base_model or "", names.FAMILY_TAG: loaded.family or "",
            names.MODEL_UPSTREAM_TAG: upstream}
