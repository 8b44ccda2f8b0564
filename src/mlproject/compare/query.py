"""Tracking server → DataFrames: the only module of ``compare`` that talks to MLflow.

``fetch_runs(client, ...)`` resolves experiments (by name or id), pages through the
``runs/search`` API (the server caps a page at 50,000 runs; ``MlflowClient.search_runs``
returns 1,000 *silently* unless paged, so we always follow ``next_page_token``; default page
10,000), adds runs named explicitly by id, then
fetches the lineage runs referenced by ``mlproject.upstream_run`` that the search did not
return (so "before" values can be found even when a filter excluded the upstream runs).

The result is a :class:`RunSet`: ``runs`` (one row per run: name, experiment, status, times,
lineage tags) and ``metrics`` (one row per run, one float column per metric key, latest
value). Tags used (``mlproject.tracking.names``; ARCHITECTURE.md "Run conventions"): ``mlproject.step``, ``mlproject.model``,
``mlproject.base_model``, ``mlproject.family``, ``mlproject.upstream_run``, ``mlproject.role``
and ``mlproject.avg_acc_metrics`` (JSON ``{"boolq": "acc", …}``: which metric each task
contributed to ``avg_acc``). MLflow's own ``mlflow.parentRunId`` is kept as ``parent_run``.

Speed: against a tracking server (``http(s)://``) the pages are fetched with MLflow's own
``rest_utils.http_request`` and read as plain JSON, skipping the protobuf round trip that
``MlflowClient.search_runs`` does (5–6 s of client CPU per 10,000 runs × 20 metrics);
other stores (``sqlite:///``, ``file:``) go through ``MlflowClient.search_runs``.

Pages after the first are requested 4 at a time when the server's page tokens are plain
offsets (MLflow's SQL / file stores), so a multi-worker server searches them concurrently
(the server's own search is ~80% of the time at 10,000 runs).

Request count: one search call per page (plus at most ``parallel - 1`` empty ones), one ``get_run`` per
explicitly listed run id, and one search per 100 missing lineage ids (plus ``get_run`` for
lineage runs living in other experiments). It grows with pages, not with runs.

Cache (``cache="on"``, the compare step's default; ``mlproject.compare.cache`` says how and
what it cannot see): the experiments' runs come from a local run table, updated with the runs
that changed since the last compare and checked against the server's count; ``"refresh"``
fetches in full and rewrites the table, ``"off"`` (this function's default) does neither.
``RunSet.cache`` reports runs served from the table, runs fetched and the requests made.
Lineage runs already fetched (out of scope by status or step) are taken from what was fetched.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd

from mlproject.errors import UserError
from mlproject.evaluation import documents as doc_table
from mlproject.tracking import names

log = logging.getLogger(__name__)

#: ``RunSet.runs`` column → the tag it is read from (tracking.names: the names the steps write).
TAG_KEYS = {
    "step": names.STEP_TAG,
    "model": names.MODEL_TAG,
    "base_model": names.BASE_MODEL_TAG,
    "family": names.FAMILY_TAG,
    "upstream_run": names.UPSTREAM_TAG,
    "role": names.ROLE_TAG,
    "avg_acc_metrics": names.AVG_ACC_METRICS_TAG,
    "parent_run": names.PARENT_RUN_TAG,
}
REUSED_TAG = names.REUSED_FROM_TAG
#: Evaluation settings that make two runs' numbers comparable (or not): column ``setting:<name>``
#: of ``RunSet.runs``, read from the first of these params / tags the run has (``resolved.<p>`` is
#: what a step logged beside the raw value ``mlflow run`` logged). PPL settings are the ones used.
SETTINGS = {
    "limit": ("param:resolved.limit", "param:limit"),
    "num_fewshot": ("param:resolved.num_fewshot", "param:num_fewshot"),
    "batch_size": ("param:resolved.batch_size", "param:batch_size"),
    "seqlen": ("param:ppl.seqlen",),
    "ppl_windows": ("param:ppl.windows",),
    "lm_eval": ("tag:env.pkg.lm_eval",),
}
SETTING_PREFIX = "setting:"
RUN_COLUMNS = ["run_name", "experiment_id", "experiment", "status", "start_time", "end_time",
               *TAG_KEYS, "in_scope", *(SETTING_PREFIX + k for k in SETTINGS)]

#: mlflow.store.tracking.SEARCH_MAX_RESULTS_THRESHOLD; the REST handler rejects more.
SERVER_PAGE_CAP = 50_000
DEFAULT_PAGE_SIZE = 2_500
#: Concurrent page requests (see _search_pages); the MLflow server runs 4 workers by default.
DEFAULT_PARALLEL = 4
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_LINEAGE_CHUNK = 100
_LINEAGE_DEPTH = 6


def is_run_id(text: str) -> bool:
    return bool(_RUN_ID.match(text or ""))


@dataclass
class RunSet:
    """What the compare views are computed from (pure data, no MLflow objects).

    runs: index ``run_id``; columns RUN_COLUMNS. ``in_scope`` is False for runs fetched only
    to resolve lineage (upstream "before" runs outside the experiments / filter asked for).
    metrics: index ``run_id`` (same order as ``runs``), one float column per metric key.
    order: run ids in the order the user listed them (``runs=``), for baseline defaults.
    requests: tracking API calls made to build this set.
    """

    runs: pd.DataFrame
    metrics: pd.DataFrame
    order: list[str] = field(default_factory=list)
    requests: int = 0
    left_out: dict[str, int] = field(default_factory=dict)  # status -> runs left out for it
    #: the run table's report (``fetch_runs(cache=…)``): mode, from_cache (runs served from the
    #: table), fetched (runs the server sent), requests (searches for the experiments), warm
    #: (experiment ids updated), cold ({experiment id: why fetched in full}); empty when off
    cache: dict = field(default_factory=dict)
    #: per-problem results of code tasks (``fetch_code_problems``): one row per (run, task,
    #: problem); None when not fetched
    problems: pd.DataFrame | None = None
    #: per-document results of lm-eval tasks (``fetch_documents``): one row per (run, leaf
    #: task, document, metric), columns ``DOCUMENT_COLUMNS``; None when not fetched
    documents: pd.DataFrame | None = None

    @classmethod
    def from_records(cls, records: Iterable[dict], order: Sequence[str] = (),
                     requests: int = 0) -> RunSet:
        """Build from plain dicts: ``{"run_id", "run_name", "tags": {...}, "metrics": {...}, …}``.

        This is also how tests and other callers feed compare without a tracking server.
        """
        rows, mets, ids = [], [], []
        for rec in records:
            tags = rec.get("tags") or {}
            row = {
                "run_name": rec.get("run_name") or rec["run_id"][:8],
                "experiment_id": rec.get("experiment_id"),
                "experiment": rec.get("experiment"),
                "status": rec.get("status", "FINISHED"),
                "start_time": rec.get("start_time"),
                "end_time": rec.get("end_time"),
                "in_scope": rec.get("in_scope", True),
            }
            for col, tag in TAG_KEYS.items():
                row[col] = tags.get(tag) or rec.get(col) or None
            params = rec.get("params") or {}
            for name, sources in SETTINGS.items():
                row[SETTING_PREFIX + name] = rec.get(SETTING_PREFIX + name) or next(
                    (v for kind, _, key in (src.partition(":") for src in sources)
                     if (v := (params if kind == "param" else tags).get(key)) not in (None, "")), None)
            rows.append(row)
            mets.append(rec.get("metrics") or {})
            ids.append(rec["run_id"])
        index = pd.Index(ids, name="run_id", dtype=object)
        runs = pd.DataFrame(rows, index=index, columns=RUN_COLUMNS)
        runs["in_scope"] = runs["in_scope"].astype(bool)
        metrics = (pd.DataFrame.from_records(mets, index=index) if mets
                   else pd.DataFrame(index=index)).astype("float64")
        metrics = metrics.reindex(columns=sorted(metrics.columns))
        if runs.index.has_duplicates:
            keep = ~runs.index.duplicated(keep="first")
            runs, metrics = runs[keep], metrics[keep]
        return cls(runs=runs, metrics=metrics, order=list(order), requests=requests)

    def tidy(self) -> pd.DataFrame:
        """Long table: one row per (run, metric) with the run's lineage columns."""
        m = self.metrics
        long = (m.rename_axis(index="run_id").reset_index()
                .melt(id_vars="run_id", var_name="metric", value_name="value")
                .dropna(subset=["value"]))
        meta = self.runs.drop(columns=["avg_acc_metrics"]).reset_index()
        out = long.merge(meta, on="run_id", how="left")
        cols = ["run_id", "run_name", "experiment", "family", "role", "step", "model",
                "base_model", "upstream_run", "metric", "value"]
        out = out[cols + [c for c in out.columns if c not in cols]]
        order = {rid: i for i, rid in enumerate(self.runs.index)}
        out = out.assign(_o=out["run_id"].map(order)).sort_values(["_o", "metric"], kind="stable")
        return out.drop(columns="_o").reset_index(drop=True)


