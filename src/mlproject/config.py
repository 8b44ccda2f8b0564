"""Step configurations: dataclasses whose fields are the entry points' parameters.

Each field is documented once, in its metadata ``help``; the CLI builds its flags from these
fields and a test checks that ``MLproject`` declares the same parameters with the same
defaults. Validation that needs no heavy import happens in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlproject.errors import UserError


def param(default: Any, help: str, choices: tuple | None = None, cli_only: bool = False):
    """A config field with its documentation (and the choices the CLI/validation accept)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli_only": cli_only})


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
        setattr(cfg, f.name, value)
        choices = f.metadata.get("choices")
        if choices:
            check_choice(f.name, value, choices)


@dataclass
class RunOptions:
    """Where a run is recorded (CLI only; under `mlflow run`, MLflow decides)."""

    experiment: str = param("", "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'mlproject')", cli_only=True)
    run_name: str = param("", "run name (default: '<step>:<model>')", cli_only=True)
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store ./mlflow.db)", cli_only=True)


@dataclass
class EvalOptions:
    """How a model is evaluated; shared by every step that evaluates its result."""

    tasks: str = param("offline", "comma list of lm-eval tasks/groups and suites (zeroshot7, quant7, offline); 'none' to skip")
    limit: str = param("", "documents per task: a count (50) or a fraction (0.2); empty = all")
    num_fewshot: int = param(-1, "few-shot examples per task; -1 = each task's default")
    batch_size: str = param("16", "lm-eval batch size (an integer or 'auto')")
    ppl_dataset: str = param("offline", "perplexity text: offline, wikitext2, a .txt path, or none")
    seqlen: int = param(2048, "perplexity window length in tokens (capped by the model's context)")
    ppl_batch_size: int = param(1, "windows per forward pass when computing perplexity")
    seed: int = param(42, "random seed (lm-eval sampling, few-shot order, torch)")

    def __post_init__(self):
        coerce_fields(self)
        from mlproject.evaluation.harness import parse_batch_size, parse_limit

        parse_limit(self.limit)
        parse_batch_size(self.batch_size)
        if self.seqlen < 2:
            raise UserError(f"seqlen {self.seqlen} must be at least 2")
        if self.ppl_batch_size < 1:
            raise UserError(f"ppl_batch_size {self.ppl_batch_size} must be at least 1")
        if self.num_fewshot < -1:
            raise UserError(f"num_fewshot {self.num_fewshot} must be -1 (task default) or >= 0")


@dataclass
class ModelOptions:
    """Which model, and how it is placed."""

    model: str = param("smollm2", "model: alias, Hugging Face id, local dir, runs:/<id>/<path> or models:/<name>@<alias>")
    adapter: str = param("", "optional PEFT adapter on top of the model (dir, hub id or runs:/ URI)")
    dtype: str = param("auto", "weights dtype (auto = bfloat16 on CUDA, float32 on CPU)",
                       choices=("auto", "float32", "bfloat16", "float16"))
    device: str = param("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class EvaluateConfig(EvalOptions, ModelOptions, RunOptions):
    """`evaluate`: perplexity + lm-eval tasks of one model, recorded as one MLflow run."""

    role: str = param("", "role tag for compare (default: 'base' for a model not produced by a run, else 'eval')")

    def __post_init__(self):
        EvalOptions.__post_init__(self)
