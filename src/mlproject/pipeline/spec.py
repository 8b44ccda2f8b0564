"""Pipeline files: parse, override, check and order — before anything runs.

A pipeline is a YAML file (see ``pipelines/``)::

    name: demo                       # the parent run is named pipeline:<name>
    description: what it reproduces
    experiment: demo                 # default experiment (--experiment / mlflow run override it)
    params:                          # pipeline-wide values: every step that has the parameter
      model: smollm2                 # gets it (--set model=qwen changes it)
      limit: 100
    steps:                           # run in this order, unless a reference says otherwise
      base:    {step: evaluate, role: base}
      pruned:  {step: prune, ratio: 0.2}                       # model from params
      tuned:   {step: finetune, model: "${pruned.model_uri}"}  # an earlier step's output
      compare: {step: compare, runs: "${base.run_id},${tuned.run_id}", view: summary}

A step's values are its config fields (``mlproject <step> --help``). ``${<step>.model_uri}``
is the model a step produced (``runs:/<id>/model``) or evaluated; ``${<step>.run_id}`` the run
holding its results. ``after: [a, b]`` orders a step after others without using their output.
Overrides: ``key=value`` sets a pipeline-wide value (it must be a parameter of some step),
``<step>.key=value`` one step's value; a step's own value beats a pipeline-wide one.

Refused with one line (``UserError``), before any run exists: unknown top-level keys, unknown
steps, unknown parameters (with a suggestion), references to unknown steps or fields, cycles,
a pipeline-wide value whose name means different things in two of the steps (``method`` is
quantize's method in one and finetune's in the other: set it per step), and the run-location
options (``experiment``, ``tracking_uri``) inside a step — they are set once, for the pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject.errors import UserError
from mlproject.steps import STEPS, StepInfo, get

TOP_LEVEL = ("name", "description", "experiment", "params", "steps")
RESERVED = ("step", "after")
PER_PIPELINE = ("experiment", "tracking_uri")  # set once for the whole pipeline
REF_FIELDS = ("model_uri", "run_id")
_NAME = re.compile(r"^[A-Za-z_][\w-]*$")
_REF = re.compile(r"\$\{([^}]*)\}")
_REF_BODY = re.compile(r"^([A-Za-z_][\w-]*)\.([A-Za-z_]\w*)$")


@dataclass
class PipelineStep:
    name: str
    info: StepInfo
    values: dict[str, Any]  # the step's own values, as written (references unresolved)
    after: list[str] = field(default_factory=list)

    @property
    def step(self) -> str:
        return self.info.name


@dataclass
class Pipeline:
    name: str
    path: str
    description: str = ""
    experiment: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, PipelineStep] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    # -- structure ------------------------------------------------------------------
    def references(self, name: str) -> list[tuple[str, str]]:
        """(step, field) pairs the step's values (own and pipeline-wide) refer to."""
        refs = []
        for value in self.values(name).values():
            refs += [_parse_ref(body, self, name) for body in _REF.findall(value if isinstance(value, str) else "")]
        return refs

    def dependencies(self, name: str) -> list[str]:
        deps = [step for step, _ in self.references(name)] + self.steps[name].after
        return list(dict.fromkeys(deps))

    def order(self) -> list[str]:
        """Steps in file order, each after what it depends on; a cycle is refused."""
        index = {n: i for i, n in enumerate(self.steps)}
        deps = {n: set(self.dependencies(n)) for n in self.steps}
        done: list[str] = []
        pending = dict(deps)
        while pending:
            ready = sorted((n for n, d in pending.items() if d <= set(done)), key=index.get)
            if not ready:
                raise UserError(f"pipeline {self.path}: steps depend on each other in a cycle: {_cycle(pending)}")
            done.append(ready[0])
            del pending[ready[0]]
        return done

    def downstream(self, names: set[str]) -> set[str]:
        """``names`` and every step that depends on them, directly or not."""
        out = set(names)
        changed = True
        while changed:
            changed = False
            for n in self.steps:
                if n not in out and set(self.dependencies(n)) & out:
                    out.add(n)
                    changed = True
        return out

    # -- values ---------------------------------------------------------------------
    def values(self, name: str) -> dict[str, Any]:
        """The step's values: pipeline-wide ones it has a field for, then its own."""
        step = self.steps[name]
        fields = field_names(step.info)
        merged = {k: v for k, v in self.params.items() if k in fields and k not in PER_PIPELINE}
        narrow = getattr(step.info.config_class(), "pipeline_fields", None)
        if narrow is not None:  # e.g. quantize: only the fields its method reads
            allowed = narrow({**merged, **step.values})
            merged = {k: v for k, v in merged.items() if k in allowed}
        merged.update(step.values)
        return merged

    def resolved_values(self, name: str, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        """Values as strings with ``${step.field}`` replaced from ``outputs[step][field]``."""
        def sub(value: Any) -> str:
            text = _as_text(value)
            return _REF.sub(lambda m: outputs[_parse_ref(m.group(1), self, name)[0]][
                _parse_ref(m.group(1), self, name)[1]], text)

        return {k: sub(v) for k, v in self.values(name).items()}


def field_names(info: StepInfo) -> set[str]:
    return {f.name for f in dataclasses.fields(info.config_class())}


def field_help(info: StepInfo) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(info.config_class())}