def _client(client_or_uri):
    from mlflow import MlflowClient

    if client_or_uri is None or isinstance(client_or_uri, str):
        return MlflowClient(tracking_uri=client_or_uri)
    return client_or_uri


def resolve_experiments(client, names: Sequence[str]) -> list:
    """Experiments by name (or numeric id); UserError naming the first one not found."""
    from mlflow.exceptions import MlflowException

    found = []
    for name in names:
        exp = None
        try:
            exp = client.get_experiment_by_name(name)
        except MlflowException:
            exp = None
        if exp is None and name.isdigit():
            try:
                exp = client.get_experiment(name)
            except MlflowException:
                exp = None
        if exp is None:
            raise UserError(f"experiment not found: {name!r}")
        found.append(exp)
    return found


def fetch_runs(
    client_or_uri,
    experiments: Sequence[str] = (),
    run_ids: Sequence[str] = (),
    filter_string: str = "",
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    parallel: int = DEFAULT_PARALLEL,
    exclude_run_ids: Iterable[str] = (),
    exclude_steps: Iterable[str] = ("compare", "pipeline", "search"),
    lineage: bool = True,
    statuses: Iterable[str] | None = None,
    cache: str = "off",
) -> RunSet:
    """Search the tracking server; see the module docstring. Raises UserError on bad input.

    cache: ``on`` | ``off`` | ``refresh``, for the experiments' runs (``mlproject.compare.cache``).
    """
    from mlflow.exceptions import MlflowException

    from mlproject.compare.cache import check_mode

    cache = check_mode(cache)
    client = _client(client_or_uri)
    page_size = max(1, min(int(page_size), SERVER_PAGE_CAP))
    requests = 0
    exps = resolve_experiments(client, list(experiments))
    requests += len(exps)
    exp_names = {e.experiment_id: e.name for e in exps}
    runs: dict[str, object] = {}
    cache_info: dict = {}

    if exps:
        try:
            if cache == "off":
                for page in _search_pages(client, [e.experiment_id for e in exps],
                                          filter_string or "", page_size, "ACTIVE_ONLY",
                                          parallel=parallel):
                    requests += 1
                    for rec in page:
                        runs[rec["run_id"]] = rec
            else:
                found, cache_info = _cached_search(client, exps, filter_string or "", page_size,
                                                   parallel, cache)
                requests += cache_info["requests"]
                runs.update(found)
        except MlflowException as e:
            if filter_string and _is_bad_request(e):
                raise UserError(f"invalid filter {filter_string!r}: "
                                f"{_first_line(e.message)}") from e
            raise
    elif filter_string:
        raise UserError("filter needs experiment=<name>: MLflow searches within experiments")

    order = []
    for rid in run_ids:
        order.append(rid)
        if rid in runs:
            continue
        try:
            runs[rid] = _entity_record(client.get_run(rid))
        except MlflowException as e:
            raise UserError(f"run not found: {rid!r}") from e
        requests += 1

    excluded = set(exclude_run_ids)
    steps_out = set(exclude_steps)
    # A pipeline's record of a reused step copies the original run's numbers: the original
    # is the result, so the copy is left out (as are compare runs and pipeline parents).
    scope = {rid: r for rid, r in runs.items()
             if rid not in excluded and r["tags"].get(TAG_KEYS["step"]) not in steps_out
             and REUSED_TAG not in r["tags"]}
    left_out: dict[str, int] = {}
    if statuses is not None:
        wanted, named = set(statuses), set(run_ids)
        for rid in [rid for rid, r in scope.items() if r["status"] not in wanted and rid not in named]:
            status = scope.pop(rid)["status"]
            left_out[status] = left_out.get(status, 0) + 1

    extra: dict[str, object] = {}
    if lineage and scope:
        extra, n = _fetch_lineage(client, scope, exp_ids=sorted({r["experiment_id"]
                                                                for r in scope.values()}),
                                  known=runs)
        requests += n

    missing_names = {r["experiment_id"] for r in [*scope.values(), *extra.values()]
                     if r["experiment_id"] not in exp_names}
    for eid in missing_names:
        try:
            exp_names[eid] = client.get_experiment(eid).name
        except MlflowException:
            exp_names[eid] = eid
        requests += 1

    listed = {rid: i for i, rid in enumerate(order)}
    if exps:  # oldest first, so tables read in the order the runs were made
        ordered = sorted(scope.values(), key=lambda r: (r["start_time"] or 0, r["run_id"]))
    else:  # only runs=…: keep the order given
        ordered = sorted(scope.values(), key=lambda r: listed.get(r["run_id"], len(listed)))
    records = [_finish(r, exp_names, True) for r in ordered]
    records += [_finish(r, exp_names, False) for rid, r in extra.items() if rid not in scope]
    log.info("fetched %d runs (+%d lineage) in %d requests", len(scope),
             len(records) - len(scope), requests)
    out = RunSet.from_records(records, order=order, requests=requests)
    out.left_out = left_out
    out.cache = cache_info
    return out


