"""The workers of a search: processes that run trials of one study until it holds n_trials.

A worker (``Worker``) runs in the ``search`` command's own process, or in one of ``workers``
local processes (``spawn`` starts them: fresh interpreters, joined to the study through its
storage and to the study run by id). A trial is a pipeline run (``pipeline.runner.execute``)
named ``trial <n>``, a child of the study run, with the pipeline's steps as its children; steps
whose reuse key exists are reused, so trials sharing a prefix (same prune ratio, different LoRA
lr) share its run. After the steps, the target step's model is scored level by level on nested
random document subsets (``search.fidelity``); a single-objective study reports each level to
its pruner and stops a poor trial early. The run carries ``mlproject.trial_state`` (COMPLETE,
PRUNED, FAIL) and the Optuna trial keeps the run id as the user attr ``mlflow_run_id``
(the trial vocabulary: ``search.trials``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlproject import progress, tracking
from mlproject.search import space as space_mod
from mlproject.search.config import SearchConfig
from mlproject.search.storage import open_storage, open_study
from mlproject.search.trials import (ATTR_ERROR, ATTR_EVAL_KEY, ATTR_LEVEL, ATTR_METRICS, ATTR_MODEL, ATTR_RUN,
                                     ATTR_SURPLUS, ATTR_TARGET, HEADLINE, counted, tally)
from mlproject.tracking import names

log = logging.getLogger(__name__)



class Surplus(Exception):
    """The study already held n_trials when this trial started (two workers raced for the last slot)."""


class LostTrial(Exception):
    """The trial is no longer RUNNING in the storage: another worker failed it as stale (this
    worker's heartbeat stopped for longer than the grace period: a partition, a stalled host, or
    Optuna's heartbeat thread, which stops at its first failed write) and queued its retry.
    Whatever this worker computed is late and must not count."""


@dataclass
class Context:
    """What a worker (this process or a spawned one) needs to join the study."""

    cfg: SearchConfig
    study_name: str
    experiment_id: str
    study_run_id: str


WORKER_ENV = "MLPROJECT_SEARCH_WORKER"


def spawn(ctx: Context, n: int) -> None:
    """``n`` worker processes on the study (fresh interpreters: torch and the tracking client hold
    threads and locks that a fork would copy); the study run stays open here meanwhile."""
    import subprocess

    import mlproject

    payload = {"cfg": dataclasses.asdict(ctx.cfg), "study_name": ctx.study_name,
               "experiment_id": ctx.experiment_id, "study_run_id": ctx.study_run_id,
               "tracking_uri": tracking.tracking_uri()}
    src = str(Path(mlproject.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MLFLOW_RUN_ID", None)  # trials nest under the study run, not under mlflow run's run
    cmd = [sys.executable, "-c", "from mlproject.search.workers import worker_main; worker_main()"]
    procs = [subprocess.Popen(cmd, env={**env, WORKER_ENV: json.dumps({**payload, "worker": i})})
             for i in range(n)]
    log.info("started %d worker processes: %s", n, ", ".join(str(p.pid) for p in procs))
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=120)
        raise
    bad = [(p.pid, c) for p, c in zip(procs, codes) if c]
    if bad:
        log.warning("worker processes ended with errors: %s", ", ".join(f"pid {a} exit {b}" for a, b in bad))


def worker_main() -> None:
    """Entry point of a worker process started by ``--workers N`` (its context in $MLPROJECT_SEARCH_WORKER)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
                        stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "httpx", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def _terminate(signum, frame):  # noqa: ARG001 - as the CLI: a SIGTERM ends runs KILLED
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = json.loads(os.environ.pop(WORKER_ENV))
    tracking.check_server(data["tracking_uri"])  # sets this process's tracking URI
    cfg = SearchConfig(**data["cfg"])
    ctx = Context(cfg=cfg, study_name=data["study_name"], experiment_id=data["experiment_id"],
                  study_run_id=data["study_run_id"])
    space = space_mod.load(cfg.space, cfg.set, model=cfg.model, n_trials=cfg.n_trials,
                           seed=cfg.seed if cfg.seed >= 0 else None, pruner=cfg.pruner,
                           objectives=cfg.objectives)
    space = worker_space(space, int(data.get("worker", 0)))
    storage = open_storage(cfg.storage, cfg.heartbeat, cfg.max_retry)
    study, _ = open_study(storage, ctx.study_name, space, create=False)
    Worker(ctx, space=space, study=study).loop()


def worker_space(space: space_mod.Space, index: int) -> space_mod.Space:
    """The space as local worker ``index`` samples it: a seeded sampler gets seed + index. With
    one seed, every worker's sampler would draw the same first (random start-up) configurations
    at the same time — seen on SmolLM2: two workers' first trials were identical. The seed is
    not part of the study's fingerprint, so the workers still share one study."""
    seed = space.sampler.get("seed")
    if not index or seed is None:
        return space
    return dataclasses.replace(space, sampler={**space.sampler, "seed": int(seed) + index})


class Worker:
    """Runs trials of one study until it holds n_trials (counting: ``search.trials``)."""

    def __init__(self, ctx: Context, space: space_mod.Space, study, checked: tuple | None = None):
        self.ctx, self.space, self.study = ctx, space, study
        self.cfg = ctx.cfg
        self.parent = tracking.Run(ctx.study_run_id, ctx.experiment_id)
        self.experiment = tracking.experiment_name(ctx.experiment_id)
        _, self.eval_plan, self.docs = checked or space_mod.check(space, self.experiment)
        self.objectives = space.objectives
        self.target_tags: dict[str, Any] = {}  # the scored trial's target, logged with its first metrics
        # the trial being run and its state (the loop asks the storage about it when Optuna refuses it)
        self._current: tuple[Any, dict[str, Any]] | None = None

    def loop(self) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        start = time.monotonic()
        heartbeat = is_heartbeat_enabled(self.study._storage)
        bar = progress.task(f"search {self.ctx.study_name}", total=self.space.n_trials, unit="trials")
        try:
            self._loop(bar, start, heartbeat)
        finally:
            bar.close()

    def _loop(self, bar, start: float, heartbeat: bool) -> None:
        from optuna.storages import fail_stale_trials

        import optuna

        while True:
            state = tally(self.study)
            bar.update(completed=state["done"], postfix=f"{state['running']} running" if state["running"] else "")
            if state["waiting"] or state["done"] + state["running"] < self.space.n_trials:
                if self.cfg.timeout and time.monotonic() - start >= self.cfg.timeout:
                    log.info("timeout: %g s reached, starting no new trial", self.cfg.timeout)
                    return
                self._current = None
                try:
                    # (no gc_after_trial: a full collection costs ~0.4 s with torch loaded; score() frees
                    # the model itself)
                    self.study.optimize(self.objective, n_trials=1, catch=(Exception,))
                except KeyboardInterrupt as exc:
                    if isinstance(exc.__cause__, SystemExit):
                        raise exc.__cause__ from None
                    raise
                except (ValueError, AssertionError):
                    # Optuna refuses to tell a trial that is no longer RUNNING ("Cannot tell a FAIL
                    # trial", or an assertion when the objective had returned): the trial was failed
                    # by heartbeat while this worker was cut off; its retry counts instead.
                    if self._current is None or not self._lost(self._current[0]):
                        raise
                    # (lost after the objective's last look: its run may have ended FINISHED)
                    self._late(*self._current)
                continue
            if state["done"] < self.space.n_trials and heartbeat and state["running"]:
                # Trials still running elsewhere: wait for them, or for their heartbeat to go
                # stale (a killed worker), so the study ends with n_trials finished.
                time.sleep(max(1.0, self.study._storage.get_heartbeat_interval() / 2))
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    fail_stale_trials(self.study)
                continue
            return

    # -- one trial -------------------------------------------------------------------
    def objective(self, trial):
        import optuna

        ahead = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
        if len(ahead) >= self.space.n_trials:
            trial.set_user_attr(ATTR_SURPLUS, True)
            raise Surplus(f"the study already holds {self.space.n_trials} trials (another worker took the last slot)")
        state: dict[str, Any] = {"run_id": None, "tags": {}}
        self._current = (trial, state)
        try:
            outcome = self._trial(trial, state)
        except BaseException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            if not interrupted:
                self._raise_if_lost(trial, state)
            if not interrupted:
                # a raised error counts the trial as done: the same values would fail again (and
                # a bug here must not make every worker start trials forever)
                with contextlib.suppress(Exception):  # (a storage that errors: Optuna tells FAIL anyway)
                    trial.set_user_attr(ATTR_ERROR, first[:1000])
            with contextlib.suppress(Exception):
                if state["run_id"]:
                    tracking.set_run_tags(state["run_id"], {names.TRIAL_STATE_TAG: "FAIL"})
                elif not interrupted:
                    self._failed_run(trial, state["tags"], exc)
            if isinstance(exc, SystemExit):
                # Optuna records FAIL for KeyboardInterrupt (not SystemExit) and re-raises it
                raise KeyboardInterrupt(first) from exc
            raise
        self._raise_if_lost(trial, state)  # cut off after scoring, before telling
        if outcome["pruned"]:
            raise optuna.TrialPruned(f"pruned at level {outcome['level']} ({outcome['documents']} documents)")
        return outcome["values"] if len(outcome["values"]) > 1 else outcome["values"][0]

    def _lost(self, trial) -> bool:
        """The trial is no longer RUNNING in the storage (only another worker's heartbeat check
        ends a trial this worker holds). A storage that cannot be read says nothing: False."""
        from optuna.trial import TrialState

        try:
            return self.study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING
        except Exception:
            return False

    def _raise_if_lost(self, trial, state: dict[str, Any] | None = None) -> None:
        if self._lost(trial):
            if state is not None:
                self._late(trial, state)
            raise LostTrial(f"trial {trial.number} was failed by heartbeat meanwhile")

    def _late(self, trial, state: dict[str, Any]) -> None:
        """The trial's run ends FAILED, saying why its result does not count (once per trial). (The
        worker that failed the trial ended the run already; the pipeline may have ended it FINISHED
        since.)"""
        if state.get("late"):
            return
        state["late"] = True
        retry = None
        with contextlib.suppress(Exception):
            retry = next((t.number for t in self.study.get_trials(deepcopy=False)
                          if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number), None)
        why = (f"this worker was cut off from the study's storage longer than the heartbeat's grace period; "
               f"trial {trial.number} was failed as stale"
               + (f" and retried as trial {retry}" if retry is not None else "") + ", so this late result is not counted")
        log.warning("trial %d: %s", trial.number, why)
        if state.get("run_id"):
            with contextlib.suppress(Exception):
                tracking.fail_run(state["run_id"], "worker lost: the trial's heartbeat went stale; retried",
                                  tags={names.TRIAL_STATE_TAG: "FAIL", names.LATE_RESULT_TAG: why})

    def _trial(self, trial, state: dict[str, Any]) -> dict[str, Any]:
        from mlproject.pipeline import runner

        values = {name: p.suggest(trial) for name, p in self.space.params.items()}
        tags = {names.STUDY_TAG: self.ctx.study_name, names.TRIAL_TAG: trial.number, names.TRIAL_STATE_TAG: "RUNNING",
                names.ROLE_TAG: "trial", names.OPTUNA_TRIAL_ID_TAG: trial._trial_id}
        # (Optuna's failed_trial names the first trial of a retry chain; the one retried is the last
        # of retry_history)
        history = self.study._storage.get_trial_system_attrs(trial._trial_id).get("retry_history") or []
        if history:
            tags[names.RETRY_OF_TAG] = history[-1]
        state["tags"] = tags

        def on_start(prun: tracking.Run) -> None:
            state["run_id"] = prun.run_id
            trial.set_user_attr(ATTR_RUN, prun.run_id)

        the_plan = self.plan_trial(values)
        result = runner.execute(the_plan, parent=self.parent, run_name=f"trial {trial.number}", tags=tags,
                                extra_params={"trial.number": trial.number,
                                              **{f"trial.{k}": v for k, v in values.items()}},
                                on_start=on_start, finish=lambda prun, results: self.score(trial, prun, results, the_plan))
        return result.details["finish"]

    def plan_trial(self, values: dict[str, Any]):
        """The checked plan of the pipeline a trial runs (steps found reusable marked so)."""
        from mlproject.pipeline import runner

        pipe = self.space.trial_pipeline(values)
        return runner.plan(pipe, self.experiment, experiment_id=self.ctx.experiment_id)

    def _failed_run(self, trial, tags: dict, exc: BaseException) -> None:
        """A FAILED run for a trial that failed before its pipeline run existed (a combination of
        values a step refuses): the trial is visible in the UI with its error."""
        with contextlib.suppress(type(exc)), tracking.step_run(
                "pipeline", run_name=f"trial {trial.number}", parent=self.parent, log_env=False,
                tags={**tags, names.TRIAL_STATE_TAG: "FAIL"}) as prun:
            trial.set_user_attr(ATTR_RUN, prun.run_id)
            raise exc

    # -- scoring the target ----------------------------------------------------------
    def eval_key(self, target_key: str | None) -> str:
        opts = self.eval_plan.params()
        blob = json.dumps({"target": target_key, "eval": opts, "levels": self.space.fractions,
                           "seed": self.space.fidelity_seed, "objectives": [o.metric for o in self.objectives],
                           "pruner": self.space.pruner}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _same_eval(self, key: str, number: int):
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if (t.number != number and (t.user_attrs.get(ATTR_TARGET) or {}).get(ATTR_EVAL_KEY) == key
                    and t.user_attrs.get(ATTR_METRICS)):
                return t
        return None

    def score(self, trial, prun: tracking.Run, results: dict, the_plan) -> dict[str, Any]:
        """Score the target's model level by level (the pipeline run's ``finish``)."""
        self._raise_if_lost(trial)  # (the storage was unreachable while the target step ran)
        self.target_tags = {}
        target = results[self.space.target]
        key = self.eval_key(the_plan.steps[self.space.target].key or target.key)
        trial.set_user_attr(ATTR_TARGET, {ATTR_EVAL_KEY: key, ATTR_MODEL: target.model_uri})
        self.target_tags = {names.EVAL_KEY_TAG: key, names.TARGET_RUN_TAG: target.run_id,
                            names.TARGET_STEP_TAG: self.space.target}
        same = self._same_eval(key, trial.number)
        if same is not None:
            return self._copy_eval(trial, prun, same)
        single = len(self.objectives) == 1 and self.space.pruning
        from mlproject.evaluation.engine import model_metrics
        from mlproject.models import loading
        from mlproject.models.reference import resolve
        from mlproject.search.fidelity import LevelScorer

        cfg = the_plan.steps[self.space.target].cfg
        start = time.perf_counter()
        # the target step's model is still in memory (the pipeline handed it off): scored as it is,
        # no download, no load; only a reused target step is read from the store
        loading.clear_handoff(keep=target.model_uri)
        loaded = loading.load_model(resolve(target.model_uri), dtype=cfg.dtype, device=loading.pick_device(cfg.device),
                                    fetch=tracking.download)
        try:
            scorer = LevelScorer(loaded, self.eval_plan, self.docs, self.space.fractions, self.space.fidelity_seed)
            wilcoxon = self.space.pruner.get("type") == "wilcoxon"
            for level in scorer.levels():
                shown = {f"fidelity/{k}": v for k, v in level.metrics.items() if "_stderr" not in k}
                shown.update({"fidelity/documents": level.documents, "fidelity/ppl_windows": level.windows})
                prun.log_metrics_and_tags(shown, self.target_tags if level.level == 1 else {}, step=level.level)
                if not single:
                    continue
                obj = self.objectives[0]
                value = level.metrics.get(obj.metric)
                if value is None or not math.isfinite(value):
                    raise RuntimeError(f"{obj.metric} is {value} at level {level.level}")
                if wilcoxon:
                    for instance, v in (level.acc_instances if obj.name == "best_acc" else level.ppl_instances):
                        trial.report(v, step=instance)
                else:
                    trial.report(value, step=round(level.fraction * 100))
                if not level.last and trial.should_prune():
                    spent = {"system/search/documents": level.documents, "system/search/ppl_windows": level.windows,
                             "eval_seconds": time.perf_counter() - start}
                    trial.set_user_attr(ATTR_METRICS, {f"estimate/{obj.metric}": value, ATTR_LEVEL: level.level,
                                                       **spent})
                    prun.log_metrics_and_tags(
                        spent,
                        {names.TRIAL_STATE_TAG: "PRUNED",
                         names.PRUNED_AT_TAG: f"level {level.level} ({level.fraction:g} of the documents)"})
                    return {"pruned": True, "level": level.level, "documents": level.documents}
            metrics = {**level.metrics, **model_metrics(loaded.model), "system/search/documents": level.documents,
                       "system/search/ppl_windows": level.windows, "eval_seconds": time.perf_counter() - start}
            level_reached = level.level
        finally:
            del loaded
            import gc

            gc.collect()
        return self._complete(trial, prun, metrics, level_reached)

    def _complete(self, trial, prun: tracking.Run, metrics: dict[str, float], level: int) -> dict[str, Any]:
        values = []
        for obj in self.objectives:
            value = metrics.get(obj.metric)
            if value is None or not math.isfinite(value):
                raise RuntimeError(f"objective {obj.name}: {obj.metric} is {value}")
            values.append(value)
        used = {td.name: "/".join(next(iter(td.metric.values()))) for td in self.docs}
        prun.log_metrics_and_tags(metrics, {**self.target_tags, names.TRIAL_STATE_TAG: "COMPLETE",
                                            names.AVG_ACC_METRICS_TAG: json.dumps(used)})
        trial.set_user_attr(ATTR_METRICS, {**{k: v for k, v in metrics.items()
                                              if k in HEADLINE or k.startswith(("ppl/", "nll/"))}, ATTR_LEVEL: level})
        return {"pruned": False, "values": values, "metrics": metrics}

    def _copy_eval(self, trial, prun: tracking.Run, same) -> dict[str, Any]:
        """The same model with the same evaluation was scored by a completed trial (the sampler
        proposed a configuration again): its numbers, without scoring a document."""
        log.info("trial %d: same model and evaluation as trial %d; its scores are reused", trial.number, same.number)
        if len(self.objectives) == 1 and self.space.pruning:  # (report raises in multi-objective studies)
            for step, value in sorted(same.intermediate_values.items()):
                trial.report(value, step=step)
        metrics = dict(same.user_attrs[ATTR_METRICS])
        level = metrics.pop(ATTR_LEVEL, len(self.space.fractions))
        metrics.update({"system/search/documents": 0, "system/search/ppl_windows": 0, "eval_seconds": 0.0})
        prun.set_tags({names.EVAL_REUSED_FROM_TAG: same.user_attrs.get(ATTR_RUN, ""),
                       names.EVAL_REUSED_TRIAL_TAG: same.number})
        return self._complete(trial, prun, metrics, level)
