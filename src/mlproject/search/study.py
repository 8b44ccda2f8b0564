"""`search` / `mlproject search`: an Optuna study whose trials are pipeline runs.

    mlproject search --space pipelines/spaces/demo.yaml --model smollm2 --n-trials 8      # offline
    mlproject search --space … --storage postgresql://user@host/optuna --study mistral-cr  # N machines
    mlproject search --space … --workers 2                                                 # 2 local processes
    mlflow run . -e evaluate -P model=models:/demo-smollm2@best_acc --env-manager local     # the winner

Order of work:

1. Read and check the space (``search.space``): every choice and range end goes through the
   pipeline runner's ``plan()``; bad input is one line, exit 2, before any study, trial or run.
2. Open the storage (SQLite file by default, any SQLAlchemy URL, or ``journal:<file>``) and
   create or load the study (same name = resume; a different space under the same name is
   refused). RDB storages get a heartbeat: a trial whose worker died (SIGKILL, lost machine)
   is failed once its heartbeat is stale, its MLflow run (left RUNNING by the kill) is ended
   FAILED, and it is retried with the same parameters (``RetryHeartbeatStaleTrialCallback``).
3. Open the study run (``search:<study>``; the one an earlier worker opened when the study has
   one, so every worker's trials nest under one run) and run trials — in this process, or in
   ``workers`` local processes — until the study holds ``n_trials`` trials.
4. A trial is a pipeline run (``pipeline.runner.execute``) named ``trial <n>``, a child of the
   study run, with the pipeline's steps as its children; steps whose reuse key exists are
   reused, so trials sharing a prefix (same prune ratio, different LoRA lr) share its run.
   After the steps, the target step's model is scored level by level on nested random
   document subsets (``search.fidelity``); a single-objective study reports each level to its
   pruner and stops a poor trial early. The run carries ``mlproject.trial_state`` (COMPLETE,
   PRUNED, FAIL) and the Optuna trial keeps the run id as the user attr ``mlflow_run_id``.
5. At the end of every launch: winners (best completed trial per objective: tag
   ``mlproject.role``, registered model ``<study>@best_acc`` / ``@best_ppl`` with study, trial
   and metrics as version tags) and the study run's tables and plots (``search.report``).

Counting: the study is done when it holds ``n_trials`` *counted* trials: finished COMPLETE or
PRUNED ones, FAIL ones that raised (a deterministic error would fail again), and the ones
running or waiting. A trial failed by heartbeat or interrupted is not counted (its retry, or a
new trial, takes its place). Optuna has no atomic "claim a slot", so two workers may both start
a trial in the same instant when one slot is left: the later one (by trial number) finds the
study full at its start, is marked ``surplus`` and FAILs at once without a run; it never counts.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject import progress, tracking
from mlproject.config import SearchConfig
from mlproject.errors import UserError
from mlproject.search import space as space_mod
from mlproject.steps import StepResult

log = logging.getLogger(__name__)

T = tracking.TAG_PREFIX
ATTR_RUN = "mlflow_run_id"  # trial and study user attr: the MLflow run
ATTR_ERROR = "error"  # set when the objective raised: the trial counts as done
ATTR_SURPLUS = "surplus"
ATTR_METRICS = "metrics"
ATTR_TARGET = "target"  # {"model_uri": the scored model, "eval_key": model key + evaluation settings}
ATTR_MODEL = "model_uri"
ATTR_EVAL_KEY = "eval_key"
ATTR_LEVEL = "level"  # inside ATTR_METRICS: the last level scored
STUDY_SPACE = "space_fingerprint"
STUDY_WINNERS = "winners"
HEADLINE = ("avg_acc", "model_size_mb", "params_b", "system/search/documents", "system/search/ppl_windows", "eval_seconds")


class Surplus(Exception):
    """The study already held n_trials when this trial started (two workers raced for the last slot)."""


# ----------------------------------------------------------------------------- storage
def storage_label(url: str) -> str:
    return tracking.redact(url)


def open_storage(url: str, heartbeat: int = 0, max_retry: int = 2):
    """An Optuna storage from ``url``: ``journal:<file>`` (or a ``.log`` / ``.journal`` path) is
    Optuna's journal file; anything else an SQLAlchemy URL (RDB storage, with a heartbeat when
    ``heartbeat`` > 0). Unreachable or malformed storages fail as UserError."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    url = (url or "sqlite:///optuna.db").strip()
    if url.startswith("journal:") or (("://" not in url) and url.endswith((".log", ".journal"))):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"storage {url!r}: folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise UserError(f"storage {url!r}: give an SQLAlchemy URL (sqlite:///optuna.db, postgresql://…) or "
                        "journal:<file>")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise UserError(f"storage {storage_label(url)!r}: {exc}") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db and db != ":memory:" and not Path(db).expanduser().resolve().parent.is_dir():
            raise UserError(f"storage {url!r}: folder {Path(db).parent} does not exist")
        # several worker processes on one file: wait for the lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        if db and db != ":memory:":
            _wal(Path(db).expanduser())
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                      heartbeat_stale_trial_callback=StaleTrial(max_retry))
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, **kwargs)
    except Exception as exc:  # driver missing, server down, bad credentials
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"storage {storage_label(url)!r} cannot be opened: {tracking.redact(first)}") from None


