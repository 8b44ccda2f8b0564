"""`main` / `mlproject run`: run a pipeline as a parent run with one child run per step.

Order of work:

1. Read the file, apply ``--set`` overrides, check names, references and cycles
   (``pipeline.spec``); check the tracking server once.
2. Build every step's config (values are checked by the config as on the command line) and
   run each step's own cheap checks — steps whose input is an earlier step's output are
   checked against a stand-in run id. Compute every step's reuse key (``mlproject.reuse``):
   keys chain the upstream keys, so they are known before anything runs.
3. ``--dry-run`` stops here and prints the plan: each step, its key, and whether it would
   run or reuse a finished run.
4. Open the parent run (``pipeline:<name>``; under ``mlflow run`` the run MLflow created) and
   go through the steps in order. A step whose key matches a FINISHED run of the experiment
   is reused: a child run tagged ``mlproject.reused_from=<run id>`` records it, copying that
   run's params and metrics, and no model is loaded. Otherwise the step runs as a child run.
   ``no_reuse`` recomputes everything, ``rerun=prune`` recomputes ``prune`` and every step
   depending on it. A failing step ends its own run and the parent FAILED with the step's
   error and stops the chain; the same command again reuses what finished and goes on.

The parent holds ``pipeline.yaml`` (the file with overrides applied and references
resolved to run ids), ``report.md`` (the steps table and the last comparison), and metrics
``system/pipeline/steps_run``, ``system/pipeline/steps_reused``, ``system/pipeline/seconds`` (MLflow's
system-metrics namespace: bookkeeping, not model numbers), and a description listing each
step's headline numbers.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mlproject import progress, tracking
from mlproject.errors import StepFailed, UserError
from mlproject.models import loading
from mlproject.pipeline import spec as pspec
from mlproject.pipeline.config import PipelineConfig
from mlproject.steps import StepResult
from mlproject.tracking import names

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"runs:/([0-9a-f]{8,64})")


@dataclass
class PlannedStep:
    name: str
    step: str
    cfg: Any
    key: str | None  # None: never reused (a step whose StepInfo.reusable is false: compare)
    reuse: dict | None = None  # the FINISHED run that would be reused
    forced: bool = False
    changed: dict[str, str] = field(default_factory=dict)  # values that differ from the step's defaults

    @property
    def action(self) -> str:
        if self.key is None:
            return f"run ({self.step} always runs)"
        if self.forced:
            return "run (forced)"
        return f"reuse {self.reuse['run_id']}" if self.reuse else "run"


@dataclass
class Plan:
    pipe: pspec.Pipeline
    steps: dict[str, PlannedStep]
    order: list[str]
    experiment: str
    experiment_id: str | None

    def table(self) -> str:
        from mlproject.report import md_table

        rows = [(s.name, s.step, s.key or "-", s.action,
                 ", ".join(f"{k}={v}" for k, v in s.changed.items()) or "-")
                for s in (self.steps[n] for n in self.order)]
        return md_table(["step", "kind", "key", "action", "settings"], rows)


def _changed(cfg: Any) -> dict[str, str]:
    import dataclasses

    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in ("run_name",) and value != f.default and str(value) != str(f.default):
            out[f.name] = str(value)
    return out


def plan(pipe: pspec.Pipeline, experiment: str, *, no_reuse: bool = False, rerun: list[str] | None = None,
         experiment_id: str | None = None) -> Plan:
    """Build and check every step's config and key; find what is reusable. No run is created."""
    rerun = rerun or []
    for name in rerun:
        if name not in pipe.steps:
            raise UserError(f"rerun {name!r}: the pipeline has no such step; steps: {', '.join(pipe.steps)}")
    forced = set(pipe.steps) if no_reuse else pipe.downstream(set(rerun))
    order = pipe.order()
    outputs: dict[str, dict[str, str]] = {}
    pending_keys: dict[str, str] = {}  # stand-in run id -> the key that run will carry

    def upstream_key(ref: str) -> str | None:
        m = _RUN_ID.search(ref)
        if m and m.group(1) in pending_keys:
            return pending_keys[m.group(1)]
        return tracking.upstream_key(ref)

    planned: dict[str, PlannedStep] = {}
    for name in order:
        ps = pipe.steps[name]
        cfg = build_config(pipe, name, outputs)
        try:
            ps.info.load().check(cfg, None, pending=frozenset(pending_keys))
        except UserError as exc:
            raise UserError(f"pipeline {pipe.path}: step {name!r} ({ps.step}): {exc}") from None
        key = ps.info.key(cfg, upstream_key=upstream_key) if ps.info.reusable else None
        stand_in = pspec.pending_run_id(name)
        if key:
            pending_keys[stand_in] = key
        outputs[name] = {"run_id": stand_in,
                         "model_uri": f"runs:/{stand_in}/model" if ps.info.produces_model else getattr(cfg, "model", "")}
        found = None
        if key and name not in forced and experiment_id:
            found = tracking.find_reusable(key, experiment_id)
        written = pipe.values(name)
        changed = {k: (str(written[k]) if "${" in str(written.get(k, "")) else v) for k, v in _changed(cfg).items()}
        planned[name] = PlannedStep(name=name, step=ps.step, cfg=cfg, key=key, reuse=found, forced=name in forced,
                                    changed=changed)
    return Plan(pipe=pipe, steps=planned, order=order, experiment=experiment, experiment_id=experiment_id)


