"""Round-to-nearest (RTN) weight quantization, simulated: pure tensor code, no MLflow.

Weights are quantized to a ``w_bits`` integer grid and immediately dequantized back into the
layer's own dtype, so the model runs unchanged and every downstream tool (PPL, lm-eval,
save_pretrained) sees an ordinary checkpoint whose weights sit on the quantization grid.

Grids (``q`` is the integer code, ``s`` the per-group fp scale, ``z`` the integer zero point):

* ``symmetric`` — restricted signed range ``q ∈ [-(2^(b-1)-1), 2^(b-1)-1]``,
  ``s = max|w| / (2^(b-1)-1)``, ``ŵ = q·s``. The most negative code of the two's-complement
  range is deliberately unused, so the grid is exactly symmetric around zero (``-ŵ`` is
  representable whenever ``ŵ`` is) and ``max|w|`` maps to the top code on either side.
  It has ``2^b - 1`` levels (2 bits: ``{-s, 0, s}``).
* ``asymmetric`` — ``2^b`` levels ``q ∈ [0, 2^b-1]`` over ``[min(w,0), max(w,0)]``:
  ``s = (max-min)/(2^b-1)``, ``z = round(-min/s)``, ``ŵ = (q-z)·s``. Like GPTQ/AutoGPTQ the
  range is widened to include 0, so the integer zero point always lies on the grid, zero
  weights stay exactly zero and the error is bounded by half a step everywhere.

Effective bits per weight (what a packed checkpoint would store, scales in fp16):
``b + 16/g`` symmetric, ``b + (16 + b)/g`` asymmetric (zero points packed at ``b`` bits as
GPTQ does), with ``g`` the group size (``in_features`` for per-channel).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mlproject.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per_channel", "per_group")
SCALE_BITS = 16  # scales stored as fp16 in the effective-bits accounting
MB = 1024**2  # "MB" throughout compression/: 2^20 bytes


def _check_args(bits: int, scheme: str, granularity: str, group_size: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"w_bits must be an integer in 2..8, got {bits!r}")
    if scheme not in SCHEMES:
        raise UserError(f"unknown RTN scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if granularity not in GRANULARITIES:
        raise UserError(
            f"unknown RTN granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise UserError(f"group_size must be an integer, got {group_size!r}")
    if group_size == 0 or group_size < -1:
        raise UserError(f"group_size must be a positive integer or -1 (whole row), got {group_size}")
    if granularity == "per_group" and group_size == -1:
        raise UserError("granularity=per_group needs group_size > 0 (use per_channel for whole rows)")


def _effective_group(granularity: str, group_size: int, in_features: int) -> int:
    return in_features if granularity == "per_channel" or group_size == -1 else group_size


def _divisors_hint(n: int, limit: int) -> str:
    divs = [d for d in (256, 128, 64, 32, 16, 8) if d <= max(limit, 8) and n % d == 0]
    return f" (divisors that work: {', '.join(map(str, divs[:3]))})" if divs else ""


def quantize_tensor(w, bits: int, group_size: int = 128, scheme: str = "symmetric",
                    granularity: str = "per_group"):
    """Quantize-dequantize a 2-D weight ``[out_features, in_features]`` row-wise in groups.

    Args:
        w: weight matrix (any float dtype); groups run along the input dimension.
        bits: integer bits per weight, 2..8.
        group_size: input columns sharing one scale; must divide ``in_features``.
            Ignored (whole row) for ``granularity="per_channel"``; ``-1`` also means whole row.
        scheme: ``"symmetric"`` or ``"asymmetric"`` (see module docstring for the grids).
        granularity: ``"per_channel"`` (one scale per output row) or ``"per_group"``.

    Returns:
        ``(w_dequant, scales, zeros)``: ``w_dequant`` has ``w``'s shape and dtype; ``scales``
        (float32) and ``zeros`` (float32 holding integers; all zero for symmetric) have shape
        ``[out_features, n_groups]``. All-zero groups get scale 1 and dequantize to exact 0.
    """
    import torch

    _check_args(bits, scheme, granularity, group_size)
    if w.dim() != 2:
        raise UserError(f"quantize_tensor expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = _effective_group(granularity, group_size, in_f)
    if in_f % g:
        raise UserError(
            f"group_size={g} does not divide the input dimension {in_f}{_divisors_hint(in_f, g)}; "
            "pick a divisor or granularity=per_channel"
        )
    x = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=-1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / scale[..., None]), -qmax, qmax)
        deq = q * scale[..., None]
        zeros = torch.zeros_like(scale)
    else:
        qmax = 2**bits - 1
        lo = x.amin(dim=-1).clamp(max=0.0)
        hi = x.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zeros = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(x / scale[..., None]) + zeros[..., None], 0, qmax)
        deq = (q - zeros[..., None]) * scale[..., None]
    return deq.reshape(out_f, in_f).to(w.dtype), scale, zeros


def effective_bits(bits: int, group_size: int, scheme: str) -> float:
    """Stored bits per weight including fp16 scales (and ``bits``-bit zero points if asymmetric)."""
    overhead = SCALE_BITS + (bits if scheme == "asymmetric" else 0)
    return bits + overhead / group_size


@dataclass
class RTNConfig:
    """Round-to-nearest weight-only quantization settings."""

    w_bits: int = 4
    """Integer bits per weight, 2..8."""
    group_size: int = 128
    """Input columns sharing one scale (per_group); must divide every quantized layer's
    ``in_features``. ``-1`` means a whole row. Ignored for ``per_channel``."""
    scheme: str = "symmetric"
    """``symmetric`` (zero at 0, grid ±(2^(b-1)-1)·scale) or ``asymmetric`` (min/max with an
    integer zero point, 2^b levels)."""
    granularity: str = "per_group"
    """``per_group`` (one scale per ``group_size`` columns of a row) or ``per_channel`` (one
    scale per output row)."""
    modules: str = "all-linear"
    """Which ``nn.Linear`` layers to quantize: ``all-linear`` (every one except the LM head) or
    a comma list of name substrings, e.g. ``q_proj,k_proj`` (name ``lm_head`` to include it; with
    tied embeddings that quantizes the shared embedding matrix too)."""

    def __post_init__(self) -> None:
        _check_args(self.w_bits, self.scheme, self.granularity, self.group_size)
        if not isinstance(self.modules, str) or not self.modules.strip():
            raise UserError("modules must be 'all-linear' or a comma list of layer-name substrings")
        if self.modules.strip() != "all-linear" and not self.patterns:
            raise UserError(f"modules={self.modules!r} names no layer")

    @property
    def patterns(self) -> list[str]:
        """Name substrings selected by ``modules`` (empty for ``all-linear``)."""
        if self.modules.strip() == "all-linear":
            return []
        return [p.strip() for p in self.modules.split(",") if p.strip()]


@dataclass
class RTNReport:
    """What ``quantize_model`` did (all sizes in MB = 2^20 bytes)."""

    layers: int
    """Number of ``nn.Linear`` layers quantized."""
    params: int
    """Weights quantized (biases stay in their dtype)."""
    total_params: int
    """All parameters of the model."""
    effective_bits: float
    """Stored bits per quantized weight, scales (fp16) and zero points included."""
    model_size_mb: float
    """Quantized weights at ``effective_bits`` + every other parameter/buffer at its real dtype."""
    original_size_mb: float
    """The model's real size before quantization (parameters + buffers)."""
    mean_rel_error: float
    """Mean over quantized layers of ``‖W - Q(W)‖_F / ‖W‖_F``."""
    layer_errors: dict[str, float] = field(default_factory=dict)
    """Relative Frobenius error per quantized layer name."""


