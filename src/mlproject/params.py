"""Config fields that document themselves: ``param()`` and the coercion every config dataclass shares.

A field declared with :func:`param` carries its help text, its accepted choices and how the CLI
and ``MLproject`` show it; :func:`coerce_fields` turns the strings ``mlflow run`` and the CLI
pass into each field's declared type. The step configs (``mlproject.config``), the evaluation
options (``mlproject.evaluation.options``) and the command configs (``mlproject.pipeline.config``,
``mlproject.search.config``) are all built from these, and the CLI, ``MLproject`` and the README
tables are generated from the fields. This module imports nothing of the package but its errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from mlproject.errors import UserError


def param(default: Any, help: str, choices: tuple | None = None, cli_only: bool = False,
          positional: bool = False, repeat: bool = False, empty: str | None = None):
    """A config field with its documentation (and the choices the CLI/validation accept).
    ``positional``: the CLI also takes it as a bare argument; ``repeat``: the CLI flag may be
    given several times (joined shell-quoted into the one string MLproject passes).
    ``empty``: the word that stands for an empty value (``none``, ``all``, ``auto``) — MLproject
    declares it as the default, because ``mlflow run`` logs an empty default as a literal ``''``."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli_only": cli_only,
                                            "positional": positional, "repeat": repeat, "empty": empty})


def shown_default(f: dataclasses.Field) -> Any:
    """The default as MLproject, the README and --help show it (the ``empty`` word for "")."""
    return f.metadata.get("empty") or f.default if f.default == "" else f.default


def shown_value(cfg: Any, name: str) -> Any:
    """A field's value as logged: an empty value as its ``empty`` word (what ``mlflow run`` logs)."""
    value = getattr(cfg, name)
    if value == "":
        f = next(f for f in dataclasses.fields(cfg) if f.name == name)
        return f.metadata.get("empty") or ""
    return value


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise UserError(f"{name} {value!r} is not a boolean (true/false)")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{name} {value!r} is not one of: {', '.join(map(str, choices))}")


def coerce_fields(cfg) -> None:
    """Coerce strings from MLproject/CLI into each field's declared type, naming bad values."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        try:
            if kind == "bool":
                value = parse_bool(f.name, value)
            elif kind == "int" and not isinstance(value, int):
                value = int(str(value).strip())
            elif kind == "float" and not isinstance(value, float):
                value = float(str(value).strip())
        except ValueError:
            raise UserError(f"{f.name} {value!r} is not a valid {kind}") from None
        empty = f.metadata.get("empty")
        if empty and isinstance(value, str) and value.strip().lower() == empty:
            value = ""
        setattr(cfg, f.name, value)
        choices = f.metadata.get("choices")
        if choices:
            check_choice(f.name, value, choices)
