"""`quantize`: weight-only quantization of one model, logged as the run's `model`, then evaluated.

``method`` names one of the families registered in ``compression.methods`` (``rtn``: simulated
round-to-nearest, stored dequantized; ``bnb-nf4`` / ``bnb-fp4`` / ``bnb-int8``: real
bitsandbytes layers, quantized while loading; ``gptq`` / ``awq``: llm-compressor, calibrated,
compressed-tensors; ``autoround``: auto-round, calibrated; ``hqq``: hqq, calibration-free); each
family's module says what its run records. This step is the same for every method: cheap checks
first (values, the method's library, server, the calibration text, the input's config on a
weightless meta-device model — e.g. the group size vs. every layer's width —, already-quantized
input), then one run: the method loads and quantizes the input (drawing its calibration windows
through the step, which logs them), the step logs the model — the method's own packed checkpoint
where it writes one — with its lineage, evaluates it and writes report.md.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mlproject import tracking
from mlproject.compression import methods as quant_methods
from mlproject.compression.methods import QuantContext
from mlproject.config import QuantizeConfig
from mlproject.evaluation.engine import plan_eval
from mlproject.models.reference import resolve
from mlproject.report import md_table
from mlproject.steps import StepResult
from mlproject.steps.shared import checks, compress, model_output, runs
from mlproject.tracking import names

log = logging.getLogger(__name__)



def check(cfg: QuantizeConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()):
    """Every cheap check, before a run or weights exist: values, the method's library, server, the
    input's config on a weightless meta model. Returns (ref, device, torch dtype, plan)."""
    ref, device, torch_dtype = checks.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    plan = plan_eval(cfg)
    method = quant_methods.get(cfg.method)
    method.check_available(cfg)
    checks.check_tracking(cfg.tracking_uri, ref, cfg.adapter, parent=parent, pending=pending)
    # A method that quantizes while loading (bitsandbytes) holds its bits per weight, not the dtype's.
    bits = method.load_bits(cfg)
    checks.check_model_sources(ref, cfg.adapter, device, torch_dtype, pending,
                               bytes_per_param=None if bits is None else bits / 8, step="quantize",
                               plan=plan if cfg.evaluate else None, strict=cfg.strict_memory)
    calibrated = "calibration" in method.params
    checks.check_data_sources({**({"calibration": cfg.calibration} if calibrated else {}),
                               **({"ppl_dataset": cfg.ppl_dataset} if cfg.evaluate else {})})
    config = None if ref.run_id in pending else compress.peek_config(ref, "quantize")
    if config is not None:
        method.check_model(cfg, config, lambda: _meta_model(config))
    if cfg.evaluate:
        checks.check_eval_fits(ref, plan, pending, config)
    return ref, device, torch_dtype, plan


def _meta_model(config):
    # A non-uniformly pruned checkpoint's layers differ from what its config builds: no meta model.
    return None if getattr(config, "pruned_layer_sizes", None) else compress.meta_model(config)


def run(cfg: QuantizeConfig, parent: tracking.Run | None = None) -> StepResult:
    ref, device, torch_dtype, plan = check(cfg, parent)
    key = runs.step_key("quantize", cfg)
    method = quant_methods.get(cfg.method)
    simulated = method.simulated(cfg)
    calibrated = "calibration" in method.params
    calib = ({"calibration": cfg.calibration, "calibration_samples": cfg.calibration_samples,
              "calibration_seqlen": cfg.calibration_seqlen} if calibrated else {"calibration": "none"})
    params = {"model": cfg.model, "adapter": cfg.adapter or "none", "dtype": cfg.dtype, "device": device,
              "method": cfg.method, **method.run_params(cfg), "modules": cfg.modules, **calib,
              "simulated": str(simulated).lower(), "evaluate": str(cfg.evaluate).lower(), **plan.params()}
    with tracking.step_run(
        "quantize", experiment=cfg.experiment or None,
        run_name=cfg.run_name or f"quantize:{ref.label}:{cfg.method}{method.run_name_suffix(cfg)}",
        tags={names.CACHE_KEY_TAG: key, **method.tags(cfg)},
        parent=parent,
    ) as run, runs.PeakMemory() as memory, tempfile.TemporaryDirectory(prefix="mlproject-quant-") as workdir:
        run.log_params(params)

        def load(quantization_config=None):
            return compress.load_input(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter,
                                       quantization_config=quantization_config)

        def calibration(tokenizer):
            return compress.calibrate(run, tokenizer, cfg.calibration, cfg.calibration_samples,
                                      cfg.calibration_seqlen, cfg.seed)

        def reload(folder):
            return compress.load_input(resolve(str(folder)), dtype=cfg.dtype, device=device, adapter="")

        ctx = QuantContext(ref=ref, device=device, dtype=torch_dtype, load=load, workdir=Path(workdir),
                           calibration=calibration, reload=reload)
        out = method.quantize(cfg, ctx)
        loaded, metrics = out.loaded, out.metrics
        run.log_params(out.params)
        run.set_tags(runs.lineage_tags(ref, loaded, role="quantized"))
        run.log_params({"resolved_model": loaded.ref.target})
        settings = None if out.saved is not None else method.recipe(cfg, ctx)
        recipe = None if settings is None else model_output.Recipe(
            "quantize", {"method": cfg.method, "settings": settings}, adapter=cfg.adapter, dtype=torch_dtype,
            device=device)
        model_uri = model_output.log_model(run, loaded, ref, step="quantize", saved=out.saved, recipe=recipe,
                                           store=cfg.store)
        body = [*out.report, md_table(["", "before", "after"], [
            ("model_size_mb", metrics["model_size_mb_before"], metrics["model_size_mb"]),
            ("bits per quantized weight", torch_dtype.itemsize * 8, metrics["effective_bits"]),
        ])]
        body.append(f"Quantized in {metrics['quant_seconds']:.2f} s; the model is logged as `{model_uri}`. "
                    f"Served by: {method.serving}.")
        if out.calibration and out.calibration.get("dataset") == cfg.ppl_dataset and cfg.evaluate:
            body.append("Note: the calibration text is also the PPL text, so the PPL is slightly optimistic"
                        + (" (calibration=wikitext2 or a file of your own keeps them apart)."
                           if cfg.calibration == "offline" else
                           " (calibration reads WikiText-2's train split, PPL its test split)."
                           if cfg.calibration == "wikitext2" else "."))
        caveat = model_output.gguf_caveat(loaded)
        if caveat:
            body.append(caveat)
        report_params = {"model": cfg.model, "method": cfg.method, "weight": out.weight,
                         "simulated": "yes (weights stored dequantized)" if simulated else "no",
                         "modules": cfg.modules, "dtype": str(torch_dtype).removeprefix("torch."),
                         "device": device, "seed": cfg.seed, "calibration": out.calibration or "N/A (calibration-free)"}
        return compress.finish(
            run, step="quantize", title=f"quantize: {ref.label} + {cfg.method}", loaded=loaded, plan=plan,
            evaluate=cfg.evaluate, report_params=report_params, metrics=metrics,
            section=("Quantization", "\n\n".join(body)), model_uri=model_uri, memory=memory, key=key,
            headline=f"quantize · {cfg.model} · {cfg.method}{out.headline}", notes=(out.note,),
        )
