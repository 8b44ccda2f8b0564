"""``view=versus``: the baseline against each candidate, one row per (candidate, metric) with
the delta, its significance and whether it is better; per candidate its improvements and
regressions; the Markdown/HTML sections and the per-task change bars.

Without ``baseline=``, a compare of exactly two runs takes the first listed (else the older) as
the baseline (``prepare``), and the other views use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.directions import LOWER, Directions
from mlproject.compare.render import figures
from mlproject.compare.render.blocks import (
    FLAG, NA, Cell, Heading, Items, Para, Table, as_bool, cell, decimals, fmt, plural)
from mlproject.compare.tables.baseline import Baseline, baseline_values, resolve_baseline
from mlproject.compare.tables.deltas import combined_stderr, improved, significant
from mlproject.compare.tables.frames import lists_by, lookup, map_once, run_labels
from mlproject.compare.tables.scores import Scores, benchmark_of, mean_accuracy, stderr_key
from mlproject.compare.views import DeltaBars, View
from mlproject.errors import UserError

VERSUS_COLUMNS = ["candidate_id", "candidate", "baseline_id", "baseline", "task", "metric",
                  "key", "direction", "baseline_value", "candidate_value", "delta",
                  "delta_display", "unit", "rel_pct", "stderr", "significant", "improved"]
#: candidate sections shown in Markdown / HTML (all are in versus.csv)
MAX_VERSUS_SECTIONS = 20
#: candidates drawn side by side in the delta bars
MAX_PLOT_PANELS = 4


# ----------------------------------------------------------------------------- tables

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
            cand_vals = lookup(metrics, keys.reset_index(drop=True), cands)
            b_vals, b_se, b_ids = baseline_values(base, metrics, keys, d)
            c_se = lookup(metrics, map_once(keys, stderr_key).reset_index(drop=True), cands)
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
    df["metric"] = map_once(df["key"], dirs.leaf)
    df["candidate"] = df["candidate_id"].map(labels)
    df["baseline"] = (df["baseline_id"].map(labels) if base.mode != "best_of"
                      else base.label)
    df["direction"] = map_once(df["key"], d)
    df["delta"] = df["candidate_value"] - df["baseline_value"]
    frac = map_once(df["key"], dirs.is_fraction_metric).astype(bool)
    for col in ("baseline_value", "candidate_value"):
        frac &= (df[col].abs() <= 1) | df[col].isna()
    df["unit"] = np.where(frac, "pts", "")
    df["delta_display"] = np.where(frac, df["delta"] * 100.0, df["delta"])
    b = df["baseline_value"].where(df["baseline_value"] != 0)
    df["rel_pct"] = df["delta"] / b.abs() * 100.0
    df["stderr"] = combined_stderr(df["se_b"], df["se_c"])
    df["significant"] = significant(df["delta"], df["stderr"])
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
        lists = lists_by(sub, "candidate_id", "task").reindex(out.index)
        out[col] = [v if isinstance(v, list) else [] for v in lists]
    return out.rename_axis("candidate_id").reset_index()[cols]


def prepare(inp) -> None:
    """No ``baseline=``: two runs compare the first listed (else the older) with the other."""
    if inp.base is not None:
        return
    scope, runs = inp.scope, inp.runs
    if len(scope) == 2:
        first = next((r for r in inp.runset.order if r in scope), None)
        if first is None:
            first = runs.loc[scope].sort_values("start_time", na_position="first").index[0]
        inp.base = resolve_baseline(f"id:{first}", runs)
    elif inp.alone("versus"):
        raise UserError(f"view=versus needs baseline=… (or exactly two runs; got "
                        f"{len(scope)})")
    else:
        inp.notes.append("versus view skipped: give baseline=<run id | name:… | role:…> "
                         "(or compare exactly two runs)")


def compute(inp) -> dict[str, pd.DataFrame]:
    if inp.base is None:
        return {}
    vs = versus(inp.runs, inp.metrics, inp.scores, inp.base, inp.directions, inp.selected)
    return {"versus": vs, "versus_summary": versus_summary(vs)}


# ----------------------------------------------------------------------------- render

def blocks(result, max_rows: int) -> list:
    t = result.tables
    if "versus" not in t:
        return []
    vs, summ = t["versus"], t["versus_summary"]
    base = result.baseline
    out: list = [Heading(2, f"Versus baseline: {base.label}")]
    if vs.empty:
        return out + [Para("No candidate shares a metric with the baseline.")]
    cands = list(dict.fromkeys(vs["candidate_id"]))
    limit = min(MAX_VERSUS_SECTIONS, max_rows)
    for cid in cands[:limit]:
        g = vs[vs["candidate_id"] == cid]
        out.append(Heading(3, f"{g['candidate'].iloc[0]} vs {g['baseline'].iloc[0]}"))
        if cid in result.setting_flags:
            out.append(Para(f"{FLAG} Scored with other settings: {result.setting_flags[cid]}."))
        rows = []
        for _, r in g.iterrows():
            pts = r["unit"] == "pts"
            dec = 2 if pts else decimals(r["key"])
            val = (lambda v: fmt(v * 100, 2, suffix="%")) if pts else (lambda v: fmt(v, dec))
            marker = {True: "▲", False: "▼"}.get(as_bool(r["improved"]), "=" if r["delta"] == 0
                                                 else "")
            sig = as_bool(r["significant"])
            rows.append([
                cell(r["task"]), cell(r["metric"]), cell(val(r["baseline_value"])),
                cell(val(r["candidate_value"])),
                cell(fmt(r["delta_display"], dec, sign=True, suffix=" pts" if pts else "")),
                cell(fmt(r["rel_pct"], 1, sign=True, suffix="%")),
                Cell(marker, {True: "good", False: "bad"}.get(as_bool(r["improved"]))),
                cell({True: "yes", False: "no (n.s.)", None: NA}[sig]),
            ])
        out.append(Table(["Task", "Metric", "Baseline", "Candidate", "Δ", "Δ rel", "",
                          "Significant"], rows, ["l", "l", "r", "r", "r", "r", "l", "l"]))
        s = summ[summ["candidate_id"] == cid]
        if len(s):
            s = s.iloc[0]
            gt = g.set_index("task")
            unit = " pts" if s["unit"] == "pts" else ""

            def item(task, gt=gt, unit=unit):
                r = gt.loc[task]
                r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
                ns = "" if as_bool(r["significant"]) is not False else " (n.s.)"
                dec = 2 if r["unit"] == "pts" else decimals(r["key"])
                return f"{task}: {fmt(r['delta_display'], dec, sign=True)}{unit}{ns}"

            out.append(Items(f"Improvements ({plural(s['n_improved'], 'task')})",
                             [item(x) for x in s["improvements"]]))
            out.append(Items(f"Regressions ({plural(s['n_regressed'], 'task')})",
                             [item(x) for x in s["regressions"]]))
            out.append(Para(f"Average change over {plural(s['n_tasks'], 'task')}: "
                            f"**{fmt(s['avg_delta'], 2, sign=True)}{unit}** "
                            f"({s['n_significant']} of {s['n_tasks']} significant)."))
    if len(cands) > limit:
        out.append(Para(f"… {len(cands) - limit} more candidates in versus.csv"))
    return out


def method_notes(result) -> list[str]:
    t = result.tables
    if "versus" not in t or not len(t["versus"]):
        return []
    return ["Versus: Δ in percentage points for scores; (n.s.) = |Δ| < 2·√(se₁² + "
            "se₂²) from the logged `_stderr` values; significance N/A without them."]


# ----------------------------------------------------------------------------- plots

def _has_rows(result) -> bool:
    t = result.tables
    return "versus" in t and bool(len(t["versus"]))


def delta_bars(result):
    """Per task: candidate − baseline, one panel per candidate (the first few)."""
    vs = result.tables["versus"]
    tasks = vs[~vs["task"].isin(["mean", "ppl", "overall"]) & vs["delta"].notna()]
    if tasks.empty:
        tasks = vs[vs["delta"].notna()]
    if tasks.empty:
        return None
    cands = list(dict.fromkeys(tasks["candidate_id"]))[:MAX_PLOT_PANELS]
    n_tasks = tasks.groupby("candidate_id")["task"].nunique().max()
    fig = figures.figure(4.5 * len(cands), max(2.5, 0.35 * n_tasks + 1.2))
    axes = fig.subplots(1, len(cands), squeeze=False)[0]
    for ax, cid in zip(axes, cands, strict=True):
        g = tasks[tasks["candidate_id"] == cid].iloc[::-1]
        colors = [figures.GREEN if as_bool(i) else figures.RED if as_bool(i) is False else figures.GREY
                  for i in g["improved"]]
        alphas = [0.45 if as_bool(s) is False else 1.0 for s in g["significant"]]
        bars = ax.barh(g["task"], g["delta_display"], color=colors)
        for bar, a, s in zip(bars, alphas, g["significant"], strict=True):
            bar.set_alpha(a)
            if as_bool(s) is False:
                bar.set_hatch("//")
        ax.axvline(0, color=figures.AXIS, lw=0.8)
        unit = "pts" if (g["unit"] == "pts").all() else ""
        ax.set_xlabel(f"Δ {unit}".strip())
        ax.set_title(f"{g['candidate'].iloc[0]}\nvs {g['baseline'].iloc[0]}", fontsize=9)
    fig.suptitle("Per-task change vs baseline (hatched: not significant)", fontsize=10)
    return fig


VIEW = View("versus", compute=compute, blocks=blocks, method_notes=method_notes, prepare=prepare,
            delta_bars=DeltaBars(rank=0, applies=_has_rows, draw=delta_bars),
            uses_code_problems=True, notes_common_problems=True)
