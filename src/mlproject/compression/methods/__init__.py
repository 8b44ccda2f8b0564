"""The quantization method registry: what a method is (:class:`QuantMethod`) and which exist (``METHODS``).

A method *family* (RTN; bitsandbytes nf4/fp4/int8; llm-compressor GPTQ/AWQ; AutoRound; HQQ) is one module holding one :class:`QuantMethod` object; it provides one or more method
names, the values of the quantize step's ``method`` parameter. ``METHODS`` maps each family to
its ``"module:object"`` entry, resolved on first use (as lm-eval's registry does). Adding a
method is one module plus one line here; the step's ``method`` choices, ``--help``, MLproject
and the README's parameter tables follow from the registry.

Everything the quantize step, model loading and evaluation need to know about a method goes
through this protocol, so none of them branches on a method name:

* before any run or weights: :meth:`~QuantMethod.validate` (the config alone, in
  ``QuantizeConfig.__post_init__``), :meth:`~QuantMethod.check_available` (its library),
  :meth:`~QuantMethod.load_bits` (memory estimate), :meth:`~QuantMethod.check_model` (the
  input's transformers config and a weightless meta-device model: layer shapes);
* the run: :meth:`~QuantMethod.run_params`, :meth:`~QuantMethod.tags`,
  :meth:`~QuantMethod.run_name_suffix`, then :meth:`~QuantMethod.quantize`, which loads the
  input through :class:`QuantContext` (quantizing while loading if the library works that way)
  and returns :class:`Quantized`: the model, metrics, params known only afterwards, report.md
  paragraphs and the run description's line;
* its output, later: checkpoints declare their format in ``config.json``
  (``quantization_config.quant_method``); the family whose ``formats`` holds it prepares a
  reloaded model (:meth:`~QuantMethod.prepare_loaded`) and says how many bytes it really holds
  (:meth:`~QuantMethod.model_size_bytes`). See :func:`prepare_loaded` and :func:`model_size_mb`.

A calibrated method (GPTQ, AWQ, AutoRound) lists ``calibration`` / ``calibration_samples`` /
``calibration_seqlen`` in its ``params`` (other families then refuse them), draws its windows
once through ``QuantContext.calibration`` (seeded, logged as params and a dataset input) and says
what it used in ``Quantized.calibration`` (report.md's calibration lines). A packed format
(compressed-tensors, auto-round, hqq) writes its own checkpoint into ``QuantContext.workdir`` and
returns it as ``Quantized.saved`` (logged as written), names its ``quant_method`` in ``formats``,
counts its real bytes in ``model_size_bytes`` and, where ``from_pretrained`` cannot read it,
loads it in ``load_dir``. ``serving`` names the runtimes that serve what a family stores.
``common`` holds what the packed methods share (one meaning of w_bits / group_size / scheme /
modules, install hints, sizes of a checkpoint folder).

No torch, transformers or MLflow here: listing the methods (``mlproject --help``) must stay
instant, so method modules import their libraries inside functions too.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from mlproject.errors import UserError

#: family → "module:object" (a :class:`QuantMethod`), in the order --help lists them.
METHODS: dict[str, str] = {
    "rtn": "mlproject.compression.methods.rtn:RTN",
    "bitsandbytes": "mlproject.compression.methods.bnb:BNB",
    "llmcompressor": "mlproject.compression.methods.llmcompressor:LLMCOMPRESSOR",
    "autoround": "mlproject.compression.methods.autoround:AUTOROUND",
    "hqq": "mlproject.compression.methods.hqq:HQQ",
}

MB = 1024**2  # 2^20 bytes, as everywhere in compression/


@dataclass
class QuantContext:
    """What the quantize step hands a method: the input and how to load it."""

    ref: Any  # the input's mlproject.models.reference.ModelRef (its .raw names it in messages)
    device: str  # resolved: cpu, cuda, cuda:N
    dtype: Any  # the torch dtype the float weights load in
    load: Callable[..., Any]
    """``load(quantization_config=None) -> LoadedModel``: the input as one plain model (a PEFT
    adapter merged in float first); with a transformers ``quantization_config`` it is quantized
    while loading."""
    workdir: Any = None  # a folder the step removes after the run: where a packed method writes its checkpoint
    calibration: Callable[..., Any] | None = None
    """``calibration(tokenizer) -> LongTensor [n, seqlen]``: the calibration windows (``calibration``,
    ``calibration_samples``, ``calibration_seqlen`` at ``seed``), logged as the run's params and
    dataset input; a calibrated method calls it once."""
    reload: Callable[..., Any] | None = None
    """``reload(folder) -> LoadedModel``: a checkpoint the method wrote, loaded as the next step would."""


@dataclass
class Quantized:
    """What :meth:`QuantMethod.quantize` returns; the step logs it and writes report.md."""

    loaded: Any  # mlproject.models.loading.LoadedModel holding the quantized model
    metrics: dict[str, float]
    """Logged once the run is evaluated, in this order (report.md lists them so): at least
    ``quant_seconds``, ``params_b``, ``model_size_mb``, ``model_size_mb_before`` and
    ``effective_bits`` (stored bits per quantized weight, scales included)."""
    params: dict[str, Any] = field(default_factory=dict)  # values known only now (quant.layers …)
    weight: dict[str, Any] = field(default_factory=dict)  # report.md's "weight" entry: the grid as stored
    report: list[str] = field(default_factory=list)  # paragraphs opening report.md's Quantization section
    note: str = ""  # the run description's line about the method
    headline: str = ""  # appended to "quantize · <model> · <method>" in the description
    calibration: dict[str, Any] = field(default_factory=dict)
    """report.md's calibration lines: ``dataset``, ``samples``, ``seqlen`` (empty: N/A, calibration-free)."""
    saved: Any = None
    """The folder holding the checkpoint in the method's own format (config + weights), logged as
    the run's model as written; None: the step saves the model with ``save_pretrained``."""


