"""``view=versus``: the baseline against each candidate, one row per (candidate, metric) with
the delta, its significance and whether it is better; per candidate its improvements and
regressions; the Markdown/HTML sections, the per-task change bars and the flips chart.

Significance: where both runs have per-document results for a task (``RunSet.documents``), the
paired test on those documents (``tables.paired``: exact McNemar for 0/1 scores, with the
correct → wrong and wrong → correct counts; a paired t-test otherwise); elsewhere the
independent-samples rule on the logged standard errors. The ``test`` column says which.
KL rows (``kl/``, ``kl_median/``, ``kl_p99/``, ``top1_agree/``: measured by the candidate
against its reference) are shown as PPL rows are, with Δ N/A when the baseline has none.

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
from mlproject.compare.tables.deltas import combined_stderr, improved, significance
from mlproject.compare.tables.frames import lists_by, lookup, map_once, run_labels
from mlproject.compare.tables.paired import ALPHA, MCNEMAR, PAIRED_COLUMNS, PAIRED_T, paired_tests
from mlproject.compare.tables.scores import Scores, benchmark_of, mean_accuracy, stderr_key
from mlproject.compare.views import DeltaBars, View
from mlproject.errors import UserError

VERSUS_COLUMNS = ["candidate_id", "candidate", "baseline_id", "baseline", "task", "metric",
                  "key", "direction", "baseline_value", "candidate_value", "delta",
                  "delta_display", "unit", "rel_pct", "stderr", "significant", "improved",
                  *PAIRED_COLUMNS]
#: rows that are not task scores: the mean accuracy, PPL, top-level metrics, the KL families
NOT_TASKS = ("mean", "ppl", "overall", *(f.rstrip("/") for f in dirs.REFERENCE_FAMILIES))
#: how the significance cell names each paired test
TEST_LABELS = {MCNEMAR: "McNemar", PAIRED_T: "paired t"}
#: candidate sections shown in Markdown / HTML (all are in versus.csv)
MAX_VERSUS_SECTIONS = 20
#: candidates drawn side by side in the delta bars
MAX_PLOT_PANELS = 4


# ----------------------------------------------------------------------------- tables

def versus(runs: pd.DataFrame, metrics: pd.DataFrame, scores: Scores, base: Baseline,
           d: Directions, selected: Sequence[str] | None = None,
           documents: pd.DataFrame | None = None) -> pd.DataFrame:
    """Baseline vs each candidate, one row per (candidate, metric); task rows tested on the
    paired ``documents`` (``RunSet.documents``) where both runs have them."""
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
        for fam in dirs.REFERENCE_FAMILIES:  # the candidate's own, against its reference
            extra += sorted(k for k in metrics.columns if k.startswith(fam))
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
    df = df.reset_index(drop=True)
    tasks = ~df["task"].isin(NOT_TASKS)
    paired = paired_tests(documents, df.loc[tasks, ["candidate_id", "baseline_id", "key"]])
    df = df.join(paired.reindex(df.index))
    df["n_pairs"] = df["n_pairs"].fillna(0).astype("int64")
    df["significant"], df["test"] = significance(df["delta"], df["stderr"], df["p_value"],
                                                 df["test"])
    df["improved"] = improved(df["delta"], df["direction"])
    return df[VERSUS_COLUMNS]


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
    """Per candidate: improvements / regressions (task scores only, sorted by gain), the
    average change (in the candidate's display unit, sign = better) and the flips summed over
    its tasks with paired 0/1 results (``n_pairs`` documents; NA without any)."""
    cols = ["candidate_id", "candidate", "baseline", "n_tasks", "n_improved", "n_regressed",
            "n_significant", "avg_delta", "unit", "improvements", "regressions",
            "n_pairs", "correct_to_wrong", "wrong_to_correct"]
    if vs.empty:
        return pd.DataFrame(columns=cols)
    tasks = vs[~vs["task"].isin(NOT_TASKS) & vs["delta"].notna()]
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
    binary = tasks["correct_to_wrong"].notna()
    flips = tasks[binary].groupby("candidate_id", sort=False)
    out["n_pairs"] = flips["n_pairs"].sum().reindex(out.index).astype("Int64")
    for col in ("correct_to_wrong", "wrong_to_correct"):
        out[col] = flips[col].sum().reindex(out.index).astype("Int64")
    # only the columns the lists need are sorted (sorting all of ``tasks`` copies every column)
    few = tasks[["candidate_id", "task", "_gain", "_imp", "_reg"]]
    ups = few[few["_imp"]].sort_values("_gain", ascending=False, kind="stable")
    downs = few[few["_reg"]].sort_values("_gain", kind="stable")
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
    vs = versus(inp.runs, inp.metrics, inp.scores, inp.base, inp.directions, inp.selected,
                documents=inp.runset.documents)
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
    show_flips = bool(vs["correct_to_wrong"].notna().any())
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
            rows.append([
                cell(r["task"]), cell(r["metric"]), cell(val(r["baseline_value"])),
                cell(val(r["candidate_value"])),
                cell(fmt(r["delta_display"], dec, sign=True, suffix=" pts" if pts else "")),
                cell(fmt(r["rel_pct"], 1, sign=True, suffix="%")),
                Cell(marker, {True: "good", False: "bad"}.get(as_bool(r["improved"]))),
                *([cell(flips_text(r["correct_to_wrong"], r["wrong_to_correct"]))]
                  if show_flips else []),
                cell(significance_text(r["significant"], r["test"], r["p_value"])),
            ])
        out.append(Table(["Task", "Metric", "Baseline", "Candidate", "Δ", "Δ rel", "",
                          *(["Flips (c→w / w→c)"] if show_flips else []), "Significant"],
                         rows, ["l", "l", "r", "r", "r", "r", "l", *(["r"] if show_flips else []),
                                "l"]))
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
            if pd.notna(s["correct_to_wrong"]) and s["n_pairs"]:
                c2w, w2c, n = (int(s[k]) for k in ("correct_to_wrong", "wrong_to_correct", "n_pairs"))
                out.append(Para(f"Flips over {plural(n, 'paired document')}: {c2w} correct → "
                                f"wrong, {w2c} wrong → correct ({fmt((c2w + w2c) / n * 100, 1)}% "
                                "of the answers changed)."))
    if len(cands) > limit:
        out.append(Para(f"… {len(cands) - limit} more candidates in versus.csv"))
    return out


def flips_text(correct_to_wrong, wrong_to_correct) -> str:
    """``12 / 5`` (correct → wrong / wrong → correct), N/A without paired 0/1 results."""
    if pd.isna(correct_to_wrong) or pd.isna(wrong_to_correct):
        return NA
    return f"{int(correct_to_wrong)} / {int(wrong_to_correct)}"


def p_text(p) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def significance_text(significant, test, p_value) -> str:
    """``yes (McNemar p=0.003)`` / ``no (paired t p=0.412)`` for a paired test; ``yes`` /
    ``no (n.s.)`` for the standard-error rule; N/A when neither could decide."""
    sig = as_bool(significant)
    if sig is None:
        return NA
    label = TEST_LABELS.get(test) if isinstance(test, str) else None
    if label is None or pd.isna(p_value):
        return "yes" if sig else "no (n.s.)"
    return f"{'yes' if sig else 'no'} ({label} {p_text(p_value)})"


def method_notes(result) -> list[str]:
    t = result.tables
    if "versus" not in t or not len(t["versus"]):
        return []
    used = set(t["versus"]["test"].dropna())
    stderr_rule = ("(n.s.) = |Δ| < 2·√(se₁² + se₂²) from the logged `_stderr` values, which "
                   "treats the two runs as independent samples; significance N/A without them.")
    if not used & {MCNEMAR, PAIRED_T}:
        return ["Versus: Δ in percentage points for scores; " + stderr_rule]
    return [
        "Versus: Δ in percentage points for scores. Significance, where both runs have "
        "per-document results for a task (artifact `eval/documents.parquet`): the runs are "
        "paired on the documents both scored (same lm-eval `doc_id` and document hash); for 0/1 "
        "scores the exact two-sided McNemar test on the discordant documents (c→w: right for "
        "the baseline, wrong for the candidate; w→c: the reverse; p = 2·P(X ≤ min(c→w, w→c)) "
        "for X ~ Binomial(c→w + w→c, ½), at most 1), for other scores a paired t-test on the "
        f"per-document differences; significant when p < {ALPHA:g}.",
        "Versus significance elsewhere (test `stderr` in versus.csv: runs or tasks without "
        "per-document results on both sides, the mean accuracy, PPL): " + stderr_rule
        + " For two runs scored on the same documents this usually understates significance, "
        "and it cannot see answers that changed in both directions.",
    ]


# ----------------------------------------------------------------------------- plots

def _has_rows(result) -> bool:
    t = result.tables
    return "versus" in t and bool(len(t["versus"]))


def _candidate_panels(rows: pd.DataFrame, extra_height: float):
    """One panel per candidate (the first ``MAX_PLOT_PANELS``), side by side, tall enough for the
    most tasks any has: (figure, [(axes, that candidate's rows, first task at the top)])."""
    cands = list(dict.fromkeys(rows["candidate_id"]))[:MAX_PLOT_PANELS]
    n_tasks = rows.groupby("candidate_id")["task"].nunique().max()
    fig = figures.figure(4.5 * len(cands), max(2.5, 0.35 * n_tasks + extra_height))
    axes = fig.subplots(1, len(cands), squeeze=False)[0]
    return fig, [(ax, rows[rows["candidate_id"] == cid].iloc[::-1]) for ax, cid in zip(axes, cands, strict=True)]


def delta_bars(result):
    """Per task: candidate − baseline, one panel per candidate (the first few)."""
    vs = result.tables["versus"]
    tasks = vs[~vs["task"].isin(NOT_TASKS) & vs["delta"].notna()]
    if tasks.empty:
        tasks = vs[vs["delta"].notna()]
    if tasks.empty:
        return None
    fig, panels = _candidate_panels(tasks, extra_height=1.2)
    for ax, g in panels:
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


def flips_chart(result):
    """Per task and candidate (the first few): documents correct → wrong (left, red) and
    wrong → correct (right, green) against the baseline; None without paired 0/1 results."""
    from matplotlib.ticker import FuncFormatter

    vs = result.tables.get("versus")
    if vs is None or not len(vs):
        return None
    rows = vs[~vs["task"].isin(NOT_TASKS) & vs["correct_to_wrong"].notna()]
    if rows.empty:
        return None
    fig, panels = _candidate_panels(rows, extra_height=1.4)
    for ax, g in panels:
        lost = g["correct_to_wrong"].to_numpy(dtype="float64")
        won = g["wrong_to_correct"].to_numpy(dtype="float64")
        ax.barh(g["task"], -lost, color=figures.RED, label="correct → wrong")
        ax.barh(g["task"], won, color=figures.GREEN, label="wrong → correct")
        for y, (a, b) in enumerate(zip(lost, won, strict=True)):
            ax.annotate(f"{a:.0f}", (-a, y), xytext=(-3, 0), textcoords="offset points",
                        ha="right", va="center", fontsize=7)
            ax.annotate(f"{b:.0f}", (b, y), xytext=(3, 0), textcoords="offset points",
                        ha="left", va="center", fontsize=7)
        span = max(1.0, float(np.nanmax(np.concatenate([lost, won]))))
        ax.set_xlim(-span * 1.3, span * 1.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{abs(v):g}"))
        ax.axvline(0, color=figures.AXIS, lw=0.8)
        ax.set_xlabel("documents")
        ax.set_title(f"{g['candidate'].iloc[0]}\nvs {g['baseline'].iloc[0]}", fontsize=9)
    handles, labels = panels[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle("Flips per task vs baseline (paired documents)", fontsize=10)
    return fig


def plots(result) -> dict[str, bytes]:
    fig = flips_chart(result)
    return {} if fig is None else {"flips.png": figures.png(fig)}


VIEW = View("versus", compute=compute, blocks=blocks, method_notes=method_notes, plots=plots,
            prepare=prepare, delta_bars=DeltaBars(rank=0, applies=_has_rows, draw=delta_bars),
            uses_code_problems=True, notes_common_problems=True, uses_documents=True)