def _fetch_lineage(client, scope: dict, exp_ids: list[str],
                   known: dict | None = None) -> tuple[dict, int]:
    """Upstream runs referenced by ``mlproject.upstream_run`` but not fetched yet.

    ``known``: records already fetched (out of scope by status or step): used as they are,
    without a request.
    """
    from mlflow.exceptions import MlflowException

    have = dict(scope)
    known = known or {}
    extra: dict[str, dict] = {}
    requests = 0
    frontier = list(scope.values())
    for _ in range(_LINEAGE_DEPTH):
        wanted = sorted({up for r in frontier
                         if (up := r["tags"].get(TAG_KEYS["upstream_run"]))
                         and is_run_id(up) and up not in have})
        if not wanted:
            break
        local = [known[rid] for rid in wanted if rid in known]
        for r in local:
            have[r["run_id"]] = r
            extra[r["run_id"]] = r
        wanted = [rid for rid in wanted if rid not in known]
        if not wanted:
            frontier = local
            continue
        got: list[dict] = []
        for i in range(0, len(wanted), _LINEAGE_CHUNK):
            ids = ",".join(f"'{x}'" for x in wanted[i:i + _LINEAGE_CHUNK])
            for page in _search_pages(client, exp_ids, f"attributes.run_id IN ({ids})",
                                      _LINEAGE_CHUNK, "ALL"):
                requests += 1
                got.extend(page)
        found = {r["run_id"] for r in got}
        for rid in wanted:
            if rid not in found:  # lives in another experiment (or is gone)
                try:
                    got.append(_entity_record(client.get_run(rid)))
                except MlflowException:
                    log.debug("upstream run %s not found", rid)
                requests += 1
        for r in got:
            have[r["run_id"]] = r
            extra[r["run_id"]] = r
        frontier = local + got
    return extra, requests


