"""Small pandas helpers the compare tables share: set strings, one call per distinct value,
lists per group, per-row lookups, and the display label of each run."""

from __future__ import annotations

import numpy as np
import pandas as pd


def nonempty(s: pd.Series) -> pd.Series:
    """Strings that are set (not NaN / None / '')."""
    return s.notna() & (s != "")


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """Display name per run: the run name, made unique with a short id when needed.
    (Only the runs that need a change are touched: ``status.isin`` and string concatenation
    over all 10,000 runs, seven times a compare, were a tenth of a second.)"""
    ids = runs.index.to_numpy(dtype=object)
    raw = runs["run_name"]
    names = raw.to_numpy(dtype=object).copy()
    unnamed = ~nonempty(raw).to_numpy(dtype=bool)
    if unnamed.any():
        names[unnamed] = [i[:8] for i in ids[unnamed]]
    dup = pd.Series(names, dtype=object).duplicated(keep=False).to_numpy()
    if dup.any():
        names[dup] = names[dup] + " (" + np.array([i[:6] for i in ids[dup]], dtype=object) + ")"
    if "status" in runs:
        # A run that did not finish is never shown as if it had (a RUNNING run left by a
        # killed process must not look like a medal winner).
        status = runs["status"].astype("object").fillna("FINISHED")
        odd = ~status.isin(["FINISHED", "", None]).to_numpy(dtype=bool)
        if odd.any():
            names[odd] = names[odd] + " [" + status[odd].astype(str).to_numpy(dtype=object) + "]"
    return pd.Series(names, index=runs.index, name=raw.name, dtype=object).astype(str)


def map_once(s: pd.Series, fn) -> pd.Series:
    """``s.map(fn)`` evaluating ``fn`` once per distinct value (NaN stays NaN).

    The same result as ``s.map({k: fn(k) for k in s.dropna().unique()})`` — values, dtype,
    index — but the dict is applied to the distinct values only and spread back by their
    codes (``pd.factorize``): a dict ``map`` over 90,000 string rows costs ~10 ms of hashing,
    and a compare of 10,000 runs makes dozens of them."""
    codes, uniques = pd.factorize(s)
    if not len(uniques):
        return s.map({})
    first = np.empty(len(uniques), dtype="int64")
    at = np.flatnonzero(codes >= 0)
    first[codes[at[::-1]]] = at[::-1]  # each distinct value's first row (the last write wins)
    small = s.iloc[first]
    mapping = {k: fn(k) for k in small}
    mapped = small.map(mapping)
    if mapped.dtype == object and (codes < 0).any():
        # objects beside missing rows: pandas re-infers the dtype over the whole result (all
        # None and NaN → float64); let it
        return s.map(mapping)
    vals = pd.api.extensions.take(mapped.array, codes, allow_fill=True)
    return pd.Series(vals, index=s.index, name=s.name, dtype=vals.dtype, copy=False)


def lookup(metrics: pd.DataFrame, key_per_row: pd.Series, run_ids) -> np.ndarray:
    """``metrics.at[run_ids[i], key_per_row[i]]`` vectorised (NaN where either is missing):
    rows and columns located once (``get_indexer`` on the distinct keys and on the run ids as
    objects, as the index holds them), the values taken in one fancy index."""
    out = np.full(len(key_per_row), np.nan)
    codes, uniques = pd.factorize(key_per_row)
    if not len(uniques):
        return out
    col_of = metrics.columns.get_indexer(uniques)
    used = np.flatnonzero(col_of >= 0)
    if not len(used):
        return out
    pos = np.full(len(uniques), -1, dtype="int64")
    pos[used] = np.arange(len(used))
    col = np.where(codes >= 0, pos[codes], -1)
    row = metrics.index.get_indexer(_as_index(run_ids, metrics.index))
    ok = (col >= 0) & (row >= 0)
    out[ok] = metrics.iloc[:, col_of[used]].to_numpy(dtype="float64")[row[ok], col[ok]]
    return out


def _as_index(labels, like: pd.Index) -> pd.Index:
    """``labels`` as an Index of ``like``'s dtype where it is object (strings would otherwise
    be inferred as Arrow strings and converted back for the lookup)."""
    if isinstance(labels, pd.Index):
        return labels
    if like.dtype == object:
        return pd.Index(np.asarray(labels, dtype=object), dtype=object)
    return pd.Index(labels)


def lists_by(df: pd.DataFrame, keys, col: str) -> pd.Series:
    """Values of ``col`` per group as Python lists (in row order), groups in order of first
    appearance, without a Python-level groupby-apply (that costs ~40 µs a group: seconds at
    10,000 runs × 9 benchmarks): the rows sorted by group once, each list one slice."""
    if df.empty:
        return pd.Series(dtype=object)
    g = df.groupby(keys, sort=False)
    codes = g.ngroup().fillna(-1).to_numpy(dtype="int64")
    index = g.size().index
    if isinstance(index, pd.MultiIndex):
        index = index.set_names([None] * index.nlevels)
    else:
        index = index.rename(None)
    kept = np.flatnonzero(codes >= 0)  # rows of NaN keys have no group
    order = kept[np.argsort(codes[kept], kind="stable")]
    vals = df[col].to_numpy(dtype=object)[order].tolist()
    bounds = np.searchsorted(codes[order], np.arange(len(index) + 1)).tolist()
    return pd.Series([vals[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                     index=index, dtype=object)


def join_by(codes: np.ndarray, n_groups: int, values: np.ndarray, sep: str = ", ") -> np.ndarray:
    """``sep.join`` of ``values`` (strings) per group ``codes[i]`` (0 … n_groups − 1; rows in
    order), ``""`` for a group without rows: one vectorised string concatenation per position
    within a group (a few for compare's groups) instead of one Python ``join`` per group."""
    out = np.full(n_groups, "", dtype=object)
    if not len(codes):
        return out
    order = np.argsort(codes, kind="stable")
    c, v = codes[order], np.asarray(values, dtype=object)[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    pos = np.arange(len(c)) - np.repeat(starts, np.diff(np.r_[starts, len(c)]))
    first = pos == 0
    out[c[first]] = v[first]
    for p in range(1, int(pos.max()) + 1):
        sel = pos == p
        out[c[sel]] = out[c[sel]] + sep + v[sel]
    return out
