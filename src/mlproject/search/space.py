"""Search spaces: a pipeline to run per trial, distributions over its steps' parameters, the
objectives, sampler, pruner and evaluation levels — read and checked before any trial runs.

A space is a YAML file (see ``pipelines/spaces/``)::

    name: demo                          # the study is <name>-<model> unless --study names it
    description: what it searches
    pipeline: pipelines/demo.yaml       # run per trial (a path or a name in pipelines/)
    set: {tasks: offline, limit: 100}   # pipeline overrides for every trial (key: value or "k=v" list)
    target: quantized                   # the step whose model each trial scores (default: the last
                                        # model-producing step); a trial runs it and what it depends on
    params:                             # <step>.<parameter>: a distribution
      pruned.ratio: {float: [0.1, 0.4], step: 0.05}
      pruned.importance: [activation, magnitude]      # a list = categorical
      quantized.w_bits: {int: [3, 8]}
      recovered.lr: {log_float: [1.0e-5, 1.0e-3]}
    objectives: [best_acc]              # best_acc: maximize avg_acc; best_ppl: minimize ppl/<dataset>;
                                        # both: a Pareto study
    n_trials: 12
    sampler: {type: tpe, seed: 0}       # tpe, random, nsgaii, nsgaiii, gp, qmc, bruteforce (+ their arguments)
    pruner: {type: wilcoxon, p_threshold: 0.1}   # none, wilcoxon, successive_halving, hyperband,
                                        # median, percentile, threshold (+ their arguments)
    fidelity: {levels: [0.1, 0.3, 1.0], seed: 0} # nested random document subsets (search.fidelity)

A trial runs each step without its own evaluation (the search scores the target) and a
finetune step without optimizer checkpoints (``save_steps=0``, unless the pipeline, ``set:`` or
the searched parameters give ``save_steps``).

Refused with one line (``UserError``) before any trial or run: unknown keys, unknown steps or
parameters (with a suggestion), malformed or empty ranges, a value a step would refuse (each
choice and each range end is put through the pipeline runner's ``plan()``: the steps' configs
and their own pre-run checks), objectives the target's evaluation cannot measure, a pruner in a
Pareto study (Optuna's ``Trial.report`` is single-objective), unknown sampler or pruner arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject.errors import UserError
from mlproject.pipeline import spec as pspec
from mlproject.search.config import OBJECTIVES, PRUNERS, SAMPLERS

TOP_LEVEL = ("name", "description", "pipeline", "set", "target", "params", "objectives", "n_trials",
             "sampler", "pruner", "fidelity")
KINDS = ("categorical", "int", "float", "log_float")
#: Parameters that turn a step's own evaluation off: the search scores the target itself.
EVAL_SWITCHES = ("evaluate", "eval_before", "eval_after")
#: The checkpoint interval a trial's steps run with 0 unless it is given (finetune's save_steps).
NO_CHECKPOINTS = "save_steps"
DEFAULT_LEVELS = [0.1, 0.3, 1.0]
MAX_CHECKED_COMBINATIONS = 32
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Param:
    """One searched parameter: ``<step>.<field>`` and its distribution."""

    name: str
    step: str
    field: str
    kind: str  # categorical / int / float / log_float
    choices: list[Any] = field(default_factory=list)
    low: float | int | None = None
    high: float | int | None = None
    step_size: float | int | None = None

    @property
    def log(self) -> bool:
        return self.kind == "log_float"

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), step=int(self.step_size or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=None if self.step_size is None else float(self.step_size))

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step_size or 1))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log,
                                   step=None if self.step_size is None else float(self.step_size))

    def check_values(self) -> list[Any]:
        """The values put through the steps' checks: every choice, or both range ends."""
        if self.kind == "categorical":
            return list(self.choices)
        dist = self.distribution()  # optuna moves `high` onto the step grid
        return [dist.low, dist.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(str, self.choices)) + "}"
        text = f"{self.kind} [{self.low:g}, {self.high:g}]"
        return text + (f" step {self.step_size:g}" if self.step_size is not None else "")


