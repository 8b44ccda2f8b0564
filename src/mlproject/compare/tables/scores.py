"""Which metric is a task's headline score, the mean accuracy over tasks, and which metrics a
``metrics=`` selection names (see ``mlproject.compare.tables`` for the conventions)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.tables.frames import lookup, map_once, nonempty
from mlproject.errors import UserError


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


def stderr_key(key: str) -> str:
    return f"{key}_stderr"


def benchmark_of(key: str) -> str:
    return dirs.group(key) or "overall"


def task_candidates(columns: Sequence[str]) -> dict[str, list[str]]:
    """``{"boolq": ["boolq/acc"], "piqa": ["piqa/acc_norm", "piqa/acc"], …}`` by preference."""
    out: dict[str, list[str]] = {}
    for key in columns:
        g, lf = dirs.group(key), dirs.leaf(key)
        if not g or dirs.is_reserved(key) or key.startswith((*dirs.LOWER_FAMILIES, *dirs.REFERENCE_FAMILIES)):
            continue
        if dirs.is_score(lf):
            out.setdefault(g, []).append(key)
    for g in out:
        out[g].sort(key=lambda k: dirs.score_preference_key(dirs.leaf(k)))
    return dict(sorted(out.items()))


def task_scores(runs: pd.DataFrame, metrics: pd.DataFrame) -> Scores:
    cands = task_candidates(metrics.columns)
    tagged = runs["avg_acc_metrics"].astype("object")
    tagged = tagged[nonempty(tagged)]
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
        stderr[t] = lookup(metrics, map_once(keys[t], stderr_key), metrics.index)
    return Scores(tasks=tasks, values=values, keys=keys, stderr=stderr)


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