class QuantMethod:
    """One method family. Subclasses set ``names`` and ``help`` and implement ``quantize``;
    every other hook has a default that suits a calibration-free method writing float weights.

    Hooks take the step's ``QuantizeConfig`` (``cfg.method`` is the name chosen) and raise
    :class:`~mlproject.errors.UserError` with one line for bad input.
    """

    names: tuple[str, ...] = ()  # the `method` values this family provides
    help: str = ""  # its part of the `method` parameter's help, naming every one of `names`
    params: tuple[str, ...] = ()  # the QuantizeConfig fields it reads (other families refuse them)
    formats: tuple[str, ...] = ()  # `quantization_config.quant_method` of the checkpoints it writes
    serving: str = ""  # the runtimes that serve what it stores (tag mlproject.quant.serving, report.md)
    no_lora: str = ""  # why peft cannot put LoRA layers on what it stores ("": it can)
    placed_on_load: bool = False  # its checkpoints load onto the device through from_pretrained's device_map

    # -- before any run or weights -----------------------------------------------------------
    def validate(self, cfg) -> None:
        """Check the config alone (cheap, no heavy import); by default refuse the fields that
        only other families read (:func:`refuse_unused`)."""
        refuse_unused(cfg, self)

    def ignores(self, cfg) -> str:
        """Why this method ignores other families' fields (the end of the refusal)."""
        return f"{cfg.method} does not use it"

    def implied(self, cfg) -> dict[str, Any]:
        """Other families' fields this method fixes itself: giving the value it implies is no error."""
        return {}

    def check_available(self, cfg) -> None:
        """Refuse when the method's library is missing."""

    def load_bits(self, cfg) -> float | None:
        """Bits per weight the model holds while loading (the memory check); None: its float dtype."""
        return None

    def check_model(self, cfg, config, meta: Callable[[], Any]) -> None:
        """Check the input's transformers ``config``; ``meta()`` builds a weightless meta-device
        model from it for shape checks (None where that is impossible: check after loading)."""

    # -- the run -----------------------------------------------------------------------------
    def simulated(self, cfg) -> bool:
        """True when the weights are stored dequantized (the checkpoint is not smaller)."""
        return False

    def run_params(self, cfg) -> dict[str, Any]:
        """The method's parameters, logged when the run starts."""
        return {}

    def tags(self, cfg) -> dict[str, str]:
        """Run tags (their names from :mod:`mlproject.tracking.names`)."""
        from mlproject.tracking import names

        tags = {names.QUANT_METHOD_TAG: cfg.method, names.QUANT_SIMULATED_TAG: str(self.simulated(cfg)).lower()}
        if self.serving:
            tags[names.QUANT_SERVING_TAG] = self.serving
        return tags

    def run_name_suffix(self, cfg) -> str:
        """Appended to the default run name ``quantize:<model>:<method>``."""
        return ""

    def quantize(self, cfg, ctx: QuantContext) -> Quantized:
        """Load the input (``ctx.load``) and quantize it; time what ``quant_seconds`` says."""
        raise NotImplementedError

    # -- a recipe instead of weights (ARCHITECTURE.md, "Storage") -----------------------------
    def recipe(self, cfg, ctx: QuantContext) -> dict[str, Any] | None:
        """JSON parameters from which :meth:`replay` re-creates the output bit for bit from the
        same input on the same kind of device; None (the default): not reproducible that way,
        the run stores weights."""
        return None

    def replay(self, params: dict[str, Any], load: Callable[..., Any]) -> Any:
        """Re-create the output of :meth:`recipe`'s ``params``: ``load(quantization_config=None)``
        gives the input as the step had it; return the LoadedModel."""
        raise NotImplementedError

    # -- its output, when loaded again ---------------------------------------------------------
    def prepare_loaded(self, model, device: str) -> None:
        """Make a just-loaded model in one of ``formats`` safe to use and save."""

    def model_size_bytes(self, model) -> int:
        """The real bytes the model holds."""
        return tensor_bytes(model)

    def load_dir(self, folder, dtype, device: str):
        """Load a checkpoint folder in one of ``formats`` that ``from_pretrained`` cannot read
        (HQQ's own files); None: ``from_pretrained`` loads it."""
        return None