def _wal(path: Path) -> None:
    """Write-ahead logging for a local SQLite storage file (a setting the file keeps): one sync
    per commit instead of several, and readers no longer block the writer — the search commits a
    few times per trial from every worker. (Not for files on NFS; use PostgreSQL across machines.)"""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(str(path), timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise UserError(f"storage sqlite:///{path}: {exc}") from None


class StaleTrial:
    """Heartbeat-stale trial: end its MLflow run (SIGKILL left it RUNNING), then retry it."""

    def __init__(self, max_retry: int):
        import warnings

        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study, trial) -> None:
        run_id = trial.user_attrs.get(ATTR_RUN)
        if run_id:
            ended = tracking.end_stale_run(
                run_id, "worker lost: the trial's heartbeat went stale (process killed or machine lost); retried",
                tags={f"{T}trial_state": "FAIL"})
            log.warning("trial %d: its worker stopped beating; run %s ended FAILED (%d runs), retrying it",
                        trial.number, run_id, len(ended))
        else:
            log.warning("trial %d: its worker stopped beating before its run started; retrying it", trial.number)
        self.retry(study, trial)


def counted(trial) -> bool:
    """Does the trial take one of the study's n_trials slots? (see the module docstring)"""
    from optuna.trial import TrialState

    if trial.user_attrs.get(ATTR_SURPLUS):
        return False
    return trial.state != TrialState.FAIL or ATTR_ERROR in trial.user_attrs


def tally(study) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {"done": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        if not counted(t):
            continue
        if t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        else:
            out["done"] += 1
    return out


def open_study(storage, name: str, space: space_mod.Space, create: bool = True):
    """(study, created): the study ``name`` in ``storage``; refused when it exists with other
    directions or another space (Optuna would reject the distributions trial by trial)."""
    import optuna

    sampler, pruner = space.sampler_object(), space.pruner_object()
    created = False
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        if not create:
            raise UserError(f"study {name!r} does not exist in the storage") from None
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        directions=space.directions)
            study.set_user_attr(STUDY_SPACE, space.fingerprint())
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it meanwhile
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    directions = [d.name.lower() for d in study.directions]
    if directions != space.directions:
        raise UserError(f"study {name!r} exists with directions {directions}, the space asks for {space.directions}; "
                        "use another --study")
    recorded = study.user_attrs.get(STUDY_SPACE)
    if recorded and recorded != space.fingerprint():
        raise UserError(f"study {name!r} was created with another space (parameters or objectives differ); "
                        "resume it with the same space, or use another --study")
    return study, created


# ----------------------------------------------------------------------------- the run
def run(cfg: SearchConfig, parent: tracking.Run | None = None) -> StepResult:
    space = space_mod.load(cfg.space, cfg.set, model=cfg.model, n_trials=cfg.n_trials,
                           seed=cfg.seed if cfg.seed >= 0 else None, pruner=cfg.pruner,
                           objectives=cfg.objectives)
    if parent is None:
        tracking.check_server(cfg.tracking_uri or None)
    name = cfg.study or space_mod.study_name(space)
    experiment = _experiment(cfg, name, parent)
    checked = space_mod.check(space, experiment)
    storage = open_storage(cfg.storage, cfg.heartbeat, cfg.max_retry)
    if cfg.dry_run:
        return _dry_run(cfg, space, storage, name, experiment)
    study, created = open_study(storage, name, space)
    run_id = _study_run_id(study, created)
    log.info("study %s (%s): %d trials wanted, %s", name, storage_label(cfg.storage), space.n_trials, tally(study))
    with tracking.step_run("search", experiment=experiment, run_name=cfg.run_name or f"search:{name}",
                           run_id=run_id, parent=parent if run_id is None else None,
                           tags={f"{T}study": name, f"{T}space": space.path, f"{T}role": "study"}) as srun:
        if study.user_attrs.get(ATTR_RUN) != srun.run_id:
            study.set_user_attr(ATTR_RUN, srun.run_id)
        settings = _study_params(cfg, space, name)
        if run_id is None:
            srun.log_params(settings)
        else:  # params are immutable: a later launch (other --set, storage URL …) records its own
            srun.log_dict(settings, f"launches/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
        srun.log_text(Path(space.path).read_text(), "space.yaml")
        ctx = Context(cfg=cfg, study_name=name, experiment_id=srun.experiment_id, study_run_id=srun.run_id)
        start = time.perf_counter()
        if cfg.workers > 1:
            _spawn(ctx, cfg.workers)
        else:
            Worker(ctx, space=space, study=study, checked=checked).loop()
        from mlproject.search import report

        study = _reload(study)
        summary = report.finalize(study, space, srun, name, seconds=time.perf_counter() - start)
        return StepResult(step="search", run_id=srun.run_id, metrics=summary.metrics, text=summary.text,
                          details={"study": name, "winners": summary.winners, "storage": storage_label(cfg.storage)})


def _experiment(cfg: SearchConfig, name: str, parent: tracking.Run | None) -> str:
    if parent is not None:
        return tracking.experiment_name(parent.experiment_id)
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher:
        return tracking.experiment_name(tracking.run_experiment_id(launcher))
    return cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or name


def _reload(study):
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=study.sampler,
                             pruner=study.pruner)


def _study_run_id(study, created: bool, wait: float = 30.0) -> str | None:
    """The study's MLflow run when an earlier (or concurrent) worker opened one and it still
    exists; None: open a new one."""
    deadline = time.monotonic() + (0 if created else wait)
    while True:
        run_id = _reload(study).user_attrs.get(ATTR_RUN) if not created else None
        if run_id:
            if tracking.run_status(run_id) is None:
                log.warning("study run %s is gone from the tracking server; opening a new one", run_id)
                return None
            return run_id
        if time.monotonic() >= deadline or study.get_trials(deepcopy=False):
            return None
        time.sleep(1.0)  # the worker that created the study is opening its run


def _study_params(cfg: SearchConfig, space: space_mod.Space, name: str) -> dict[str, Any]:
    return {"study": name, "space": space.path, "pipeline": space.pipeline, "target": space.target,
            "set": " ".join(space.overrides) or "none", "objectives": ",".join(o.name for o in space.objectives),
            "sampler": json.dumps(space.sampler, sort_keys=True), "pruner": json.dumps(space.pruner, sort_keys=True),
            "levels": ",".join(f"{f:g}" for f in space.fractions), "fidelity_seed": space.fidelity_seed,
            "storage": storage_label(cfg.storage),
            **{f"space.{n}": p.describe() for n, p in space.params.items()}}


def _dry_run(cfg, space, storage, name: str, experiment: str) -> StepResult:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
        state = tally(study)
        status = f"exists: {state['done']} finished, {state['running']} running, {state['waiting']} waiting"
    except KeyError:
        status = "new"
    text = (f"search {name} (space {space.path}, pipeline {space.pipeline}, target {space.target}), "
            f"experiment {experiment!r}: dry run, nothing was run\n"
            f"study: {status}; {space.n_trials} trials wanted; storage {storage_label(cfg.storage)}\n"
            f"objectives: {', '.join(f'{o.name} ({o.direction} {o.metric})' for o in space.objectives)}; "
            f"sampler {space.sampler}; pruner {space.pruner}; levels {space.fractions}\n"
            f"a trial runs: {', '.join(space.steps)}\n\n{space.table()}\n")
    return StepResult(step="search", run_id="", status="DRY_RUN", text=text)


# ----------------------------------------------------------------------------- workers
@dataclass
class Context:
    """What a worker (this process or a spawned one) needs to join the study."""

    cfg: SearchConfig
    study_name: str
    experiment_id: str
    study_run_id: str


WORKER_ENV = "MLPROJECT_SEARCH_WORKER"


def _spawn(ctx: Context, n: int) -> None:
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
    cmd = [sys.executable, "-c", "from mlproject.search.study import worker_main; worker_main()"]
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
    """Runs trials of one study until it holds n_trials (see the module docstring)."""

    def __init__(self, ctx: Context, space: space_mod.Space, study, checked: tuple | None = None):
        self.ctx, self.space, self.study = ctx, space, study
        self.cfg = ctx.cfg
        self.parent = tracking.Run(ctx.study_run_id, ctx.experiment_id)
        self.experiment = tracking.experiment_name(ctx.experiment_id)
        _, self.eval_plan, self.docs = checked or space_mod.check(space, self.experiment)
        self.objectives = space.objectives
        self.target_tags: dict[str, Any] = {}  # the scored trial's target, logged with its first metrics

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
                try:
                    # (no gc_after_trial: a full collection costs ~0.4 s with torch loaded; score() frees
                    # the model itself)
                    self.study.optimize(self.objective, n_trials=1, catch=(Exception,))
                except KeyboardInterrupt as exc:
                    if isinstance(exc.__cause__, SystemExit):
                        raise exc.__cause__ from None
                    raise
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
        try:
            outcome = self._trial(trial, state)
        except BaseException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            if not interrupted:
                # a raised error counts the trial as done: the same values would fail again (and
                # a bug here must not make every worker start trials forever)
                trial.set_user_attr(ATTR_ERROR, first[:1000])
            with contextlib.suppress(Exception):
                if state["run_id"]:
                    tracking.set_run_tags(state["run_id"], {f"{T}trial_state": "FAIL"})
                elif not interrupted:
                    self._failed_run(trial, state["tags"], exc)
            if isinstance(exc, SystemExit):
                # Optuna records FAIL for KeyboardInterrupt (not SystemExit) and re-raises it
                raise KeyboardInterrupt(first) from exc
            raise
        if outcome["pruned"]:
            raise optuna.TrialPruned(f"pruned at level {outcome['level']} ({outcome['documents']} documents)")
        return outcome["values"] if len(outcome["values"]) > 1 else outcome["values"][0]

    def _trial(self, trial, state: dict[str, Any]) -> dict[str, Any]:
        from mlproject.pipeline import runner

        values = {name: p.suggest(trial) for name, p in self.space.params.items()}
        tags = {f"{T}study": self.ctx.study_name, f"{T}trial": trial.number, f"{T}trial_state": "RUNNING",
                f"{T}role": "trial", f"{T}optuna_trial_id": trial._trial_id}
        retry_of = self.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            tags[f"{T}retry_of"] = retry_of
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
                tags={**tags, f"{T}trial_state": "FAIL"}) as prun:
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
        self.target_tags = {}
        target = results[self.space.target]
        key = self.eval_key(the_plan.steps[self.space.target].key or target.key)
        trial.set_user_attr(ATTR_TARGET, {ATTR_EVAL_KEY: key, ATTR_MODEL: target.model_uri})
        self.target_tags = {f"{T}eval_key": key, f"{T}target_run": target.run_id,
                            f"{T}target_step": self.space.target}
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
                        {f"{T}trial_state": "PRUNED",
                         f"{T}pruned_at": f"level {level.level} ({level.fraction:g} of the documents)"})
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
        prun.log_metrics_and_tags(metrics, {**self.target_tags, f"{T}trial_state": "COMPLETE",
                                            f"{T}avg_acc_metrics": json.dumps(used)})
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
        prun.set_tags({f"{T}eval_reused_from": same.user_attrs.get(ATTR_RUN, ""),
                       f"{T}eval_reused_trial": same.number})
        return self._complete(trial, prun, metrics, level)
