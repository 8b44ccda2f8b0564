"""Evaluation settings check, shown by every compare (not a selectable view): which runs were
scored with other settings (limit, few-shot, batch size, PPL seqlen / windows, lm-eval version)
than the run they are compared with — their table, the warning block at the top of the report,
and the note."""

from __future__ import annotations

import math

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
    runs whose numbers cannot be compared with the others' show up here. One row per run."""
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