def _cached_search(client, exps: list, filter_string: str, page_size: int, parallel: int,
                   mode: str) -> tuple[dict[str, dict], dict]:
    """The experiments' runs (matching ``filter_string``) through the local run table.

    Each experiment whose table can be updated (``cache.cold_reason`` is None) is updated by
    ``_warm_update``; the others, and those whose update failed its checks, are searched in
    full, as without a cache, and their tables rewritten. Returns ``(records by run id,
    report)``; the report is ``RunSet.cache``.
    """
    from mlproject.compare import cache

    RUNS_CHANGED_TAG = names.RUNS_CHANGED_TAG

    creds = _rest_creds(client)
    server = creds.host if creds is not None else str(client.tracking_uri)
    user = (getattr(creds, "username", None) or "") if creds is not None else ""
    started = cache.now_ms()  # before any search: the next "ended since" looks back from here
    ttl = cache.ttl_seconds()
    by_id = {e.experiment_id: e for e in exps}
    info: dict = {"mode": mode, "from_cache": 0, "fetched": 0, "requests": 0, "warm": [],
                  "cold": {}}
    warm: list[cache.Entry] = []
    for e in by_id.values():
        entry = None if mode == "refresh" else cache.load(server, user, e.experiment_id,
                                                           filter_string)
        reason = cache.cold_reason(entry, mode=mode, experiment_created=e.creation_time,
                                   runs_changed=e.tags.get(RUNS_CHANGED_TAG), now=started,
                                   ttl_s=ttl)
        if reason:
            info["cold"][e.experiment_id] = reason
        else:
            warm.append(entry)

    records: dict[str, dict] = {}
    if warm:
        update, n, why = _warm_update(client, creds, warm, filter_string, page_size, parallel)
        info["requests"] += n
        if update is None:
            log.info("compare cache: %s; fetching in full", why)
            info["cold"].update({e.experiment_id: why for e in warm})
        else:
            info["warm"] = [e.experiment_id for e in warm]
            info["from_cache"] += update.from_cache
            info["fetched"] += update.fetched
            records.update(update.records)
            for e in warm:
                e.records = {rid: r for rid, r in update.records.items()
                             if r["experiment_id"] == e.experiment_id}
                if update.changed:  # else the stored table (and its watermark) still holds
                    e.fetched_ms = started
                    cache.save(e)

    cold_ids = [eid for eid in by_id if eid in info["cold"]]
    if cold_ids:
        seen: dict = {}
        fetched: dict[str, dict] = {}
        for page in _search_pages(client, cold_ids, filter_string, page_size, "ACTIVE_ONLY",
                                  parallel=parallel, seen=seen):
            info["requests"] += 1
            for rec in page:
                fetched[rec["run_id"]] = rec
        offsets = seen.get("offset_tokens")
        if offsets is None and len(fetched) >= 2:  # one page: ask for a token to learn its kind
            _, token = _one_page(client, creds, cold_ids, filter_string, 1, "ACTIVE_ONLY", None)
            info["requests"] += 1
            offsets = token is not None and _token_offset(token) is not None
        info["fetched"] += len(fetched)
        records.update(fetched)
        for eid in cold_ids:
            entry = cache.new_entry(server, user, eid, filter_string)
            entry.experiment_created = by_id[eid].creation_time
            entry.runs_changed = by_id[eid].tags.get(RUNS_CHANGED_TAG)
            entry.offset_tokens = bool(offsets)
            entry.fetched_ms = entry.verified_ms = started
            entry.records = {rid: r for rid, r in fetched.items() if r["experiment_id"] == eid}
            cache.save(entry)
    log.info("compare cache: %d runs from the table, %d fetched, %d requests (warm %s, cold %s)",
             info["from_cache"], info["fetched"], info["requests"], info["warm"], info["cold"])
    return records, info


