"""RTN as a quantization method: simulated round-to-nearest on the tensor code of ``compression.rtn``.

Every selected weight is rounded to its ``w_bits`` grid and stored dequantized in the model's
dtype, so the artifact is an ordinary checkpoint (same bytes on disk as the input) whose
numbers are exactly those of the quantized model. ``model_size_mb`` is the *effective* size a
packed checkpoint would have (``effective_bits`` per quantized weight, fp16 scales included).
The run says so: param ``simulated=true``, tag ``mlproject.quant.simulated``, a line in report.md.
"""

from __future__ import annotations

import time

from mlproject.compression import rtn  # called as rtn.quantize_model: tests patch the module attribute
from mlproject.compression.methods import QuantContext, QuantMethod, Quantized


class RTNMethod(QuantMethod):
    names = ("rtn",)
    help = "rtn (simulated: weights rounded to the grid, stored dequantized)"
    params = ("w_bits", "group_size", "scheme", "granularity", "modules")
    serving = "any transformers runtime, as a float checkpoint (stored dequantized: not smaller)"

    def settings(self, cfg) -> rtn.RTNConfig:
        """The library's settings; building them is its validation (bits, scheme, granularity, group size)."""
        return rtn.RTNConfig(w_bits=cfg.w_bits, group_size=cfg.group_size, scheme=cfg.scheme,
                             granularity=cfg.granularity, modules=cfg.modules)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        self.settings(cfg)

    def check_model(self, cfg, config, meta) -> None:
        model = meta()
        if model is not None:
            rtn.check_layers(model, self.settings(cfg))  # e.g. group_size 128 on SmolLM2's 576-wide layers

    def simulated(self, cfg) -> bool:
        return True

    def run_params(self, cfg) -> dict:
        return {"w_bits": cfg.w_bits, "group_size": cfg.group_size, "granularity": cfg.granularity,
                "scheme": cfg.scheme}

    def run_name_suffix(self, cfg) -> str:
        return f"-w{cfg.w_bits}"

    def recipe(self, cfg, ctx: QuantContext) -> dict:
        return {f: getattr(cfg, f) for f in ("w_bits", "group_size", "scheme", "granularity", "modules")}

    def replay(self, params: dict, load):
        loaded = load()
        rtn.quantize_model(loaded.model, rtn.RTNConfig(**params))
        return loaded

    def quantize(self, cfg, ctx: QuantContext) -> Quantized:
        settings = self.settings(cfg)
        start = time.perf_counter()
        loaded = ctx.load()
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        rep = rtn.quantize_model(loaded.model, settings)
        quant_seconds = time.perf_counter() - start
        metrics = {"quant_seconds": quant_seconds, "load_seconds": load_seconds,
                   "params_b": rep.total_params / 1e9,
                   "model_size_mb": rep.model_size_mb, "model_size_mb_before": rep.original_size_mb,
                   "effective_bits": rep.effective_bits, "quant/mean_rel_error": rep.mean_rel_error}
        grid = (f"w{cfg.w_bits} {cfg.scheme} {cfg.granularity}"
                + (f", group_size {cfg.group_size}" if cfg.granularity == "per_group" else ""))
        stored = str(loaded.model.dtype).removeprefix("torch.")
        body = (
            f"**Simulated quantization (RTN).** {rep.layers} linear layers ({rep.params:,} weights) were "
            f"rounded to the {grid} grid and stored dequantized as {stored}: the model computes "
            "exactly what the quantized model would, but its checkpoint is not smaller. model_size_mb is the "
            f"effective size of a packed checkpoint at {rep.effective_bits:.3f} bits per quantized weight "
            "(fp16 scales" + (" and packed zero points" if cfg.scheme == "asymmetric" else "")
            + " included; other parameters at their real dtype)."
        )
        return Quantized(
            loaded=loaded, metrics=metrics,
            params={"quant.layers": rep.layers},  # a count, not a score: a param
            weight=self.run_params(cfg), report=[body],
            note=("Simulated RTN: weights rounded to the grid and stored dequantized; model_size_mb is the packed "
                  f"size at {rep.effective_bits:.3f} bits per quantized weight."),
            headline=f" w{cfg.w_bits} g{cfg.group_size} {cfg.scheme}",
        )


RTN = RTNMethod()
