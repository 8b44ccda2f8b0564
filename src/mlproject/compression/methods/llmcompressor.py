"""llm-compressor as a quantization method family: ``gptq`` and ``awq``, calibrated, packed.

Both run through llm-compressor's ``oneshot`` (the vLLM project's compressor) on the
calibration windows the step draws (``calibration`` × ``calibration_samples`` ×
``calibration_seqlen`` at ``seed``), with one weight-only scheme built from the shared
parameters: ``w_bits``-bit integers, ``group_size`` columns per scale (-1: one per row),
``scheme`` symmetric or asymmetric (integer zero points), on the layers ``modules`` selects
(the LM head never, unless named). ``gptq`` is ``GPTQModifier`` (Hessian-based error feedback,
llm-compressor's defaults: dampening 0.01, static activation ordering, blocks of 128 columns);
``awq`` is ``AWQModifier`` (activation-aware scales searched per layer group, then the same
grid; it needs an architecture llm-compressor maps, and a CUDA device: 0.14 pins calibration
activations in accelerator memory and raises on a CPU-only torch).

The checkpoint is compressed-tensors (``save_pretrained(save_compressed=True)``: packed int32
codes, scales, zero points), what vLLM and SGLang serve; transformers reloads it
(decompressed on CPU). ``model_size_mb`` is its bytes on disk, ``effective_bits`` the stored
bits per quantized weight. llm-compressor 0.14 pins transformers <= 5.17: it is the extra
``mlproject[llmcompressor]`` (README, "Calibrated quantization").
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from mlproject.compression.methods import QuantContext, QuantMethod, Quantized, common, tensor_bytes
from mlproject.errors import UserError

BITS = (2, 3, 4, 5, 6, 7, 8)
SERVING = "vLLM and SGLang (compressed-tensors), transformers (compressed-tensors, decompressed on CPU)"
HINT = ("pip install 'mlproject[llmcompressor]' (llm-compressor 0.14 pins transformers<=5.17: install it in its "
        "own environment, see the README)")


class LLMCompressorMethod(QuantMethod):
    names = ("gptq", "awq")
    help = "gptq or awq (calibrated, packed compressed-tensors via llm-compressor)"
    params = ("w_bits", "group_size", "scheme", "modules", "calibration", "calibration_samples",
              "calibration_seqlen")
    formats = ("compressed-tensors",)
    serving = SERVING
    placed_on_load = True

    def validate(self, cfg) -> None:
        super().validate(cfg)
        common.check_grid(cfg, BITS)
        common.check_calibration(cfg)

    def check_available(self, cfg) -> None:
        common.require("llmcompressor", HINT, cfg.method)
        if cfg.method == "awq":
            import torch

            if not torch.cuda.is_available():
                raise UserError("method=awq needs a CUDA device: llm-compressor's AWQ pins calibration activations "
                                "in accelerator memory (it raises on a CPU-only torch); use method=gptq or autoround "
                                "here")

    def check_model(self, cfg, config, meta) -> None:
        if cfg.method == "awq":
            from llmcompressor.modifiers.transform.awq import mappings

            try:  # architectures whose mappings llm-compressor builds at run time (Qwen3-Next, Qwen3.5 …)
                from llmcompressor.modifiers.transform.awq import dynamic_mappings
            except ImportError:
                dynamic_mappings = None
            arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
            known = set(mappings.AWQ_MAPPING_REGISTRY)
            dynamic = getattr(dynamic_mappings, "AWQ_DYNAMIC_MAPPING_REGISTRY", None) or {}
            if arch not in known and arch not in dynamic:
                raise UserError(f"method=awq: llm-compressor has no AWQ layer mapping for {arch}; it maps "
                                f"{', '.join(sorted(known)[:12])} …; use method=gptq")
        common.check_input(cfg, config, meta)

    def run_params(self, cfg) -> dict:
        return {"w_bits": cfg.w_bits, "group_size": cfg.group_size, "scheme": cfg.scheme}

    def run_name_suffix(self, cfg) -> str:
        return f"-w{cfg.w_bits}g{cfg.group_size}"

    def recipe(self, cfg, names: list[str]):
        """The llm-compressor modifier: one weight-only scheme on the selected layers."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        group = cfg.group_size != -1
        args = QuantizationArgs(num_bits=cfg.w_bits, type="int", symmetric=cfg.scheme == "symmetric",
                                strategy="group" if group else "channel",
                                group_size=cfg.group_size if group else None)
        pats = common.patterns(cfg.modules)
        # every selected layer by its full name: exactly the layers `modules` means, LM head excluded
        targets = ["Linear"] if not pats else [f"re:^{re.escape(n)}$" for n in names]
        scheme = QuantizationScheme(targets=targets, weights=args)
        ignore = [] if pats else ["lm_head"]
        if cfg.method == "gptq":
            from llmcompressor.modifiers.gptq import GPTQModifier

            return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(config_groups={"group_0": scheme}, ignore=ignore)

    def quantize(self, cfg, ctx: QuantContext) -> Quantized:
        from datasets import Dataset
        from llmcompressor import oneshot

        start = time.perf_counter()
        loaded = ctx.load()
        load_seconds = time.perf_counter() - start
        model = loaded.model
        layers = common.check_layers(cfg, model)
        weights = common.layer_weights(model, layers)
        before = tensor_bytes(model)
        params = sum(p.numel() for p in model.parameters())
        ids = ctx.calibration(loaded.tokenizer)
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
        recipe = self.recipe(cfg, layers)
        start = time.perf_counter()
        oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
        quant_seconds = time.perf_counter() - start
        out = Path(ctx.workdir) / "model"
        model.save_pretrained(out, save_compressed=True)
        metrics = {"quant_seconds": quant_seconds, "load_seconds": load_seconds,
                   **common.size_metrics(out, before, params, layers, weights)}
        algo = ("GPTQ (Hessian error feedback, dampening_frac "
                f"{getattr(recipe, 'dampening_frac', '?')}, block_size {getattr(recipe, 'block_size', '?')})"
                if cfg.method == "gptq" else "AWQ (activation-aware per-channel scales, then the grid)")
        grid = f"w{cfg.w_bits} {cfg.scheme}, " + (f"group_size {cfg.group_size}" if cfg.group_size != -1
                                                   else "one scale per row")
        body = (
            f"**{cfg.method.upper()} via llm-compressor.** {algo} on {len(layers)} linear layers ({weights:,} weights), "
            f"grid {grid}, calibrated on {ids.shape[0]} × {ids.shape[1]} tokens of `{cfg.calibration}`. The checkpoint "
            f"is compressed-tensors: packed integer codes with their scales "
            f"({metrics['effective_bits']:.3f} stored bits per weight); model_size_mb is its bytes on disk. "
            f"Served by {SERVING}."
        )
        return Quantized(
            loaded=loaded, metrics=metrics, params={"quant.layers": len(layers)},
            weight=self.run_params(cfg), report=[body], saved=out,
            calibration={"dataset": cfg.calibration, "samples": ids.shape[0], "seqlen": ids.shape[1]},
            note=(f"{cfg.method.upper()} (llm-compressor) w{cfg.w_bits} g{cfg.group_size}: compressed-tensors, "
                  f"{metrics['effective_bits']:.3f} bits per weight."),
            headline=f" w{cfg.w_bits} g{cfg.group_size} {cfg.scheme}",
        )

    def prepare_loaded(self, model, device: str) -> None:
        # transformers leaves packed layers compressed until the first forward pass decompresses
        # the whole model (a hook): do it now, so that peft (LoRA) and layer-wise code see weights.
        quantizer = getattr(model, "hf_quantizer", None)
        compressor = getattr(quantizer, "compressor", None)
        if compressor is not None and any(n.endswith("weight_packed") for n, _ in model.named_parameters()):
            compressor.decompress_model(model=model)

    def model_size_bytes(self, model) -> int:
        # Reloaded on CPU, the layers are decompressed to floats: the format's size is its files.
        return common.folder_size(model) or tensor_bytes(model)


LLMCOMPRESSOR = LLMCompressorMethod()
