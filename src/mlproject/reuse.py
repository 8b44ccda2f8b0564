"""Reuse keys: when is a finished step's run the answer to a new request?

A step's key (tag ``mlproject.cache_key``) is a hash of

* the step name and its canonical parameters (the config's fields, defaults included, with
  run-location fields such as ``experiment`` left out and ``auto`` device/dtype resolved);
* the *keys* of the upstream runs it consumes: a ``runs:/<id>/…`` (or ``models:/…``)
  reference in a parameter is replaced by the key of the run behind it, so the key does
  not depend on which of two identical upstream runs produced the input, and a change
  upstream changes every key downstream;
* the content of local files named by a parameter (a dataset or PPL text edited in place
  is new work);
* the code version: the git commit of the source tree plus a hash of uncommitted changes
  under ``src/`` (or the installed package's version when there is no git checkout);
* the versions of torch, transformers, lm-eval, peft, trl and bitsandbytes.

Lookups of a key are exact tag matches among FINISHED runs (``tracking.find_reusable``),
never a subset match of parameters (the classic MLflow multistep example's
``_already_ran`` matches a subset and ignores code and upstream changes).
Nothing here talks to MLflow: the caller passes ``upstream_key`` to resolve run ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

#: Config fields that say where a run is recorded or how it is checkpointed, not what it computes.
#: ``nproc`` asks for processes; a step whose result depends on how many ran (finetune: the
#: effective batch) puts the world size of the launch in the key itself. ``strict_memory`` only
#: decides whether a run starts.
NOT_IN_KEY = frozenset({"experiment", "run_name", "tracking_uri", "resume", "output_dir", "save_steps", "keep_output",
                        "nproc", "strict_memory"})
# the libraries whose version can change a result (quantization kernels and formats included)
LIBRARIES = ("torch", "transformers", "lm_eval", "peft", "trl", "bitsandbytes", "auto_round", "hqq", "llmcompressor",
             "compressed_tensors")
KEY_LENGTH = 24

_RUN_REF = re.compile(r"runs:/([0-9a-f]{8,64})(?=/|$)")
_MODEL_REF = re.compile(r"models:/[^\s,]+")
_HASH_FILE_LIMIT = 256 * 2**20  # bigger files are fingerprinted by size and mtime


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


def code_version(root: str | Path | None = None) -> str:
    """``<commit>`` or ``<commit>+dirty.<hash>`` of the git checkout holding ``src/``;
    ``mlproject==<version>`` when the package is installed without git.

    Uncommitted changes count when they are under ``src/``: modified tracked files (their
    diff against HEAD) and untracked files (their content).
    """
    if root is None:
        return _package_code_version()
    root = Path(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD")
    if not top or not commit:
        return ""
    top_path = Path(top.strip())
    digest = hashlib.sha256()
    diff = _git(top_path, "diff", "HEAD", "--no-ext-diff", "--binary", "--", "src")
    digest.update((diff or "").encode())
    untracked = _git(top_path, "ls-files", "--others", "--exclude-standard", "-z", "--", "src") or ""
    for name in sorted(n for n in untracked.split("\0") if n):
        path = top_path / name
        digest.update(name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    dirty = bool(diff) or bool(untracked.strip("\0"))
    return commit.strip()[:12] + (f"+dirty.{digest.hexdigest()[:12]}" if dirty else "")


@functools.cache
def _package_code_version() -> str:
    import mlproject

    src = Path(mlproject.__file__).resolve().parent  # …/src/mlproject in a checkout
    if (src.parent.name == "src") and _git(src.parent.parent, "rev-parse", "HEAD"):
        version = code_version(src.parent.parent)
        if version:
            return version
    return f"mlproject=={mlproject.__version__}"


@functools.cache
def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = "none"
    return out


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    if st.st_size > _HASH_FILE_LIMIT:
        return f"size={st.st_size},mtime={st.st_mtime_ns}"
    return "sha256=" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def canonical_value(value: Any, upstream_key: Callable[[str], str | None]) -> Any:
    """A parameter value as it enters the key: run and registry references replaced by the
    key of the run behind them, local files by their path and content fingerprint."""
    if not isinstance(value, str):
        return value

    def by_key(ref: str) -> str:
        key = upstream_key(ref)
        return f"key:{key}" if key else ref

    text = _MODEL_REF.sub(lambda m: by_key(m.group(0)), value)
    text = _RUN_REF.sub(lambda m: by_key(m.group(0)), text)
    if text == value and value and len(value) < 4096 and "\n" not in value:
        path = Path(value).expanduser()
        try:
            if path.is_file():
                return {"file": str(path.resolve()), "content": file_fingerprint(path)}
        except OSError:
            pass
    return text


def canonical_params(cfg: Any, resolved: dict[str, Any] | None = None,
                     upstream_key: Callable[[str], str | None] = lambda ref: None) -> dict[str, Any]:
    """The config's fields that shape the result (``resolved`` overrides values such as
    device=auto → cpu), references and files canonicalized."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_IN_KEY}
    values.update(resolved or {})
    return {k: canonical_value(v, upstream_key) for k, v in sorted(values.items())}


def step_key(step: str, params: dict[str, Any], code: str | None = None,
             libraries: dict[str, str] | None = None) -> str:
    """The reuse key of one step invocation with canonical ``params``."""
    blob = json.dumps({
        "step": step, "params": params,
        "code": code_version() if code is None else code,
        "libraries": library_versions() if libraries is None else libraries,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]
