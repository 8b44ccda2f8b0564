"""A local, incremental run table for ``compare``: fetch only what changed since the last compare.

Why: searching 10,000 runs × 20 metrics costs an MLflow server ~13 CPU-seconds (it loads every
run's tags, params and metrics), and a compare repeated a minute later asks for the same runs.
With ``cache=on`` (the default of the compare step) ``compare.query.fetch_runs`` keeps the run
records it built, one file per (tracking server, user, experiment, filter), and the next compare
of that experiment asks the server only for what can have changed, then checks the result.

What the warm path asks (all ``runs/search`` calls, the user's filter ANDed to each):

1. runs that are live now (status RUNNING or SCHEDULED): their metrics are still moving;
2. runs that were live in the table and are not any more, by id: finished, reaped, deleted;
3. runs whose ``end_time`` is after the last fetch (minus ``SLACK_MS`` for clocks that differ
   between machines): a run resumed and ended again since (``mlflow.start_run(run_id=…)``);
4. every run that is *not* in the table (``attributes.run_id NOT IN (…)``, split by run-id
   prefix so one filter stays under the size MLflow's filter parser accepts): new runs, runs
   logged with an old start time (imports), restored runs, runs that came to match the filter;
5. a count check: one search of two runs at offset ``len(table) - 1`` (page tokens of MLflow's
   SQL and file stores are offsets) must return exactly one run. If fewer, the cached runs are
   looked up among the deleted ones and dropped, and the count is checked again. Anything else
   (more runs, a count still off, a server whose page tokens are not offsets, an error) makes
   the compare fetch everything, as without a cache.

So which runs are compared is always exactly what an uncached compare sees (up to changes
made while the compare runs, as with any paged search). What a run *holds* is refetched when
it is live, when it ended since the last fetch, and when the experiment carries a new
``mlproject.runs_changed`` mark. mlproject's own after-the-fact writers set that mark (tags put
on finished runs: search winners, stale runs ended; ``runs sync`` sending a spool late), and an
experiment whose mark changed is fetched in full.

**Limits.** MLflow records no per-run change time: tags, params or metrics written to an
*ended* run by another client (the MLflow UI, a raw ``MlflowClient``, a script) leave no trace a
cheap query can see. Such edits show after the table's time to live, when the whole table is
fetched again (``MLPROJECT_COMPARE_CACHE_TTL`` seconds since its last full fetch, default 600;
0 = every compare fetches in full), or at once with ``cache=refresh`` (fetch in full and
rewrite the table). ``cache=off`` neither reads nor writes it. Runs are ended by a client whose
clock may differ from this one: an end time more than ``SLACK_MS`` behind this machine's clock
is missed by query 3. Many live runs (a crashed study never reaped) are refetched every time.

Where: ``MLPROJECT_COMPARE_CACHE``, else ``compare/`` under the mlproject cache
(``mlproject.paths.cache_root``). Files are JSON (never pickle: a cache folder shared by a team
must not run code), written to a temporary file and renamed, so a reader sees the old table or
the new one. A file that cannot be read or does not match what it claims to be is ignored (the
compare fetches in full and rewrites it), never an error. The server is named without its
credentials (``mlproject.redaction.redact``); the user name is part of the key, so users of a
shared cache folder who see different runs on a server with access control do not share tables.

This module is pure (files, JSON, no MLflow): ``compare.query`` does the talking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mlproject import paths
from mlproject.errors import UserError
from mlproject.redaction import redact

log = logging.getLogger(__name__)

#: ``cache=`` values: use and update the table | ignore it | fetch in full and rewrite it.
MODES = ("on", "off", "refresh")
DIR_ENV = "MLPROJECT_COMPARE_CACHE"
TTL_ENV = "MLPROJECT_COMPARE_CACHE_TTL"
DEFAULT_TTL_S = 600.0
#: How far back (ms) before the last fetch the "ended since" query looks: runs are ended with
#: the clock of the machine that ran them.
SLACK_MS = 10 * 60 * 1000
#: Run ids per ``run_id [NOT] IN (…)`` filter. MLflow parses filters with sqlparse, which
#: refuses a statement of more than 10,000 tokens (≈ 3,300 quoted ids); 2,000 leaves room
#: for the user's own filter.
IDS_PER_FILTER = 2_000
#: Statuses of runs whose numbers may still change.
LIVE_STATUSES = ("RUNNING", "SCHEDULED")
_FORMAT = "mlproject.compare.cache/1"
_HEX = "0123456789abcdef"


def check_mode(mode: str) -> str:
    """``on`` / ``off`` / ``refresh`` (any case); UserError naming anything else."""
    m = str(mode or "").strip().lower()
    if m not in MODES:
        raise UserError(f"unknown cache mode {mode!r}: choose from {', '.join(MODES)}")
    return m


def cache_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or paths.cache_root() / "compare")


def ttl_seconds() -> float:
    """``MLPROJECT_COMPARE_CACHE_TTL`` (seconds ≥ 0), default 600; UserError on a bad value."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not ttl >= 0:  # also NaN
        raise UserError(f"{TTL_ENV} must be a number of seconds ≥ 0, got {raw!r}")
    return ttl


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Entry:
    """One experiment's run table as of ``fetched_ms``: the records ``fetch_runs`` builds
    (``run_id``, ``run_name``, ``experiment_id``, ``status``, times, ``tags``, ``metrics``,
    ``params``), keyed by run id.

    experiment_created: the experiment's creation time (a recreated experiment with a reused
        id is another experiment).
    runs_changed: the experiment's ``mlproject.runs_changed`` mark when fetched.
    offset_tokens: the server's page tokens are offsets (the count check relies on it).
    fetched_ms: this machine's clock when the fetch that wrote the table began.
    verified_ms: same, for the last fetch in full (the time to live counts from it).
    """

    server: str
    user: str
    experiment_id: str
    filter: str
    experiment_created: int | None = None
    runs_changed: str | None = None
    offset_tokens: bool = False
    fetched_ms: int = 0
    verified_ms: int = 0
    records: dict[str, dict] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return entry_path(self.server, self.user, self.experiment_id, self.filter)

    def key(self) -> list:
        return [self.server, self.user, self.experiment_id, self.filter]