def _warm_update(client, creds, entries: list, filter_string: str, page_size: int,
                 parallel: int):
    """Update stored tables with what changed on the server; see ``mlproject.compare.cache``.

    Returns ``(cache.Update, requests, "")`` when the result passed the count check, else
    ``(None, requests, why)``: the caller then fetches in full.
    """
    from mlflow.exceptions import MlflowException

    from mlproject.compare import cache

    cached = {rid: r for e in entries for rid, r in e.records.items()}
    exp_ids = [e.experiment_id for e in entries]
    since = min(e.fetched_ms for e in entries) - cache.SLACK_MS
    was_live = [rid for rid, r in cached.items() if r.get("status") in cache.LIVE_STATUSES]

    def scoped(ours: str) -> str:
        return cache.and_filter(filter_string, ours)

    queries = [scoped(cache.live_filter()), scoped(f"attributes.end_time >= {since}")]
    queries += [scoped(cache.ids_clause(ids)) for ids in cache.chunks(was_live)]
    queries += [scoped(cache.not_in_filter(prefix, ids))
                for prefix, ids in cache.not_in_groups(cached)]
    requests = 0
    try:
        results, requests = _searches(client, creds, exp_ids, queries, page_size,
                                      "ACTIVE_ONLY", parallel)
        found = [r for recs in results for r in recs]
        found_ids = {r["run_id"] for r in found}
        update = cache.apply_changes(cached, found, [rid for rid in was_live
                                                     if rid not in found_ids])
        exact, n = _count_is(client, creds, exp_ids, filter_string, len(update.records))
        requests += n
        if exact is False and update.records:  # fewer on the server: deleted cached runs?
            unseen = [rid for rid in update.records if rid not in found_ids]
            results, n = _searches(client, creds, exp_ids,
                                   [cache.ids_clause(ids) for ids in cache.chunks(unseen)],
                                   page_size, "DELETED_ONLY", parallel)
            requests += n
            deleted = [r["run_id"] for recs in results for r in recs]
            if deleted:
                after = cache.apply_changes(update.records, (), deleted)
                update = cache.Update(after.records, update.fetched, True,
                                      update.from_cache - len(deleted))
                exact, n = _count_is(client, creds, exp_ids, filter_string,
                                     len(update.records))
                requests += n
    except MlflowException as exc:
        return None, requests, f"the update failed ({_first_line(str(exc))})"
    if not exact:
        return None, requests, "the run count differs from the updated table"
    return update, requests, ""