@dataclass
class Objective:
    name: str  # best_acc / best_ppl
    direction: str  # maximize / minimize
    metric: str  # avg_acc / ppl/<dataset>


@dataclass
class Space:
    path: str
    name: str
    description: str
    pipeline: str
    overrides: list[str]
    target: str
    params: dict[str, Param]
    objectives: list[Objective]
    n_trials: int
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    levels: list[float]
    fidelity_seed: int
    raw: dict[str, Any]
    pipe: pspec.Pipeline  # the pipeline with the space's overrides (no trial values)
    steps: list[str] = field(default_factory=list)  # what a trial runs: the target and its upstream steps
    objectives_changed: bool = False  # --objectives differ from the file's

    # -- derived ---------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def pareto(self) -> bool:
        return len(self.objectives) > 1

    @property
    def pruning(self) -> bool:
        return self.pruner.get("type", "none") != "none"

    @property
    def fractions(self) -> list[float]:
        """Levels actually used: without a pruner one pass scores every document."""
        return self.levels if self.pruning else [1.0]

    @property
    def model(self) -> str:
        """The model at the root of the target's chain (``${pruned.model_uri}`` followed up)."""
        name = self.target
        for _ in range(len(self.pipe.steps)):
            value = str(self.pipe.values(name).get("model") or self.pipe.params.get("model") or "")
            ref = re.fullmatch(r"\$\{([A-Za-z_][\w-]*)\.model_uri\}", value.strip())
            if not ref or ref.group(1) not in self.pipe.steps:
                return value
            name = ref.group(1)
        return ""

    def fingerprint(self) -> str:
        """What a study must keep across resumes: distributions and objectives."""
        blob = json.dumps({"params": {n: dataclasses.asdict(p) for n, p in sorted(self.params.items())},
                           "objectives": [dataclasses.asdict(o) for o in self.objectives]},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def trial_overrides(self, values: dict[str, Any]) -> list[str]:
        out = list(self.overrides)
        out += [f"{self.params[name].step}.{self.params[name].field}={_text(v)}" for name, v in values.items()]
        # every step of a trial runs without its own evaluation: the search scores the target
        for name in self.steps:
            fields = pspec.field_names(self.pipe.steps[name].info)
            out += [f"{name}.{f}=false" for f in EVAL_SWITCHES if f in fields]
            # and writes no optimizer checkpoints (a trial is never resumed; at 7B each one is
            # tens of GB), unless the pipeline, the space's `set:` / --set or the search gives it
            searched = {p.field for p in self.params.values() if p.step == name}
            if NO_CHECKPOINTS in fields and NO_CHECKPOINTS not in self.pipe.values(name) \
                    and NO_CHECKPOINTS not in searched:
                out.append(f"{name}.{NO_CHECKPOINTS}=0")
        return out

    def trial_pipeline(self, values: dict[str, Any]) -> pspec.Pipeline:
        """The pipeline a trial runs: the file with the space's and the trial's values, cut down to
        the target and the steps it depends on."""
        full = pspec.load(self.pipeline, self.trial_overrides(values))
        return subset(full, self.steps)

    def sampler_object(self):
        return _build("sampler", self.sampler, SAMPLERS, "optuna.samplers")

    def pruner_object(self):
        spec = dict(self.pruner)
        kind = spec.get("type", "none")
        percents = [round(f * 100) for f in self.levels]
        # Aggregate pruners see one report per level at step = percent of the documents scored,
        # so their rungs fall on the levels (e.g. 10, 30, 100 with successive halving's factor 3).
        if kind == "successive_halving":
            spec.setdefault("min_resource", percents[0])
        if kind == "hyperband":
            spec.setdefault("min_resource", percents[0])
            spec.setdefault("max_resource", 100)
        return _build("pruner", spec, PRUNERS, "optuna.pruners")

    def table(self) -> str:
        from mlproject.report import md_table

        rows = [(n, p.describe()) for n, p in self.params.items()]
        return md_table(["parameter", "distribution"], rows)


# ----------------------------------------------------------------------------- helpers
def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(kind: str, spec: dict[str, Any], table: dict[str, str], module: str):
    import importlib

    spec = dict(spec)
    name = str(spec.pop("type", "none" if kind == "pruner" else "tpe"))
    if name not in table:
        raise UserError(f"{kind} {name!r} is not one of: {', '.join(table)}")
    cls = getattr(importlib.import_module(module), table[name])
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of Wilcoxon / GP
            return cls(**spec)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{kind} {name}: {exc}") from None


def subset(pipe: pspec.Pipeline, keep: list[str]) -> pspec.Pipeline:
    """The same pipeline with only ``keep`` (in file order); references stay valid because
    ``keep`` is closed under dependencies."""
    out = copy.copy(pipe)
    out.steps = {n: s for n, s in pipe.steps.items() if n in keep}
    return out


def upstream(pipe: pspec.Pipeline, name: str) -> list[str]:
    """``name`` and every step it depends on, directly or not, in pipeline order."""
    need, todo = {name}, [name]
    while todo:
        for dep in pipe.dependencies(todo.pop()):
            if dep not in need:
                need.add(dep)
                todo.append(dep)
    return [n for n in pipe.order() if n in need]


def model_label(model: str) -> str:
    from mlproject.models.reference import resolve

    try:
        label = resolve(model).label
    except UserError:
        label = model
    label = label.rstrip("/").split("/")[-1] if "://" not in label else label
    return _NAME.sub("-", label).strip("-") or "model"


def study_name(space: Space) -> str:
    """``<space name>-<model>``, plus the objectives when --objectives changed the file's."""
    suffix = "-" + "-".join(o.name for o in space.objectives) if space.objectives_changed else ""
    return _NAME.sub("-", f"{space.name}-{model_label(space.model)}{suffix}").strip("-")


# ----------------------------------------------------------------------------- parsing
def resolve_path(path: str) -> Path:
    """A path, or a bare name looked up as ``pipelines/spaces/<name>.yaml``."""
    return pspec.resolve_path(path, folder="pipelines/spaces", kind="space")


def load(path: str, overrides: str | list[str] = "", model: str = "", n_trials: int = 0, seed: int | None = None,
         pruner: str = "", objectives: str = "") -> Space:
    """Read and check a space file's structure (values are checked by :func:`check`)."""
    p = resolve_path(path)
    return parse(pspec.read_yaml(p, "space"), str(p), overrides, model=model, n_trials=n_trials, seed=seed, pruner=pruner,
                 objectives=objectives)


def parse(raw: Any, path: str = "<space>", overrides: str | list[str] = "", *, model: str = "", n_trials: int = 0,
          seed: int | None = None, pruner: str = "", objectives: str = "") -> Space:
    where = f"space {path}"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with {', '.join(TOP_LEVEL)}")
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), TOP_LEVEL)}; "
                        f"known: {', '.join(TOP_LEVEL)}")
    if not raw.get("pipeline"):
        raise UserError(f"{where}: 'pipeline' names the pipeline a trial runs, e.g. pipelines/demo.yaml")
    pipeline = _pipeline_path(str(raw["pipeline"]), path)
    sets = raw.get("set") or []
    if isinstance(sets, dict):
        sets = [f"{k}={_text(v)}" for k, v in sets.items()]
    elif isinstance(sets, str):
        sets = pspec.split_overrides(sets)
    elif not isinstance(sets, list):
        raise UserError(f"{where}: 'set' is a mapping of key: value (or a list of key=value)")
    all_sets = [str(s) for s in sets] + ([f"model={model}"] if model else []) + pspec.split_overrides(overrides)
    try:
        pipe = pspec.load(pipeline, all_sets)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None

    producers = [n for n in pipe.order() if pipe.steps[n].info.produces_model]
    target = str(raw.get("target") or (producers[-1] if producers else ""))
    if target not in pipe.steps:
        raise UserError(f"{where}: target {target!r} is not a step of {pipe.path}{_suggest(target, pipe.steps)}; "
                        f"steps: {', '.join(pipe.steps)}")
    if not pipe.steps[target].info.produces_model:
        raise UserError(f"{where}: target {target!r} ({pipe.steps[target].step}) produces no model; "
                        f"a trial scores a model: {', '.join(producers) or 'the pipeline has no such step'}")
    steps = upstream(pipe, target)

    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise UserError(f"{where}: 'params' must map <step>.<parameter> to a distribution")
    params = {str(name): _param(str(name), spec, pipe, steps, where) for name, spec in params_raw.items()}

    objectives_raw = objectives or raw.get("objectives") or ["best_acc"]
    if isinstance(objectives_raw, str):
        objectives_raw = [x.strip() for x in objectives_raw.split(",") if x.strip()]
    if not isinstance(objectives_raw, list):
        raise UserError(f"{where}: objectives is a list: [best_acc], [best_ppl] or [best_acc, best_ppl]")
    chosen = []
    for name in objectives_raw:
        if name not in OBJECTIVES:
            raise UserError(f"{where}: objective {name!r} is not one of: {', '.join(OBJECTIVES)}")
        if name in [o.name for o in chosen]:
            raise UserError(f"{where}: objective {name!r} is listed twice")
        # best_ppl's metric names the target's PPL dataset: set by check()
        chosen.append(Objective(name=name, direction=OBJECTIVES[name],
                                metric="avg_acc" if name == "best_acc" else "ppl"))
    in_file = raw.get("objectives") or ["best_acc"]
    in_file = [x.strip() for x in in_file.split(",")] if isinstance(in_file, str) else list(in_file)
    objectives_changed = bool(objectives) and [o.name for o in chosen] != in_file
    objectives = chosen

    try:
        n = int(n_trials or raw.get("n_trials") or 20)
    except (TypeError, ValueError):
        raise UserError(f"{where}: n_trials {raw.get('n_trials')!r} is not an integer") from None
    if n < 1:
        raise UserError(f"{where}: n_trials {n} must be at least 1")

    sampler = _mapping(raw.get("sampler") or {"type": "tpe"}, "sampler", where)
    sampler.setdefault("type", "tpe")
    if seed is not None and seed >= 0:
        sampler["seed"] = seed
    pareto = len(objectives) > 1
    # the file's pruner is for its own objectives; other objectives get the default for their count
    default_pruner = {"type": "none" if pareto else "wilcoxon"}
    pruner_spec = _mapping((None if objectives_changed else raw.get("pruner")) or default_pruner, "pruner", where)
    pruner_spec.setdefault("type", "none")
    if pruner:
        pruner_spec = {"type": pruner}
    if pareto and pruner_spec["type"] != "none":
        raise UserError(f"{where}: pruner {pruner_spec['type']!r} with {len(objectives)} objectives: Optuna's pruners "
                        "are single-objective (Trial.report raises in multi-objective studies); use pruner none "
                        "(--pruner none) or one objective")

    fid = _mapping(raw.get("fidelity") or {}, "fidelity", where)
    bad = [k for k in fid if k not in ("levels", "seed")]
    if bad:
        raise UserError(f"{where}: fidelity has no key {bad[0]!r}; known: levels, seed")
    from mlproject.search.fidelity import check_fractions

    try:
        levels = check_fractions(fid.get("levels", DEFAULT_LEVELS))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    try:
        fseed = int(fid.get("seed", 0))
    except (TypeError, ValueError):
        raise UserError(f"{where}: fidelity seed {fid.get('seed')!r} is not an integer") from None

    space = Space(path=path, name=str(raw.get("name") or Path(path).stem), description=str(raw.get("description") or ""),
                  pipeline=pipeline, overrides=all_sets, target=target, params=params, objectives=objectives,
                  objectives_changed=objectives_changed,
                  n_trials=n, sampler=sampler, pruner=pruner_spec, levels=levels, fidelity_seed=fseed, raw=raw,
                  pipe=pipe, steps=steps)
    space.sampler_object()  # bad sampler / pruner arguments fail here
    space.pruner_object()
    return space


