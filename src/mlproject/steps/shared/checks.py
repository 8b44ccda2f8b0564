"""The cheap checks every step runs before a run opens or weights load: the model reference,
adapter, device and dtype; the launch; the tracking server and the runs:/ / models:/ references
on it; the Hugging Face hub for the models and data that must come from it; whether the weights
fit in memory; whether the evaluation's generation tasks fit the model's context.
Each raises UserError naming the bad value (one line, exit 2), or logs a warning."""

from __future__ import annotations

import logging
from typing import Any

from mlproject import tracking
from mlproject.models.reference import ModelRef

log = logging.getLogger(__name__)


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


def check_eval_fits(ref: ModelRef, plan: Any, pending: frozenset[str] = frozenset(), config: Any = None) -> None:
    """A generation task of the evaluation plan fits the model's context (its config read
    without weights: ``config`` when the caller has it); refuses in one line otherwise.
    Unknown until the weights load (an upstream step's model, an unconverted GGUF): no check."""
    from mlproject.evaluation import context
    from mlproject.models import loading

    check_reference(plan, pending)
    if not plan.tasks or ref.run_id in pending:
        return
    if not context.may_generate(plan.tasks):
        return  # multiple choice only: no config to read, no task index to build
    config = config if config is not None else loading.peek_config(ref, fetch=tracking.download)
    positions = context.context_length(config) if config is not None else None
    if positions:  # lm-eval's task index (hub tasks) is cached: the run reuses it
        context.check_generation_fits(plan.tasks, positions, ref.raw)


def check_reference(plan: Any, pending: frozenset[str] = frozenset()) -> None:
    """An explicit KL ``reference=<model>`` can be had: cached or on the hub, or a run / registry
    model that exists (a pipeline's own earlier step is ``pending``: it will)."""
    from mlproject.models import hub
    from mlproject.models.reference import resolve

    spec = plan.opts.reference
    if spec in ("auto", "none") or not plan.ppl_name:
        return
    rref = resolve(spec)
    if rref.kind in ("hub", "alias") and not rref.gguf:
        hub.check_model(rref.raw, rref.target, what="reference model")
    elif rref.kind in ("run", "registry") and rref.run_id not in pending:
        tracking.check_model_uri(rref.raw)


def check_data_sources(texts: dict[str, str] | None = None, training: str = "") -> None:
    """Before a run opens, as models are: the data that must come from the Hugging Face hub is
    in the local datasets cache or the hub answers (one line with advice, exit 2, otherwise).
    ``texts``: {parameter: PPL or calibration text} (``wikitext2`` is a hub data set);
    ``training``: a training-data reference (a hub id such as ``yahma/alpaca-cleaned``)."""
    from mlproject.evaluation import perplexity
    from mlproject.models import hub
    from mlproject.training import datasets as tdata

    for what, spec in (texts or {}).items():
        source = perplexity.hub_source(spec)
        if source is not None:
            hub.check_dataset(spec, *source, what=what, instead=f"{what}=offline")
    repo = tdata.hub_id(training) if training else None
    if repo is not None:
        hub.check_dataset(training, repo, what="dataset", instead="dataset=offline:sft_mlp_nonce (or a local .jsonl)")
