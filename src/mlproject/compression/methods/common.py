"""What the packed-format methods (llm-compressor GPTQ/AWQ, AutoRound, HQQ) share: one meaning
for ``w_bits`` / ``group_size`` / ``scheme`` / ``modules`` checked the same way before any run,
the refusal of a missing library with its install hint, and the real size of a packed checkpoint.

A packed method writes its own format into ``QuantContext.workdir`` (the checkpoint the step
logs as-is) and reports its size from those files: ``model_size_mb`` is the bytes on disk,
``effective_bits`` the stored bits per quantized weight (packed codes, scales and zero points of
the quantized layers over their weight count). No torch or library import at module level.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mlproject.errors import UserError

SCHEMES = ("symmetric", "asymmetric")
WEIGHT_FILES = ("*.safetensors", "*.pt", "*.bin")


def require(module: str, hint: str, method: str) -> None:
    """Refuse ``method`` with the install hint when ``module`` is not importable."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"method={method} needs the {module} package, which is not installed; {hint}")


def check_grid(cfg, bits: tuple[int, ...], schemes: tuple[str, ...] = SCHEMES) -> None:
    """``w_bits`` / ``group_size`` / ``scheme`` / ``modules`` as every packed method reads them."""
    w = cfg.w_bits
    if isinstance(w, bool) or not isinstance(w, int) or w not in bits:
        raise UserError(f"w_bits={w!r}: method={cfg.method} supports {', '.join(map(str, bits))}")
    g = cfg.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g == 0 or g < -1:
        raise UserError(f"group_size={g!r} must be a positive integer or -1 (whole row)")
    if cfg.scheme not in schemes:
        raise UserError(f"scheme={cfg.scheme!r}: method={cfg.method} supports {', '.join(schemes)}")
    if not isinstance(cfg.modules, str) or not cfg.modules.strip() or not (
            cfg.modules.strip() == "all-linear" or patterns(cfg.modules)):
        raise UserError(f"modules={cfg.modules!r} must be 'all-linear' or a comma list of layer-name substrings")


def check_calibration(cfg) -> None:
    if isinstance(cfg.calibration_samples, bool) or cfg.calibration_samples < 1:
        raise UserError(f"calibration_samples={cfg.calibration_samples!r} must be at least 1")
    if isinstance(cfg.calibration_seqlen, bool) or cfg.calibration_seqlen < 2:
        raise UserError(f"calibration_seqlen={cfg.calibration_seqlen!r} must be at least 2")


def patterns(modules: str) -> list[str]:
    """Layer-name substrings ``modules`` selects (empty for ``all-linear``)."""
    if modules.strip() == "all-linear":
        return []
    return [p.strip() for p in modules.split(",") if p.strip()]


def selected(model, modules: str) -> list[str]:
    """Full names of the ``nn.Linear`` layers ``modules`` selects (the LM head only when named)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pats = patterns(modules)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (any(p in name for p in pats) if pats else mod is not head):
            out.append(name)
    return out


def check_input(cfg, config, meta) -> list[str] | None:
    """The pre-run checks every packed method makes on its input: a uniform architecture (a
    non-uniformly pruned checkpoint's layers differ from its config, which a packed format's
    loader rebuilds the model from) and, on a weightless model, the group size against every
    selected layer. Returns the selected layer names (None when no meta model can be built)."""
    if getattr(config, "pruned_layer_sizes", None):
        raise UserError(f"method={cfg.method}: the input is a non-uniformly pruned checkpoint (prune keep_layers>0); "
                        "a packed format cannot reload its differently sized layers: use method=rtn, or prune with "
                        "keep_layers=0")
    model = meta()
    return check_layers(cfg, model) if model is not None else None


def check_layers(cfg, model) -> list[str]:
    """The selected layers, after checking that ``group_size`` divides each one's in_features
    (shapes only: works on a weightless meta-device model)."""
    from mlproject.compression import rtn

    settings = rtn.RTNConfig(w_bits=4, group_size=cfg.group_size,
                             granularity="per_channel" if cfg.group_size == -1 else "per_group",
                             modules=cfg.modules)
    return [name for name, _ in rtn.check_layers(model, settings)]


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for pat in WEIGHT_FILES for p in Path(folder).glob(pat))


def folder_bytes(folder: Path) -> int:
    """Bytes of a checkpoint's weight files (what a runtime reads)."""
    return sum(p.stat().st_size for p in weight_files(folder))


def folder_size(model) -> int:
    """Bytes of the weight files a model was loaded from (0 when it has no folder): a packed
    format's real size, whatever the runtime unpacked in memory."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    return folder_bytes(folder) if folder.is_dir() else 0


def stored_bits(folder: Path, layers: list[str], weights: int) -> float:
    """Stored bits per quantized weight: every tensor under a quantized layer's name (packed
    codes, scales, zero points, shapes; biases excluded) over the layers' weight count."""
    from safetensors import safe_open

    prefixes = tuple(f"{name}." for name in layers)
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.startswith(prefixes) and not key.endswith(".bias"):
                    t = f.get_slice(key)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * _itemsize(t.get_dtype())
    return 8 * total / weights if weights else 0.0


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 4)


def layer_weights(model, layers: list[str]) -> int:
    """Weights (out × in) of the named layers, from a float model before it is packed."""
    mods = dict(model.named_modules())
    return sum(mods[n].weight.numel() for n in layers)


def size_metrics(folder: Path, before_bytes: int, params: int, layers: list[str], weights: int,
                 bits: float | None = None) -> dict[str, float]:
    """model_size_mb (the packed files), model_size_mb_before, params_b and effective_bits."""
    from mlproject.compression.methods import MB

    return {"params_b": params / 1e9, "model_size_mb": folder_bytes(folder) / MB,
            "model_size_mb_before": before_bytes / MB,
            "effective_bits": bits if bits is not None else stored_bits(folder, layers, weights)}
