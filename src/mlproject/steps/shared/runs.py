"""Run bookkeeping every step shares: the run's name, the lineage tags compare relies on, the
reuse key the run records (tag ``mlproject.cache_key``), and the step's peak memory."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from mlproject import tracking
from mlproject.models.loading import LoadedModel
from mlproject.models.reference import ModelRef
from mlproject.tracking import names



def run_name(step: str, explicit: str, ref: ModelRef) -> str:
    return explicit or f"{step}:{ref.label}"


def lineage_tags(ref: ModelRef, loaded: LoadedModel | None = None, role: str = "") -> dict[str, Any]:
    """Tags compare relies on: the model, its root base model, family, upstream run, role."""
    meta = loaded.meta if loaded else {}
    upstream = meta.get("run_id") or ref.run_id
    tags = {
        names.MODEL_TAG: ref.raw,
        names.BASE_MODEL_TAG: (loaded.base_model if loaded else None) or ref.alias or ref.target,
        names.FAMILY_TAG: (loaded.family if loaded else None) or ref.family or "",
        names.ROLE_TAG: role or ("eval" if upstream else "base"),
    }
    if upstream:
        tags[names.UPSTREAM_TAG] = upstream
    if loaded is not None and loaded.adapter:
        tags[names.ADAPTER_TAG] = loaded.adapter
    return tags


def cache_key(**parts: Any) -> str:
    """A stable short hash of ``parts`` (names checkpoint folders)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def step_key(step: str, cfg: Any, upstream_key: Any = None, extra: dict[str, Any] | None = None) -> str:
    """The reuse key of running ``step`` with ``cfg`` (tag ``mlproject.cache_key``; see
    ``mlproject.reuse``). ``device``/``dtype`` count as what ``auto`` resolves to here; run
    and registry references count by the key of the run behind them (``upstream_key``,
    default: the tag on the tracking server). ``extra``: facts of this invocation that shape
    the result beyond the config (finetune: the launch's world size)."""
    from mlproject import reuse

    resolved: dict[str, Any] = dict(extra or {})
    if hasattr(cfg, "device") and hasattr(cfg, "dtype"):
        from mlproject.models import loading

        device = loading.pick_device(cfg.device)
        # The device *kind*: under a launch, cuda:<local rank> differs per rank, the result does not.
        resolved.update(device=device.split(":")[0],
                        dtype=str(loading.pick_dtype(cfg.dtype, device)).removeprefix("torch."))
    return reuse.step_key(step, reuse.canonical_params(cfg, resolved, upstream_key or tracking.upstream_key))


class PeakMemory:
    """Peak memory of *one step*, not of the process.

    ``peak_rss_mb``: the largest resident set size of this process between ``start()`` and
    the read. On Linux the kernel's high-water mark (VmHWM) is reset at the start (``5`` to
    ``/proc/self/clear_refs``) and read at the end, which catches even brief peaks; a daemon
    thread also samples the RSS every ``interval`` seconds (the only source where the reset is
    not allowed, and a guard when another monitor resets the mark in between).
    ``ru_maxrss`` is never used: it is the peak of the whole process lifetime, so in a
    pipeline every later step would inherit the largest earlier one.
    ``peak_vram_mb`` (CUDA only): the torch allocator peak, reset at the start.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._max_rss = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeakMemory":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._hwm_reset = _reset_hwm()
        self._max_rss = _rss()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max_rss = max(self._max_rss, _rss())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def peak(self) -> dict[str, float]:
        """The peaks so far: ``peak_rss_mb`` always, ``peak_vram_mb`` on CUDA. Under a distributed
        launch, the largest over the ranks (every rank calls this at the same point)."""
        import torch

        from mlproject import distributed

        rss = max(self._max_rss, _rss())
        if self._hwm_reset:
            rss = max(rss, _hwm() or 0)
        out = {"peak_rss_mb": rss / 2**20}
        if torch.cuda.is_available():
            out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return distributed.max_over_ranks(out)

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int | None:
    """VmHWM of this process in bytes (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
