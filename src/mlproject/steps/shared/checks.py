"""The cheap checks every step runs before a run opens or weights load: the model reference,
adapter, device and dtype; the launch; the tracking server and the runs:/ / models:/ references
on it; the Hugging Face hub for the models and data that must come from it; whether the step's
peak memory fits (estimated by ``memory``); whether the evaluation's generation tasks fit the
model's context.
Each raises UserError naming the bad value (one line, exit 2), or logs a warning."""

from __future__ import annotations

import dataclasses
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
                        step: str = "evaluate", plan: Any = None, training: Any = None, kept: float = 1.0,
                        strict: bool = False) -> None:
    """Before a run opens (after ``check_tracking``): a model or adapter that must come from the
    Hugging Face hub is cached or the hub answers (one line with advice, exit 2, otherwise), and
    the step's peak memory fits (``check_memory``: a warning, or with ``strict`` a refusal).
    ``bytes_per_param``: a method that quantizes while loading (bitsandbytes) holds that many
    bytes per linear weight; ``plan``: the evaluation the step runs (None: none); ``training``:
    the finetune config; ``kept``: prune's fraction of parameters left for the evaluation."""
    from mlproject.models import hub
    from mlproject.models.loading import resolve_adapter

    if ref.kind in ("hub", "alias") and not ref.gguf:
        hub.check_model(ref.raw, ref.target)
    if adapter:
        aref = resolve_adapter(adapter)
        if aref.kind == "hub":
            hub.check_model(aref.raw, aref.target, what="adapter", filename="adapter_config.json")
    if ref.run_id not in pending:
        check_memory(ref, device, torch_dtype, step=step, load_bits=None if bytes_per_param is None
                     else bytes_per_param * 8, merge_first=bool(adapter), plan=plan, training=training,
                     kept=kept, strict=strict)


def available_memory(device: str) -> tuple[int, str]:
    """(bytes free, where): the CUDA device's free memory, else the host's available RAM."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0], device
    import psutil

    return psutil.virtual_memory().available, "this host's RAM"


def check_memory(ref: ModelRef, device: str, torch_dtype: Any, *, step: str = "evaluate",
                 load_bits: float | None = None, merge_first: bool = False, plan: Any = None,
                 training: Any = None, kept: float = 1.0, strict: bool = False) -> str | None:
    """Estimate the step's peak memory before loading (``memory.estimate``) and compare it with
    the memory free on ``device``. Over: a warning naming the numbers and the parameters that
    lower them (returned), or with ``strict`` a UserError; None when it fits or nothing is known."""
    from mlproject.errors import UserError
    from mlproject.steps.shared import memory

    shape, stored_bits = model_shape(ref)
    if shape is None:
        return None
    work = memory.Work(
        step=step, dtype_bytes=torch_dtype.itemsize, cuda=device.startswith("cuda"),
        load_bits=load_bits if load_bits is not None else (stored_bits if training is None else None),
        merge_first=merge_first and load_bits is not None, evaluation=evaluation_work(plan),
        training=None if training is None else memory.Training(
            **{f.name: getattr(training, f.name) for f in dataclasses.fields(memory.Training)}),
        kept=kept)
    est = memory.estimate(shape, work)
    available, where = available_memory(device)
    dtype = str(torch_dtype).removeprefix("torch.")
    if est.total <= available:
        log.debug("%s of %s: %s in %s, %s free on %s", step, ref.raw, est.describe(), dtype,
                  memory.gb(available), where)
        return None
    knobs = est.knobs()
    use = f"{', '.join(knobs[:-1])} or {knobs[-1]}" if len(knobs) > 1 else knobs[0]
    note = f" [{'; '.join(est.notes)}]" if est.notes else ""
    msg = (f"{step} of {ref.raw} ({shape.params / 1e9:.2f} B parameters, {dtype}) needs {est.describe()}{note}, "
           f"but {where} has {memory.gb(available)} free; lower it with {use}")
    if strict:
        raise UserError(f"strict_memory: {msg}")
    msg += " (it may swap or be killed; strict_memory=true refuses before the run instead)"
    log.warning("%s", msg)
    return msg


def model_shape(ref: ModelRef):
    """(``memory.ModelShape``, bits per linear weight of a bitsandbytes checkpoint or None) of
    the model behind ``ref`` without its weights: its config and a weightless model when cheap
    to read, else the alias table's parameter count; (None, None) when nothing is known."""
    from mlproject.models import loading
    from mlproject.steps.shared import memory

    config = loading.peek_config(ref, fetch=tracking.download)
    if config is not None:
        try:
            meta = loading.meta_model(config)
        except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build weightless
            log.debug("no meta model for %s: %s", ref.raw, exc)
        else:
            return memory.ModelShape.from_config(config, loading.count_params(meta), meta), _stored_bits(config)
    if ref.params_b:
        return memory.ModelShape(params=int(ref.params_b * 1e9)), None
    return None, None


def _stored_bits(config: Any) -> float | None:
    # A bitsandbytes checkpoint loads packed; the other packed formats are counted as float (an upper
    # bound: compressed-tensors decompresses at the first forward, AutoRound unpacks on CPU).
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
    if qc.get("load_in_4bit"):
        return 4.0
    if qc.get("load_in_8bit"):
        return 8.0
    return None


def evaluation_work(plan: Any):
    """An evaluation plan as ``memory.Evaluation`` (None for no plan): lm-eval's batch, the most
    tokens a generation task of the plan generates (tasks whose settings can be read cheaply),
    the PPL window."""
    if plan is None:
        return None
    from mlproject.evaluation import context
    from mlproject.steps.shared import memory

    generates = 0
    if plan.tasks and context.may_generate(plan.tasks):
        generates = max(context.generation_lengths(plan.tasks).values(), default=0)
    batch = plan.batch_size if isinstance(plan.batch_size, int) else 1  # auto: lm-eval finds what fits
    return memory.Evaluation(batch_size=batch if plan.tasks else 0, generation_tokens=generates if plan.tasks else 0,
                             ppl_seqlen=plan.opts.seqlen if plan.ppl_name else 0,
                             ppl_batch_size=plan.opts.ppl_batch_size)


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