def pending_run_id(step_name: str) -> str:
    """A stand-in run id for a step that has not run yet (dry runs, up-front checks)."""
    return hashlib.md5(f"mlproject-pending:{step_name}".encode()).hexdigest()


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(v) for v in value)
    return str(value)


def _parse_ref(body: str, pipe: Pipeline, owner: str) -> tuple[str, str]:
    m = _REF_BODY.match(body.strip())
    if not m:
        raise UserError(f"pipeline {pipe.path}: step {owner!r}: bad reference ${{{body}}}; "
                        f"use ${{<step>.model_uri}} or ${{<step>.run_id}}")
    step, attr = m.groups()
    if step not in pipe.steps:
        raise UserError(f"pipeline {pipe.path}: step {owner!r} refers to unknown step {step!r} in ${{{body}}}"
                        + _suggest(step, pipe.steps))
    if step == owner:
        raise UserError(f"pipeline {pipe.path}: step {owner!r} refers to itself in ${{{body}}}")
    if attr not in REF_FIELDS:
        raise UserError(f"pipeline {pipe.path}: step {owner!r}: unknown field {attr!r} in ${{{body}}}; "
                        f"known: {', '.join(REF_FIELDS)}")
    if attr == "model_uri" and not pipe.steps[step].info.names_model():
        raise UserError(f"pipeline {pipe.path}: step {owner!r}: ${{{body}}}: a {pipe.steps[step].step} step has no model")
    return step, attr


def _cycle(pending: dict[str, set[str]]) -> str:
    start = next(iter(pending))
    path, node = [start], start
    while True:
        node = next(d for d in pending[node] if d in pending)
        if node in path:
            return " -> ".join(path[path.index(node):] + [node])
        path.append(node)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------- loading
def resolve_path(pipeline: str, folder: str = "pipelines", kind: str = "pipeline") -> Path:
    """A path, or a bare name looked up as ``<folder>/<name>.yaml`` (pipelines; search spaces
    live in ``pipelines/spaces``)."""
    if not pipeline.strip():
        raise UserError(f"{kind} is empty: give a YAML file, e.g. {folder}/demo.yaml")
    path = Path(pipeline).expanduser()
    if not path.is_file() and not path.suffix:
        path = Path(folder) / f"{pipeline}.yaml"
    if not path.is_file():
        shipped = sorted(p.name for p in Path(folder).glob("*.yaml")) if Path(folder).is_dir() else []
        hint = f"; in {folder}/: {', '.join(shipped)}" if shipped else ""
        raise UserError(f"{kind} file {pipeline!r} not found{hint}")
    return path