def build_config(pipe: pspec.Pipeline, name: str, outputs: dict[str, dict[str, str]]):
    """The step's config from its resolved values; a bad value names the step."""
    ps = pipe.steps[name]
    values = pipe.resolved_values(name, outputs)
    try:
        return ps.info.config_class()(**values)
    except UserError as exc:
        raise UserError(f"pipeline {pipe.path}: step {name!r} ({ps.step}): {exc}") from None
    except TypeError as exc:  # defensive: spec.check refuses unknown names first
        raise UserError(f"pipeline {pipe.path}: step {name!r} ({ps.step}): {exc}") from None


def _experiment(cfg: PipelineConfig, pipe: pspec.Pipeline) -> tuple[str, str | None]:
    """(name, id or None when it does not exist yet); under `mlflow run`, its run's experiment."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher:
        exp_id = tracking.run_experiment_id(launcher)
        return tracking.experiment_name(exp_id), exp_id
    name = cfg.experiment or pipe.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.DEFAULT_EXPERIMENT
    return name, tracking.find_experiment_id(name)


def run(cfg: PipelineConfig, parent: tracking.Run | None = None) -> StepResult:
    pipe = pspec.load(cfg.pipeline, cfg.set, skip=cfg.skip)
    if parent is None:
        tracking.check_server(cfg.tracking_uri or None)
    experiment, exp_id = (tracking.experiment_name(parent.experiment_id), parent.experiment_id) if parent \
        else _experiment(cfg, pipe)
    rerun = [s.strip() for s in cfg.rerun.split(",") if s.strip()]
    the_plan = plan(pipe, experiment, no_reuse=cfg.no_reuse, rerun=rerun, experiment_id=exp_id)
    if cfg.dry_run:
        text = (f"pipeline {pipe.name} ({pipe.path}), experiment {experiment!r}: dry run, nothing was run\n\n"
                + the_plan.table() + "\n")
        return StepResult(step="pipeline", run_id="", status="DRY_RUN", text=text,
                          details={"plan": the_plan})
    return execute(the_plan, cfg=cfg, parent=parent)


def execute(the_plan: Plan, *, cfg: PipelineConfig | None = None, parent: tracking.Run | None = None,
            run_name: str | None = None, tags: dict | None = None, extra_params: dict | None = None,
            on_start: Callable[[tracking.Run], None] | None = None,
            finish: Callable[[tracking.Run, dict[str, StepResult]], dict | None] | None = None) -> StepResult:
    """Run a checked plan under a new parent run (a child of ``parent`` when given: a search
    trial is a pipeline nested in the study run).

    ``extra_params`` are logged with the pipeline's own (a search trial's sampled values);
    ``on_start(run)`` is called once the pipeline run exists (a search trial records its run id);
    ``finish(run, results)`` after the last step, inside the run (a search trial scores the
    target's model there): what it returns is ``details["finish"]``, what it raises fails the run."""
    pipe = the_plan.pipe
    start = time.perf_counter()
    params = {"pipeline": pipe.path, "set": " ".join(pipe.overrides) or "none",
              **{f"pipeline.{k}": v for k, v in pipe.params.items()}}
    if cfg is not None:
        params.update({"no_reuse": cfg.no_reuse, "rerun": cfg.rerun or "none"})
    params.update(extra_params or {})
    results: dict[str, StepResult] = {}
    with tracking.step_run("pipeline", experiment=the_plan.experiment, run_name=run_name or f"pipeline:{pipe.name}",
                           tags={names.PIPELINE_TAG: pipe.name, **(tags or {})}, parent=parent) as prun:
        prun.log_params(params)
        if on_start is not None:
            on_start(prun)
        outputs: dict[str, dict[str, str]] = {}
        bar = progress.task(f"pipeline {pipe.name}", total=len(the_plan.order), unit="steps")
        try:
            for name in the_plan.order:
                planned = the_plan.steps[name]
                bar.update(postfix=f"{name} ({planned.step})")
                step_cfg = build_config(pipe, name, outputs)
                # the model handed off by the step before is kept only for a step that takes it
                loading.clear_handoff(keep=getattr(step_cfg, "model", None))
                try:
                    result = _run_one(prun, planned, step_cfg)
                except (KeyboardInterrupt, SystemExit):
                    loading.clear_handoff()
                    raise
                except Exception as exc:
                    loading.clear_handoff()  # (a model handed to the failed step is not kept for the next trial)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    _log_report(prun, the_plan, results, failed=(name, first))
                    raise StepFailed(f"pipeline {pipe.name}: step {name!r} ({planned.step}) failed: {first}") from exc
                _hand_off(result)
                results[name] = result
                outputs[name] = {"run_id": result.run_id, "model_uri": result.model_uri or ""}
                bar.advance()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        ran = sum(1 for r in results.values() if not r.reused)
        # Bookkeeping, not model numbers: MLflow's system/ namespace keeps them off the model metrics.
        stats = {f"{tracking.SYSTEM_PREFIX}pipeline/steps_run": ran,
                 f"{tracking.SYSTEM_PREFIX}pipeline/steps_reused": len(results) - ran,
                 f"{tracking.SYSTEM_PREFIX}pipeline/seconds": seconds}
        prun.log_metrics(stats)
        text = _log_report(prun, the_plan, results)
        prun.log_text(_resolved_yaml(pipe, outputs), "pipeline.yaml")
        prun.set_description(_description(the_plan, results, ran, seconds))
        try:
            finished = finish(prun, results) if finish is not None else None
        finally:
            loading.clear_handoff()
        return StepResult(step="pipeline", run_id=prun.run_id, text=text + _ui_hint(prun), metrics=stats,
                          details={"steps": results, "finish": finished})


def _hand_off(result: StepResult) -> None:
    """The step's output model stays in memory for the next load of its ``model_uri`` in this
    process (the next step, a trial's scorer); the result itself lets go of it, so no model
    outlives the step that takes it."""
    loaded, result.loaded, result.model = result.loaded, None, None
    if loaded is not None and result.model_uri:
        loading.hand_off(result.model_uri, loaded, str(next(loaded.model.parameters()).device))
    else:
        loading.clear_handoff()


def _run_one(prun: tracking.Run, planned: PlannedStep, cfg: Any) -> StepResult:
    from mlproject.steps import get

    info = get(planned.step)
    tags = {names.PIPELINE_STEP_TAG: planned.name}
    if planned.key and not planned.forced:
        # Looked up again now: an earlier step of this very pipeline may have produced it.
        found = tracking.find_reusable(planned.key, prun.experiment_id)
        if found:
            record = tracking.record_reuse(prun, planned.step, found, run_name=f"{planned.name} (reused)",
                                           extra_tags=tags)
            log.info("step %s: reused run %s (key %s)", planned.name, found["run_id"], planned.key)
            model_uri = (f"runs:/{found['run_id']}/model" if info.produces_model
                         else getattr(cfg, "model", None))
            return StepResult(step=planned.step, run_id=found["run_id"], metrics=found["metrics"],
                              model_uri=model_uri, key=planned.key, reused_from=found["run_id"],
                              record_run_id=record)
    log.info("step %s: running %s", planned.name, planned.step)
    with tracking.extra_tags(tags):
        result = info.run(cfg, parent=prun)
    if planned.key and result.key and result.key != planned.key:
        # Both come from the same function; a difference means an input changed meanwhile.
        log.warning("step %s: planned key %s but the run recorded %s", planned.name, planned.key, result.key)
    return result


def _log_report(prun: tracking.Run, the_plan: Plan, results: dict[str, StepResult],
                failed: tuple[str, str] | None = None) -> str:
    from mlproject.report import fmt_metric, md_table

    rows = []
    for name in the_plan.order:
        p = the_plan.steps[name]
        r = results.get(name)
        if r is None:
            status = f"FAILED: {failed[1]}" if failed and failed[0] == name else "not run"
            rows.append((name, p.step, "-", status, "-"))
            continue
        status = f"reused ({r.reused_from[:8]})" if r.reused else "ran"
        shown = {k: v for k, v in r.metrics.items()
                 if k == "avg_acc" or k.startswith("ppl/") or k in ("model_size_mb", "params_b")}
        rows.append((name, p.step, r.run_id, status,
                     ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in sorted(shown.items())) or "-"))
    title = f"pipeline {the_plan.pipe.name}"
    text = f"## {title}\n\n" + (the_plan.pipe.description + "\n\n" if the_plan.pipe.description else "")
    text += md_table(["step", "kind", "run", "status", "headline"], rows) + "\n"
    # The last Markdown report a step returned (compare's tables) closes the pipeline's report.
    reports = [r for r in results.values() if r.details.get("markdown")]
    if reports:
        text += "\n" + reports[-1].details["markdown"] + "\n"
    try:
        prun.log_text(text, "report.md")
    except Exception:  # reporting must not hide the step's own error
        log.warning("could not log the pipeline report", exc_info=True)
    return text