def _searches(client, creds, exp_ids, filters: list[str], page_size: int, view: str,
              parallel: int) -> tuple[list[list[dict]], int]:
    """Every page of each search (``parallel`` searches at once against a server)."""

    def one(flt):
        recs, n = [], 0
        for page in _search_pages(client, exp_ids, flt, page_size, view):
            n += 1
            recs.extend(page)
        return recs, n

    if creds is not None and parallel > 1 and len(filters) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(parallel, len(filters)),
                                thread_name_prefix="compare-cache") as pool:
            done = list(pool.map(one, filters))
    else:
        done = [one(f) for f in filters]
    return [recs for recs, _ in done], sum(n for _, n in done)


def _count_is(client, creds, exp_ids, filter_string: str, n: int) -> tuple[bool, int]:
    """Whether exactly ``n`` runs match: one search of 2 runs at offset ``n - 1`` (page tokens
    are offsets) returns exactly one. Returns ``(answer, requests)``."""
    if n == 0:
        recs, _ = _one_page(client, creds, exp_ids, filter_string, 1, "ACTIVE_ONLY", None)
        return not recs, 1
    recs, _ = _one_page(client, creds, exp_ids, filter_string, 2, "ACTIVE_ONLY",
                        _offset_token(n - 1))
    return len(recs) == 1, 1


def _one_page(client, creds, exp_ids, filter_string, max_results, view, token):
    if creds is not None:
        return _rest_page(creds, exp_ids, filter_string, max_results, view, token)
    return _entity_page(client, exp_ids, filter_string, max_results, view, token)


_SEARCH_ENDPOINT = "/api/2.0/mlflow/runs/search"


def _search_pages(client, exp_ids: list[str], filter_string: str, page_size: int,
                  view: str, parallel: int = 1, seen: dict | None = None) -> Iterator[list[dict]]:
    """Yield one list of run records per ``runs/search`` page, in order, following tokens.

    With ``parallel > 1`` and a server whose page tokens are plain offsets (MLflow's SQL and
    file stores: base64 of ``{"offset": n}``), pages after the first are requested
    ``parallel`` at a time, so a server with several workers searches them concurrently;
    at most ``parallel - 1`` requests past the last page come back empty. Any other token
    format falls back to one page after the other. ``seen["offset_tokens"]`` (when given)
    says whether the first page token was an offset (absent: a single page, no token).
    """
    creds = _rest_creds(client)
    if creds is None:
        token = None
        while True:
            records, token = _entity_page(client, exp_ids, filter_string, page_size, view, token)
            if token and seen is not None and "offset_tokens" not in seen:
                seen["offset_tokens"] = _token_offset(token) is not None
            yield records
            if not token:
                return
    records, token = _rest_page(creds, exp_ids, filter_string, page_size, view, None)
    if token and seen is not None:
        seen["offset_tokens"] = _token_offset(token) is not None
    yield records
    if parallel > 1 and token and _token_offset(token) == page_size:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(parallel, thread_name_prefix="compare-page") as pool:
            start = page_size
            while True:
                batch = [pool.submit(_rest_page, creds, exp_ids, filter_string, page_size,
                                     view, _offset_token(start + i * page_size))
                         for i in range(parallel)]
                for fut in batch:
                    records, token = fut.result()
                    yield records
                    if not token:
                        for rest in batch:
                            rest.cancel()
                        return
                start += parallel * page_size
    while token:
        records, token = _rest_page(creds, exp_ids, filter_string, page_size, view, token)
        yield records


