"""`search` / `mlproject search`: an Optuna study whose trials are pipeline runs.

    mlproject search --space pipelines/spaces/demo.yaml --model smollm2 --n-trials 8      # offline
    mlproject search --space … --storage postgresql+psycopg2://user@host/optuna --study mistral-cr  # N machines
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

Counting (which trials take one of the ``n_trials`` slots) and the trial user attrs:
``search.trials``; storages and the heartbeat: ``search.storage``; the workers and what one
trial does: ``search.workers``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mlproject import tracking
from mlproject.search import report
from mlproject.search import space as space_mod
from mlproject.search.config import SearchConfig
from mlproject.search.storage import open_storage, open_study, reload_study, storage_label
from mlproject.search.trials import ATTR_RUN, tally
from mlproject.search.workers import Context, Worker, spawn
from mlproject.steps import StepResult
from mlproject.tracking import names

log = logging.getLogger(__name__)



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
                           tags={names.STUDY_TAG: name, names.SPACE_TAG: space.path, names.ROLE_TAG: "study"}) as srun:
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
            spawn(ctx, cfg.workers)
        else:
            Worker(ctx, space=space, study=study, checked=checked).loop()
        study = reload_study(study)
        summary = report.finalize(study, space, srun, name, seconds=time.perf_counter() - start,
                                  register_weights=cfg.register_weights)
        return StepResult(step="search", run_id=srun.run_id, metrics=summary.metrics, text=summary.text,
                          details={"study": name, "winners": summary.winners, "storage": storage_label(cfg.storage)})


def _experiment(cfg: SearchConfig, name: str, parent: tracking.Run | None) -> str:
    if parent is not None:
        return tracking.experiment_name(parent.experiment_id)
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher:
        return tracking.experiment_name(tracking.run_experiment_id(launcher))
    return cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or name


def _study_run_id(study, created: bool, wait: float = 30.0) -> str | None:
    """The study's MLflow run when an earlier (or concurrent) worker opened one and it still
    exists; None: open a new one."""
    deadline = time.monotonic() + (0 if created else wait)
    while True:
        run_id = reload_study(study).user_attrs.get(ATTR_RUN) if not created else None
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
