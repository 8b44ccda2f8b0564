"""The step contract (:class:`StepModule`, :class:`StepResult`) and the step registry.

Every step is a module that implements :class:`StepModule`: ``check(cfg, parent=None,
pending=…)`` and ``run(cfg, parent=None) -> StepResult`` (and ``reuse_key`` where its reuse key
depends on more than the config). ``cfg`` is the step's config dataclass (``mlproject.config``),
``parent`` an open :class:`mlproject.tracking.Run` under which the step's run becomes a child
(pipelines, search trials), else the step opens (or, under ``mlflow run``, attaches to) a
top-level run. Steps never parse argv; the CLI, the MLproject file, pipelines and the search
all go through this registry, so a step added here is reachable from all of them. What steps
share lives in ``mlproject.steps.shared``; no step module imports another.

Entries are ``"module:object"`` strings resolved lazily (as lm-eval's registry does), so
listing steps or building ``mlproject --help`` imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlproject.errors import UserError


@dataclass
class StepResult:
    """What every step returns (and what a pipeline hands to the steps after it).

    step: the registry name (``evaluate``, ``prune`` …).
    run_id: the run that holds the results. For a reused step, the original run (whose
        metrics and artifacts are the results); ``reused_from`` is then set too, and
        ``record_run_id`` is the child run that records the reuse.
    status: the MLflow status of that run (``FINISHED`` for any result returned).
    metrics: as logged on the run (latest value per key).
    model_uri: ``runs:/<run_id>/model`` when the step produced a model, or the model it
        evaluated; None for steps without one (compare).
    key: the step's reuse key (tag ``mlproject.cache_key``), None where the step has none.
    details: step-specific values (finetune: ``global_step``, ``final_loss``,
        ``output_dir``; compare: ``files``, ``stats``, and ``markdown``, a report a
        pipeline's own report.md ends with).
    text: what the CLI prints instead of the metric list (compare's Markdown), if anything.
    model: the model object still in memory, for in-process callers (finetune), else None.
    loaded: the output model still in memory exactly as ``model_uri`` would load it (a
        ``models.loading.LoadedModel``), for a pipeline to hand to its next step or a search to
        score without reading the store; None where the step has no such model.
    """

    step: str
    run_id: str
    status: str = "FINISHED"
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    key: str | None = None
    reused_from: str | None = None
    record_run_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    model: Any = field(default=None, repr=False)
    loaded: Any = field(default=None, repr=False)

    @property
    def avg_acc(self) -> float | None:
        return self.metrics.get("avg_acc")

    @property
    def ppl(self) -> dict[str, float]:
        """``{dataset: ppl}`` from the ``ppl/<dataset>`` metrics."""
        return {k[len("ppl/"):]: v for k, v in self.metrics.items() if k.startswith("ppl/")}

    @property
    def reused(self) -> bool:
        return self.reused_from is not None


class StepModule(Protocol):
    """What a step module (``StepInfo.module``) provides; pipelines, the search and the CLI call
    nothing else of it. (The commands in :data:`COMMANDS` implement ``run`` only.)

    Optional: ``reuse_key(cfg, upstream_key=None) -> str``, the reuse key when the result depends
    on more than the config (finetune: the launch's world size); without it the key is
    ``shared.runs.step_key(name, cfg, upstream_key=…)`` (see :meth:`StepInfo.key`).
    """

    def check(self, cfg: Any, parent: Any = None, pending: frozenset[str] = frozenset()) -> Any:
        """Every cheap check, before a run opens or weights load; raises UserError naming a bad
        value. ``parent``: the run the step will be a child of (the server was checked by whoever
        opened it). ``pending``: run ids that do not exist yet, a pipeline's later steps checked
        up front (a ``runs:/<pending id>/model`` reference is not looked up). What it returns
        is the step's own business (``run`` calls it again)."""

    def run(self, cfg: Any, parent: Any = None) -> StepResult:
        """Check, then do the work as one MLflow run (a child of ``parent`` when given), and
        return its result. A failure leaves the run FAILED with the error as a tag."""


@dataclass(frozen=True)
class StepInfo:
    """One registry entry: the config class and the module whose ``run`` executes it."""

    name: str
    config: str  # "module:Class"
    module: str  # a StepModule (commands: a module with run(cfg, parent=None) -> StepResult)
    summary: str
    produces_model: bool = False  # the run logs a `model` artifact the next step can take
    entry_point: str | None = None  # MLproject entry point name when it differs from `name`
    # A finished run with the same reuse key stands for a new one (pipelines reuse it); false
    # for steps whose result depends on more than their inputs (compare reads the server's runs now).
    reusable: bool = True

    def config_class(self) -> type:
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def load(self) -> StepModule:
        return importlib.import_module(self.module)

    def names_model(self) -> bool:
        """The step's result names a model (``StepResult.model_uri``, a pipeline's
        ``${<step>.model_uri}``): the one the run logged (``produces_model``), or the one its
        config names and the step measured (evaluate's ``model``). False for compare."""
        return self.produces_model or any(f.name == "model" for f in dataclasses.fields(self.config_class()))

    def run(self, cfg: Any, parent: Any = None) -> StepResult:
        return self.load().run(cfg, parent=parent)

    def key(self, cfg: Any, upstream_key: Any = None) -> str:
        """The reuse key the step's run will record (tag ``mlproject.cache_key``): the module's
        ``reuse_key(cfg, upstream_key=…)`` where the result depends on more than the config
        (finetune: the launch's world size), else ``shared.runs.step_key``. Pipelines plan with
        it, so a planned key is the one the run records."""
        module = self.load()
        if hasattr(module, "reuse_key"):
            return module.reuse_key(cfg, upstream_key=upstream_key)
        from mlproject.steps.shared import runs

        return runs.step_key(self.name, cfg, upstream_key=upstream_key)


#: Steps a pipeline can chain (and the CLI's step subcommands), in the order shown by --help.
STEPS: dict[str, StepInfo] = {s.name: s for s in (
    StepInfo("evaluate", "mlproject.config:EvaluateConfig", "mlproject.steps.evaluate",
             "perplexity + lm-eval tasks of one model"),
    StepInfo("finetune", "mlproject.config:FinetuneStepConfig", "mlproject.steps.finetune",
             "SFT / DPO with LoRA, QLoRA or full fine-tuning (trl), evaluated before/after",
             produces_model=True),
    StepInfo("quantize", "mlproject.config:QuantizeConfig", "mlproject.steps.quantize",
             "weight quantization (RTN, bitsandbytes, GPTQ/AWQ, AutoRound, HQQ) + evaluation",
             produces_model=True),
    StepInfo("prune", "mlproject.config:PruneStepConfig", "mlproject.steps.prune",
             "structured pruning to a fraction of parameters + evaluation", produces_model=True),
    StepInfo("compare", "mlproject.config:CompareConfig", "mlproject.steps.compare",
             "delta tables, rankings and plots from runs on the tracking server", reusable=False),
)}

#: Commands that compose steps: the CLI subcommand name → its entry (MLproject `main` for `run`).
COMMANDS: dict[str, StepInfo] = {s.name: s for s in (
    StepInfo("run", "mlproject.pipeline.config:PipelineConfig", "mlproject.pipeline.runner",
             "a pipeline: chained steps from a YAML file, finished steps reused", entry_point="main"),
    StepInfo("search", "mlproject.search.config:SearchConfig", "mlproject.search.study",
             "an Optuna search whose trials are pipeline runs; winners registered as <study>@best_acc / @best_ppl"),
)}


def get(name: str) -> StepInfo:
    """The registry entry for ``name``; an unknown name lists the known ones."""
    try:
        return STEPS[name]
    except KeyError:
        raise UserError(f"unknown step {name!r}; known steps: {', '.join(STEPS)}") from None


def entry(name: str) -> StepInfo:
    """A step or a command (CLI subcommands)."""
    return STEPS.get(name) or COMMANDS.get(name) or get(name)