def _token_offset(token: str) -> int | None:
    import base64
    import json

    try:
        data = json.loads(base64.b64decode(token, validate=True))
    except (ValueError, TypeError):
        return None
    if isinstance(data, dict) and set(data) == {"offset"} and isinstance(data["offset"], int):
        return data["offset"]
    return None


def _offset_token(offset: int) -> str:
    import base64
    import json

    return base64.b64encode(json.dumps({"offset": offset}).encode()).decode()


def _rest_creds(client):
    """Host credentials when the client talks to a tracking server, else None."""
    try:
        from mlflow.store.tracking.rest_store import RestStore

        store = client._tracking_client.store
    except (AttributeError, ImportError):
        return None
    return store.get_host_creds() if isinstance(store, RestStore) else None


def _rest_page(creds, exp_ids, filter_string, page_size, view, token):
    from mlflow.utils import rest_utils

    body = {"experiment_ids": list(exp_ids), "filter": filter_string,
            "max_results": page_size, "run_view_type": view}
    if token:
        body["page_token"] = token
    # Looked up at call time so tools that wrap http_request (the benchmark counts calls)
    # see these requests too.
    resp = rest_utils.http_request(host_creds=creds, endpoint=_SEARCH_ENDPOINT, method="POST",
                                   json=body)
    if resp.status_code != 200:
        rest_utils.verify_rest_response(resp, _SEARCH_ENDPOINT)  # raises MlflowException
    data = resp.json()
    return [_json_record(r) for r in data.get("runs", ())], data.get("next_page_token")


def _entity_page(client, exp_ids, filter_string, page_size, view, token):
    from mlflow.entities import ViewType

    page = client.search_runs(experiment_ids=exp_ids, filter_string=filter_string,
                              run_view_type=ViewType.from_string(view.lower()),
                              max_results=page_size, page_token=token)
    return [_entity_record(r) for r in page], page.token


def _num(v) -> float:
    return float(v)  # proto JSON writes NaN / Infinity as strings; float() reads both


def _int(v):
    return None if v in (None, "") else int(v)


def _json_record(r: dict) -> dict:
    info, data = r.get("info", {}), r.get("data", {})
    return {
        "run_id": info.get("run_id") or info.get("run_uuid"),
        "run_name": info.get("run_name"),
        "experiment_id": str(info.get("experiment_id")),
        "status": info.get("status"),
        "start_time": _int(info.get("start_time")),
        "end_time": _int(info.get("end_time")),
        "tags": {t["key"]: t.get("value", "") for t in data.get("tags", ())},
        "metrics": {m["key"]: _num(m.get("value", "NaN")) for m in data.get("metrics", ())},
        "params": {p["key"]: p.get("value", "") for p in data.get("params", ())},
    }


def _entity_record(run) -> dict:
    info = run.info
    return {
        "run_id": info.run_id, "run_name": info.run_name,
        "experiment_id": str(info.experiment_id), "status": info.status,
        "start_time": info.start_time, "end_time": info.end_time,
        "tags": dict(run.data.tags), "metrics": dict(run.data.metrics), "params": dict(run.data.params),
    }


def _finish(rec: dict, exp_names: dict, in_scope: bool) -> dict:
    return {**rec, "experiment": exp_names.get(rec["experiment_id"], rec["experiment_id"]),
            "in_scope": in_scope}


def _is_bad_request(exc) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return "INVALID_PARAMETER_VALUE" in str(code) or "BAD_REQUEST" in str(code)


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if text else ""


#: Artifact each code task's per-problem results are logged to (steps/shared/evaluation.py).
CODE_ARTIFACT = "code/{task}.json"
PROBLEM_COLUMNS = ["run_id", "task", "problem", "passed", "time_s", "ref_time_s", "time_ratio"]


def code_tasks_of(metrics: pd.DataFrame) -> list[str]:
    """Tasks scored by the code sandbox: they log ``<task>/timed``."""
    return sorted({c.rsplit("/", 1)[0] for c in metrics.columns
                   if c.endswith("/timed") and not c.startswith(("before/", "delta/"))})


class _quiet_downloads:
    """MLflow draws a progress bar per download; one per tiny artifact would flood the terminal."""

    _ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

    def __enter__(self):
        self._before = os.environ.get(self._ENV)
        os.environ[self._ENV] = "false"

    def __exit__(self, *exc):
        if self._before is None:
            os.environ.pop(self._ENV, None)
        else:
            os.environ[self._ENV] = self._before


