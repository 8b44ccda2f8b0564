"""The ``baseline=`` argument: resolved to the run (or runs) each candidate is compared with,
and the baseline's value of any metric per candidate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlproject.compare.directions import LOWER, Directions
from mlproject.compare.query import is_run_id
from mlproject.compare.tables.frames import lookup, map_once, run_labels
from mlproject.compare.tables.lineage import families
from mlproject.compare.tables.scores import stderr_key
from mlproject.errors import UserError


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
    fam = families(runs).astype("object").fillna("")
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
        vals = lookup(metrics, pd.Series(key_per_row.to_numpy(), index=range(n)), bids)
        se_keys = map_once(key_per_row, stderr_key)
        ses = lookup(metrics, pd.Series(se_keys.to_numpy(), index=range(n)), bids)
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
