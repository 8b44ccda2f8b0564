"""`quantize`: weight-only quantization of one model, logged as the run's `model`, then evaluated.

* ``rtn`` — simulated round-to-nearest (``compression.rtn``): every selected weight is rounded
  to its ``w_bits`` grid and stored dequantized in the model's dtype, so the artifact is an
  ordinary checkpoint (same bytes on disk as the input) whose numbers are exactly those of the
  quantized model. ``model_size_mb`` is the *effective* size a packed checkpoint would have
  (``effective_bits`` per quantized weight, fp16 scales included). The run says so: param
  ``simulated=true``, tag ``mlproject.quant.simulated``, a line in report.md.
* ``bnb-nf4`` / ``bnb-fp4`` / ``bnb-int8`` — real bitsandbytes layers through transformers'
  ``BitsAndBytesConfig`` (quantized while loading; they run on CPU too). ``model_size_mb`` is
  the real bytes held, quant state included; the artifact reloads with ``from_pretrained``.
  ``quant_seconds`` is the quantizing load.

Cheap checks first (values, server, the input's config on a weightless meta-device model:
group size vs. every layer's width, already-quantized input), then one run.
"""

from __future__ import annotations

import logging
import time

from mlproject import tracking
from mlproject.compression import bnb as bnb_lib
from mlproject.compression import rtn as rtn_lib
from mlproject.config import QuantizeConfig
from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.report import md_table
from mlproject.steps import StepResult, common
from mlproject.steps import _compression as shared
from mlproject.steps.evaluate import plan_eval

log = logging.getLogger(__name__)

T = tracking.TAG_PREFIX
MB = 2**20


def _check_bnb_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("bitsandbytes is not installed; pip install bitsandbytes (or use method=rtn)")


def _bnb_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def bnb_summary(model, float_bytes: int) -> dict:
    """Real sizes of a bitsandbytes model: quantized layers' bytes per weight, size before/after."""
    layers = _bnb_layers(model)
    q_weights = sum(loading.count_params(m) - (m.bias.numel() if m.bias is not None else 0) for m in layers)
    q_bytes = sum(bnb_lib.model_size_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                  for m in layers)
    size = bnb_lib.model_size_bytes(model)
    first = layers[0] if layers else None
    qs = getattr(getattr(first, "weight", None), "quant_state", None)
    return {
        "layers": len(layers),
        "weights": q_weights,
        "effective_bits": 8 * q_bytes / q_weights if q_weights else float("nan"),
        "model_size_mb": size / MB,
        "model_size_mb_before": (size - q_bytes + q_weights * float_bytes) / MB,
        "params": loading.count_params(model),
        "blocksize": getattr(qs, "blocksize", None),
    }


def _bnb_params(method: str, blocksize: int | None) -> dict:
    """The parameter block for a bitsandbytes method, as bitsandbytes actually stores it."""
    if method == "bnb-int8":
        return {"w_bits": 8, "group_size": -1, "granularity": "per_channel",
                "scheme": "llm.int8 (absmax per row, fp16 outliers above 6.0)"}
    return {"w_bits": 4, "group_size": blocksize or 64, "granularity": "per_block",
            "scheme": method.removeprefix("bnb-") + " (absmax per block)"}


def check(cfg: QuantizeConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()):
    """Every cheap check, before a run or weights exist: values, server, the input's config on
    a weightless meta model. Returns (ref, device, torch dtype, plan)."""
    ref, device, torch_dtype = common.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    plan = plan_eval(cfg)
    rtn = cfg.method == "rtn"
    if not rtn:
        _check_bnb_installed()
    common.check_tracking(cfg.tracking_uri, ref, cfg.adapter, parent=parent, pending=pending)
    # bitsandbytes quantizes while loading: 4 or 8 bits per weight, not the float dtype's size.
    common.check_model_sources(ref, cfg.adapter, device, torch_dtype, pending,
                               bytes_per_param=None if rtn else (1.0 if cfg.method == "bnb-int8" else 0.5))
    config = None if ref.run_id in pending else shared.peek_config(ref, "quantize")
    if rtn and config is not None and not getattr(config, "pruned_layer_sizes", None):
        meta = shared.meta_model(config)
        if meta is not None:
            rtn_lib.check_layers(meta, cfg.rtn_config())  # e.g. group_size 128 on SmolLM2's 576-wide layers
    return ref, device, torch_dtype, plan