def fetch_code_problems(client_or_uri, runset: RunSet, parallel: int = DEFAULT_PARALLEL) -> int:
    """Download the per-problem artifacts of every in-scope code run into ``runset.problems``.

    One download per (run, code task). A run without the artifact (older runs, runs built from
    metrics alone) simply has no rows; the tables then fall back to its logged averages.
    Returns the number of requests made.
    """
    import json
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.exceptions import MlflowException

    client = _client(client_or_uri)
    scope = runset.runs.index[runset.runs["in_scope"].astype(bool)]
    jobs = [(rid, task) for task in code_tasks_of(runset.metrics)
            for rid in scope if pd.notna(runset.metrics.at[rid, f"{task}/timed"])]

    def get(job):
        rid, task = job
        with tempfile.TemporaryDirectory(prefix="mlproject-compare-") as tmp:
            try:
                path = client.download_artifacts(rid, CODE_ARTIFACT.format(task=task), tmp)
                with open(path, encoding="utf-8") as fh:
                    doc = json.load(fh)
            except (MlflowException, OSError, ValueError) as exc:
                log.info("no per-problem results for run %s, task %s: %s", rid, task,
                         _first_line(str(exc)))
                return []
        return [{"run_id": rid, "task": task, "problem": str(p.get("id")),
                 "passed": bool(p.get("c", 0)), "time_s": p.get("time_s"),
                 "ref_time_s": p.get("ref_time_s"), "time_ratio": p.get("time_ratio")}
                for p in doc.get("problems", [])]

    rows = []
    if jobs:
        with _quiet_downloads(), ThreadPoolExecutor(max(1, min(parallel, len(jobs)))) as pool:
            for part in pool.map(get, jobs):
                rows.extend(part)
    runset.problems = pd.DataFrame(rows, columns=PROBLEM_COLUMNS).astype(
        {"time_s": "float64", "ref_time_s": "float64", "time_ratio": "float64"})
    runset.requests += len(jobs)
    return len(jobs)


#: Artifact every evaluation logs its per-document results to (``evaluation.documents``).
DOCUMENTS_ARTIFACT = doc_table.DOCUMENTS_ARTIFACT
#: ``RunSet.documents``: the artifact's columns (task, group, doc_id, doc_hash, metric, value;
#: see ``compare.tables.paired``) after the run's id
DOCUMENT_COLUMNS = ["run_id", *doc_table.COLUMNS]


def fetch_documents(client_or_uri, runset: RunSet, run_ids: Iterable[str],
                    parallel: int = DEFAULT_PARALLEL) -> int:
    """Download the per-document results of ``run_ids`` into ``runset.documents``.

    One download per run, ``parallel`` at a time. A run without the artifact (older runs, runs
    built from metrics alone) or with an unreadable one simply has no rows; the views then fall
    back to the standard-error rule for it. Returns the number of requests made.
    """
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.exceptions import MlflowException

    client = _client(client_or_uri)
    jobs = list(dict.fromkeys(run_ids))
    wanted = DOCUMENT_COLUMNS[1:]

    def get(rid: str) -> pd.DataFrame | None:
        with tempfile.TemporaryDirectory(prefix="mlproject-compare-") as tmp:
            try:
                path = client.download_artifacts(rid, DOCUMENTS_ARTIFACT, tmp)
                df = pd.read_parquet(path, columns=wanted)
            except (MlflowException, OSError, ValueError, KeyError) as exc:
                log.info("no per-document results for run %s: %s", rid, _first_line(str(exc)))
                return None
        df = df.astype({"task": "str", "group": "str", "doc_id": "int64", "doc_hash": "str",
                        "metric": "str", "value": "float64"})
        df.insert(0, "run_id", rid)
        return df

    frames = []
    if jobs:
        with _quiet_downloads(), ThreadPoolExecutor(max(1, min(parallel, len(jobs)))) as pool:
            frames = [f for f in pool.map(get, jobs) if f is not None and len(f)]
    runset.documents = (pd.concat(frames, ignore_index=True) if frames else
                        pd.DataFrame({c: pd.Series(dtype="float64" if c == "value" else
                                                   "int64" if c == "doc_id" else "str")
                                      for c in DOCUMENT_COLUMNS}))
    runset.requests += len(jobs)
    return len(jobs)
