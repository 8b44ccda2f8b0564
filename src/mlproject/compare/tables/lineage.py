"""Who came from whom: each run's upstream run and the evaluation of the same input model
(where "before" values come from), its root model and its model family."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlproject.compare.tables.frames import nonempty


def family_of(runs: pd.DataFrame) -> pd.Series:
    """Model family: tag ``mlproject.family``, else ``mlproject.base_model``, else root model."""
    fam = runs["family"].astype("object")
    for col in ("base_model", "root_model"):
        if col in runs:
            fam = fam.where(nonempty(fam), runs[col].astype("object"))
    return fam.where(nonempty(fam), None)


def root_models(runs: pd.DataFrame, max_depth: int = 8) -> pd.Series:
    """Root model per run: its ``base_model`` tag, else the model of its lineage root."""
    up = runs["upstream_run"].astype("object")
    up = up.where(nonempty(up) & up.isin(runs.index), None)
    model = runs["model"].astype("object").where(nonempty(runs["model"]), None)
    cur = pd.Series(runs.index, index=runs.index, dtype=object)
    for _ in range(max_depth):
        nxt = up.reindex(cur.values).to_numpy()
        has = pd.notna(nxt)
        if not has.any():
            break
        cur = cur.where(~has, pd.Series(nxt, index=cur.index))
    root = model.reindex(cur.values).to_numpy()
    base = runs["base_model"].astype("object")
    return base.where(nonempty(base), pd.Series(root, index=runs.index))


def families(runs: pd.DataFrame) -> pd.Series:
    """``family_of`` with the lineage root model as the last fallback."""
    return family_of(runs.assign(root_model=root_models(runs)))


@dataclass
class Lineage:
    upstream: pd.Series       # run → upstream run id (in the set) or None
    sibling_eval: pd.Series   # run → evaluate run sharing its upstream, or None

    def before(self, metrics: pd.DataFrame, key: str) -> pd.Series:
        """Before value of ``key`` per run (see ``mlproject.compare.tables`` for the order)."""
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
    up = up.where(nonempty(up) & up.isin(runs.index), None)
    is_eval = (runs["step"].astype("object") == "evaluate") & up.notna()
    ev = runs[is_eval].assign(_up=up[is_eval]).sort_values("start_time", na_position="first")
    latest = pd.Series(ev.index, index=ev["_up"].to_numpy()).groupby(level=0).last()
    sib = pd.Series(latest.reindex(up.to_numpy()).to_numpy(), index=runs.index, dtype=object)
    sib = sib.where(sib != pd.Series(runs.index, index=runs.index), None)
    return Lineage(upstream=up, sibling_eval=sib.where(sib.notna(), None))