def _description(the_plan: Plan, results: dict[str, StepResult], ran: int, seconds: float) -> str:
    """The parent run's description: one line per step with its headline numbers."""
    from mlproject.report import fmt_metric

    pipe = the_plan.pipe
    from mlproject.progress import duration

    lines = [f"**pipeline {pipe.name}** · {len(results)} steps ({ran} run, {len(results) - ran} reused) "
             f"in {duration(seconds)}"]
    if pipe.description:
        lines.append(pipe.description)
    for name in the_plan.order:
        r = results.get(name)
        if r is None:
            continue
        shown = [f"{k} {fmt_metric(k, v)}" for k, v in sorted(r.metrics.items())
                 if k == "avg_acc" or k.startswith("ppl/") or k in ("model_size_mb", "params_b")]
        status = " (reused)" if r.reused else ""
        lines.append(f"- **{name}** ({r.step}{status}): " + (", ".join(shown) or "no scores"))
    lines.append("Per-step runs are the children of this run; the comparison is in `report.md` (Artifacts tab).")
    return "  \n".join(lines) + "\n"


def _resolved_yaml(pipe: pspec.Pipeline, outputs: dict[str, dict[str, str]]) -> str:
    import yaml

    doc = {"name": pipe.name, "description": pipe.description, "params": pipe.params,
           "overrides": pipe.overrides,
           "steps": {n: {"step": s.step, **pipe.resolved_values(n, outputs)} for n, s in pipe.steps.items()}}
    return yaml.safe_dump(doc, sort_keys=False)


def _ui_hint(prun: tracking.Run) -> str:
    return "\n" + tracking.where_to_look(prun.run_id, prun.experiment_id) + "\n"
