"""bitsandbytes quantization through transformers (``BitsAndBytesConfig``) and real model sizes.

Measured here (transformers 5.23, bitsandbytes 0.50.2, torch 2.13 CPU-only):

* Loading works on CPU with no ``device_map``::

      AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config("bnb-nf4"))

  Every decoder ``nn.Linear`` becomes ``bnb.nn.Linear4bit`` (nf4/fp4) or ``bnb.nn.Linear8bitLt``
  (int8); ``lm_head`` stays a plain ``nn.Linear`` (transformers skips the output layer).
  ``dtype=torch.bfloat16`` and double quantization also load and run. Logits are finite.
  Non-quantized parts (embeddings, norms, lm_head) keep the load ``dtype`` (float32 default).
* int8 on CPU casts activations to float16 inside ``MatMul8bitLt`` (it logs "inputs will be
  cast from torch.float32 to float16" on every call); results are still finite.
* Save + reload (lineage: the next step loads ``runs:/<id>/model``): ``save_pretrained`` writes
  the packed weights, the quant state and ``quantization_config`` into config.json, and a plain
  ``AutoModelForCausalLM.from_pretrained(saved_dir)`` — no ``quantization_config`` argument —
  rebuilds the ``Linear4bit`` / ``Linear8bitLt`` layers with exactly the saved quantized
  weights; logits are bit-identical when both models take the same kernel path (int8 always).
  **Trap (4-bit, CPUs with AVX512-BF16, i.e. this machine):** the first inference forward of
  a ``Linear4bit`` repacks its weight into a CPU-only layout with its absmax cast to bf16 (a
  faster kernel whose logits differ from the generic path by ~2e-3); ``save_pretrained`` then
  undoes that "best effort" and, without double quant, writes a transposed absmax, so the
  saved model — and the in-memory one, which the save mutates — is wrong (max logit change
  0.03 on a tiny model, no error or warning). Call :func:`disable_cpu_repacking` right after
  every 4-bit load on CPU (the original *and* the reloaded model: same generic path, same
  numbers, safe to save at any time), or at least save before the first forward.
  CUDA never repacks.
"""

from __future__ import annotations

import logging

from mlproject.errors import UserError

log = logging.getLogger(__name__)

BNB_METHODS = ("bnb-nf4", "bnb-fp4", "bnb-int8")
MB = 1024**2  # 2^20 bytes, as everywhere in compression/


def bnb_config(method: str, compute_dtype=None, double_quant: bool = False):
    """The ``transformers.BitsAndBytesConfig`` for one of ``BNB_METHODS``.

    Args:
        method: ``bnb-nf4`` / ``bnb-fp4`` (4-bit, blocks of 64 with an absmax each) or
            ``bnb-int8`` (LLM.int8(), per-row scales, outlier threshold 6.0).
        compute_dtype: dtype of the 4-bit matmuls (``torch.bfloat16`` on GPUs is the usual
            choice); ``None`` keeps bitsandbytes' default (float32). A string such as
            ``"bfloat16"`` is accepted. Ignored for int8.
        double_quant: quantize the 4-bit absmax values again (QLoRA's double quantization,
            ~0.4 bit/weight saved). Ignored for int8.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if method not in BNB_METHODS:
        raise UserError(f"unknown bitsandbytes method {method!r}; choose one of {', '.join(BNB_METHODS)}")
    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if isinstance(compute_dtype, str):
        resolved = getattr(torch, compute_dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise UserError(f"unknown compute dtype {compute_dtype!r} (try bfloat16, float16, float32)")
        compute_dtype = resolved
    kwargs = {"bnb_4bit_compute_dtype": compute_dtype} if compute_dtype is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=double_quant,
        **kwargs,
    )


def disable_cpu_repacking(model) -> int:
    """Keep 4-bit weights in their serializable layout on CPU; returns the layers touched.

    Works around the save-after-forward corruption described in the module docstring.
    """
    import bitsandbytes as bnb

    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            if getattr(mod.weight.quant_state, "packing_format_for_cpu", False):
                log.warning("%s was already repacked for CPU; save_pretrained may write it wrongly", mod)
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _quant_state_bytes(qs) -> int:
    tensors = [getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)]
    state2 = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
    if state2 is not None:
        tensors += [getattr(state2, "absmax", None), getattr(state2, "code", None)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "numel"))


def model_size_bytes(model) -> int:
    """Real bytes held by the model's parameters and buffers, each tensor counted once.

    bitsandbytes layers count what they actually store: 4-bit packed ``uint8`` weights plus
    their quant state (absmax, code book, nested state for double quant), int8 weights plus
    their per-row ``SCB`` scales.
    """
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None and id(qs) not in seen:
            seen.add(id(qs))
            total += _quant_state_bytes(qs)
        scb = getattr(p, "SCB", None)
        if scb is not None and hasattr(scb, "numel"):
            add(scb)
    for b in model.buffers():
        add(b)
    return total


def model_size_mb(model) -> float:
    """:func:`model_size_bytes` in MB (2^20 bytes)."""
    return model_size_bytes(model) / MB


def quantized_layers(model) -> list:
    """The model's bitsandbytes layers (``Linear4bit`` / ``Linear8bitLt``)."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def logical_params(module) -> int:
    """Weights the module stands for, tied ones once: a 4-bit weight packs two values per
    stored byte, its logical shape is in its quant state."""
    import math

    total = 0
    for p in module.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def summary(model, float_bytes: int) -> dict:
    """Real sizes of a bitsandbytes model: quantized layers' bytes per weight, size before/after
    (``float_bytes``: bytes per weight of the float dtype it was loaded from)."""
    layers = quantized_layers(model)
    q_weights = sum(logical_params(m) - (m.bias.numel() if m.bias is not None else 0) for m in layers)
    q_bytes = sum(model_size_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                  for m in layers)
    size = model_size_bytes(model)
    first = layers[0] if layers else None
    qs = getattr(getattr(first, "weight", None), "quant_state", None)
    return {
        "layers": len(layers),
        "weights": q_weights,
        "effective_bits": 8 * q_bytes / q_weights if q_weights else float("nan"),
        "model_size_mb": size / MB,
        "model_size_mb_before": (size - q_bytes + q_weights * float_bytes) / MB,
        "params": logical_params(model),
        "blocksize": getattr(qs, "blocksize", None),
    }
