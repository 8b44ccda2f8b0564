"""The compare views as plain pandas: no MLflow, no formatting, unrounded numbers.

Input is a :class:`~mlproject.compare.query.RunSet` (``runs`` + ``metrics`` frames). Every
function is vectorised over runs (every view for 10,000 runs × 20 metrics: ~2 s here).

Conventions assumed (see also ``query.py``):

* Task scores: ``<task>/<metric>`` with ``<metric>`` a score (acc, acc_norm, exact_match…,
  f1, pass_at_1 …). The metric a run used for a task is read from its tag
  ``mlproject.avg_acc_metrics`` (JSON ``{"boolq": "acc", "piqa": "acc_norm"}``); without it
  we prefer acc_norm > acc > math_verify > exact_match (flexible-extract before strict-match)
  > f1 > pass@1 … (``directions.SCORE_PREFERENCE``). When any run carries the tag, the task
  list is the union of the tag's keys (so MMLU's 57 subjects do not each become a task).
* Mean accuracy: the logged ``avg_acc``; where absent, the mean of the run's task scores if
  it has a score for every task of the comparison (else N/A: a partial mean misleads).
* "Before" a fine-tune (summary view), per metric, first found of: (1) ``before/<key>`` on
  the run itself, (2) ``<key>`` on its upstream run (tag ``mlproject.upstream_run``),
  (3) ``<key>`` on the latest ``mlproject.step=evaluate`` run that shares the same upstream
  run (an evaluation of the same input model, e.g. of the pruned model before recovery).
  A run that supplies another's "before" is not a summary row itself when its role is
  empty or a step default (``eval``, ``pruned``, ``quantized``: ``BEFORE_ROLES``); ``base``,
  ``finetuned``, ``best_acc`` … stay rows.
* Percent changes are computed from unrounded values: (after − before) / before × 100.
* Significance (versus view): a delta is significant when |Δ| ≥ 2·sqrt(se_base² + se_cand²),
  the standard errors being ``<task>/<metric>_stderr``; unknown (NA) without both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.directions import HIGHER, LOWER, Directions
from mlproject.errors import UserError

MEDALS = {1: "gold", 2: "silver", 3: "bronze"}
#: Roles the steps give by default (and "before"-like ones): a run with one of these that
#: supplies another run's "before" values is shown as that run's before, not as a row.
BEFORE_ROLES = ("", "before", "pre", "upstream", "eval", "evaluate", "pruned", "quantized",
                "compressed")


# ----------------------------------------------------------------------------- helpers

def _nonempty(s: pd.Series) -> pd.Series:
    """Strings that are set (not NaN / None / '')."""
    return s.notna() & (s.astype("object").fillna("").astype(str).str.len() > 0)


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """Display name per run: the run name, made unique with a short id when needed."""
    names = runs["run_name"].astype("object").where(_nonempty(runs["run_name"]),
                                                    pd.Series(runs.index.str[:8], index=runs.index))
    dup = names.duplicated(keep=False)
    names = names.where(~dup, names + " (" + runs.index.str[:6] + ")")
    if "status" in runs:
        # A run that did not finish is never shown as if it had (a RUNNING run left by a
        # killed process must not look like a medal winner).
        status = runs["status"].astype("object").fillna("FINISHED")
        names = names.where(status.isin(["FINISHED", "", None]), names + " [" + status.astype(str) + "]")
    return names.astype(str)


def family_of(runs: pd.DataFrame) -> pd.Series:
    """Model family: tag ``mlproject.family``, else ``mlproject.base_model``, else root model."""
    fam = runs["family"].astype("object")
    for col in ("base_model", "root_model"):
        if col in runs:
            fam = fam.where(_nonempty(fam), runs[col].astype("object"))
    return fam.where(_nonempty(fam), None)


def root_models(runs: pd.DataFrame, max_depth: int = 8) -> pd.Series:
    """Root model per run: its ``base_model`` tag, else the model of its lineage root."""
    up = runs["upstream_run"].astype("object")
    up = up.where(_nonempty(up) & up.isin(runs.index), None)
    model = runs["model"].astype("object").where(_nonempty(runs["model"]), None)
    cur = pd.Series(runs.index, index=runs.index, dtype=object)
    for _ in range(max_depth):
        nxt = up.reindex(cur.values).to_numpy()
        has = pd.notna(nxt)
        if not has.any():
            break
        cur = cur.where(~has, pd.Series(nxt, index=cur.index))
    root = model.reindex(cur.values).to_numpy()
    base = runs["base_model"].astype("object")
    return base.where(_nonempty(base), pd.Series(root, index=runs.index))


@dataclass
class Scores:
    """Per-task headline scores. ``values``/``stderr``: run × task floats; ``keys``: run × task
    metric key chosen (``boolq/acc``) or None; ``tasks``: task order."""

    tasks: list[str]
    values: pd.DataFrame
    keys: pd.DataFrame
    stderr: pd.DataFrame

    def mode_key(self, task: str) -> str | None:
        k = self.keys[task].dropna()
        return None if k.empty else k.mode().iloc[0]


def task_candidates(columns: Sequence[str]) -> dict[str, list[str]]:
    """``{"boolq": ["boolq/acc"], "piqa": ["piqa/acc_norm", "piqa/acc"], …}`` by preference."""
    out: dict[str, list[str]] = {}
    for key in columns:
        g, lf = dirs.group(key), dirs.leaf(key)
        if not g or dirs.is_reserved(key) or key.startswith(dirs.LOWER_FAMILIES):
            continue
        if dirs.is_score(lf):
            out.setdefault(g, []).append(key)
    for g in out:
        out[g].sort(key=lambda k: dirs.score_preference_key(dirs.leaf(k)))
    return dict(sorted(out.items()))


def task_scores(runs: pd.DataFrame, metrics: pd.DataFrame) -> Scores:
    cands = task_candidates(metrics.columns)
    tagged = runs["avg_acc_metrics"].astype("object")
    tagged = tagged[_nonempty(tagged)]
    parsed: dict[str, dict] = {}
    for text in tagged.unique():
        try:
            val = json.loads(text)
            # lm-eval spells the unfiltered metric "acc,none"; we log it as "acc".
            parsed[text] = ({str(k): str(v).removesuffix(",none") for k, v in val.items()}
                            if isinstance(val, dict) else {})
        except (TypeError, ValueError):
            parsed[text] = {}
    # Task order: as the runs recorded them (evaluation order), else alphabetical.
    tag_tasks = list(dict.fromkeys(t for d in parsed.values() for t in d))
    # A tagged task counts when it has a recognised score or the tagged metric was logged.
    tagged_keys = {f"{t}/{m}" for d in parsed.values() for t, m in d.items()}
    tasks = ([t for t in tag_tasks if t in cands or any(
        k.startswith(f"{t}/") and k in metrics for k in tagged_keys)]
        if tag_tasks else list(cands))
    values = pd.DataFrame(index=metrics.index, columns=tasks, dtype="float64")
    keys = pd.DataFrame(index=metrics.index, columns=tasks, dtype=object)
    for t in tasks:
        v = pd.Series(np.nan, index=metrics.index)
        k = pd.Series(None, index=metrics.index, dtype=object)
        for key in cands.get(t, ()):
            fill = v.isna() & metrics[key].notna()
            v = v.where(~fill, metrics[key])
            k = k.where(~fill, key)
        values[t], keys[t] = v, k
    # The run's own record of which metric it used wins (when that metric was logged).
    canon_cols = {dirs.canon(c): c for c in metrics.columns}
    for text, choice in parsed.items():
        rows = tagged.index[tagged == text]
        for t, m in choice.items():
            if t not in values:
                continue
            key = f"{t}/{m}" if f"{t}/{m}" in metrics else canon_cols.get(dirs.canon(f"{t}/{m}"))
            if key is None:
                continue
            val = metrics.loc[rows, key]
            ok = val.notna()
            values.loc[rows[ok.to_numpy()], t] = val[ok]
            keys.loc[rows[ok.to_numpy()], t] = key
    stderr = pd.DataFrame(index=metrics.index, columns=tasks, dtype="float64")
    for t in tasks:
        stderr[t] = _lookup(metrics, _map(keys[t], _stderr_key), metrics.index)
    return Scores(tasks=tasks, values=values, keys=keys, stderr=stderr)


def _lookup(metrics: pd.DataFrame, key_per_row: pd.Series, run_ids) -> np.ndarray:
    """``metrics.at[run_ids[i], key_per_row[i]]`` vectorised (NaN where either is missing)."""
    run_ids = pd.Index(run_ids)
    out = np.full(len(key_per_row), np.nan)
    keys = key_per_row.to_numpy(dtype=object)
    for key in pd.unique(keys[pd.notna(keys)]):
        if key not in metrics:
            continue
        sel = keys == key
        out[sel] = metrics[key].reindex(run_ids[sel]).to_numpy(dtype="float64")
    return out


def mean_accuracy(metrics: pd.DataFrame, scores: Scores,
                  values: pd.DataFrame | None = None, logged: pd.Series | None = None) -> pd.Series:
    """Logged ``avg_acc``, else the mean of the run's task scores — only when the run has a
    score for every task of the comparison (a mean over a subset would not be comparable)."""
    values = scores.values if values is None else values
    if scores.tasks:
        computed = values.mean(axis=1, skipna=True).where(values.notna().all(axis=1))
    else:
        computed = pd.Series(np.nan, index=metrics.index)
    if logged is None:
        logged = metrics["avg_acc"] if "avg_acc" in metrics else None
    return computed if logged is None else logged.combine_first(computed)


# ----------------------------------------------------------------------------- lineage

@dataclass
class Lineage:
    upstream: pd.Series       # run → upstream run id (in the set) or None
    sibling_eval: pd.Series   # run → evaluate run sharing its upstream, or None

    def before(self, metrics: pd.DataFrame, key: str) -> pd.Series:
        """Before value of ``key`` per run (see module docstring for the order)."""
        out = metrics[f"before/{key}"] if f"before/{key}" in metrics else \
            pd.Series(np.nan, index=metrics.index)
        if key in metrics:
            for src in (self.upstream, self.sibling_eval):
                vals = metrics[key].reindex(src.to_numpy()).to_numpy(dtype="float64")
                out = out.combine_first(pd.Series(vals, index=metrics.index))
        return out

    def before_of_keys(self, metrics: pd.DataFrame, key_per_row: pd.Series) -> pd.Series:
        out = pd.Series(np.nan, index=metrics.index)
        keys = key_per_row.to_numpy(dtype=object)
        for key in pd.unique(keys[pd.notna(keys)]):
            sel = keys == key
            out[sel] = self.before(metrics, key)[sel]
        return out

    def sources(self) -> set[str]:
        return {x for s in (self.upstream, self.sibling_eval) for x in s.dropna()}


def lineage(runs: pd.DataFrame) -> Lineage:
    up = runs["upstream_run"].astype("object")
    up = up.where(_nonempty(up) & up.isin(runs.index), None)
    is_eval = (runs["step"].astype("object") == "evaluate") & up.notna()
    ev = runs[is_eval].assign(_up=up[is_eval]).sort_values("start_time", na_position="first")
    latest = pd.Series(ev.index, index=ev["_up"].to_numpy()).groupby(level=0).last()
    sib = pd.Series(latest.reindex(up.to_numpy()).to_numpy(), index=runs.index, dtype=object)
    sib = sib.where(sib != pd.Series(runs.index, index=runs.index), None)
    return Lineage(upstream=up, sibling_eval=sib.where(sib.notna(), None))


# ----------------------------------------------------------------------------- summary

def summary(runs: pd.DataFrame, metrics: pd.DataFrame, scores: Scores,
            lin: Lineage) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compress-recover summary: one row per (family, role) run, then one per (row, task)."""
    ppl_keys = sorted(k for k in metrics.columns if k.startswith("ppl/"))
    acc_after = mean_accuracy(metrics, scores)
    before_scores = pd.DataFrame(
        {t: lin.before_of_keys(metrics, scores.keys[t]) for t in scores.tasks},
        index=metrics.index, dtype="float64")
    acc_before = mean_accuracy(metrics, scores, values=before_scores,
                               logged=lin.before(metrics, "avg_acc"))

    has_data = acc_after.notna() | scores.values.notna().any(axis=1)
    for k in ppl_keys + ["params_b"]:
        if k in metrics:
            has_data |= metrics[k].notna()
    in_scope = runs["in_scope"].astype(bool)
    role = runs["role"].astype("object")
    role_set = _nonempty(role) & ~role.astype(str).str.lower().isin(BEFORE_ROLES)
    feeds = pd.Series(runs.index.isin(list(lin.sources())), index=runs.index)
    rows = runs.index[in_scope & has_data & (role_set | ~feeds)]

    fam = family_of(runs.assign(root_model=root_models(runs)))
    labels = run_labels(runs)
    role_label = role.where(role_set, None)
    table = pd.DataFrame({
        "family": fam, "role": role_label.where(role_label.notna(), labels),
        "run_id": runs.index, "run": labels,
        "params_b": metrics["params_b"] if "params_b" in metrics else np.nan,
    }, index=runs.index)
    for k in ppl_keys:
        ds = k.split("/", 1)[1]
        before, after = lin.before(metrics, k), metrics[k]
        table[f"ppl_before[{ds}]"] = before
        table[f"ppl_after[{ds}]"] = after
        table[f"ppl_change_pct[{ds}]"] = pct_change(before, after)
    table["acc_before"] = acc_before
    table["acc_after"] = acc_after
    table["acc_change_pct"] = pct_change(acc_before, acc_after)
    table["upstream_run"] = lin.upstream
    table = _sort_rows(table.loc[rows], runs)

    parts = []
    for t in scores.tasks:
        after = scores.values.loc[table.index, t]
        before = before_scores.loc[table.index, t]
        parts.append(pd.DataFrame({
            "task": t, "metric": _map(scores.keys.loc[table.index, t], dirs.leaf),
            "family": table["family"], "role": table["role"], "run_id": table["run_id"],
            "run": table["run"], "before": before, "after": after, "change": after - before,
        }))
    per_task = (pd.concat(parts, ignore_index=True) if parts else
                pd.DataFrame(columns=["task", "metric", "family", "role", "run_id", "run",
                                      "before", "after", "change"]))
    per_task = per_task[per_task[["before", "after"]].notna().any(axis=1)]
    return table.reset_index(drop=True), per_task.reset_index(drop=True)