def select_linears(model, cfg: RTNConfig) -> list[tuple[str, object]]:
    """The ``(name, module)`` pairs of ``nn.Linear`` layers that ``cfg.modules`` selects."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    patterns = cfg.patterns
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if patterns:
            if any(p in name for p in patterns):
                chosen.append((name, mod))
        elif mod is not head:
            chosen.append((name, mod))
    return chosen


def check_layers(model, cfg: RTNConfig) -> list[tuple[str, object]]:
    """The layers ``quantize_model`` would quantize, after checking each one (float weight,
    ``group_size`` divides ``in_features``); raises ``UserError`` naming the first bad layer.

    Reads only shapes and dtypes, so it also works on a meta-device model built from a config
    (a step checks its settings this way before any weight is loaded).
    """
    chosen = select_linears(model, cfg)
    if not chosen:
        arch = getattr(getattr(model, "config", None), "model_type", None)
        raise UserError(f"modules={cfg.modules!r} matched no nn.Linear layer in the model"
                        + (f" (architecture {arch!r})" if arch else ""))
    for name, mod in chosen:
        if not mod.weight.dtype.is_floating_point:
            raise UserError(
                f"layer {name} holds {mod.weight.dtype} weights (already quantized?); RTN needs float weights"
            )
        in_f = mod.weight.shape[1]
        g = _effective_group(cfg.granularity, cfg.group_size, in_f)
        if in_f % g:
            raise UserError(
                f"group_size={g} does not divide in_features={in_f} of {name}"
                f"{_divisors_hint(in_f, g)}; pick a divisor or granularity=per_channel"
            )
    return chosen


def quantize_model(model, cfg: RTNConfig) -> RTNReport:
    """Simulated RTN quantization of ``model`` in place, layer by layer; returns a report.

    Every selected layer is checked (float weight, group size divides ``in_features``) before
    any weight changes, so a bad setting fails fast and leaves the model untouched.
    """
    import torch

    from mlproject.compression.bnb import model_size_mb

    chosen = check_layers(model, cfg)
    original_mb = model_size_mb(model)
    n_params = 0
    stored_bits = 0.0
    real_bytes = 0
    errors: dict[str, float] = {}
    seen: set[int] = set()
    with torch.no_grad():
        for name, mod in chosen:
            w = mod.weight
            if id(w) in seen:  # tied weights: quantize the shared matrix once
                continue
            seen.add(id(w))
            in_f = w.shape[1]
            deq, _, _ = quantize_tensor(w, cfg.w_bits, cfg.group_size, cfg.scheme, cfg.granularity)
            ref = w.detach().float()
            denom = ref.norm().item()
            errors[name] = (ref - deq.float()).norm().item() / denom if denom > 0 else 0.0
            w.copy_(deq)
            del deq, ref
            g = _effective_group(cfg.granularity, cfg.group_size, in_f)
            n_params += w.numel()
            stored_bits += w.numel() * effective_bits(cfg.w_bits, g, cfg.scheme)
            real_bytes += w.numel() * w.element_size()
            log.debug("rtn %s: rel error %.4g", name, errors[name])
    total = sum(p.numel() for p in model.parameters())
    eff = stored_bits / n_params
    size = original_mb - real_bytes / MB + stored_bits / 8 / MB
    report = RTNReport(
        layers=len(errors), params=n_params, total_params=total, effective_bits=eff,
        model_size_mb=size, original_size_mb=original_mb,
        mean_rel_error=sum(errors.values()) / len(errors), layer_errors=errors,
    )
    log.info("RTN w%d %s/%s: %d layers, %.3f bits/weight, %.2f MB (from %.2f), mean rel error %.4g",
             cfg.w_bits, cfg.scheme, cfg.granularity, report.layers, eff, size, original_mb,
             report.mean_rel_error)
    return report
