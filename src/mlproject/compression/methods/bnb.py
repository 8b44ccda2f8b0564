"""bitsandbytes as a quantization method: ``bnb-nf4`` / ``bnb-fp4`` / ``bnb-int8``, one family.

Real bitsandbytes layers through transformers' ``BitsAndBytesConfig`` (``compression.bnb``):
the model is quantized while loading (on CPU too). ``model_size_mb`` is the real bytes held,
quant state included; the artifact reloads with ``from_pretrained`` (its config.json declares
``quant_method: bitsandbytes``, and :meth:`prepare_loaded` keeps a reloaded 4-bit model safe to
save on CPU). ``quant_seconds`` is the quantizing load.
"""

from __future__ import annotations

import time

from mlproject.compression import bnb
from mlproject.compression.methods import QuantContext, QuantMethod, Quantized
from mlproject.errors import UserError


class BitsAndBytesMethod(QuantMethod):
    names = bnb.BNB_METHODS
    help = "bnb-nf4, bnb-fp4 or bnb-int8 (real bitsandbytes layers via BitsAndBytesConfig)"
    formats = ("bitsandbytes",)
    serving = "transformers with bitsandbytes; vLLM (quantization=bitsandbytes, 4-bit)"

    @staticmethod
    def bits(cfg) -> int:
        return 8 if cfg.method == "bnb-int8" else 4

    def ignores(self, cfg) -> str:
        return f"{cfg.method} stores {self.bits(cfg)}-bit weights in bitsandbytes' own layout"

    def implied(self, cfg) -> dict:
        return {"w_bits": self.bits(cfg)}

    def check_available(self, cfg) -> None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("bitsandbytes is not installed; pip install bitsandbytes (or use method=rtn)")

    def load_bits(self, cfg) -> int:
        return self.bits(cfg)  # quantized while loading: 4 or 8 bits per weight, not the float dtype's size

    @staticmethod
    def stored_params(method: str, blocksize: int | None) -> dict:
        """The parameter block for a bitsandbytes method, as bitsandbytes actually stores it."""
        if method == "bnb-int8":
            return {"w_bits": 8, "group_size": -1, "granularity": "per_channel",
                    "scheme": "llm.int8 (absmax per row, fp16 outliers above 6.0)"}
        return {"w_bits": 4, "group_size": blocksize or 64, "granularity": "per_block",
                "scheme": method.removeprefix("bnb-") + " (absmax per block)"}

    def recipe(self, cfg, ctx: QuantContext) -> dict:
        # bitsandbytes quantizes while loading, deterministically: its config is the recipe
        return {"method": cfg.method, "compute_dtype": str(ctx.dtype).removeprefix("torch.")}

    def replay(self, params: dict, load):
        import torch

        int8 = params["method"] == "bnb-int8"
        return load(quantization_config=bnb.bnb_config(
            params["method"], compute_dtype=None if int8 else getattr(torch, params["compute_dtype"])))

    def quantize(self, cfg, ctx: QuantContext) -> Quantized:
        int8 = cfg.method == "bnb-int8"
        qc = bnb.bnb_config(cfg.method, compute_dtype=None if int8 else ctx.dtype)
        start = time.perf_counter()
        loaded = ctx.load(quantization_config=qc)
        quant_seconds = time.perf_counter() - start
        if not bnb.quantized_layers(loaded.model):
            raise UserError(f"{cfg.method}: no layer of {ctx.ref.raw!r} was quantized by bitsandbytes "
                            "(a non-uniformly pruned checkpoint? those load without quantization)")
        s = bnb.summary(loaded.model, ctx.dtype.itemsize)
        stored = self.stored_params(cfg.method, s["blocksize"])
        metrics = {"quant_seconds": quant_seconds, "params_b": s["params"] / 1e9,
                   "model_size_mb": s["model_size_mb"], "model_size_mb_before": s["model_size_mb_before"],
                   "effective_bits": s["effective_bits"]}
        body = (
            f"**Real bitsandbytes quantization ({cfg.method}).** {s['layers']} linear layers "
            f"({s['weights']:,} weights) hold packed {stored['w_bits']}-bit weights "
            f"({s['effective_bits']:.3f} bits per weight with their scales); the LM head and embeddings stay "
            f"{str(ctx.dtype).removeprefix('torch.')}. model_size_mb counts the real bytes held. "
            "quant_seconds is the quantizing load."
        )
        return Quantized(
            loaded=loaded, metrics=metrics, params={**stored, "quant.layers": s["layers"]}, weight=stored,
            report=[body],
            note=f"Real bitsandbytes layers: {s['effective_bits']:.3f} bits per quantized weight with scales.",
        )

    def prepare_loaded(self, model, device: str) -> None:
        if device == "cpu":
            # bitsandbytes' CPU repacking corrupts a later save_pretrained (see compression/bnb.py).
            bnb.disable_cpu_repacking(model)

    def model_size_bytes(self, model) -> int:
        return bnb.model_size_bytes(model)


BNB = BitsAndBytesMethod()
