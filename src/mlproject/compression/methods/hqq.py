"""HQQ as a quantization method: ``hqq``, calibration-free, through the hqq library (Mobius Labs).

Half-Quadratic Quantization fits each group's scale and zero point by optimizing the weight
error under a sparsity-promoting loss (no calibration data), then packs the codes
(``HQQLinear``). The step saves hqq's own format (``config.json`` + ``qmodel.pt``, through
``AutoHQQHFModel.save_quantized``); its config.json also declares
``quantization_config.quant_method: hqq`` so mlproject (and ``peek_config``) know what it is, and
:meth:`load_dir` reloads it with ``AutoHQQHFModel.from_quantized`` (``from_pretrained`` cannot:
transformers 5 has no HQQ weight loader). Grid: asymmetric, ``w_bits`` ∈ {1, 2, 3, 4, 8},
``group_size`` columns per scale/zero pair (kept in the compute dtype, as hqq stores them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlproject.compression.methods import QuantContext, QuantMethod, Quantized, common, tensor_bytes
from mlproject.errors import UserError

BITS = (1, 2, 3, 4, 8)
SERVING = "the hqq library (AutoHQQHFModel.from_quantized; its torch, torchao and Marlin backends)"


class HQQMethod(QuantMethod):
    names = ("hqq",)
    help = "hqq (Half-Quadratic Quantization, calibration-free, packed; the hqq library)"
    params = ("w_bits", "group_size", "modules")
    formats = ("hqq",)
    serving = SERVING

    def validate(self, cfg) -> None:
        super().validate(cfg)
        common.check_grid(cfg, BITS, schemes=("symmetric", "asymmetric"))
        if cfg.group_size == -1:
            raise UserError("group_size=-1: hqq needs a group size (a positive divisor of every layer's in_features)")
        if "lm_head" in common.patterns(cfg.modules):
            raise UserError("modules=lm_head: hqq quantizes the decoder's linear layers only")

    def ignores(self, cfg) -> str:
        return "hqq fits its own asymmetric grid without calibration"

    def implied(self, cfg) -> dict:
        return {"scheme": "asymmetric"}

    def check_available(self, cfg) -> None:
        common.require("hqq", "pip install 'mlproject[quant]' (or pip install hqq)", cfg.method)

    def check_model(self, cfg, config, meta) -> None:
        model = meta()
        if getattr(config, "pruned_layer_sizes", None) or model is None:
            common.check_input(cfg, config, lambda: None)
            return
        self.quant_config(cfg, model, common.check_layers(cfg, model), object())

    @staticmethod
    def quant_config(cfg, model, layers: list[str], qc):
        """hqq's ``quant_config``: ``qc`` for every layer, or, for a ``modules`` subset, a dict of
        hqq's linear tags (a layer's type, e.g. ``self_attn.q_proj``: hqq selects by type, not by
        index) to ``qc`` or None; refused when the tags cannot express exactly ``layers``."""
        from hqq.models.base import name_to_linear_tag

        if not common.patterns(cfg.modules):
            return qc
        every = common.selected(model, "all-linear")
        tags = {name_to_linear_tag(n) for n in layers}
        covered = [n for n in every if name_to_linear_tag(n) in tags]
        if covered != layers:
            raise UserError(f"modules={cfg.modules!r}: hqq quantizes layers by type (e.g. self_attn.q_proj, "
                            "mlp.down_proj), not a subset of one type's layers; name layer types")
        return {t: (qc if t in tags else None) for t in {name_to_linear_tag(n) for n in every}}

    def run_params(self, cfg) -> dict:
        return {"w_bits": cfg.w_bits, "group_size": cfg.group_size, "scheme": "asymmetric (hqq)"}

    def run_name_suffix(self, cfg) -> str:
        return f"-w{cfg.w_bits}g{cfg.group_size}"

    def quantize(self, cfg, ctx: QuantContext) -> Quantized:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        start = time.perf_counter()
        loaded = ctx.load()
        load_seconds = time.perf_counter() - start
        model = loaded.model
        layers = common.check_layers(cfg, model)
        weights = common.layer_weights(model, layers)
        before = tensor_bytes(model)
        params = sum(p.numel() for p in model.parameters())
        qc = BaseQuantizeConfig(nbits=cfg.w_bits, group_size=cfg.group_size)
        quant_config = self.quant_config(cfg, model, layers, qc)
        start = time.perf_counter()
        AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=model.dtype,
                                      device=ctx.device)
        quant_seconds = time.perf_counter() - start
        packed = sum(type(m).__name__ == "HQQLinear" for m in model.modules())
        if packed != len(layers):
            raise RuntimeError(f"hqq packed {packed} layers, {len(layers)} were selected (modules={cfg.modules!r})")
        model.config.quantization_config = self.declared(cfg)
        out = Path(ctx.workdir) / "model"
        AutoHQQHFModel.save_quantized(model, str(out))
        self._declare(out, cfg)
        metrics = {"quant_seconds": quant_seconds, "load_seconds": load_seconds,
                   **common.size_metrics(out, before, params, layers, weights,
                                         bits=self.bits_per_weight(model) or None)}
        dtype = str(model.dtype).removeprefix("torch.")
        body = (
            f"**HQQ quantization (w{cfg.w_bits}, group_size {cfg.group_size}).** {len(layers)} linear layers "
            f"({weights:,} weights) hold packed {cfg.w_bits}-bit codes with one {dtype} scale and zero point per "
            f"{cfg.group_size} weights, fitted by half-quadratic optimization without calibration data "
            f"({metrics['effective_bits']:.3f} stored bits per weight). The checkpoint is hqq's own format "
            f"(qmodel.pt); model_size_mb is its bytes on disk. Served by {SERVING}."
        )
        return Quantized(
            loaded=loaded, metrics=metrics, params={"quant.layers": len(layers)},
            weight={"w_bits": cfg.w_bits, "group_size": cfg.group_size, "scheme": "asymmetric (hqq)"},
            report=[body], saved=out,
            note=f"HQQ w{cfg.w_bits} g{cfg.group_size}: packed, {metrics['effective_bits']:.3f} bits per weight.",
            headline=f" w{cfg.w_bits} g{cfg.group_size}",
        )

    @staticmethod
    def declared(cfg) -> dict:
        """config.json's quantization_config: transformers' HqqConfig layout (lm-eval rebuilds the
        config object from it), quant_method ``hqq``."""
        from transformers import HqqConfig

        config = HqqConfig(nbits=cfg.w_bits, group_size=cfg.group_size).to_dict()
        return {**config, "quant_method": "hqq"}

    def _declare(self, folder: Path, cfg) -> None:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["quantization_config"] = self.declared(cfg)
        path.write_text(json.dumps(config, indent=2))

    @staticmethod
    def bits_per_weight(model) -> float:
        """Stored bits per weight of the HQQLinear layers: packed codes + scales + zero points."""
        bits = n = 0
        for mod in model.modules():
            if type(mod).__name__ == "HQQLinear" and getattr(mod, "W_q", None) is not None:
                shape = mod.meta["shape"]
                n += shape[0] * shape[1]
                bits += 8 * _meta_bytes(mod)
        return bits / n if n else 0.0

    def model_size_bytes(self, model) -> int:
        # HQQLinear keeps its scales and zero points in a plain dict (`meta`), not as buffers.
        return tensor_bytes(model) + sum(_meta_bytes(m, codes=False) for m in model.modules()
                                         if type(m).__name__ == "HQQLinear")

    def load_dir(self, folder: Path, dtype, device: str):
        from hqq.models.hf.base import AutoHQQHFModel

        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
        model = AutoHQQHFModel.from_quantized(str(folder), compute_dtype=dtype, device=device)
        model.config.quantization_config = qc
        return model


def _meta_bytes(mod, codes: bool = True) -> int:
    import torch

    total = mod.W_q.numel() * mod.W_q.element_size() if codes else 0
    for key in ("scale", "zero"):
        t = mod.meta.get(key)
        if torch.is_tensor(t):
            total += t.numel() * t.element_size()
    return total


HQQ = HQQMethod()