def _pipeline_path(pipeline: str, space_path: str) -> str:
    """As written (from the working directory), else next to the space file or up to two
    folders above it (``pipelines/spaces/x.yaml`` names ``pipelines/demo.yaml`` from the repo root)."""
    if Path(pipeline).expanduser().is_file() or "/" not in pipeline and not pipeline.endswith(".yaml"):
        return pipeline
    here = Path(space_path).resolve().parent
    for base in (here, here.parent, here.parent.parent):
        if (base / pipeline).is_file():
            return str(base / pipeline)
    return pipeline


def _mapping(value: Any, what: str, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"type": value}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {what} is a mapping such as {{type: …, seed: 0}}")
    return dict(value)


def _param(name: str, spec: Any, pipe: pspec.Pipeline, steps: list[str], where: str) -> Param:
    step, dot, fname = name.partition(".")
    if not dot or not step or not fname:
        raise UserError(f"{where}: parameter {name!r}: write <step>.<parameter>, e.g. pruned.ratio")
    if step not in pipe.steps:
        raise UserError(f"{where}: parameter {name!r}: the pipeline has no step {step!r}{_suggest(step, pipe.steps)}; "
                        f"steps: {', '.join(pipe.steps)}")
    if step not in steps:
        raise UserError(f"{where}: parameter {name!r}: step {step!r} does not feed the target; a trial runs "
                        f"{', '.join(steps)}")
    fields = pspec.field_names(pipe.steps[step].info)
    if fname not in fields or fname in pspec.PER_PIPELINE or fname == "run_name":
        raise UserError(f"{where}: parameter {name!r}: step {step!r} ({pipe.steps[step].step}) has no parameter "
                        f"{fname!r}{_suggest(fname, fields)}")
    if fname in EVAL_SWITCHES:
        raise UserError(f"{where}: parameter {name!r}: the search scores the target itself; steps run with "
                        f"{fname}=false")
    if isinstance(spec, list):
        spec = {"categorical": spec}
    if not isinstance(spec, dict):
        raise UserError(f"{where}: parameter {name!r}: give a list of choices or one of "
                        f"{{categorical: […]}}, {{int: [low, high]}}, {{float: [low, high]}}, {{log_float: [low, high]}}")
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in KINDS and k not in ("step",)]
    if len(kinds) != 1 or extra:
        odd = extra[0] if extra else ", ".join(kinds) or "nothing"
        raise UserError(f"{where}: parameter {name!r}: expected one of {', '.join(KINDS)} (and an optional step), "
                        f"got {odd!r}")
    kind = kinds[0]
    body = spec[kind]
    p = Param(name=name, step=step, field=fname, kind=kind)
    if kind == "categorical":
        if not isinstance(body, list) or not body:
            raise UserError(f"{where}: parameter {name!r}: categorical choices must be a non-empty list")
        if any(not (v is None or isinstance(v, (bool, int, float, str))) for v in body):
            raise UserError(f"{where}: parameter {name!r}: choices must be plain values (numbers, strings, booleans)")
        if len({json.dumps(v) for v in body}) != len(body):
            raise UserError(f"{where}: parameter {name!r}: a choice is listed twice")
        if "step" in spec:
            raise UserError(f"{where}: parameter {name!r}: 'step' applies to int and float ranges")
        p.choices = list(body)
        return p
    if not isinstance(body, list) or len(body) != 2:
        raise UserError(f"{where}: parameter {name!r}: {kind} takes [low, high]")
    low, high = body
    numbers = (int,) if kind == "int" else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, numbers) for v in (low, high)):
        raise UserError(f"{where}: parameter {name!r}: {kind} bounds must be {'integers' if kind == 'int' else 'numbers'}, "
                        f"got {body!r}")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"{where}: parameter {name!r}: empty range [{low}, {high}] (low must be below high; "
                        "for one value use set:)")
    if kind == "log_float" and low <= 0:
        raise UserError(f"{where}: parameter {name!r}: log_float needs low > 0, got {low}")
    if "step" in spec:
        step_size = spec["step"]
        if kind == "log_float":
            raise UserError(f"{where}: parameter {name!r}: log_float takes no step")
        if isinstance(step_size, bool) or not isinstance(step_size, numbers) or step_size <= 0:
            raise UserError(f"{where}: parameter {name!r}: step must be a positive {'integer' if kind == 'int' else 'number'}")
        if step_size > high - low:
            raise UserError(f"{where}: parameter {name!r}: step {step_size} is wider than the range [{low}, {high}]")
        p.step_size = step_size
    p.low, p.high = low, high
    return p


# ----------------------------------------------------------------------------- checking
def assignments(space: Space) -> list[dict[str, Any]]:
    """Values to check: every combination of the check values when there are few, else each
    value once with the other parameters at their first value."""
    values = {n: p.check_values() for n, p in space.params.items()}
    total = math.prod(len(v) for v in values.values())
    if total <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    first = {n: v[0] for n, v in values.items()}
    out = [dict(first)]
    for n, vs in values.items():
        out += [{**first, n: v} for v in vs[1:]]
    return out


def _check_scoring(the_plan, eval_plan) -> None:
    """The target's scoring data can be had, and its generation tasks fit the lineage's root model
    (pruning and fine-tuning keep the context length)."""
    from mlproject.models.reference import resolve
    from mlproject.steps.shared import checks

    checks.check_data_sources({"ppl_dataset": eval_plan.opts.ppl_dataset})
    root = the_plan.steps[the_plan.order[0]].cfg
    if getattr(root, "model", ""):
        checks.check_eval_fits(resolve(root.model), eval_plan)


def check(space: Space, experiment: str):
    """Put the space's values through the steps' configs and checks (the pipeline runner's
    ``plan()``); check the objectives against the target's evaluation and that every task can be
    scored on document subsets. Returns (the first assignment's plan, the target's evaluation
    plan, the task documents). Runs nothing."""
    from mlproject.evaluation.engine import plan_eval
    from mlproject.pipeline import runner
    from mlproject.search.fidelity import task_documents

    first = None
    for values in assignments(space):
        try:
            pipe = space.trial_pipeline(values)
            the_plan = runner.plan(pipe, experiment)
        except UserError as exc:
            shown = ", ".join(f"{k}={_text(v)}" for k, v in values.items())
            raise UserError(f"space {space.path}: {shown}: {exc}") from None
        first = first or the_plan
    cfg = first.steps[space.target].cfg
    eval_plan = plan_eval(cfg)
    for obj in space.objectives:
        if obj.name == "best_acc" and not eval_plan.tasks:
            raise UserError(f"space {space.path}: objective best_acc needs tasks on the target {space.target!r} "
                            "(tasks is none)")
        if obj.name == "best_ppl":
            if not eval_plan.ppl_name:
                raise UserError(f"space {space.path}: objective best_ppl needs a ppl_dataset on the target "
                                f"{space.target!r} (ppl_dataset is none)")
            obj.metric = f"ppl/{eval_plan.ppl_name}"
    if eval_plan.empty:
        raise UserError(f"space {space.path}: the target {space.target!r} measures nothing (tasks and ppl_dataset "
                        "are none)")
    # The trial scores the target itself (its steps run with their own evaluation off), so the
    # data it scores on and the context its generation tasks need are checked here, as the steps'
    # own checks do: a refusal now, not one failed trial after another.
    try:
        _check_scoring(first, eval_plan)
    except UserError as exc:
        raise UserError(f"space {space.path}: target {space.target!r}: {exc}") from None
    try:
        docs = task_documents(eval_plan.tasks, eval_plan.limit)
    except UserError as exc:
        raise UserError(f"space {space.path}: {exc}") from None
    return first, eval_plan, docs