def read_yaml(path: Path, kind: str = "pipeline") -> Any:
    """A YAML file's content; malformed YAML is one line naming the file and line."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{kind} {path}{where}: malformed YAML ({getattr(exc, 'problem', exc)})") from None


def load(pipeline: str, overrides: str | list[str] = "", skip: str = "") -> Pipeline:
    """Read, override and check a pipeline file (see the module docstring), leaving out ``skip``."""
    path = resolve_path(pipeline)
    pipe = parse(read_yaml(path), str(path), overrides)
    if skip and skip != "none":
        skip_steps(pipe, [s.strip() for s in skip.split(",") if s.strip()])
    return pipe


def skip_steps(pipe: Pipeline, names: list[str]) -> set[str]:
    """Leave out ``names`` and every step that still refers to one of them once each
    ``${<skipped>.run_id}`` entry of a comma list (a compare step's ``runs``) is dropped; an
    ``after`` on a skipped step is dropped too. Returns every step left out."""
    for name in names:
        if name not in pipe.steps:
            raise UserError(f"skip {name!r}: the pipeline has no step {name!r}{_suggest(name, pipe.steps)}; "
                            f"steps: {', '.join(pipe.steps)}")
    gone = set(names)
    changed = True
    while changed:
        changed = False
        for name, step in pipe.steps.items():
            if name in gone:
                continue
            for key, value in step.values.items():
                if not isinstance(value, str) or "," not in value:
                    continue  # a single reference to a skipped step takes its step out below
                items = [i for i in value.split(",")
                         if not (m := _REF.fullmatch(i.strip())) or not m.group(1).endswith(".run_id")
                         or m.group(1).split(".")[0] not in gone]
                if items:
                    step.values[key] = ",".join(items)
            step.after = [a for a in step.after if a not in gone]
            if any(dep in gone for dep in pipe.dependencies(name)):
                gone.add(name)
                changed = True
    for name in gone:
        del pipe.steps[name]
    if not pipe.steps:
        raise UserError(f"skip {','.join(names)}: no step of pipeline {pipe.path} is left")
    return gone


def parse(raw: Any, path: str = "<pipeline>", overrides: str | list[str] = "") -> Pipeline:
    if not isinstance(raw, dict):
        raise UserError(f"pipeline {path}: expected a mapping with {', '.join(TOP_LEVEL)}")
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise UserError(f"pipeline {path}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), TOP_LEVEL)}; "
                        f"known: {', '.join(TOP_LEVEL)}")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, dict) or not steps_raw:
        raise UserError(f"pipeline {path}: 'steps' must be a non-empty mapping of step names to steps")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise UserError(f"pipeline {path}: 'params' must be a mapping of parameter names to values")
    pipe = Pipeline(name=str(raw.get("name") or Path(path).stem), path=path,
                    description=str(raw.get("description") or "").strip(),
                    experiment=str(raw.get("experiment") or ""), params=dict(params))
    for name, body in steps_raw.items():
        name = str(name)
        if not _NAME.match(name):
            raise UserError(f"pipeline {path}: step name {name!r} must be letters, digits, _ or - (no dots)")
        if not isinstance(body, dict) or "step" not in body:
            raise UserError(f"pipeline {path}: step {name!r} needs 'step: <one of {', '.join(STEPS)}>'")
        try:
            info = get(str(body["step"]))
        except UserError as exc:
            raise UserError(f"pipeline {path}: step {name!r}: {exc}") from None
        after = body.get("after") or []
        after = [after] if isinstance(after, str) else [str(a) for a in after]
        for a in after:
            if a not in steps_raw:
                raise UserError(f"pipeline {path}: step {name!r}: 'after' names unknown step {a!r}"
                                + _suggest(a, steps_raw))
        values = {str(k): v for k, v in body.items() if k not in RESERVED}
        pipe.steps[name] = PipelineStep(name=name, info=info, values=values, after=after)
    apply_overrides(pipe, overrides)
    check(pipe)
    return pipe


def split_overrides(overrides: str | list[str]) -> list[str]:
    """``"model=qwen limit=0.2"`` (shell-quoted, as MLproject passes it) or a list of them."""
    items = overrides if isinstance(overrides, list) else [overrides]
    out: list[str] = []
    for item in items:
        try:
            out += shlex.split(item or "")
        except ValueError as exc:
            raise UserError(f"set {item!r}: {exc}") from None
    return out


def apply_overrides(pipe: Pipeline, overrides: str | list[str]) -> None:
    for assignment in split_overrides(overrides):
        key, sep, value = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"set {assignment!r}: expected key=value or <step>.key=value")
        pipe.overrides.append(assignment)
        step, dot, param = key.partition(".")
        if dot:
            if step not in pipe.steps:
                raise UserError(f"set {assignment!r}: the pipeline has no step {step!r}{_suggest(step, pipe.steps)}; "
                                f"steps: {', '.join(pipe.steps)}")
            pipe.steps[step].values[param] = value
        else:
            pipe.params[key] = value


def check(pipe: Pipeline) -> None:
    """Structure and names; values are checked by building each step's config (runner)."""
    every: dict[str, list[str]] = {}
    for name, step in pipe.steps.items():
        fields = field_names(step.info)
        for key in step.values:
            if key in PER_PIPELINE:
                raise UserError(f"pipeline {pipe.path}: step {name!r} sets {key!r}: it is set once for the whole "
                                f"pipeline (--{key.replace('_', '-')} or the file's 'experiment')")
            if key not in fields:
                raise UserError(f"pipeline {pipe.path}: step {name!r} ({step.step}) has no parameter {key!r}"
                                f"{_suggest(key, fields)}")
        for f in fields:
            every.setdefault(f, []).append(name)
    for key in pipe.params:
        if key in PER_PIPELINE:
            raise UserError(f"pipeline {pipe.path}: {key!r} is not a step parameter; use --{key.replace('_', '-')}")
        if key not in every:
            raise UserError(f"pipeline {pipe.path}: no step of this pipeline has a parameter {key!r}"
                            f"{_suggest(key, every)}")
        meanings = {}
        for name in every[key]:
            if key in pipe.steps[name].values:
                continue  # the step sets its own value; the pipeline-wide one does not reach it
            meanings.setdefault(field_help(pipe.steps[name].info)[key], []).append(pipe.steps[name].step)
        if len(meanings) > 1:
            kinds = sorted({s for steps in meanings.values() for s in steps})
            raise UserError(f"pipeline {pipe.path}: {key!r} means different things in {' and '.join(kinds)}; "
                            f"set it per step ({kinds[0]} step: <name>.{key}=…)")
    for name in pipe.steps:
        pipe.references(name)  # bad references fail here
    pipe.order()  # cycles fail here
