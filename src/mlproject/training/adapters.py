"""LoRA, QLoRA and full fine-tuning set-up on top of peft, and saving the result.

QLoRA needs the *base* loaded in 4-bit: the model loader (not this module) passes
``quantization_config=qlora_quantization_config()`` to ``from_pretrained``; then
:func:`prepare_model` adds ``prepare_model_for_kbit_training`` and LoRA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlproject.errors import UserError

if TYPE_CHECKING:
    import torch

    from mlproject.training.config import FinetuneConfig

log = logging.getLogger(__name__)


def default_compute_dtype() -> "torch.dtype":
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def qlora_quantization_config(compute_dtype: "torch.dtype | str | None" = None):
    """``BitsAndBytesConfig`` for a QLoRA base: 4-bit NF4 with double quantization.

    ``compute_dtype`` defaults to :func:`default_compute_dtype` (bf16 on CUDA, fp32 on CPU).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        compute_dtype = default_compute_dtype()
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_4bit(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False))


def lora_config(cfg: "FinetuneConfig", targets: list[str] | None = None):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets is not None else cfg.target_modules_value,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def prepare_model(model: Any, cfg: "FinetuneConfig") -> Any:
    """Make ``model`` trainable as ``cfg.finetuning`` says; returns the model to hand to the trainer.

    * ``lora``: ``get_peft_model`` (base frozen).
    * ``qlora``: the base must already be 4-bit (see module doc); ``prepare_model_for_kbit_training``
      (fp32 norms, input grads) then LoRA.
    * ``full``: every parameter trainable.

    A model that is already a ``PeftModel`` is returned as is (continue training its adapter).
    """
    import torch
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if isinstance(model, PeftModel):
        return model
    quantized = is_4bit(model) or bool(getattr(model, "is_loaded_in_8bit", False))
    if cfg.finetuning == "qlora":
        if not is_4bit(model):
            raise UserError("finetuning=qlora needs the base model loaded in 4-bit "
                            "(from_pretrained(..., quantization_config=qlora_quantization_config()))")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif quantized:
        raise UserError(f"finetuning={cfg.finetuning} cannot train a quantized base model; use finetuning=qlora")
    if cfg.finetuning == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if "lm_head" in cfg.target_modules_value:
        # trl computes log-probs from lm_head.weight directly, so an adapter there would never train.
        raise UserError(f"target_modules={cfg.target_modules!r}: LoRA on lm_head is not supported")
    torch.manual_seed(cfg.seed)  # LoRA A is randomly initialised
    try:
        return get_peft_model(model, lora_config(cfg, packed_targets(model, cfg)))
    except ValueError as exc:  # e.g. target_modules naming modules the model lacks
        raise UserError(f"cannot apply LoRA (target_modules={cfg.target_modules!r}): {exc}") from exc


# Packed linear layers peft puts LoRA on (its own dispatchers) but its "all-linear" does not list.
PACKED_LINEARS = ("HQQLinear",)


def packed_targets(model: Any, cfg: "FinetuneConfig") -> list[str] | None:
    """``all-linear`` spelled out as layer names when the base holds packed layers (an HQQ
    checkpoint): peft's ``all-linear`` counts only ``nn.Linear``; None otherwise."""
    import torch

    if cfg.target_modules_value != "all-linear":
        return None
    mods = dict(model.named_modules())
    if not any(type(m).__name__ in PACKED_LINEARS for m in mods.values()):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in mods.items()
                   if (isinstance(m, torch.nn.Linear) or type(m).__name__ in PACKED_LINEARS) and m is not head})


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


@dataclass
class SavedModel:
    """What :func:`save_output` wrote, and the model to keep using afterwards."""

    adapter_dir: Path | None
    """peft adapter + tokenizer (``PeftModel.from_pretrained(base, adapter_dir)``); None for full."""
    model_dir: Path | None
    """Full weights + tokenizer loadable with ``AutoModelForCausalLM`` (merged LoRA, or the
    fully fine-tuned model); None when LoRA was not merged."""
    model: Any
    """The model to evaluate next: the merged model when merged, else the trained model."""


