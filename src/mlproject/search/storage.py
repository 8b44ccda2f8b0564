"""Where a study lives: Optuna storages (SQLite, any SQLAlchemy URL, Optuna's journal file), the
heartbeat callback that fails and retries a dead worker's trial, and opening or resuming a study.

RDB storages get a heartbeat: a trial whose worker died (SIGKILL, lost machine) is failed once
its heartbeat is stale, its MLflow run (left RUNNING by the kill) is ended FAILED, and it is
retried with the same parameters (``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlproject import tracking
from mlproject.errors import UserError
from mlproject.search.trials import ATTR_RUN, STUDY_SPACE
from mlproject.tracking import names

if TYPE_CHECKING:
    from mlproject.search.space import Space

log = logging.getLogger(__name__)



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
        raise UserError(f"storage {url!r}: give an SQLAlchemy URL (sqlite:///optuna.db, postgresql+psycopg2://…) or "
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
            return (_beating_storage() if heartbeat else RDBStorage)(url, **kwargs)
    except Exception as exc:  # driver missing, server down, bad credentials
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if isinstance(exc, ImportError) and parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
            hint = " (a plain postgresql:// means psycopg 3: pip install 'psycopg[binary]', or write postgresql+psycopg2://)"
        raise UserError(f"storage {storage_label(url)!r} cannot be opened: {tracking.redact(first)}{hint}") from None


_BEATING: type | None = None


def _beating_storage() -> type:
    """RDBStorage whose heartbeat survives a failed write. Optuna's heartbeat thread calls
    ``record_heartbeat`` in a loop with no try: one write that errors (the database restarted, a
    connection reset) ends the thread, the trial stops beating for good, and another worker fails
    it as stale although its worker is alive. Here a failed beat is a warning and the next one
    is tried on time: only a worker silent for the whole grace period loses its trial."""
    global _BEATING
    if _BEATING is None:
        from optuna.storages import RDBStorage

        class BeatingRDBStorage(RDBStorage):
            def record_heartbeat(self, trial_id: int) -> None:
                try:
                    super().record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - the next beat is the retry
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    log.warning("trial id %d: a heartbeat could not be written (%s); trying again in %s s",
                                trial_id, tracking.redact(first)[:300], self.heartbeat_interval)

        _BEATING = BeatingRDBStorage
    return _BEATING


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
                tags={names.TRIAL_STATE_TAG: "FAIL"})
            log.warning("trial %d: its worker stopped beating; run %s ended FAILED (%d runs), retrying it",
                        trial.number, run_id, len(ended))
        else:
            log.warning("trial %d: its worker stopped beating before its run started; retrying it", trial.number)
        self.retry(study, trial)


def open_study(storage, name: str, space: Space, create: bool = True):
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


def reload_study(study):
    """The study read again from its storage (trials and user attrs another worker wrote since)."""
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=study.sampler,
                             pruner=study.pruner)