def entry_path(server: str, user: str, experiment_id: str, filter_string: str) -> Path:
    """The table's file: a hash of the key (server without credentials, user, experiment, filter)."""
    key = json.dumps([redact(server), user or "", str(experiment_id), filter_string or ""])
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def new_entry(server: str, user: str, experiment_id: str, filter_string: str) -> Entry:
    return Entry(server=redact(server), user=user or "", experiment_id=str(experiment_id),
                 filter=filter_string or "")


def load(server: str, user: str, experiment_id: str, filter_string: str) -> Entry | None:
    """The stored table for this key, or None (none yet, unreadable, another format or key)."""
    want = new_entry(server, user, experiment_id, filter_string)
    path = want.path
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        if doc.get("format") != _FORMAT or doc.get("key") != want.key():
            log.info("compare cache %s is for something else; ignored", path)
            return None
        records = doc["records"]
        if not isinstance(records, list) or not all(isinstance(r, dict) and "run_id" in r
                                                    for r in records):
            raise ValueError("records are not run records")
        want.experiment_created = doc.get("experiment_created")
        want.runs_changed = doc.get("runs_changed")
        want.offset_tokens = bool(doc.get("offset_tokens"))
        want.fetched_ms = int(doc["fetched_ms"])
        want.verified_ms = int(doc["verified_ms"])
        want.records = {r["run_id"]: r for r in records}
        return want
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("compare cache %s is unreadable (%s); fetching in full", path, exc)
        return None


