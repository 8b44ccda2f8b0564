"""Evaluation settings check, shown by every compare (not a selectable view): which runs were
scored with other settings (limit, few-shot, batch size, PPL seqlen / windows, lm-eval version)
than the run they are compared with — their table, the warning block at the top of the report,
and the note."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.query import SETTING_PREFIX
from mlproject.compare.render.blocks import FLAG, Heading, Para, Table, cell
from mlproject.compare.tables.baseline import Baseline
from mlproject.compare.tables.frames import run_labels

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
    runs whose numbers cannot be compared with the others' show up here. One row per run.

    Column by column over all runs at once (one array per setting, the reference runs' values
    by position): 10,000 runs take milliseconds, not the seconds per-value reads took."""
    cols = [c for c in runs.columns if c.startswith(SETTING_PREFIX)]
    scored = [c for c in metrics.columns if c == "avg_acc" or c.startswith("ppl/")
              or (dirs.group(c) and dirs.is_score(dirs.leaf(c)) and not dirs.is_reserved(c))]
    has = metrics[scored].notna().any(axis=1) if scored else pd.Series(False, index=metrics.index)
    scope = runs.index[runs["in_scope"].astype(bool) & has.reindex(runs.index, fill_value=False)]
    if not cols or not len(scope):
        return pd.DataFrame(columns=SETTINGS_COLUMNS)
    labels = run_labels(runs)
    # each run's reference run: its baseline run (one run, or its family's), never itself
    ref_ids = np.full(len(scope), None, dtype=object)
    if base is not None and base.mode in ("run", "family"):
        per_run = base.per_run[~base.per_run.index.duplicated(keep=False)]
        cand = per_run.reindex(scope).to_numpy(dtype=object)
        ok = np.fromiter((isinstance(r, str) for r in cand), dtype=bool, count=len(cand))
        ok &= pd.Index(cand, dtype=object).isin(runs.index) & (cand != scope.to_numpy(dtype=object))
        ref_ids[ok] = cand[ok]
    has_ref = pd.notna(ref_ids)
    mine_pos = runs.index.get_indexer(scope)
    ref_pos = runs.index.get_indexer(pd.Index(ref_ids[has_ref], dtype=object))
    mine_cols, parts = {}, []
    for c in cols:
        values = _setting_values(runs[c])
        mine = values[mine_pos]
        ref = np.full(len(scope), _modal(mine), dtype=object)
        ref[has_ref] = values[ref_pos]
        diff = pd.notna(mine) & pd.notna(ref)
        diff[diff] = mine[diff] != ref[diff]
        name = SETTING_LABELS.get(c[len(SETTING_PREFIX):], c[len(SETTING_PREFIX):])
        text = np.full(len(scope), None, dtype=object)
        text[diff] = [f"{name} {m} (vs {r})" for m, r in zip(mine[diff], ref[diff], strict=True)]
        parts.append(text)
        mine_cols[c[len(SETTING_PREFIX):]] = mine
    differs = [", ".join(p for p in row if p is not None) for row in zip(*parts, strict=True)]
    reference = np.full(len(scope), "most runs", dtype=object)
    reference[has_ref] = labels.iloc[ref_pos].to_numpy(dtype=object)
    return pd.DataFrame({"run_id": list(scope), "run": list(labels.iloc[mine_pos]),
                         "reference": list(reference), "differs": differs,
                         **{k: list(v) for k, v in mine_cols.items()}})


def _setting_values(col: pd.Series) -> np.ndarray:
    """``_setting_value`` of every run's value (objects; None where unknown), computed once
    per distinct value."""
    codes, uniques = pd.factorize(col.astype(object))
    clean = np.array([_setting_value(u) for u in uniques] + [None], dtype=object)
    return clean[codes]  # code -1 (missing) → the None at the end


def _modal(values: np.ndarray):
    """The most common known value; on a tie, the one the earliest run has (None: none known)."""
    codes, uniques = pd.factorize(values)
    codes = codes[codes >= 0]
    if not len(codes):
        return None
    return uniques[int(np.argmax(np.bincount(codes)))]


def differs_text(differs) -> str:
    """``limit 20 (vs all), lm-eval 0.4.9 (vs 0.4.13)``."""
    return ", ".join(f"{name} {mine} (vs {ref})" for name, mine, ref in (differs or []))


def compute(inp) -> dict[str, pd.DataFrame]:
    """The ``settings`` table (when any run has settings), and the warning as the first note."""
    settings = settings_check(inp.runs, inp.metrics, inp.base)
    if not len(settings):
        return {}
    odd = settings[settings["differs"] != ""]
    if len(odd):
        inp.notes.insert(0, f"{FLAG} evaluation settings differ, so these numbers are not directly comparable: "
                         + "; ".join(f"{r.run}: {r.differs}" for r in odd.itertuples()))
    return {"settings": settings}


def blocks(result) -> list:
    flags = result.setting_flags
    if not flags:
        return []
    t = result.tables["settings"]
    rows = [[cell(f"{r.run} {FLAG}"), cell(r.differs), cell(r.reference)] for r in t.itertuples() if r.differs]
    return [Heading(2, f"{FLAG} Evaluation settings differ"),
            Para("These runs were scored with other evaluation settings than the run they are compared with "
                 "(limit, few-shot, batch size, PPL seqlen or windows, lm-eval version), so their differences "
                 "mix the model with the measurement. Rows marked " + FLAG + " below are these runs."),
            Table(["Run", "Differs", "Compared with"], rows, ["l", "l", "l"])]
