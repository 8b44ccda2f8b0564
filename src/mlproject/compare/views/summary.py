"""``view=summary``: the compress-recover summary — one row per (family, role) run with PPL and
mean accuracy before → after and the change, then per task before → after; its Markdown/HTML
blocks and the per-task change bars (drawn when no versus view has a chart of its own).

Where "before" comes from: see ``mlproject.compare.tables``. With a baseline, each per-task row
also counts the run's flips against it on the paired per-document results (``tables.paired``:
correct → wrong, wrong → correct, the McNemar p-value), where both runs have them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.directions import HIGHER, LOWER
from mlproject.compare.render import figures
from mlproject.compare.render.blocks import (
    Heading, Para, Table, cell, flag, fmt, good, text_or_na, tone_cell)
from mlproject.compare.directions import Directions
from mlproject.compare.tables.baseline import Baseline, baseline_values
from mlproject.compare.tables.deltas import pct_change
from mlproject.compare.tables.frames import map_once, nonempty, run_labels
from mlproject.compare.tables.lineage import Lineage, families
from mlproject.compare.tables.paired import no_pairs, paired_tests
from mlproject.compare.tables.scores import Scores, mean_accuracy
from mlproject.compare.views import DeltaBars, View
from mlproject.compare.views.versus import flips_text

#: Roles the steps give by default (and "before"-like ones): a run with one of these that
#: supplies another run's "before" values is shown as that run's before, not as a row.
BEFORE_ROLES = ("", "before", "pre", "upstream", "eval", "evaluate", "pruned", "quantized",
                "compressed")


# ----------------------------------------------------------------------------- table

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
    role_set = nonempty(role) & ~role.astype(str).str.lower().isin(BEFORE_ROLES)
    feeds = pd.Series(runs.index.isin(list(lin.sources())), index=runs.index)
    rows = runs.index[in_scope & has_data & (role_set | ~feeds)]

    fam = families(runs)
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
            "task": t, "metric": map_once(scores.keys.loc[table.index, t], dirs.leaf),
            "family": table["family"], "role": table["role"], "run_id": table["run_id"],
            "run": table["run"], "before": before, "after": after, "change": after - before,
        }))
    per_task = (pd.concat(parts, ignore_index=True) if parts else
                pd.DataFrame(columns=["task", "metric", "family", "role", "run_id", "run",
                                      "before", "after", "change"]))
    per_task = per_task[per_task[["before", "after"]].notna().any(axis=1)]
    return table.reset_index(drop=True), per_task.reset_index(drop=True)


#: the per-task columns added against a baseline (``flips_vs_baseline``)
FLIP_COLUMNS = ["n_pairs", "correct_to_wrong", "wrong_to_correct", "flip_rate", "p_value", "test"]


def flips_vs_baseline(per_task: pd.DataFrame, metrics: pd.DataFrame, scores: Scores,
                      base: Baseline, d: Directions,
                      documents: pd.DataFrame | None) -> pd.DataFrame:
    """``per_task`` with ``FLIP_COLUMNS``: each (run, task) against the baseline's run for it on
    the task's headline metric; NA where either lacks per-document results, and on the
    baseline's own rows."""
    out = per_task.copy()
    if documents is None or not len(documents):
        paired = no_pairs(per_task.index)
        for col in FLIP_COLUMNS:
            out[col] = paired[col]
        return out
    keys = pd.Series(None, index=per_task.index, dtype=object)
    for task, idx in per_task.groupby("task", sort=False).groups.items():
        keys[idx] = scores.keys.loc[per_task.loc[idx, "run_id"], task].to_numpy(dtype=object)
    _, _, bids = baseline_values(base, metrics,
                                 pd.Series(keys.to_numpy(), index=per_task["run_id"].to_numpy()), d)
    pairs = pd.DataFrame({"candidate_id": per_task["run_id"], "baseline_id": bids, "key": keys},
                         index=per_task.index)
    paired = paired_tests(documents, pairs)
    for col in FLIP_COLUMNS:
        out[col] = paired[col]
    return out


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


def compute(inp) -> dict[str, pd.DataFrame]:
    summ, per_task = summary(inp.runs, inp.metrics, inp.scores, inp.lineage)
    if inp.base is not None:
        per_task = flips_vs_baseline(per_task, inp.metrics, inp.scores, inp.base, inp.directions,
                                     inp.runset.documents)
    before_cols = [c for c in summ.columns if "before" in c]
    has_before = summ[before_cols].notna().any().any() or per_task["before"].notna().any()
    if has_before or inp.alone("summary"):
        return {"summary": summ, "summary_tasks": per_task}
    inp.notes.append("summary view skipped: no run has a \"before\" evaluation (no "
                     "`before/` metrics, no upstream run with metrics); use view=summary "
                     "to show it anyway")
    return {}


# ----------------------------------------------------------------------------- render

