"""Derived models stored as recipes (ARCHITECTURE.md, "Storage").

A step whose output is a deterministic function of its input and parameters (RTN, bitsandbytes,
structured pruning) logs a *recipe* instead of weights: the input's reference pinned to an
identity, the operation and its parameters, prune's kept indices as a small safetensors file,
the code and library versions, the working dtype and device, and a digest of the resulting
weights. Loading (``models.loading.load_model``) re-materializes the chain — the input is loaded
the same way (recursively: a recipe's input can be another recipe or an adapter on one), the
operation re-applied — and compares the digest; a mismatch is one line, never silent.

The folder holds ``mlproject_model.json`` (``kind: "recipe"``), the result's ``config.json``
(cheap pre-run checks read it as they read a checkpoint's) and, for prune,
``prune_indices.safetensors``. Pure torch and files: nothing here talks to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from mlproject.errors import UserError

log = logging.getLogger(__name__)

KIND = "recipe"
FORMAT = 1
INDICES_FILE = "prune_indices.safetensors"


def is_recipe(meta: dict) -> bool:
    return meta.get("kind") == KIND


def weights_digest(model) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes) in name order.

    Tensors are hashed on worker threads (hashlib releases the GIL); a GPU tensor is copied to
    host one at a time, so the extra memory is the largest tensor. ~10–30 s for 14.5 GB."""
    import torch

    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    def one(item):
        name, t = item
        t = t.detach()
        raw = t.reshape(-1).contiguous().cpu()
        if raw.dtype == torch.bool:
            raw = raw.to(torch.uint8)
        data = raw.view(torch.uint8).numpy() if raw.numel() else b""
        return f"{name}|{str(t.dtype)}|{tuple(t.shape)}|{hashlib.sha256(data).hexdigest()}"

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        lines = list(pool.map(one, sorted(state.items())))
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dir_digest(path: Path) -> str:
    """A content digest of a local model directory, cached by (file, size, mtime) so a 14.5 GB
    checkpoint is hashed once, not at every step."""
    from mlproject.paths import cache_root

    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    stamp = hashlib.sha256(json.dumps(
        [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()
    memo = cache_root() / "dir-digests" / f"{stamp}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    digest = "sha256:" + h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def hub_commit(repo_id: str) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (what loading reads offline), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - provenance only
        return None
    if isinstance(got, str) and "/snapshots/" in got:
        return got.split("/snapshots/", 1)[1].split("/", 1)[0]
    return None


def write(out_dir: Path, *, model, input_ref: str, adapter: str, identity: dict, op: str,
          params: dict, dtype: str, device: str, digest: str, versions: dict, meta: dict,
          tensors: dict | None = None) -> Path:
    """Write a recipe folder (see the module docstring); ``meta``: the lineage every model folder carries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(out / "config.json"))
    if tensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / INDICES_FILE))
    recipe = {"format": FORMAT, "op": op, "params": params,
              "input": {"ref": input_ref, "adapter": adapter or "", "identity": identity},
              "dtype": dtype, "device": device.split(":")[0], "digest": digest, "versions": versions,
              "files": [INDICES_FILE] if tensors else []}
    (out / "mlproject_model.json").write_text(json.dumps({**meta, "kind": KIND, "recipe": recipe},
                                                         indent=2, sort_keys=True, default=str))
    return out


def materialize(folder: Path, meta: dict, label: str, *, device: str,
                load: Callable[..., Any], versions: dict) -> Any:
    """Re-create a recipe's model: ``load(ref, dtype=…, adapter=…, quantization_config=…)`` loads
    the input as one plain model on ``device`` (``models.loading.load_merged``); the operation is
    re-applied and the digest compared. Returns the LoadedModel (in the recipe's dtype)."""
    from mlproject.compression import methods as quant_methods
    from mlproject.compression import prune as prune_lib

    recipe = meta["recipe"]
    if recipe.get("format") != FORMAT:
        raise UserError(f"{label}: recipe format {recipe.get('format')!r} is not {FORMAT}; upgrade mlproject")
    inp = recipe["input"]
    op, params = recipe["op"], recipe["params"]

    def load_input(quantization_config=None):
        return load(inp["ref"], dtype=recipe["dtype"], adapter=inp["adapter"], quantization_config=quantization_config)

    log.info("re-making %s from its recipe: %s of %s", label, op, inp["ref"])
    try:
        if op == "prune":
            from safetensors.torch import load_file

            loaded = load_input()
            prune_lib.apply_kept(loaded.model, load_file(str(Path(folder) / INDICES_FILE)))
        elif op == "quantize":
            loaded = quant_methods.get(params["method"]).replay(params["settings"], load_input)
        else:
            raise UserError(f"{label}: unknown recipe operation {op!r}")
    except (RuntimeError, IndexError, KeyError, FileNotFoundError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            raise
        raise UserError(f"{label}: cannot re-apply its recipe ({op} of {inp['ref']}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    got = weights_digest(loaded.model)
    if got != recipe["digest"]:
        raise UserError(mismatch_line(label, recipe, got, device, versions))
    return loaded


def mismatch_line(label: str, recipe: dict, got: str, device: str, versions: dict) -> str:
    """The one line a digest mismatch gets: what differs that could explain it."""
    why = []
    changed = {k: (v, versions.get(k)) for k, v in (recipe.get("versions") or {}).items() if versions.get(k) != v}
    if changed:
        why.append("libraries changed: " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in sorted(changed.items())))
    if recipe.get("device") and recipe["device"] != device.split(":")[0]:
        why.append(f"made on {recipe['device']}, re-made on {device.split(':')[0]}")
    ident = recipe["input"].get("identity") or {}
    why.append(f"or its input {recipe['input']['ref']} changed" + (f" (recorded as {_short(ident)})" if ident else ""))
    return (f"{label}: the weights re-made from its recipe differ from the recorded ones (digest {got[7:19]} ≠ "
            f"{recipe['digest'][7:19]}): {'; '.join(why)}. Re-run the step (store=weights keeps real weights)")


def _short(identity: dict) -> str:
    return ", ".join(f"{k}={str(v)[:19]}" for k, v in sorted(identity.items()))
