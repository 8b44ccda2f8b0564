"""Pieces every step shares: run naming, lineage tags, memory figures, progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import sys
from typing import Any, Iterator

from mlproject import tracking
from mlproject.models.loading import LoadedModel
from mlproject.models.reference import ModelRef

T = tracking.TAG_PREFIX


def run_name(step: str, explicit: str, ref: ModelRef) -> str:
    return explicit or f"{step}:{ref.label}"


def lineage_tags(ref: ModelRef, loaded: LoadedModel | None = None, role: str = "") -> dict[str, Any]:
    """Tags compare relies on: the model, its root base model, family, upstream run, role."""
    meta = loaded.meta if loaded else {}
    upstream = meta.get("run_id") or ref.run_id
    tags = {
        f"{T}model": ref.raw,
        f"{T}base_model": (loaded.base_model if loaded else None) or ref.alias or ref.target,
        f"{T}family": (loaded.family if loaded else None) or ref.family or "",
        f"{T}role": role or ("eval" if upstream else "base"),
    }
    if upstream:
        tags[f"{T}upstream_run"] = upstream
    if loaded is not None and loaded.adapter:
        tags[f"{T}adapter"] = loaded.adapter
    return tags


def check_model_args(model: str, adapter: str, device: str, dtype: str):
    """The cheap checks every model-loading step starts with: reference, adapter, device,
    dtype. Returns (ModelRef, device, torch dtype); raises UserError naming a bad value."""
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    ref = resolve(model)
    loading.check_hub(ref)  # an unknown or uncached hub id fails here, before any run exists
    if adapter:
        loading.check_hub(loading.resolve_adapter(adapter), "adapter_config.json")
    device = loading.pick_device(device)
    return ref, device, loading.pick_dtype(dtype, device)


def check_tracking(tracking_uri: str, ref: ModelRef, adapter: str = "") -> None:
    """The tracking server answers and the runs:/ / models:/ references exist on it."""
    tracking.check_server(tracking_uri or None)
    check_remote_refs(ref, adapter)


def check_remote_refs(ref: ModelRef, adapter: str = "") -> None:
    """runs:/ and models:/ references must exist before a run is opened."""
    from mlproject.models.loading import resolve_adapter

    refs = [ref] + ([resolve_adapter(adapter)] if adapter else [])
    for r in refs:
        if r.kind in ("run", "registry"):
            tracking.check_model_uri(r.target)


def cache_key(**parts: Any) -> str:
    """A stable hash of what determines a run's numbers (to spot repeated work)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """peak_vram_mb on CUDA (torch allocator peak) and peak_rss_mb of this process."""
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if sys.platform == "darwin":  # macOS reports bytes
        out["peak_rss_mb"] /= 1024.0
    if torch.cuda.is_available():
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr; yields advance(n). Silent when stderr is not a TTY."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