def blocks(result, max_rows: int) -> list:
    t = result.tables
    if "summary" not in t:
        return []
    summ, per_task = t["summary"], t["summary_tasks"]
    out: list = [Heading(2, "Summary: before → after fine-tuning")]
    if summ.empty:
        return out + [Para("No runs with accuracy, perplexity or size metrics.")]
    ppl_ds = [c[len("ppl_after["):-1] for c in summ.columns if c.startswith("ppl_after[")]
    dup = summ.duplicated(["family", "role"], keep=False).any()
    fam = summ["family"].notna().any()
    cols = (["Family"] if fam else []) + ["Role"] + (["Run"] if dup else [])
    show_params = summ["params_b"].notna().any()
    if show_params:
        cols.append("Params (B)")
    for ds in ppl_ds:
        tag = f" ({ds})" if len(ppl_ds) > 1 or ds else ""
        cols += [f"PPL before{tag}", f"PPL after{tag}", f"PPL change %{tag}"]
    cols += ["Mean acc before", "Mean acc after", "Mean acc change %"]
    rows = []
    for _, r in summ.head(max_rows).iterrows():
        row = ([cell(text_or_na(r["family"]))] if fam else []) + \
            [cell(text_or_na(r["role"]) + flag(result, r["run_id"]))] + ([cell(r["run"])] if dup else [])
        if show_params:
            row.append(cell(fmt(r["params_b"], 2)))
        for ds in ppl_ds:
            row += [cell(fmt(r[f"ppl_before[{ds}]"], 2)), cell(fmt(r[f"ppl_after[{ds}]"], 2)),
                    tone_cell(fmt(r[f"ppl_change_pct[{ds}]"], 2, sign=True),
                              good(r[f"ppl_change_pct[{ds}]"], LOWER))]
        row += [cell(fmt(r["acc_before"], 4)), cell(fmt(r["acc_after"], 4)),
                tone_cell(fmt(r["acc_change_pct"], 2, sign=True),
                          good(r["acc_change_pct"], HIGHER))]
        rows.append(row)
    n_left = 1 + fam + dup
    out.append(Table(cols, rows, ["l"] * n_left + ["r"] * (len(cols) - n_left)))
    if len(summ) > max_rows:
        out.append(Para(f"… {len(summ) - max_rows} more rows in summary.csv"))
    if not per_task.empty:
        out.append(Heading(2, "Per task: before → after"))
        for task, g in per_task.groupby("task", sort=False):
            metric = g["metric"].dropna()
            metric = metric.mode().iloc[0] if len(metric) else ""
            out.append(Heading(3, f"{task} ({metric})" if metric else task))
            flips = "correct_to_wrong" in g and bool(g["correct_to_wrong"].notna().any())
            cols = (["Family"] if fam else []) + ["Role"] + (["Run"] if dup else []) + \
                ["Before", "After", "Change"] + \
                (["Flips vs baseline (c→w / w→c)"] if flips else [])
            rows = []
            for _, r in g.head(max_rows).iterrows():
                rows.append(([cell(text_or_na(r["family"]))] if fam else [])
                            + [cell(text_or_na(r["role"]) + flag(result, r["run_id"]))]
                            + ([cell(r["run"])] if dup else [])
                            + [cell(fmt(r["before"], 4)), cell(fmt(r["after"], 4)),
                               tone_cell(fmt(r["change"], 4, sign=True), good(r["change"], HIGHER))]
                            + ([cell(flips_text(r["correct_to_wrong"], r["wrong_to_correct"]))]
                               if flips else []))
            out.append(Table(cols, rows, ["l"] * n_left + ["r"] * (3 + flips)))
    return out


def method_notes(result) -> list[str]:
    t = result.tables
    if "summary" not in t or not len(t["summary"]):
        return []
    return ["Summary: \"before\" is the run's `before/<metric>` value, else its "
            "upstream run's (tag `mlproject.upstream_run`), else the evaluation of "
            "the same upstream model; change % = (after − before) / before × 100 "
            "from unrounded values; per-task change = after − before."
            + (f" Flips vs baseline ({result.baseline.label}): documents right for the "
               "baseline and wrong for the run (c→w) and the reverse (w→c), on the documents "
               "both scored (per-document results; summary_tasks.csv has the paired tests' "
               "p-values)."
               if "correct_to_wrong" in t["summary_tasks"]
               and t["summary_tasks"]["correct_to_wrong"].notna().any() else ""),
            "Mean acc is the logged `avg_acc` (each task counted once with the "
            "metric recorded in `mlproject.avg_acc_metrics`), else the mean of the "
            "task scores shown."]


# ----------------------------------------------------------------------------- plots

def _has_changes(result) -> bool:
    t = result.tables
    return "summary_tasks" in t and bool(t["summary_tasks"]["change"].notna().any())


def delta_bars(result):
    """Per task and run: after − before, in points."""
    per_task = result.tables["summary_tasks"]
    g = per_task[per_task["change"].notna()]
    # One bar series per run: "family role", with the run's name where several runs share it
    # (two fine-tunes of one model), as the Markdown table does.
    label = g["family"].astype(str) + " " + g["role"].astype(str)
    shared = g.groupby(label)["run_id"].transform("nunique") > 1
    label = label.where(~shared, label + " (" + g["run"].astype(str) + ")")
    shared = g.groupby(label)["run_id"].transform("nunique") > 1  # same run name too
    g = g.assign(label=label.where(~shared, label + " " + g["run_id"].astype(str).str[:8]))
    labels = list(dict.fromkeys(g["label"]))[:8]
    g = g[g["label"].isin(labels)]
    tasks = list(dict.fromkeys(g["task"]))
    fig = figures.figure(max(6.0, 0.9 * len(tasks) + 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(tasks))
    for i, lab in enumerate(labels):
        s = g[g["label"] == lab].set_index("task")["change"].reindex(tasks)
        ax.bar(x + i * width - 0.4 + width / 2, s.to_numpy(dtype=float) * 100, width, label=lab)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.axhline(0, color=figures.AXIS, lw=0.8)
    ax.set_ylabel("after − before (pts)")
    ax.set_title("Per-task change after fine-tuning")
    ax.legend(fontsize=7, ncols=2)
    return fig


# versus's chart (against a chosen baseline) outranks this one (against each run's own before)
VIEW = View("summary", compute=compute, blocks=blocks, method_notes=method_notes,
            delta_bars=DeltaBars(rank=1, applies=_has_changes, draw=delta_bars), uses_documents=True)
