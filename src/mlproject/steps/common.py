"""Pieces every step shares: run naming, lineage tags, pre-run checks, memory figures."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from mlproject import tracking
from mlproject.progress import progress  # noqa: F401 - steps use common.progress
from mlproject.models.loading import LoadedModel
from mlproject.models.reference import ModelRef

T = tracking.TAG_PREFIX
log = logging.getLogger(__name__)


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
    if adapter:
        loading.resolve_adapter(adapter)
    device = loading.pick_device(device)
    return ref, device, loading.pick_dtype(dtype, device)


def check_launch(cfg: Any) -> None:
    """``nproc`` > 1 is honoured by ``mlproject <step>`` / ``mlflow run`` (they start torchrun);
    a step called in-process (a pipeline) cannot grow more processes."""
    from mlproject import distributed
    from mlproject.errors import UserError

    nproc = getattr(cfg, "nproc", 1)
    if nproc > 1 and not distributed.active():
        raise UserError(f"nproc={nproc} needs a launcher: use `mlproject <step> --nproc {nproc}` or "
                        f"`mlflow run -P nproc={nproc}`, or start the whole command with torchrun")


def check_model_sources(ref: ModelRef, adapter: str, device: str, torch_dtype: Any,
                        pending: frozenset[str] = frozenset(), bytes_per_param: float | None = None,
                        purpose: str = "load") -> None:
    """Before a run opens (after ``check_tracking``): a model or adapter that must come from the
    Hugging Face hub is cached or the hub answers (one line with advice, exit 2, otherwise), and a
    warning when the weights will not fit in the memory available (``bytes_per_param`` overrides
    the dtype's size, e.g. 4-bit loading or full fine-tuning's gradients and Adam states)."""
    from mlproject.models import hub
    from mlproject.models.loading import resolve_adapter

    if ref.kind in ("hub", "alias") and not ref.gguf:
        hub.check_model(ref.raw, ref.target)
    if adapter:
        aref = resolve_adapter(adapter)
        if aref.kind == "hub":
            hub.check_model(aref.raw, aref.target, what="adapter", filename="adapter_config.json")
    if ref.run_id not in pending:
        warn_memory(ref, device, torch_dtype, bytes_per_param, purpose)


def warn_memory(ref: ModelRef, device: str, torch_dtype: Any, bytes_per_param: float | None = None,
                purpose: str = "load") -> str | None:
    """Log (and return) a warning when the model's weights exceed 90% of the memory available
    on ``device``; None when they fit or the size is unknown."""
    from mlproject.models import loading

    n = loading.estimate_params(ref, fetch=tracking.download)
    if not n:
        return None
    per = bytes_per_param or torch_dtype.itemsize
    need = n * per
    if device.startswith("cuda"):
        import torch

        available, where = torch.cuda.mem_get_info(torch.device(device))[0], f"free on {device}"
    else:
        import psutil

        available, where = psutil.virtual_memory().available, "of RAM available"
    if need <= 0.9 * available:
        log.debug("%s: ~%.1f GiB needed, %.1f GiB %s", ref.raw, need / 2**30, available / 2**30, where)
        return None
    dtype = str(torch_dtype).removeprefix("torch.")
    fixes = ([] if device.startswith("cuda") else ["a GPU (device=cuda)"]) \
        + (["dtype=bfloat16"] if per >= 4 else []) + ["a smaller model (model=smollm2)"]
    use = f"{', '.join(fixes[:-1])} or {fixes[-1]}" if len(fixes) > 1 else fixes[0]
    msg = (f"{ref.raw} has ~{n / 1e9:.2f} B parameters: to {purpose} it takes ~{need / 2**30:.1f} GiB "
           f"({per:g} bytes per parameter, {dtype}), but only {available / 2**30:.1f} GiB {where}; it may swap "
           f"or be killed. Use {use}.")
    log.warning("%s", msg)
    return msg


def check_tracking(tracking_uri: str, ref: ModelRef, adapter: str = "", parent: Any = None,
                   pending: frozenset[str] = frozenset()) -> None:
    """The tracking server answers and the runs:/ / models:/ references exist on it. Under a
    parent run (pipeline, search trial) the server was checked once, by whoever opened it.
    ``pending``: run ids that do not exist yet (a pipeline's later steps, checked up front)."""
    if parent is None:
        tracking.check_server(tracking_uri or None)
    check_remote_refs(ref, adapter, pending)


def check_remote_refs(ref: ModelRef, adapter: str = "", pending: frozenset[str] = frozenset()) -> None:
    """runs:/ and models:/ references must exist before a run is opened."""
    from mlproject.models.loading import resolve_adapter

    refs = [ref] + ([resolve_adapter(adapter)] if adapter else [])
    for r in refs:
        if r.kind in ("run", "registry") and r.run_id not in pending:
            tracking.check_model_uri(r.target)


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