def run(cfg: QuantizeConfig, parent: tracking.Run | None = None) -> StepResult:
    ref, device, torch_dtype, plan = check(cfg, parent)
    key = common.step_key("quantize", cfg)
    rtn = cfg.method == "rtn"
    rtn_cfg = cfg.rtn_config() if rtn else None

    method_params = ({"w_bits": cfg.w_bits, "group_size": cfg.group_size, "granularity": cfg.granularity,
                      "scheme": cfg.scheme} if rtn else {})
    params = {"model": cfg.model, "adapter": cfg.adapter or "none", "dtype": cfg.dtype, "device": device,
              "method": cfg.method, **method_params, "modules": cfg.modules, "simulated": str(rtn).lower(),
              "evaluate": str(cfg.evaluate).lower(), **plan.params()}
    with tracking.step_run(
        "quantize", experiment=cfg.experiment or None,
        run_name=cfg.run_name or f"quantize:{ref.label}:{cfg.method}" + (f"-w{cfg.w_bits}" if rtn else ""),
        tags={f"{T}cache_key": key, f"{T}quant.method": cfg.method, f"{T}quant.simulated": str(rtn).lower()},
        parent=parent,
    ) as run, common.PeakMemory() as memory:
        run.log_params(params)
        start = time.perf_counter()
        if rtn:
            loaded = shared.load_input(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter)
            load_seconds = time.perf_counter() - start
            start = time.perf_counter()
            rep = rtn_lib.quantize_model(loaded.model, rtn_cfg)
            quant_seconds = time.perf_counter() - start
            metrics = {"quant_seconds": quant_seconds, "load_seconds": load_seconds,
                       "params_b": loading.count_params(loaded.model) / 1e9,
                       "model_size_mb": rep.model_size_mb, "model_size_mb_before": rep.original_size_mb,
                       "effective_bits": rep.effective_bits, "quant/mean_rel_error": rep.mean_rel_error}
            run.log_params({"quant.layers": rep.layers})  # a count, not a score: a param
            grid = (f"w{cfg.w_bits} {cfg.scheme} {cfg.granularity}"
                    + (f", group_size {cfg.group_size}" if cfg.granularity == "per_group" else ""))
            stored = str(loaded.model.dtype).removeprefix("torch.")
            body = [
                f"**Simulated quantization (RTN).** {rep.layers} linear layers ({rep.params:,} weights) were "
                f"rounded to the {grid} grid and stored dequantized as {stored}: the model computes "
                "exactly what the quantized model would, but its checkpoint is not smaller. model_size_mb is the "
                f"effective size of a packed checkpoint at {rep.effective_bits:.3f} bits per quantized weight "
                "(fp16 scales" + (" and packed zero points" if cfg.scheme == "asymmetric" else "")
                + " included; other parameters at their real dtype).",
            ]
        else:
            qc = bnb_lib.bnb_config(cfg.method, compute_dtype=torch_dtype if cfg.method != "bnb-int8" else None)
            loaded = shared.load_input(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter,
                                       quantization_config=qc)
            quant_seconds = time.perf_counter() - start
            if not _bnb_layers(loaded.model):
                raise UserError(f"{cfg.method}: no layer of {ref.raw!r} was quantized by bitsandbytes "
                                "(a non-uniformly pruned checkpoint? those load without quantization)")
            s = bnb_summary(loaded.model, torch_dtype.itemsize)
            method_params = _bnb_params(cfg.method, s["blocksize"])
            run.log_params(method_params)
            metrics = {"quant_seconds": quant_seconds, "params_b": s["params"] / 1e9,
                       "model_size_mb": s["model_size_mb"], "model_size_mb_before": s["model_size_mb_before"],
                       "effective_bits": s["effective_bits"]}
            run.log_params({"quant.layers": s["layers"]})
            body = [
                f"**Real bitsandbytes quantization ({cfg.method}).** {s['layers']} linear layers "
                f"({s['weights']:,} weights) hold packed {method_params['w_bits']}-bit weights "
                f"({s['effective_bits']:.3f} bits per weight with their scales); the LM head and embeddings stay "
                f"{str(torch_dtype).removeprefix('torch.')}. model_size_mb counts the real bytes held. "
                "quant_seconds is the quantizing load.",
            ]
        run.set_tags(common.lineage_tags(ref, loaded, role="quantized"))
        run.log_params({"resolved_model": loaded.ref.target})
        model_uri = shared.log_model(run, loaded, ref, step="quantize")
        body.append(md_table(["", "before", "after"], [
            ("model_size_mb", metrics["model_size_mb_before"], metrics["model_size_mb"]),
            ("bits per quantized weight", torch_dtype.itemsize * 8, metrics["effective_bits"]),
        ]))
        body.append(f"Quantized in {quant_seconds:.2f} s; the model is logged as `{model_uri}`.")
        caveat = shared.gguf_caveat(loaded)
        if caveat:
            body.append(caveat)
        report_params = {"model": cfg.model, "method": cfg.method, "weight": method_params,
                         "simulated": "yes (weights stored dequantized)" if rtn else "no",
                         "modules": cfg.modules, "dtype": str(torch_dtype).removeprefix("torch."),
                         "device": device, "seed": cfg.seed, "calibration": "N/A (calibration-free)"}
        grid_text = f" w{cfg.w_bits} g{cfg.group_size} {cfg.scheme}" if rtn else ""
        headline = f"quantize · {cfg.model} · {cfg.method}{grid_text}"
        note = (f"Simulated RTN: weights rounded to the grid and stored dequantized; model_size_mb is the packed "
                f"size at {metrics['effective_bits']:.3f} bits per quantized weight." if rtn else
                f"Real bitsandbytes layers: {metrics['effective_bits']:.3f} bits per quantized weight with scales.")
        return shared.finish(
            run, step="quantize", title=f"quantize: {ref.label} + {cfg.method}", loaded=loaded, plan=plan,
            evaluate=cfg.evaluate, report_params=report_params, metrics=metrics,
            section=("Quantization", "\n\n".join(body)), model_uri=model_uri, memory=memory, key=key,
            headline=headline, notes=(note,),
        )