def save_output(model: Any, tokenizer: Any, out_dir: str | Path, merge: bool = False,
                write: bool = True) -> SavedModel:
    """Write the fine-tuned result under ``out_dir``.

    ``write=False``: the same result in memory (merged when ``merge``), nothing written and no
    directories returned (the other ranks of a data-parallel launch, whose weights equal the
    main process's).

    * adapter models: ``out_dir/adapter`` (``save_pretrained`` of the adapter + tokenizer);
      with ``merge`` also ``out_dir/model`` (LoRA folded into the base, full weights).
    * ``full`` fine-tuning: ``out_dir/model``.

    Merging a LoRA model folds the adapter into the base in place (``merge_and_unload``):
    afterwards use ``SavedModel.model``. For QLoRA the 4-bit base is dequantized first and the
    adapter is merged in full precision (compute dtype), so the merged model computes what the
    trained QLoRA model computed; merging into the 4-bit weights directly would re-quantize and
    lose most of the LoRA update. The trained 4-bit model is left untouched in that case.
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, PeftModel):
        model_dir = out / "model"
        if is_4bit(model):
            raise UserError("refusing to save a 4-bit model without an adapter as the fine-tuned model")
        if not write:
            return SavedModel(adapter_dir=None, model_dir=None, model=model)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return SavedModel(adapter_dir=None, model_dir=model_dir, model=model)

    adapter_dir = out / "adapter"
    if write or (merge and is_4bit(model)):  # the 4-bit merge reloads the adapter from disk
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    if not merge:
        return SavedModel(adapter_dir=adapter_dir if write else None, model_dir=None, model=model)

    model_dir = out / "model"
    if is_4bit(model):
        merged = _merge_into_dequantized(model, adapter_dir)
    else:
        merged = model.merge_and_unload()
    if not write:
        return SavedModel(adapter_dir=None, model_dir=None, model=merged)
    merged.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return SavedModel(adapter_dir=adapter_dir, model_dir=model_dir, model=merged)


def dequantized_copy(model_4bit: Any, dtype: "torch.dtype | None" = None) -> Any:
    """A full-precision copy of a bitsandbytes 4-bit causal LM (weights = dequantized 4-bit values).

    Accepts the plain model or a PeftModel over it (LoRA layers are skipped; ``base_layer`` names
    are mapped back to the original module names).
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    base = model_4bit.get_base_model() if hasattr(model_4bit, "get_base_model") else model_4bit
    qcfg = getattr(base.config, "quantization_config", None)
    if dtype is None:
        dtype = getattr(qcfg, "bnb_4bit_compute_dtype", None) if qcfg is not None else None
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or torch.float32
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype

    state: dict[str, torch.Tensor] = {}
    for mod_name, module in base.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if "lora_" in full:
                continue
            if param.__class__.__name__ == "Params4bit":
                value = _dequantize_4bit(param)
            else:
                value = param.data
            state[full.replace(".base_layer.", ".")] = value.detach().to("cpu", dtype)
    # Buffers other than rotary caches (recomputed) are not expected in decoder LMs.
    with torch.device("cpu"):
        fp = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fp.load_state_dict(state, strict=False)
    tied = set(getattr(fp, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"dequantizing failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        fp.tie_weights()
    fp.eval()
    return fp


def _dequantize_4bit(param: Any) -> "torch.Tensor":
    import bitsandbytes as bnb

    data, state = param.data, param.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight (and its quant state, in
        # place) for its bf16 inference kernel at the first eval-mode forward. Undo that on copies
        # so the live model keeps working.
        import copy

        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnb.functional.dequantize_4bit(data, state)


def _merge_into_dequantized(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    fp = dequantized_copy(model)
    device = next(p for p in model.parameters()).device
    fp.to(device)
    merged = PeftModel.from_pretrained(fp, adapter_dir).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged
