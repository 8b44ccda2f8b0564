"""AutoRound as a quantization method: ``autoround``, calibrated, packed, through Intel's auto-round.

AutoRound tunes each weight's rounding (and the groups' clipping ranges) by signed gradient
descent on the block output error over the calibration windows the step draws (``calibration``
× ``calibration_samples`` × ``calibration_seqlen`` at ``seed``): ``iters`` steps per decoder
block (0: plain RTN on AutoRound's grid). Grid: ``w_bits`` ∈ {2, 3, 4, 8} integers,
``group_size`` columns per scale (-1: one per row), ``scheme`` symmetric or asymmetric, on the
layers ``modules`` selects (the LM head stays float, as AutoRound leaves it).

The checkpoint is AutoRound's own format (``auto_round``, GPTQ-style packing: int32 codes,
fp16 scales, packed zero points) that transformers reloads with auto-round installed and vLLM
serves. ``model_size_mb`` is its bytes on disk. The step evaluates the model as reloaded from
that checkpoint (one load of the packed, small model), so what it scores is exactly what the
artifact holds. On CPU a reload is unpacked to float32 layers holding the same dequantized
weights (:func:`unpack_on_cpu`: auto-round's CPU kernel computes in float16, ~20× slower).
"""

from __future__ import annotations

import time
from pathlib import Path

from mlproject.compression.methods import QuantContext, QuantMethod, Quantized, common, tensor_bytes

BITS = (2, 3, 4, 8)
SERVING = "transformers with auto-round (CPU, CUDA, XPU kernels), vLLM and SGLang (auto-round)"