def pct_change(before: pd.Series, after: pd.Series) -> pd.Series:
    b = before.where(before != 0)
    return (after - b) / b.abs() * 100.0


def _sort_rows(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    role = table["role"].astype(str)
    key = pd.DataFrame({
        "fam": table["family"].astype("object").fillna("~").astype(str).str.lower(),
        "base": (role.str.lower() != "base").astype(int),
        "role": role.str.lower(),
        "t": runs.loc[table.index, "start_time"].astype("float64").fillna(0),
    }, index=table.index)
    order = key.sort_values(["fam", "base", "role", "t"], kind="stable").index
    return table.loc[order]


# ----------------------------------------------------------------------------- baseline

@dataclass
class Baseline:
    """A resolved ``baseline=`` argument.

    text: what the user typed. mode: ``run`` (one run), ``family`` (``role:<r>``: the run with
    that role in each candidate's family) or ``best_of`` (``a|b|c``: per metric the best value
    among the listed runs — how code-dpo-comparison.md's lists were made).
    run_ids: every matched run. per_run: candidate → its baseline run (modes run / family).
    """

    text: str
    mode: str
    run_ids: list[str]
    per_run: pd.Series
    label: str
    notes: list[str] = field(default_factory=list)

    def label_for(self, run_id: str, labels: pd.Series) -> str:
        if self.mode == "best_of":
            return self.label
        b = self.per_run.get(run_id)
        return labels.get(b, "N/A") if isinstance(b, str) else "N/A"


def resolve_baseline(text: str, runs: pd.DataFrame, order: Sequence[str] = ()) -> Baseline:
    """Parse ``baseline=``: ``<run id>``, ``id:<id>``, ``name:<run name>``, ``role:<role>``
    (per model family), a bare run name, or several joined by ``|`` (best of)."""
    text = (text or "").strip()
    scope = runs[runs["in_scope"].astype(bool)]
    labels = run_labels(runs)
    parts = [p.strip() for p in text.split("|") if p.strip()]
    if not parts:
        raise UserError("baseline is empty")
    matched: list[str] = []
    role_sel = None
    for part in parts:
        ids = _match_selector(part, runs, scope)
        if not ids:
            names = ", ".join(sorted(set(labels[scope.index]))[:12])
            raise UserError(f"baseline {part!r} matches no run"
                            + (f" (runs: {names}{', …' if len(scope) > 12 else ''})"
                               if names else ""))
        if part.startswith("role:"):
            role_sel = part
        matched.extend(i for i in ids if i not in matched)
    fam = family_of(runs.assign(root_model=root_models(runs))).astype("object").fillna("")
    if len(parts) == 1 and role_sel and len(matched) > 1:
        # role:<r> → per family: the latest run with that role in the candidate's family.
        cand = runs.loc[matched].assign(_fam=fam[matched]).sort_values(
            "start_time", na_position="first")
        by_fam = pd.Series(cand.index, index=cand["_fam"].to_numpy()).groupby(level=0).last()
        per_run = pd.Series(by_fam.reindex(fam.to_numpy()).to_numpy(), index=runs.index,
                            dtype=object)
        missing = sorted(set(fam[scope.index]) - set(by_fam.index))
        notes = [f"no run with {role_sel} in family {m or '(none)'!r}: its runs have no baseline"
                 for m in missing]
        return Baseline(text, "family", matched, per_run, f"{role_sel} (per family)", notes)
    if len(matched) == 1 or (len(parts) == 1 and not role_sel):
        if len(matched) > 1:  # one name, several runs: take the latest
            latest = runs.loc[matched].sort_values("start_time", na_position="first").index[-1]
            notes = [f"baseline {text!r} matches {len(matched)} runs; using the latest "
                     f"({labels[latest]})"]
            matched = [latest]
        else:
            notes = []
        per_run = pd.Series(matched[0], index=runs.index, dtype=object)
        return Baseline(text, "run", matched, per_run, labels[matched[0]], notes)
    label = "best of " + ", ".join(labels[m] for m in matched)
    return Baseline(text, "best_of", matched, pd.Series(None, index=runs.index, dtype=object),
                    label)


def _match_selector(part: str, runs: pd.DataFrame, scope: pd.DataFrame) -> list[str]:
    from mlproject.compare.query import is_run_id

    kind, _, val = part.partition(":")
    if kind in ("id", "run") and val:
        return [val] if val in runs.index else [i for i in runs.index if i.startswith(val)][:1]
    if kind == "name" and val:
        return list(scope.index[scope["run_name"].astype("object") == val])
    if kind == "role" and val:
        return list(scope.index[scope["role"].astype("object") == val])
    if is_run_id(part) and part in runs.index:
        return [part]
    return list(scope.index[scope["run_name"].astype("object") == part])


def baseline_values(base: Baseline, metrics: pd.DataFrame, key_per_row: pd.Series,
                    d: Directions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(baseline value, baseline stderr, baseline run id) per row for that row's metric key."""
    n = len(key_per_row)
    run_ids = key_per_row.index
    if base.mode != "best_of":
        bids = base.per_run.reindex(run_ids).to_numpy(dtype=object)
        vals = _lookup(metrics, pd.Series(key_per_row.to_numpy(), index=range(n)), bids)
        se_keys = _map(key_per_row, _stderr_key)
        ses = _lookup(metrics, pd.Series(se_keys.to_numpy(), index=range(n)), bids)
        return vals, ses, bids
    vals, ses = np.full(n, np.nan), np.full(n, np.nan)
    bids = np.full(n, None, dtype=object)
    keys = key_per_row.to_numpy(dtype=object)
    sub = metrics.loc[base.run_ids]
    for key in pd.unique(keys[pd.notna(keys)]):
        if key not in sub:
            continue
        col = sub[key].dropna()
        if col.empty:
            continue
        direction = d(key)
        best = col.idxmin() if direction == LOWER else col.idxmax()
        sel = keys == key
        vals[sel] = col[best]
        bids[sel] = best
        se_key = f"{key}_stderr"
        if se_key in sub:
            ses[sel] = sub.at[best, se_key]
    return vals, ses, bids


# ----------------------------------------------------------------------------- selection

def select_metrics(requested: Sequence[str], columns: Sequence[str],
                   scores: Scores) -> list[str]:
    """Metric keys for ``metrics=…``: a full key, a leaf (``pass@1`` ~ ``*/pass_at_1``),
    a task name (its headline metric) or a key prefix (``ppl`` → ``ppl/*``)."""
    cols = [c for c in columns if not dirs.is_stderr(c)]
    out: list[str] = []
    for req in requested:
        req = req.strip()
        if not req:
            continue
        if req in cols:
            hits = [req]
        else:
            c = dirs.canon(req)
            hits = [k for k in cols if dirs.canon(k) == c] or \
                [k for k in cols if dirs.canon(dirs.leaf(k)) == c and not dirs.is_reserved(k)]
            if not hits and req in scores.tasks and scores.mode_key(req):
                hits = [scores.mode_key(req)]
            if not hits:
                hits = [k for k in cols if k.startswith(req.rstrip("/") + "/")
                        and not dirs.is_reserved(k)]
        if not hits:
            leaves = sorted({dirs.leaf(k) for k in cols if not dirs.is_reserved(k)})
            raise UserError(f"metric {req!r} matches no logged metric (known: "
                            f"{', '.join(leaves[:20])}{', …' if len(leaves) > 20 else ''})")
        out.extend(h for h in hits if h not in out)
    return out


def default_ranking_metrics(columns: Sequence[str], scores: Scores, d: Directions) -> list[str]:
    """Per task its (most used) headline score; per other group every metric whose direction
    is known; top-level ``avg_acc``; every ``ppl/*``."""
    keys: list[str] = []
    task_set = set(scores.tasks)
    for t in scores.tasks:
        k = scores.mode_key(t)
        if k:
            keys.append(k)
    for k in columns:
        g = dirs.group(k)
        if dirs.is_stderr(k) or dirs.is_reserved(k) or k in keys:
            continue
        if g in task_set and dirs.is_score(dirs.leaf(k)):
            continue  # another score of a task already ranked by its headline
        if k.startswith("nll/"):
            continue
        if not g and k != "avg_acc":
            continue  # params_b, memory, seconds: context, not a contest
        if dirs.is_score(dirs.leaf(k)) and g not in task_set:
            keys.append(k)
        elif d(k) is not None:
            keys.append(k)
    return keys


def benchmark_of(key: str) -> str:
    return dirs.group(key) or "overall"


# ----------------------------------------------------------------------------- versus

VERSUS_COLUMNS = ["candidate_id", "candidate", "baseline_id", "baseline", "task", "metric",
                  "key", "direction", "baseline_value", "candidate_value", "delta",
                  "delta_display", "unit", "rel_pct", "stderr", "significant", "improved"]


def versus(runs: pd.DataFrame, metrics: pd.DataFrame, scores: Scores, base: Baseline,
           d: Directions, selected: Sequence[str] | None = None) -> pd.DataFrame:
    """Baseline vs each candidate, one row per (candidate, metric)."""
    scope = runs.index[runs["in_scope"].astype(bool)]
    cands = scope.difference(pd.Index(base.run_ids), sort=False)
    if base.mode != "best_of":
        cands = cands[base.per_run.reindex(cands).notna().to_numpy()]
    labels = run_labels(runs)
    per_key: list[tuple[str, str, pd.Series]] = []  # (task/group, metric label, key per cand)
    if selected:
        task_of_key = {k: t for t in scores.tasks for k in scores.keys[t].dropna().unique()}
        for k in selected:
            group = task_of_key.get(k) or benchmark_of(k)
            per_key.append((group, dirs.leaf(k), pd.Series(k, index=cands, dtype=object)))
    else:
        for t in scores.tasks:
            per_key.append((t, "", scores.keys.loc[cands, t]))
        extra = (["avg_acc"] if "avg_acc" in metrics or scores.tasks else []) + \
            sorted(k for k in metrics.columns if k.startswith("ppl/"))
        for k in extra:
            per_key.append((benchmark_of(k) if k != "avg_acc" else "mean", dirs.leaf(k),
                            pd.Series(k, index=cands)))
    frames = []
    mean_acc = mean_accuracy(metrics, scores)
    for group, _, keys in per_key:
        keys = keys.astype(object)
        if group == "mean":
            cand_vals = mean_acc.reindex(cands).to_numpy(dtype="float64")
            b_vals, b_se, b_ids = _baseline_mean(base, mean_acc, cands, d)
            c_se = np.full(len(cands), np.nan)
        else:
            cand_vals = _lookup(metrics, keys.reset_index(drop=True), cands)
            b_vals, b_se, b_ids = baseline_values(base, metrics, keys, d)
            c_se = _lookup(metrics, _map(keys, _stderr_key).reset_index(drop=True), cands)
        frames.append(pd.DataFrame({
            "candidate_id": cands, "baseline_id": b_ids, "task": group,
            "key": keys.to_numpy(), "baseline_value": b_vals, "candidate_value": cand_vals,
            "se_b": b_se, "se_c": c_se,
        }))
    if not frames:
        return pd.DataFrame(columns=VERSUS_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    # A row per metric the candidate has; the baseline may lack it (shown N/A).
    df = df[df["key"].notna() & df["candidate_value"].notna()]
    df["metric"] = _map(df["key"], dirs.leaf)
    df["candidate"] = df["candidate_id"].map(labels)
    df["baseline"] = (df["baseline_id"].map(labels) if base.mode != "best_of"
                      else base.label)
    df["direction"] = _map(df["key"], d)
    df["delta"] = df["candidate_value"] - df["baseline_value"]
    frac = _map(df["key"], dirs.is_fraction_metric).astype(bool)
    for col in ("baseline_value", "candidate_value"):
        frac &= (df[col].abs() <= 1) | df[col].isna()
    df["unit"] = np.where(frac, "pts", "")
    df["delta_display"] = np.where(frac, df["delta"] * 100.0, df["delta"])
    b = df["baseline_value"].where(df["baseline_value"] != 0)
    df["rel_pct"] = df["delta"] / b.abs() * 100.0
    se = np.sqrt(df["se_b"] ** 2 + df["se_c"] ** 2)
    df["stderr"] = se
    sig = pd.Series(pd.NA, index=df.index, dtype="boolean")
    known = se.notna() & df["delta"].notna()
    sig[known] = (df["delta"].abs() >= 2 * se)[known]
    df["significant"] = sig
    df["improved"] = improved(df["delta"], df["direction"])
    return df[VERSUS_COLUMNS].reset_index(drop=True)


def _baseline_mean(base: Baseline, mean_acc: pd.Series, cands, d):
    if base.mode != "best_of":
        bids = base.per_run.reindex(cands).to_numpy(dtype=object)
        return (mean_acc.reindex(bids).to_numpy(dtype="float64"), np.full(len(cands), np.nan),
                bids)
    col = mean_acc.reindex(base.run_ids).dropna()
    if col.empty:
        return np.full(len(cands), np.nan), np.full(len(cands), np.nan), \
            np.full(len(cands), None, dtype=object)
    best = col.idxmax()
    return (np.full(len(cands), col[best]), np.full(len(cands), np.nan),
            np.full(len(cands), best, dtype=object))


def improved(delta: pd.Series, direction: pd.Series) -> pd.Series:
    """True / False per row by direction; NA for ties, unknown direction or missing data."""
    out = pd.Series(pd.NA, index=delta.index, dtype="boolean")
    up = (direction == HIGHER) & delta.notna() & (delta != 0)
    down = (direction == LOWER) & delta.notna() & (delta != 0)
    out[up] = (delta > 0)[up]
    out[down] = (delta < 0)[down]
    return out


def versus_summary(vs: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: improvements / regressions (task scores only, sorted by gain) and the
    average change (in the candidate's display unit, sign = better)."""
    cols = ["candidate_id", "candidate", "baseline", "n_tasks", "n_improved", "n_regressed",
            "n_significant", "avg_delta", "unit", "improvements", "regressions"]
    if vs.empty:
        return pd.DataFrame(columns=cols)
    tasks = vs[~vs["task"].isin(["mean", "ppl", "overall"]) & vs["delta"].notna()]
    if tasks.empty:
        return pd.DataFrame(columns=cols)
    sign = np.where(tasks["direction"] == LOWER, -1.0, 1.0)
    imp = tasks["improved"].fillna(False).astype(bool)
    reg = (tasks["improved"] == False).fillna(False).astype(bool)  # noqa: E712
    tasks = tasks.assign(_gain=tasks["delta_display"] * sign, _imp=imp, _reg=reg,
                         _sig=tasks["significant"].fillna(False).astype(bool))
    g = tasks.groupby("candidate_id", sort=False)
    out = pd.DataFrame({
        "candidate": g["candidate"].first(), "baseline": g["baseline"].first(),
        "n_tasks": g.size(), "n_improved": g["_imp"].sum(), "n_regressed": g["_reg"].sum(),
        "n_significant": g["_sig"].sum(), "avg_delta": g["_gain"].mean(),
        "unit": g["unit"].first().where(g["unit"].nunique() == 1, ""),
    })
    ups = tasks[tasks["_imp"]].sort_values("_gain", ascending=False, kind="stable")
    downs = tasks[tasks["_reg"]].sort_values("_gain", kind="stable")
    for col, sub in (("improvements", ups), ("regressions", downs)):
        lists = _lists(sub, "candidate_id", "task").reindex(out.index)
        out[col] = [v if isinstance(v, list) else [] for v in lists]
    return out.rename_axis("candidate_id").reset_index()[cols]


# ----------------------------------------------------------------------------- ranking

RANKING_COLUMNS = ["benchmark", "metric", "key", "direction", "run_id", "run", "value",
                   "rank", "medal", "worst"]


def ranking(runs: pd.DataFrame, metrics: pd.DataFrame, keys: Sequence[str],
            d: Directions) -> pd.DataFrame:
    """Per (benchmark, metric): value per run, rank by direction, medals for the best three,
    ``worst`` for the last when more than three runs compete (no medal/worst if the
    direction is unknown). Ties share the better rank."""
    scope = runs.index[runs["in_scope"].astype(bool)]
    labels = run_labels(runs)
    keys = [k for k in keys if k in metrics]
    if not keys or not len(scope):
        return pd.DataFrame(columns=RANKING_COLUMNS)
    m = metrics.loc[scope, keys]
    long = (m.rename_axis(index="run_id").reset_index()
            .melt(id_vars="run_id", var_name="key", value_name="value").dropna(subset=["value"]))
    long["benchmark"] = _map(long["key"], benchmark_of)
    long["metric"] = _map(long["key"], dirs.leaf)
    long["direction"] = _map(long["key"], d)
    long["run"] = long["run_id"].map(labels)
    sign = np.select([long["direction"] == HIGHER, long["direction"] == LOWER], [1.0, -1.0],
                     np.nan)
    long["_signed"] = long["value"] * sign
    grp = long.groupby("key", sort=False)["_signed"]
    long["rank"] = grp.rank(method="min", ascending=False)
    n = grp.transform("count")
    worst_val = grp.transform("min")
    long["medal"] = long["rank"].map(MEDALS).fillna("")
    long["worst"] = (long["_signed"] == worst_val) & (n > 3)
    order = {k: i for i, k in enumerate(keys)}
    run_order = {r: i for i, r in enumerate(scope)}
    long["_k"] = long["key"].map(order)
    long["_r"] = long["run_id"].map(run_order)
    bench_order = {b: i for i, b in enumerate(dict.fromkeys(benchmark_of(k) for k in keys))}
    long["_b"] = long["benchmark"].map(bench_order)
    long = long.sort_values(["_b", "_k", "_r"])
    return long[RANKING_COLUMNS].reset_index(drop=True)


DELTA_COLUMNS = ["benchmark", "metric", "key", "direction", "run_id", "run", "baseline_id",
                 "baseline", "baseline_value", "value", "delta", "rel_pct", "speedup",
                 "improved"]


def ranking_delta(rank: pd.DataFrame, runs: pd.DataFrame, metrics: pd.DataFrame,
                  base: Baseline, d: Directions) -> pd.DataFrame:
    """Each run against the baseline: delta, relative %, speedup (time-like metrics)."""
    if rank.empty:
        return pd.DataFrame(columns=DELTA_COLUMNS)
    df = rank[~rank["run_id"].isin(base.run_ids)].copy()
    keys = pd.Series(df["key"].to_numpy(), index=df["run_id"].to_numpy())
    vals, _, bids = baseline_values(base, metrics, keys, d)
    labels = run_labels(runs)
    df["baseline_value"] = vals
    df["baseline_id"] = bids
    df["baseline"] = (pd.Series(bids, index=df.index).map(labels) if base.mode != "best_of"
                      else base.label)
    df["delta"] = df["value"] - df["baseline_value"]
    b = df["baseline_value"].where(df["baseline_value"] != 0)
    df["rel_pct"] = df["delta"] / b.abs() * 100.0
    time_like = _map(df["key"], dirs.is_time_like).astype(bool)
    v = df["value"].where(df["value"] != 0)
    df["speedup"] = np.where(time_like, df["baseline_value"] / v, np.nan)
    df["improved"] = improved(df["delta"], df["direction"])
    df = df[df["baseline_value"].notna()]
    return df[DELTA_COLUMNS].reset_index(drop=True)


LIST_COLUMNS = ["benchmark", "category", "run_id", "run", "better", "worse"]
ALL_BETTER = "better than baseline on every metric"
ALL_WORSE = "worse than baseline on every metric"


def ranking_lists(delta: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark, each run's category against the baseline; plus benchmark ``*`` for
    runs better on every metric of every benchmark (when there are several)."""
    if delta.empty:
        return pd.DataFrame(columns=LIST_COLUMNS)
    df = delta[delta["direction"].notna()]
    if df.empty:
        return pd.DataFrame(columns=LIST_COLUMNS)
    better = df["improved"].fillna(False).astype(bool).to_numpy()
    worse = (df["improved"] == False).fillna(False).astype(bool).to_numpy()  # noqa: E712
    timed = _map(df["key"], dirs.is_time_like).astype(bool).to_numpy()
    score = _map(df["metric"], dirs.is_score).astype(bool).to_numpy()
    df = df.assign(_b=better, _w=worse, _bt=better & timed, _wt=worse & timed,
                   _bs=better & score, _ws=worse & score)
    g = df.groupby(["benchmark", "run_id"], sort=False)
    a = pd.DataFrame({"run": g["run"].first(), "n": g.size(),
                      **{c: g[c].sum() for c in ("_b", "_w", "_bt", "_wt", "_bs", "_ws")}})
    for col, mask in (("better", better), ("worse", worse)):
        lists = _lists(df[mask], ["benchmark", "run_id"], "metric")
        lists = lists.reindex(a.index) if len(lists) else pd.Series(None, index=a.index)
        a[col] = [", ".join(v) if isinstance(v, list) else "" for v in lists]
    mixed = (a["_b"] > 0) & (a["_w"] > 0)
    faster = mixed & (a["_bt"] == a["_b"]) & (a["_wt"] == 0)
    slower = mixed & (a["_wt"] == a["_w"]) & (a["_bt"] == 0)
    a["category"] = np.select(
        [(a["_b"] == a["n"]), (a["_w"] == a["n"]), (a["_b"] == 0) & (a["_w"] == 0),
         faster & (a["_ws"] == a["_w"]), faster,
         slower & (a["_bs"] == a["_b"]), slower, mixed, a["_b"] > 0],
        [ALL_BETTER, ALL_WORSE, "equal to baseline",
         "faster but less accurate", "faster but worse on " + a["worse"],
         "more accurate but slower", "better on " + a["better"] + " but slower",
         "better on " + a["better"] + "; worse on " + a["worse"],
         "better on " + a["better"] + ", equal on the rest"],
        "worse on " + a["worse"] + ", equal on the rest")
    out = a.reset_index()[LIST_COLUMNS]
    n_bench = out["benchmark"].nunique()
    if n_bench > 1:
        per = out.assign(_ok=out["category"] == ALL_BETTER).groupby("run_id", sort=False)
        allb = per["_ok"].all() & (per.size() == n_bench)
        runs_ok = allb[allb].index
        if len(runs_ok):
            first = out.drop_duplicates("run_id").set_index("run_id").loc[runs_ok, "run"]
            out = pd.concat([out, pd.DataFrame({
                "benchmark": "*", "category": ALL_BETTER + " of every benchmark",
                "run_id": runs_ok, "run": first.to_numpy(), "better": "", "worse": ""})],
                ignore_index=True)
    return out


def _lists(df: pd.DataFrame, keys, col: str) -> pd.Series:
    """Values of ``col`` per group as Python lists (in row order), without a Python-level
    groupby-apply (that costs ~40 µs a group: seconds at 10,000 runs × 9 benchmarks)."""
    if df.empty:
        return pd.Series(dtype=object)
    vals = df[col].to_numpy(dtype=object)
    idx = df.groupby(keys, sort=False).indices
    return pd.Series({k: vals[v].tolist() for k, v in idx.items()}, dtype=object)


def _stderr_key(key: str) -> str:
    return f"{key}_stderr"


def _map(s: pd.Series, fn) -> pd.Series:
    """``s.map(fn)`` evaluating ``fn`` once per distinct value."""
    return s.map({k: fn(k) for k in s.dropna().unique()})


# ----------------------------------------------------------------------------- code tasks

#: Time metrics of code tasks recomputed on the problems every compared run solved.
COMMON_TIME_METRICS = {"avg_time_s": "time_s", "time_ratio": "time_ratio"}


@dataclass
class CommonSet:
    """For one code task: the problems every compared run solved (and timed)."""

    task: str
    runs: list[str]
    problems: list[str]
    total: int            # distinct problems seen across the runs
    missing: list[str]    # runs without per-problem results (then: no common set)

    @property
    def applied(self) -> bool:
        return not self.missing


def common_problem_metrics(runs: pd.DataFrame, metrics: pd.DataFrame,
                           problems: pd.DataFrame | None) -> tuple[pd.DataFrame, dict[str, CommonSet]]:
    """Code tasks' ``avg_time_s`` / ``time_ratio`` recomputed per run over the problems that
    *every* in-scope run with that task solved and timed, so a model solving only the easy
    problems cannot win on speed. ``avg_time_s`` = mean seconds, ``time_ratio`` = geometric
    mean of candidate / reference, as the evaluation defines them. Where a run lacks its
    per-problem results, that task keeps the logged values (and says so)."""
    if problems is None:
        return metrics, {}
    out = metrics.copy()
    info: dict[str, CommonSet] = {}
    scope = runs.index[runs["in_scope"].astype(bool)]
    tasks = sorted({c.rsplit("/", 1)[0] for c in metrics.columns if c.endswith("/timed")
                    and not dirs.is_reserved(c)})
    for task in tasks:
        members = [r for r in scope if pd.notna(metrics.at[r, f"{task}/timed"])]
        if not members:
            continue
        pt = problems[(problems["task"] == task) & problems["run_id"].isin(members)]
        have = set(pt["run_id"])
        missing = [r for r in members if r not in have]
        timed = pt[pt["time_s"].notna()]
        counts = timed.groupby("problem")["run_id"].nunique()
        common = sorted(counts.index[counts == len(members)]) if not missing else []
        info[task] = CommonSet(task, members, common, int(pt["problem"].nunique()), missing)
        if missing:
            continue
        sel = timed[timed["problem"].isin(common)]
        for metric, col in COMMON_TIME_METRICS.items():
            key = f"{task}/{metric}"
            if key not in out:
                continue
            if metric == "time_ratio":  # ratios multiply: geometric mean
                vals = np.log(sel[col].where(sel[col] > 0)).groupby(sel["run_id"]).mean()
                vals = np.exp(vals)
            else:
                vals = sel.groupby("run_id")[col].mean()
            out.loc[members, key] = vals.reindex(members).to_numpy(dtype="float64")
    return out, info


# ----------------------------------------------------------------------------- pareto

def pareto_front(x: pd.Series, y: pd.Series, x_dir: str, y_dir: str) -> pd.Series:
    """Boolean mask of points no other point beats on both axes (NaN rows are False)."""
    ok = x.notna() & y.notna()
    xs = x[ok] * (1 if x_dir == HIGHER else -1)
    ys = y[ok] * (1 if y_dir == HIGHER else -1)
    order = pd.DataFrame({"x": xs, "y": ys}).sort_values(["x", "y"], ascending=False)
    best = -math.inf
    front = pd.Series(False, index=x.index)
    for idx, yy in zip(order.index, order["y"].to_numpy(), strict=True):
        if yy > best:
            front[idx] = True
            best = yy
    return front


def pareto_table(runs: pd.DataFrame, metrics: pd.DataFrame, scores: Scores) -> pd.DataFrame:
    """Accuracy vs PPL and vs size per in-scope run, with Pareto-front flags."""
    scope = runs.index[runs["in_scope"].astype(bool)]
    acc = mean_accuracy(metrics, scores).reindex(scope)
    df = pd.DataFrame({"run_id": scope, "run": run_labels(runs).reindex(scope).to_numpy(),
                       "acc": acc.to_numpy()}, index=scope)
    ppl_keys = sorted(k for k in metrics.columns if k.startswith("ppl/"))
    if ppl_keys:
        df["ppl"] = metrics.loc[scope, ppl_keys[0]]
        df["ppl_key"] = ppl_keys[0]
        df["front_acc_ppl"] = pareto_front(df["ppl"], df["acc"], LOWER, HIGHER)
    if "params_b" in metrics:
        df["params_b"] = metrics.loc[scope, "params_b"]
        df["front_acc_size"] = pareto_front(df["params_b"], df["acc"], LOWER, HIGHER)
    df = df[df["acc"].notna()]
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------- settings

SETTINGS_COLUMNS = ["run_id", "run", "reference", "differs"]
SETTING_LABELS = {"limit": "limit", "num_fewshot": "num_fewshot", "batch_size": "batch size",
                  "seqlen": "seqlen", "ppl_windows": "PPL windows", "lm_eval": "lm-eval"}


def _setting_value(v) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip()
    return None if s in ("", "nan", "None") else s


def settings_check(runs: pd.DataFrame, metrics: pd.DataFrame, base: Baseline | None = None) -> pd.DataFrame:
    """Evaluation settings (``setting:*`` columns: limit, num_fewshot, batch size, PPL seqlen and
    windows, lm-eval version) of each in-scope run with numbers, against its reference: its
    baseline run (``baseline=`` one run or ``role:``), else the most common value among the runs.
    ``differs`` lists ``(setting, value, reference value)`` where both are known and differ;
    runs whose numbers cannot be compared with the others' show up here. One row per run."""
    from mlproject.compare.query import SETTING_PREFIX

    cols = [c for c in runs.columns if c.startswith(SETTING_PREFIX)]
    scored = [c for c in metrics.columns if c == "avg_acc" or c.startswith("ppl/")
              or (dirs.group(c) and dirs.is_score(dirs.leaf(c)) and not dirs.is_reserved(c))]
    has = metrics[scored].notna().any(axis=1) if scored else pd.Series(False, index=metrics.index)
    scope = runs.index[runs["in_scope"].astype(bool) & has.reindex(runs.index, fill_value=False)]
    if not cols or not len(scope):
        return pd.DataFrame(columns=SETTINGS_COLUMNS)
    values = runs[cols].astype(object).apply(lambda col: col.map(_setting_value))
    modal = {}
    for c in cols:
        present = list(values.loc[scope, c].dropna())
        # the most common value; on a tie, the one the earliest run has
        modal[c] = max(dict.fromkeys(present), key=lambda v, p=present: (p.count(v), -p.index(v))) \
            if present else None
    labels = run_labels(runs)
    rows = []
    for rid in scope:
        ref_id = base.per_run.get(rid) if base is not None and base.mode in ("run", "family") else None
        ref_id = ref_id if isinstance(ref_id, str) and ref_id in values.index and ref_id != rid else None
        differs = []
        for c in cols:
            mine = values.at[rid, c]
            ref = values.at[ref_id, c] if ref_id else modal[c]
            if mine is not None and ref is not None and mine != ref:
                differs.append((SETTING_LABELS.get(c[len(SETTING_PREFIX):], c[len(SETTING_PREFIX):]), mine, ref))
        rows.append({"run_id": rid, "run": labels[rid],
                     "reference": labels[ref_id] if ref_id else "most runs", "differs": differs_text(differs),
                     **{c[len(SETTING_PREFIX):]: values.at[rid, c] for c in cols}})
    return pd.DataFrame(rows)


def differs_text(differs) -> str:
    """``limit 20 (vs all), lm-eval 0.4.9 (vs 0.4.13)``."""
    return ", ".join(f"{name} {mine} (vs {ref})" for name, mine, ref in (differs or []))