def save(entry: Entry) -> Path | None:
    """Write the table atomically (temporary file + rename). Returns the path, or None when
    the folder is not writable (logged; a compare never fails for its cache)."""
    path = entry.path
    doc = {"format": _FORMAT, "key": entry.key(),
           "experiment_created": entry.experiment_created, "runs_changed": entry.runs_changed,
           "offset_tokens": entry.offset_tokens, "fetched_ms": entry.fetched_ms,
           "verified_ms": entry.verified_ms, "records": list(entry.records.values())}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a shared cache follows the umask
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, separators=(",", ":"))
        os.replace(tmp, path)
        return path
    except OSError as exc:
        log.warning("could not write the compare cache %s: %s", path, exc)
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cold_reason(entry: Entry | None, *, mode: str, experiment_created: int | None,
                runs_changed: str | None, now: int, ttl_s: float) -> str | None:
    """Why this experiment must be fetched in full, or None when its table can be updated."""
    if mode == "refresh":
        return "cache=refresh"
    if entry is None:
        return "no table yet"
    if not entry.offset_tokens:
        return "the server's page tokens are not offsets (no count check)"
    if entry.experiment_created != experiment_created:
        return "the experiment was recreated"
    if entry.runs_changed != runs_changed:
        return "runs were changed after the fact (mlproject.runs_changed)"
    age = now - entry.verified_ms
    if age < 0 or age >= ttl_s * 1000:
        return f"time to live ({ttl_s:g} s) expired"
    return None


def chunks(ids: Iterable[str], size: int = IDS_PER_FILTER) -> list[list[str]]:
    items = list(ids)
    return [items[i:i + size] for i in range(0, len(items), size)]


def not_in_groups(ids: Iterable[str], limit: int = IDS_PER_FILTER) -> list[tuple[str, list[str]]]:
    """Split run ids into ``(prefix, ids with that prefix)`` groups of at most ``limit`` ids whose
    prefixes cover every lowercase hex run id (MLflow's are uuid4 hex): one ``run_id LIKE
    'prefix%' AND run_id NOT IN (…)`` search per group then finds every run not in ``ids``."""
    out: list[tuple[str, list[str]]] = []

    def split(prefix: str, group: list[str]) -> None:
        if len(group) <= limit or len(prefix) >= 32:
            out.append((prefix, group))
            return
        depth = len(prefix)
        for c in _HEX:
            split(prefix + c, [i for i in group if len(i) > depth and i[depth] == c])

    split("", sorted(set(ids)))
    return out


def ids_clause(ids: Iterable[str], negate: bool = False) -> str:
    quoted = ",".join(f"'{i}'" for i in ids)
    return f"attributes.run_id {'NOT IN' if negate else 'IN'} ({quoted})"


def not_in_filter(prefix: str, ids: list[str]) -> str:
    """The search for runs with this id prefix that are not among ``ids``."""
    parts = [f"attributes.run_id LIKE '{prefix}%'"] if prefix else []
    if ids:
        parts.append(ids_clause(ids, negate=True))
    return " AND ".join(parts)


def live_filter() -> str:
    """Runs RUNNING or SCHEDULED (status accepts no IN list; filters are AND-only)."""
    return " AND ".join(f"attributes.status != '{s}'" for s in ("FINISHED", "FAILED", "KILLED"))


def and_filter(user: str, ours: str) -> str:
    return " AND ".join(f for f in ((user or "").strip(), ours) if f)


@dataclass
class Update:
    """What the warm queries found, and the table they imply."""

    records: dict[str, dict]
    fetched: int  # records the server sent
    changed: bool  # the table differs from the stored one
    from_cache: int  # records of the table that no query returned (served as stored)


def apply_changes(cached: Mapping[str, dict], found: Iterable[dict], gone: Iterable[str]) -> Update:
    """The table after the warm queries: cached records, minus ``gone`` ids, with every record
    ``found`` replacing or adding its run."""
    out = dict(cached)
    changed = False
    for rid in gone:
        if out.pop(rid, None) is not None:
            changed = True
    ids = set()
    for rec in found:
        rid = rec["run_id"]
        ids.add(rid)
        if out.get(rid) != rec:
            out[rid] = rec
            changed = True
    return Update(records=out, fetched=len(ids), changed=changed,
                  from_cache=sum(1 for rid in out if rid not in ids))
