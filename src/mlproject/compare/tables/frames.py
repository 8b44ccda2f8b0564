"""Small pandas helpers the compare tables share: set strings, one call per distinct value,
lists per group, per-row lookups, and the display label of each run."""

from __future__ import annotations

import numpy as np
import pandas as pd


def nonempty(s: pd.Series) -> pd.Series:
    """Strings that are set (not NaN / None / '')."""
    return s.notna() & (s.astype("object").fillna("").astype(str).str.len() > 0)


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """Display name per run: the run name, made unique with a short id when needed."""
    names = runs["run_name"].astype("object").where(nonempty(runs["run_name"]),
                                                    pd.Series(runs.index.str[:8], index=runs.index))
    dup = names.duplicated(keep=False)
    names = names.where(~dup, names + " (" + runs.index.str[:6] + ")")
    if "status" in runs:
        # A run that did not finish is never shown as if it had (a RUNNING run left by a
        # killed process must not look like a medal winner).
        status = runs["status"].astype("object").fillna("FINISHED")
        names = names.where(status.isin(["FINISHED", "", None]), names + " [" + status.astype(str) + "]")
    return names.astype(str)


def map_once(s: pd.Series, fn) -> pd.Series:
    """``s.map(fn)`` evaluating ``fn`` once per distinct value."""
    return s.map({k: fn(k) for k in s.dropna().unique()})


def lookup(metrics: pd.DataFrame, key_per_row: pd.Series, run_ids) -> np.ndarray:
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


def lists_by(df: pd.DataFrame, keys, col: str) -> pd.Series:
    """Values of ``col`` per group as Python lists (in row order), without a Python-level
    groupby-apply (that costs ~40 µs a group: seconds at 10,000 runs × 9 benchmarks)."""
    if df.empty:
        return pd.Series(dtype=object)
    vals = df[col].to_numpy(dtype=object)
    idx = df.groupby(keys, sort=False).indices
    return pd.Series({k: vals[v].tolist() for k, v in idx.items()}, dtype=object)