@lru_cache(maxsize=None)
def _resolve(entry: str) -> QuantMethod:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def families() -> list[QuantMethod]:
    """Every registered family, resolved (their modules import nothing heavy)."""
    return [_resolve(entry) for entry in METHODS.values()]


def names() -> tuple[str, ...]:
    """Every method name, in registry order."""
    return tuple(n for fam in families() for n in fam.names)


class _Names(Sequence):
    """The method names as a live sequence: a config field's ``choices`` that sees methods
    registered after import (tests, plugins)."""

    def __getitem__(self, i):
        return names()[i]

    def __len__(self) -> int:
        return len(names())

    def __repr__(self) -> str:
        return repr(names())


CHOICES: Sequence[str] = _Names()


def help_text() -> str:
    """The ``method`` parameter's help: each family's part, in registry order."""
    return ", ".join(fam.help for fam in families())


def get(name: str) -> QuantMethod:
    """The family providing method ``name``; an unknown name lists what exists."""
    for fam in families():
        if name in fam.names:
            return fam
    raise UserError(f"unknown quantization method {name!r}; choose one of: {', '.join(names())}")


def _field_default(cfg, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cfg) if f.name == name)


def refuse_unused(cfg, method: QuantMethod) -> None:
    """Refuse a field that only other families read, set away from its default (and from the
    value ``method`` implies for it): it would be silently ignored."""
    implied = method.implied(cfg)
    for fam in families():
        if fam is method:
            continue
        for name in fam.params:
            if name in method.params:
                continue
            value = getattr(cfg, name)
            if value == _field_default(cfg, name) or (name in implied and value == implied[name]):
                continue
            owners = "/".join(n for f in families() if name in f.params for n in f.names)
            raise UserError(f"{name}={value!r} applies to method={owners} only; {method.ignores(cfg)} "
                            f"(leave {name} at its default)")


def checkpoint_format(model) -> str | None:
    """The ``quant_method`` a model's config declares (``bitsandbytes``, ``gptq`` …), or None."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        quantizer = getattr(model, "hf_quantizer", None)
        qc = getattr(quantizer, "quantization_config", None)
    if not qc:
        return None
    kind = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    kind = getattr(kind, "value", kind)  # transformers' QuantizationMethod enum
    return str(kind) if kind else None


def for_model(model) -> QuantMethod | None:
    """The family whose ``formats`` holds the model's declared format; None for a float model."""
    kind = checkpoint_format(model)
    if kind is None:
        return None
    return next((fam for fam in families() if kind in fam.formats), None)


def prepare_loaded(model, device: str) -> bool:
    """Let the family that wrote ``model`` prepare it after a load; False when none did."""
    fam = for_model(model)
    if fam is None:
        return False
    fam.prepare_loaded(model, device)
    return True


def folder_family(folder) -> QuantMethod | None:
    """The family whose format a checkpoint folder's config.json declares (``quant_method``)."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    kind = qc.get("quant_method") if isinstance(qc, dict) else None
    return next((f for f in families() if kind and kind in f.formats), None)


def load_dir(folder, dtype, device: str):
    """A checkpoint folder loaded by the family that wrote it, when ``from_pretrained`` cannot;
    None otherwise."""
    from pathlib import Path

    fam = folder_family(folder)
    return None if fam is None else fam.load_dir(Path(folder), dtype, device)


def placed_on_load(folder) -> bool:
    """True when a packed checkpoint must load straight onto its device (``device_map``): its
    kernels are picked, and its layers placed, while loading (auto-round, compressed-tensors)."""
    fam = folder_family(folder)
    return bool(fam is not None and fam.placed_on_load)


def finetune_refusal(config, finetuning: str) -> str | None:
    """Why a model whose transformers ``config`` declares a packed format cannot be fine-tuned
    ``finetuning`` (lora / qlora / full); None when it can, or when it is a float model."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    kind = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    kind = str(getattr(kind, "value", kind))
    fam = next((f for f in families() if kind in f.formats), None)
    if fam is None or kind == "bitsandbytes":
        return None  # bitsandbytes: the finetune step's own QLoRA checks decide
    if finetuning == "full":
        return f"finetuning=full cannot train a {kind} checkpoint's packed weights; use finetuning=lora"
    if finetuning == "qlora":
        return (f"finetuning=qlora quantizes a float base to NF4, and this model is already {kind}; "
                "use finetuning=lora (LoRA on the packed model)")
    return f"finetuning=lora on a {kind} checkpoint: {fam.no_lora}" if fam.no_lora else None


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_size_mb(model) -> float:
    """The real size of any loaded model in MB (2^20 bytes): its format's family counts what
    it stores (packed weights, quant state), a float model its tensors."""
    fam = for_model(model)
    return (fam.model_size_bytes(model) if fam is not None else tensor_bytes(model)) / MB