class AutoRoundMethod(QuantMethod):
    names = ("autoround",)
    help = "autoround (calibrated sign-gradient rounding, packed; Intel auto-round)"
    params = ("w_bits", "group_size", "scheme", "modules", "calibration", "calibration_samples",
              "calibration_seqlen", "iters")
    formats = ("auto-round",)
    serving = SERVING
    placed_on_load = True
    no_lora = ("peft has no LoRA layer for auto-round's packed QuantLinear; fine-tune the float model first, "
               "or quantize with method=gptq or hqq, whose checkpoints take LoRA")

    def validate(self, cfg) -> None:
        super().validate(cfg)
        common.check_grid(cfg, BITS)
        common.check_calibration(cfg)
        if cfg.w_bits == 8 and cfg.scheme == "asymmetric":
            from mlproject.errors import UserError

            raise UserError("w_bits=8 with scheme=asymmetric: auto-round's format does not serve 8-bit asymmetric "
                            "weights; use scheme=symmetric (or 7 bits or fewer)")
        if isinstance(cfg.iters, bool) or not isinstance(cfg.iters, int) or cfg.iters < 0:
            from mlproject.errors import UserError

            raise UserError(f"iters={cfg.iters!r} must be a non-negative integer")

    def check_available(self, cfg) -> None:
        common.require("auto_round", "pip install 'mlproject[quant]' (or pip install auto-round)", cfg.method)

    def check_model(self, cfg, config, meta) -> None:
        common.check_input(cfg, config, meta)

    def run_params(self, cfg) -> dict:
        return {"w_bits": cfg.w_bits, "group_size": cfg.group_size, "scheme": cfg.scheme, "iters": cfg.iters}

    def run_name_suffix(self, cfg) -> str:
        return f"-w{cfg.w_bits}g{cfg.group_size}"

    def quantize(self, cfg, ctx: QuantContext) -> Quantized:
        from auto_round import AutoRound

        start = time.perf_counter()
        loaded = ctx.load()
        load_seconds = time.perf_counter() - start
        model = loaded.model
        layers = common.check_layers(cfg, model)
        weights = common.layer_weights(model, layers)
        before = tensor_bytes(model)
        params = sum(p.numel() for p in model.parameters())
        chosen = set(layers)
        # AutoRound quantizes every linear layer of the decoder blocks: the others stay float
        keep = {n: {"bits": 16, "data_type": "float"} for n in common.selected(model, "all-linear")
                if n not in chosen}
        ids = ctx.calibration(loaded.tokenizer)
        data = [{"input_ids": row[None, :]} for row in ids]
        cpu = ctx.device == "cpu"
        ar = AutoRound(model, loaded.tokenizer, bits=cfg.w_bits, group_size=cfg.group_size,
                       sym=cfg.scheme == "symmetric", iters=cfg.iters, nsamples=ids.shape[0],
                       seqlen=ids.shape[1], batch_size=min(8, ids.shape[0]), dataset=data, seed=cfg.seed,
                       layer_config=keep or None, device_map="cpu" if cpu else ctx.device,
                       enable_torch_compile=False if cpu else None)
        start = time.perf_counter()
        _, folder = ar.quantize_and_save(str(Path(ctx.workdir) / "model"), format="auto_round")
        quant_seconds = time.perf_counter() - start
        out = Path(folder)
        del ar
        # Score what the artifact holds: the packed checkpoint as transformers reloads it.
        reloaded = ctx.reload(out)
        reloaded.model.eval()
        loaded.model = reloaded.model
        metrics = {"quant_seconds": quant_seconds, "load_seconds": load_seconds,
                   **common.size_metrics(out, before, params, layers, weights)}
        grid = f"w{cfg.w_bits} {cfg.scheme}, " + (f"group_size {cfg.group_size}" if cfg.group_size != -1
                                                   else "one scale per row")
        body = (
            f"**AutoRound (auto-round).** {cfg.iters} signed-gradient steps per decoder block tuned the rounding and "
            f"clipping of {len(layers)} linear layers ({weights:,} weights) on {ids.shape[0]} × {ids.shape[1]} tokens "
            f"of `{cfg.calibration}`; grid {grid}. The checkpoint is AutoRound's packed format "
            f"({metrics['effective_bits']:.3f} stored bits per weight); model_size_mb is its bytes on disk, and the "
            f"model evaluated is that checkpoint reloaded"
            + (" and unpacked to float32 layers holding its dequantized weights (CPU). " if cpu else ". ") +
            f"Served by {SERVING}."
        )
        return Quantized(
            loaded=loaded, metrics=metrics, params={"quant.layers": len(layers)},
            weight=self.run_params(cfg), report=[body], saved=out,
            calibration={"dataset": cfg.calibration, "samples": ids.shape[0], "seqlen": ids.shape[1]},
            note=(f"AutoRound w{cfg.w_bits} g{cfg.group_size}, {cfg.iters} iters: packed, "
                  f"{metrics['effective_bits']:.3f} bits per weight."),
            headline=f" w{cfg.w_bits} g{cfg.group_size} {cfg.scheme}",
        )


    def prepare_loaded(self, model, device: str) -> None:
        if device == "cpu":
            unpack_on_cpu(model)

    def model_size_bytes(self, model) -> int:
        # On CPU the layers are unpacked to floats (prepare_loaded): the format's size is its files.
        return common.folder_size(model) or tensor_bytes(model)


def unpack_on_cpu(model) -> int:
    """Replace every packed auto-round layer by a float32 ``nn.Linear`` holding its dequantized
    weights, and run the rest of the model in float32 too. auto-round's CPU kernel (torch_zp)
    dequantizes the whole weight in float16 on every call and multiplies in float16, ~20× slower
    than a float32 model on CPU (SmolLM2's PPL: 11 minutes for 2 of 11 windows); the weights are
    the same numbers (``layer(I) = Wᵀ``: exact), only the arithmetic is float32. Returns the
    number of layers unpacked. CUDA keeps auto-round's kernels."""
    import torch

    packed = [(name, mod) for name, mod in model.named_modules()
              if hasattr(mod, "qweight") and hasattr(mod, "scales") and not isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for name, mod in packed:
            n_in, n_out = mod.infeatures, mod.outfeatures
            bias = getattr(mod, "bias", None)
            eye = torch.eye(n_in, dtype=torch.float32)
            weight = mod(eye).float() - (bias.float() if bias is not None else 0)  # [in, out] = Wᵀ
            lin = torch.nn.Linear(n_in, n_out, bias=bias is not None, dtype=torch.float32)
            lin.weight.copy_(weight.T)
            if bias is not None:
                lin.bias.copy_(bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    torch.nn.Module.float(model)  # transformers refuses .float() on a quantized model; its layers are float now
    return len(packed)


AUTOROUND = AutoRoundMethod()
