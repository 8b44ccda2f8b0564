"""A model reference exported as a standalone Hugging Face folder: real weights where people deploy.

    mlproject export runs:/<run_id>/model ./out          # the command (mlproject.export)
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('./out')"   # no mlproject needed

What the reference loads to through ``loading.load_model`` (a recipe re-made, a PEFT adapter
merged into its base with ``merge_and_unload``) is written with ``save_pretrained`` as sharded
safetensors in the *working dtype*: the dtype of the lineage's root checkpoint (``dtype`` /
``torch_dtype`` of its config.json), never the float32 that ``dtype=auto`` means on CPU. The
tokenizer goes beside it, and config.json gets ``mlproject_lineage`` (the reference exported, the
chain of upstream models and runs, the root, the dtypes, the mlproject version).

A packed quantized checkpoint (gptq / awq / auto-round / bitsandbytes stored as weights) already is
real weights in its library's format: its files are copied as written (``from_pretrained`` reads
them with that library installed). Refused in one line, before any weights load: a non-uniformly
pruned model (``config.pruned_layer_sizes``: transformers builds every decoder layer the same
size), a format ``from_pretrained`` cannot read (HQQ's own files), a LoRA adapter on a packed base
and a QLoRA adapter (merging either would round the adapter into 4-bit weights).

Nothing here talks to MLflow: ``runs:/`` and ``models:/`` references go through ``fetch``
(``tracking.download``), as in ``loading``; only small files (``mlproject_model.json``,
``config.json``, ``adapter_config.json``) are fetched to read a lineage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject.compression.prune import SIZES_KEY
from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.models.reference import ModelRef, alias_table, resolve

log = logging.getLogger(__name__)

#: config.json's key holding where the exported weights come from.
LINEAGE_KEY = "mlproject_lineage"
SAVE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD_SIZE = "5GB"
#: Files of a logged model folder that belong to MLflow or mlproject, not to the checkpoint.
_NOT_CHECKPOINT = ("MLmodel", "components", loading.META_FILE, ".mlproject-download.json")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_MAX_DEPTH = 32


@dataclass
class Node:
    """One model of a lineage, read from its small files only."""

    ref: str
    kind: str  # recipe | adapter | weights | hub | unknown
    run_id: str | None = None
    config: dict | None = None  # its config.json (None: not known cheaply)
    meta: dict = field(default_factory=dict)  # its mlproject_model.json
    adapter: dict | None = None  # its adapter_config.json (an adapter-only folder)
    loaded: bool = True  # part of what load_model materializes (False: history behind real weights)

    @property
    def dtype(self) -> str | None:
        value = (self.config or {}).get("dtype") or (self.config or {}).get("torch_dtype")
        return str(value).removeprefix("torch.") if value else None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ref": self.ref, "kind": self.kind}
        if self.run_id:
            out["run_id"] = self.run_id
        recipe = self.meta.get("recipe") or {}
        if recipe.get("op"):
            out["op"] = recipe["op"]
            method = (recipe.get("params") or {}).get("method")
            if method:
                out["method"] = method
        for key in ("step", "method"):
            if self.meta.get(key) and key not in out:
                out[key] = self.meta[key]
        if self.dtype:
            out["dtype"] = self.dtype
        return out


@dataclass
class ExportPlan:
    """Everything checked before weights load (``plan``)."""

    ref: ModelRef
    out_dir: Path
    dtype: str  # the dtype the weights are written in
    root_dtype: str | None  # the lineage root's, when known
    device: str
    max_shard_size: int
    chain: list[Node]
    packed: str | None = None  # quant_method of a packed checkpoint copied as written
    force: bool = False

    @property
    def top(self) -> Node:
        return self.chain[0]

    @property
    def needs_weights(self) -> bool:
        """True when the reference's folder does not hold the weights it loads to (a recipe, or an
        adapter that needs its base): exporting it writes a checkpoint that did not exist."""
        return self.top.kind in ("recipe", "adapter")


@dataclass
class Exported:
    out_dir: Path
    dtype: str
    files: list[str]
    bytes: int
    lineage: dict
    merged_adapter: bool = False
    copied: bool = False  # a packed checkpoint copied as written
    flavor: dict | None = None  # MLflow's transformers flavor for the folder (``flavor=True``)


# ----------------------------------------------------------------------------- checks
def parse_shard_size(text: str | int) -> int:
    """``5GB``, ``500MB``, ``1.5GB``, ``200KB`` (powers of 10, as transformers means them) or bytes."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"max shard size {text!r} is not a size such as 5GB, 500MB or 200KB")
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}.get((m.group(2) or "").upper(), 1)
    return max(1, int(float(m.group(1)) * scale))


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """DIR is new, empty, or (``force``) replaceable; its parent is writable."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out_dir} exists and is not empty; use --force to replace it")
        cwd = Path.cwd().resolve()
        if out in (Path(out.anchor), Path.home().resolve()) or out == cwd or out in cwd.parents:
            raise UserError(f"refusing to replace {out_dir} (the root, home or current directory, or above it)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out_dir}: {parent} is not writable")
    return out


def plan(reference: str, out_dir: str | Path, *, dtype: str = "", device: str = "",
         max_shard_size: str | int = DEFAULT_SHARD_SIZE, force: bool = False,
         fetch: loading.Fetch | None = None) -> ExportPlan:
    """The cheap part: reference, DIR, options, then the lineage from small files; refuses what
    cannot become a standalone folder. Raises UserError (one line) before any weights load."""
    ref = resolve(reference)
    out = check_out_dir(out_dir, force)
    shard = parse_shard_size(max_shard_size)
    if dtype and dtype not in SAVE_DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(SAVE_DTYPES)} (empty: the root checkpoint's)")
    if ref.kind == "local" and Path(ref.target).resolve() in (out, *out.parents):
        raise UserError(f"{out_dir} would overwrite the model it exports")
    chain = lineage(ref, fetch)
    top = chain[0]
    _refuse(ref, chain)
    packed = None
    if top.kind == "weights" and (top.config or {}).get("quantization_config"):
        packed = _quant_method(top.config) or "quantized"
    root_dtype = _root_dtype(chain)
    if packed and dtype:
        log.warning("%s is a packed %s checkpoint: it is copied as written; --dtype %s does not apply",
                    ref.raw, packed, dtype)
    return ExportPlan(ref=ref, out_dir=out, dtype=dtype or root_dtype or "float32", root_dtype=root_dtype,
                      device=device or _recipe_device(chain), max_shard_size=shard, chain=chain, packed=packed,
                      force=force)


def _refuse(ref: ModelRef, chain: list[Node]) -> None:
    from mlproject.compression import methods as quant_methods

    for node in chain:
        if not node.loaded:
            break
        if (node.config or {}).get(SIZES_KEY):
            raise UserError(f"{ref.raw} is non-uniformly pruned (config.pruned_layer_sizes, via {node.ref}): "
                            "from_pretrained builds every decoder layer the same size, so no standalone folder can "
                            "hold it; prune with keep_layers=0 for a uniform model, or load it with mlproject")
        kind = _quant_method(node.config) if node.kind == "weights" else None
        fam = next((f for f in quant_methods.families() if kind and kind in f.formats), None)
        if fam is not None and type(fam).load_dir is not quant_methods.QuantMethod.load_dir:
            raise UserError(f"{ref.raw} is a {kind} checkpoint that only its library's own loader reads "
                            f"(from_pretrained cannot): serve it with {fam.serving or kind}, or export its input model")
        if node is not chain[0] and kind and chain[0].kind == "adapter":
            raise UserError(f"{ref.raw} is a LoRA adapter on a packed {kind} checkpoint: merging it would round it "
                            "into the packed weights; export the base and serve the adapter beside it")
        if node.kind == "adapter" and node.meta.get("quantization"):
            raise UserError(f"{ref.raw} holds a QLoRA adapter (trained on a {node.meta['quantization']} base): merging "
                            "it into 4-bit weights would round it away; serve it on its base with peft")


def _quant_method(config: dict | None) -> str | None:
    qc = (config or {}).get("quantization_config")
    return str(qc.get("quant_method")) if isinstance(qc, dict) and qc.get("quant_method") else None


def _root_dtype(chain: list[Node]) -> str | None:
    """The deepest known dtype of the lineage (its root checkpoint's), converting a GGUF alias once."""
    last = chain[-1]
    if last.kind == "hub" and last.dtype is None:
        with contextlib.suppress(UserError, OSError, ValueError):
            ref = resolve(last.ref)
            if ref.gguf:  # what load_model converts anyway: its config says the dequantized dtype
                last.config = _read_json(loading.converted_gguf_dir(ref) / "config.json")
    for node in reversed(chain):
        if node.dtype in SAVE_DTYPES:
            return node.dtype
    return None


def _recipe_device(chain: list[Node]) -> str:
    """A recipe is re-made on the kind of device it was made on (its digest holds only there);
    otherwise load_model's ``auto``."""
    for node in chain:
        made = ((node.meta.get("recipe") or {}).get("device") or "") if node.loaded else ""
        if made == "cpu":
            return "cpu"
        if made.startswith("cuda"):
            import torch

            return "cuda" if torch.cuda.is_available() else "auto"
    return "auto"


# ----------------------------------------------------------------------------- the lineage
def lineage(ref: ModelRef, fetch: loading.Fetch | None) -> list[Node]:
    """The models behind ``ref``, newest first: what load_model materializes (a recipe's input, an
    adapter's base, recursively) and, behind the first real weights, the history their
    ``mlproject_model.json`` names (``upstream`` / ``source``), as far as small files tell."""
    chain: list[Node] = []
    seen: set[str] = set()
    current: ModelRef | None = ref
    loaded = True
    while current is not None and len(chain) < _MAX_DEPTH and current.target not in seen:
        seen.add(current.target)
        node = _read_node(current, fetch, loaded, first=not chain)
        if node is None:
            break
        chain.append(node)
        nxt = _next_ref(node)
        if node.kind not in ("recipe", "adapter"):
            loaded = False
        current = nxt
        if current is not None and current.kind == "registry" and not loaded:
            # a registry model behind real weights: fetching it would download its weights for a name
            chain.append(Node(ref=current.raw, kind="unknown", loaded=False))
            break
    return chain


def _next_ref(node: Node) -> ModelRef | None:
    meta = node.meta
    if node.kind == "recipe":
        candidates = [((meta.get("recipe") or {}).get("input") or {}).get("ref"), meta.get("upstream")]
    elif node.kind == "adapter":
        candidates = [meta.get("base"), (node.adapter or {}).get("base_model_name_or_path")]
    elif node.kind == "weights":
        candidates = [meta.get("upstream"), meta.get("source")]
    else:
        return None
    for cand in candidates:
        if not cand:
            continue
        try:
            return resolve(str(cand))
        except UserError:
            continue  # a GGUF file name, a folder gone since: history ends here
    return None


def _read_node(ref: ModelRef, fetch: loading.Fetch | None, loaded: bool, first: bool) -> Node | None:
    if ref.kind in ("hub", "alias"):
        config = None
        if ref.gguf:
            src = loading._converted_path(ref) / "config.json"
            config = _read_json(src) if src.is_file() else None
        else:
            with contextlib.suppress(Exception):  # noqa: BLE001 - provenance: the load reports a missing model
                got = loading.peek_config(ref)
                config = got.to_dict() if got is not None else None
        return Node(ref=ref.raw, kind="hub", config=config, loaded=loaded)
    if ref.kind == "local":
        folder = Path(ref.target)
        files = {name: _read_json(folder / name) for name in ("mlproject_model.json", "config.json",
                                                              "adapter_config.json")}
    elif ref.kind == "run":
        if fetch is None:
            raise UserError(f"{ref.raw!r} needs a tracking server to download from")
        files = {name: _fetch_json(fetch, f"{ref.target.rstrip('/')}/{name}") for name in ("mlproject_model.json", "config.json", "adapter_config.json")}
    else:  # registry: only the whole folder can be fetched (what load_model fetches anyway, cached)
        if fetch is None:
            raise UserError(f"{ref.raw!r} needs a tracking server to download from")
        folder = Path(fetch(ref.target))
        files = {name: _read_json(folder / name) for name in ("mlproject_model.json", "config.json",
                                                              "adapter_config.json")}
    meta, config, adapter = files["mlproject_model.json"] or {}, files["config.json"], files["adapter_config.json"]
    run_id = ref.run_id or meta.get("run_id")
    if meta.get("kind") == "recipe":
        kind = "recipe"
    elif adapter is not None and config is None:
        kind = "adapter"
    elif config is not None:
        kind = "weights"
    else:
        if first:
            raise UserError(f"{ref.raw} holds no config.json or adapter_config.json: not a model folder")
        kind = "unknown"
    return Node(ref=ref.raw, kind=kind, run_id=run_id, config=config, meta=meta, adapter=adapter, loaded=loaded)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _fetch_json(fetch: loading.Fetch, uri: str) -> dict | None:
    try:
        return _read_json(Path(fetch(uri)))
    except UserError:
        return None
    except Exception as exc:  # noqa: BLE001 - a missing small file: the lineage just stops knowing
        log.debug("cannot fetch %s: %s", uri, exc)
        return None


# ----------------------------------------------------------------------------- the export
def export(p: ExportPlan, fetch: loading.Fetch | None = None, flavor: bool = False) -> Exported:
    """Load (or, packed, copy) and write the folder into a temporary sibling of ``p.out_dir``,
    then put it in place (a failed export leaves no half-written DIR)."""
    from mlproject.paths import shared_mkdtemp
    from mlproject.progress import phase

    p.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = shared_mkdtemp(p.out_dir.parent, f".{p.out_dir.name}.export-")
    try:
        with phase(f"exporting {p.ref.label}") as step:
            if p.packed:
                step.update(postfix=f"copying the {p.packed} checkpoint")
                result = _copy_packed(p, tmp, fetch)
            else:
                result = _save_loaded(p, tmp, fetch, step, flavor)
        if p.out_dir.exists():
            shutil.rmtree(p.out_dir)
        os.replace(tmp, p.out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out_dir = p.out_dir
    result.files = sorted(str(f.relative_to(p.out_dir)) for f in p.out_dir.rglob("*") if f.is_file())
    result.bytes = sum(f.stat().st_size for f in p.out_dir.rglob("*") if f.is_file())
    log.info("exported %s to %s: %d files, %.1f MB (%s)", p.ref.raw, p.out_dir, len(result.files),
             result.bytes / 1e6, result.dtype)
    return result


def _save_loaded(p: ExportPlan, tmp: Path, fetch, step, flavor: bool) -> Exported:
    import torch

    step.update(postfix=f"loading in {p.dtype}")
    loaded = loading.load_model(p.ref, dtype=p.dtype, device=p.device, fetch=fetch)
    merged = False
    if loading.is_peft(loaded.model):
        step.update(postfix="merging the adapter")
        log.info("merging the PEFT adapter of %s into its base (merge_and_unload)", p.ref.raw)
        loaded.model = loaded.model.merge_and_unload()
        merged = True
    model = loaded.model
    if getattr(model.config, SIZES_KEY, None):  # known only now where the lineage was not readable
        raise UserError(f"{p.ref.raw} is non-uniformly pruned (config.pruned_layer_sizes): from_pretrained builds "
                        "every decoder layer the same size; prune with keep_layers=0, or load it with mlproject")
    quantized = getattr(model, "hf_quantizer", None) is not None
    want = getattr(torch, p.dtype)
    if not quantized and model.dtype != want:
        model.to(want)
    written = str(model.dtype).removeprefix("torch.")
    step.update(postfix=f"writing {written} safetensors")
    from mlproject.progress import route_tqdm

    with route_tqdm(prefix=f"{p.ref.label}: ", transformers=True):  # transformers' "Writing model shards" bar
        model.save_pretrained(tmp, max_shard_size=p.max_shard_size)
    loaded.tokenizer.save_pretrained(tmp)
    lin = _lineage_record(p, loaded, written, merged)
    _add_lineage(tmp, lin)
    _write_meta(tmp, p, loaded)
    out = Exported(out_dir=tmp, dtype=written, files=[], bytes=0, lineage=lin, merged_adapter=merged)
    if flavor:
        out.flavor = loading.mlflow_flavor(model, loaded.tokenizer, tmp, source=_source_model(loaded.base_model))
    del loaded, model
    return out


def _copy_packed(p: ExportPlan, tmp: Path, fetch) -> Exported:
    src = loading.local_source(p.ref, fetch)
    for item in src.iterdir():
        if item.name in _NOT_CHECKPOINT:
            continue
        dst = tmp / item.name
        if item.is_dir():
            shutil.copytree(item, dst)
        else:
            shutil.copy2(item, dst)
    meta = p.top.meta
    lin = _lineage_record(p, None, p.packed or "", False, base_model=meta.get("base_model"), family=meta.get("family"))
    lin["copied"] = f"packed {p.packed} checkpoint, as written"
    _add_lineage(tmp, lin)
    loading.write_meta(tmp, kind="full", base_model=meta.get("base_model"), family=meta.get("family"),
                       instruct=meta.get("instruct"), upstream=p.ref.raw, exported_from=p.ref.raw,
                       **({"run_id": p.top.run_id} if p.top.run_id else {}))
    return Exported(out_dir=tmp, dtype=p.packed or "", files=[], bytes=0, lineage=lin, copied=True)


def _lineage_record(p: ExportPlan, loaded, written: str, merged: bool, **override) -> dict[str, Any]:
    from mlproject import __version__
    from mlproject.reuse import code_version

    base_model = override.get("base_model") or (loaded.base_model if loaded is not None else None)
    family = override.get("family") or (loaded.family if loaded is not None else None)
    record = {
        "exported": p.ref.raw,
        "base_model": base_model,
        "family": family,
        "root": p.chain[-1].ref,
        "root_dtype": p.root_dtype,
        "dtype": written,
        "merged_adapter": merged,
        "chain": [n.record() for n in p.chain],
        "upstream_runs": list(dict.fromkeys(n.run_id for n in p.chain if n.run_id)),
        "mlproject_version": __version__,
    }
    with contextlib.suppress(Exception):  # noqa: BLE001 - provenance only
        record["code_version"] = code_version()
    return record


def _add_lineage(folder: Path, lin: dict) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[LINEAGE_KEY] = lin
    path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def _write_meta(folder: Path, p: ExportPlan, loaded) -> None:
    """mlproject_model.json, so mlproject's own loading keeps the lineage (plain weights: ``kind`` full)."""
    loading.write_meta(folder, kind="full", base_model=loaded.base_model, family=loaded.family,
                       instruct=loaded.instruct, upstream=p.ref.raw, exported_from=p.ref.raw,
                       **({"run_id": p.top.run_id} if p.top.run_id else {}))


def _source_model(base_model: str | None) -> str:
    entry = alias_table().get(base_model or "") or {}
    return entry.get("hf_id") or base_model or ""
