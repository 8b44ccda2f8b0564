"""Markdown, HTML and PNG from a CompareResult's tables.

Markdown is plain GitHub-flavoured tables (it renders on GitHub and in MLflow's artifact
viewer, and reads fine in a terminal): medals 🥇🥈🥉, worst value 🔻, better / worse than
the baseline 🟢 / 🔴, direction ▲ / ▼. HTML carries the same blocks with colours
(#1ABD76 green, #E33D30 red, as in the hand-made tables) and the plots embedded, so the single
file works as an MLflow artifact. Plots use matplotlib's object API on an Agg canvas (no
pyplot state, no display needed).

Precision: scores (acc, pass@1, avg_acc …) 4 decimals; PPL, times, sizes, percentages 2;
versus shows scores as percentages (2 decimals), deltas in points, relative change 1 decimal.
Missing values print as N/A.
"""

from __future__ import annotations

import base64
import html as _html
import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.directions import HIGHER, LOWER
from mlproject.compare.tables import COMMON_TIME_METRICS

NA = "N/A"
GREEN, RED = "#1ABD76", "#E33D30"
TONE_MD = {"gold": ("🥇", ""), "silver": ("🥈", ""), "bronze": ("🥉", ""),
           "worst": ("", " 🔻"), "good": ("🟢 ", ""), "bad": ("🔴 ", "")}
ARROW = {HIGHER: "↑", LOWER: "↓", None: ""}
MAX_VERSUS_SECTIONS = 20
MAX_PLOT_PANELS = 4


# ----------------------------------------------------------------------------- numbers

def decimals(key: str, values=None) -> int:
    """Display precision for a metric key (see module docstring)."""
    lf = dirs.leaf(key).lower()
    if dirs.is_time_like(key) and values is not None:
        # seconds of generated code are often micro- to milliseconds: 3 significant digits
        v = pd.Series(values, dtype="float64").abs()
        small = v[(v > 0) & (v < 10)].min()
        if pd.notna(small):
            return int(min(8, max(2, 2 - math.floor(math.log10(small)))))
    if key.startswith(dirs.LOWER_FAMILIES) or lf in ("params_b",) or dirs.is_time_like(key):
        return 2
    if dirs.is_fraction_metric(key) or dirs.is_score(lf):
        return 4
    if values is not None:
        v = pd.Series(values, dtype="float64").abs().max()
        if pd.notna(v) and v >= 10:
            return 2
    return 4


def fmt(v, dec: int = 4, sign: bool = False, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return NA
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return NA
    if math.isinf(f):
        return ("+" if f > 0 and sign else "-" if f < 0 else "") + "inf"
    text = f"{f:+.{dec}f}" if sign else f"{f:.{dec}f}"
    if text.lstrip("+-").strip("0.") == "":  # -0.00 → 0.00
        text = ("+" if sign else "") + f"{0:.{dec}f}"
    return text + suffix


# ----------------------------------------------------------------------------- blocks

@dataclass
class Cell:
    text: str
    tone: str | None = None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    align: list[str] = field(default_factory=list)  # "l" | "r"


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Items:
    title: str
    items: list[str]


@dataclass
class Image:
    name: str
    caption: str


def _c(text, tone=None) -> Cell:
    return Cell(str(text), tone)


def blocks(result, max_rows: int | None = None, images: list[str] | None = None) -> list:
    spec = result.spec
    max_rows = max_rows or spec.max_rows
    out: list = [Heading(1, spec.title or _title(result))]
    out.append(Para(_scope_line(result)))
    out += _settings_blocks(result)
    t = result.tables
    if "summary" in t:
        out += _summary_blocks(result, t["summary"], t["summary_tasks"], max_rows)
    if "versus" in t:
        out += _versus_blocks(result, t["versus"], t["versus_summary"], max_rows)
    if "ranking" in t:
        out += _ranking_blocks(result, t["ranking"], t.get("ranking_delta"),
                               t.get("ranking_lists"), max_rows)
    out += _pareto_blocks(result, t.get("pareto"), images or [])
    notes = _method_notes(result) + [n for n in result.notes if not n.startswith(FLAG)]
    if notes:
        out += [Heading(2, "Notes"), Items("", notes)]
    return out


FLAG = "⚠"


def _flag(result, run_id) -> str:
    """`` ⚠`` after a run whose evaluation settings differ from its reference (see the block)."""
    return f" {FLAG}" if run_id in result.setting_flags else ""


def _settings_blocks(result) -> list:
    flags = result.setting_flags
    if not flags:
        return []
    t = result.tables["settings"]
    rows = [[_c(f"{r.run} {FLAG}"), _c(r.differs), _c(r.reference)] for r in t.itertuples() if r.differs]
    return [Heading(2, f"{FLAG} Evaluation settings differ"),
            Para("These runs were scored with other evaluation settings than the run they are compared with "
                 "(limit, few-shot, batch size, PPL seqlen or windows, lm-eval version), so their differences "
                 "mix the model with the measurement. Rows marked " + FLAG + " below are these runs."),
            Table(["Run", "Differs", "Compared with"], rows, ["l", "l", "l"])]


def _title(result) -> str:
    spec = result.spec
    if spec.experiments:
        return "Compare: " + ", ".join(spec.experiments)
    n = int(result.runset.runs["in_scope"].astype(bool).sum())
    return f"Compare: {n} runs"


def _scope_line(result) -> str:
    spec, runs = result.spec, result.runset.runs
    scope = runs[runs["in_scope"].astype(bool)]
    n = len(scope)
    unfinished = scope["status"].astype("object").fillna("FINISHED")
    unfinished = unfinished[unfinished != "FINISHED"].value_counts()
    bits = [f"{n} runs" + (" (" + ", ".join(f"{c} {st}" for st, c in sorted(unfinished.items())) + ")"
                           if len(unfinished) else "")]
    if spec.experiments:
        bits.append("experiment " + ", ".join(f"`{e}`" for e in spec.experiments))
    if spec.filter:
        bits.append(f"filter `{spec.filter}`")
    if spec.runs:
        bits.append("runs " + ", ".join(f"`{r[:8]}`" for r in spec.runs))
    if result.baseline is not None:
        bits.append(f"baseline **{result.baseline.label}**")
    return " · ".join(bits)


def _method_notes(result) -> list[str]:
    notes = []
    t = result.tables
    if "summary" in t and len(t["summary"]):
        notes.append("Summary: \"before\" is the run's `before/<metric>` value, else its "
                     "upstream run's (tag `mlproject.upstream_run`), else the evaluation of "
                     "the same upstream model; change % = (after − before) / before × 100 "
                     "from unrounded values; per-task change = after − before.")
        notes.append("Mean acc is the logged `avg_acc` (each task counted once with the "
                     "metric recorded in `mlproject.avg_acc_metrics`), else the mean of the "
                     "task scores shown.")
    if "versus" in t and len(t["versus"]):
        notes.append("Versus: Δ in percentage points for scores; (n.s.) = |Δ| < 2·√(se₁² + "
                     "se₂²) from the logged `_stderr` values; significance N/A without them.")
    if "ranking" in t and len(t["ranking"]):
        notes.append("Ranking: 🥇🥈🥉 best three per column, 🔻 worst (when more than three "
                     "runs); ↑ higher is better, ↓ lower is better; speedup = baseline / run "
                     "for time-like metrics.")
    return notes


# --- summary

def _summary_blocks(result, summ: pd.DataFrame, per_task: pd.DataFrame, max_rows: int):
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
        row = ([_c(_s(r["family"]))] if fam else []) + [_c(_s(r["role"]) + _flag(result, r["run_id"]))] + \
            ([_c(r["run"])] if dup else [])
        if show_params:
            row.append(_c(fmt(r["params_b"], 2)))
        for ds in ppl_ds:
            row += [_c(fmt(r[f"ppl_before[{ds}]"], 2)), _c(fmt(r[f"ppl_after[{ds}]"], 2)),
                    _tone_cell(fmt(r[f"ppl_change_pct[{ds}]"], 2, sign=True),
                               _good(r[f"ppl_change_pct[{ds}]"], LOWER))]
        row += [_c(fmt(r["acc_before"], 4)), _c(fmt(r["acc_after"], 4)),
                _tone_cell(fmt(r["acc_change_pct"], 2, sign=True),
                           _good(r["acc_change_pct"], HIGHER))]
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
            cols = (["Family"] if fam else []) + ["Role"] + (["Run"] if dup else []) + \
                ["Before", "After", "Change"]
            rows = []
            for _, r in g.head(max_rows).iterrows():
                rows.append(([_c(_s(r["family"]))] if fam else []) + [_c(_s(r["role"]) + _flag(result, r["run_id"]))]
                            + ([_c(r["run"])] if dup else [])
                            + [_c(fmt(r["before"], 4)), _c(fmt(r["after"], 4)),
                               _tone_cell(fmt(r["change"], 4, sign=True),
                                          _good(r["change"], HIGHER))])
            out.append(Table(cols, rows, ["l"] * n_left + ["r"] * 3))
    return out


def _s(v) -> str:
    return NA if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _good(delta, direction) -> bool | None:
    if delta is None or pd.isna(delta) or delta == 0:
        return None
    return bool(delta > 0) if direction == HIGHER else bool(delta < 0)


def _tone_cell(text: str, good: bool | None) -> Cell:
    # Tone only for the HTML colours; Markdown keeps before/after deltas unadorned.
    return Cell(text, None if good is None else ("up" if good else "down"))


# --- versus

def _versus_blocks(result, vs: pd.DataFrame, summ: pd.DataFrame, max_rows: int):
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
            marker = {True: "▲", False: "▼"}.get(_bool(r["improved"]), "=" if r["delta"] == 0
                                                  else "")
            sig = _bool(r["significant"])
            rows.append([
                _c(r["task"]), _c(r["metric"]), _c(val(r["baseline_value"])),
                _c(val(r["candidate_value"])),
                _c(fmt(r["delta_display"], dec, sign=True, suffix=" pts" if pts else "")),
                _c(fmt(r["rel_pct"], 1, sign=True, suffix="%")),
                Cell(marker, {True: "good", False: "bad"}.get(_bool(r["improved"]))),
                _c({True: "yes", False: "no (n.s.)", None: NA}[sig]),
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
                ns = "" if _bool(r["significant"]) is not False else " (n.s.)"
                dec = 2 if r["unit"] == "pts" else decimals(r["key"])
                return f"{task}: {fmt(r['delta_display'], dec, sign=True)}{unit}{ns}"

            out.append(Items(f"Improvements ({_n(s['n_improved'], 'task')})",
                             [item(x) for x in s["improvements"]]))
            out.append(Items(f"Regressions ({_n(s['n_regressed'], 'task')})",
                             [item(x) for x in s["regressions"]]))
            out.append(Para(f"Average change over {_n(s['n_tasks'], 'task')}: "
                            f"**{fmt(s['avg_delta'], 2, sign=True)}{unit}** "
                            f"({s['n_significant']} of {s['n_tasks']} significant)."))
    if len(cands) > limit:
        out.append(Para(f"… {len(cands) - limit} more candidates in versus.csv"))
    return out


def _n(n, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _bool(v) -> bool | None:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return bool(v)


# --- ranking

def _ranking_blocks(result, rk: pd.DataFrame, delta, lists, max_rows: int):
    d = result.directions
    out: list = [Heading(2, "Ranking")]
    if rk.empty:
        return out + [Para("No comparable metrics.")]
    base = result.baseline
    for bench, g in rk.groupby("benchmark", sort=False):
        keys = list(dict.fromkeys(g["key"]))
        out.append(Heading(3, bench))
        dec = {k: decimals(k, v) for k, v in g.groupby("key", sort=False)["value"]}
        cells = {(r, k): (v, m, w) for r, k, v, m, w in zip(
            g["run_id"], g["key"], g["value"], g["medal"], g["worst"], strict=True)}
        run_order = list(dict.fromkeys(g["run_id"]))
        n_runs = len(run_order)
        if n_runs > max_rows:
            best = g.groupby("run_id")["rank"].min().sort_values(kind="stable")
            run_order = list(best.index[:max_rows])
        names = dict(zip(g["run_id"], g["run"], strict=True))
        rows = []
        for rid in run_order:
            row = [_c(names[rid] + _flag(result, rid))]
            for k in keys:
                hit = cells.get((rid, k))
                if hit is None or pd.isna(hit[0]):
                    row.append(_c(NA))
                    continue
                v, medal, worst = hit
                row.append(Cell(fmt(v, dec[k]), medal or ("worst" if worst else None)))
            rows.append(row)
        cs = result.common.get(bench)
        on_common = cs is not None and cs.applied

        def head(k, cs=cs, on_common=on_common):
            text = f"{dirs.leaf(k)} {ARROW[d(k)]}".strip()
            if on_common and dirs.leaf(k) in COMMON_TIME_METRICS:
                text += f" (on {len(cs.problems)} common)"
            return text

        cols = ["Run"] + [head(k) for k in keys]
        out.append(Table(cols, rows, ["l"] + ["r"] * len(keys)))
        if on_common and any(dirs.leaf(k) in COMMON_TIME_METRICS for k in keys):
            out.append(Para(
                f"Run times ({', '.join(COMMON_TIME_METRICS)}) compare the {len(cs.problems)} "
                f"problems that all {len(cs.runs)} runs solved (of {cs.total} seen), so a run "
                "that solves only easy problems cannot look fast; the other columns count "
                "every problem."))
        if n_runs > len(run_order):
            out.append(Para(f"… {n_runs - len(run_order)} more runs in ranking.csv "
                            "(shown: best ranks)"))
        if delta is not None and base is not None:
            out += _delta_blocks(result, bench, keys, delta[delta["benchmark"] == bench],
                                 lists, max_rows, dec)
    if lists is not None and len(lists):
        overall = lists[lists["benchmark"] == "*"]
        if len(overall):
            out.append(Heading(3, "Across benchmarks"))
            out.append(Items(overall["category"].iloc[0].capitalize(),
                             [name + _flag(result, rid) for name, rid in zip(overall["run"], overall["run_id"],
                                                                             strict=True)]))
    return out


def _delta_blocks(result, bench, keys, dg: pd.DataFrame, lists, max_rows: int, dec: dict):
    base = result.baseline
    out: list = [Heading(3, f"{bench} vs baseline: {base.label}")]
    if dg.empty:
        return out + [Para("The baseline has no value on this benchmark.")]
    if base.mode in ("run", "best_of"):
        bv = dg.drop_duplicates("key").set_index("key")["baseline_value"]
        out.append(Para("Baseline values: " + ", ".join(
            f"{dirs.leaf(k)} {fmt(bv[k], dec.get(k, 4))}" for k in keys if k in bv)))
    timed = {k for k in keys if dirs.is_time_like(k)}
    per_family = base.mode == "family"
    cols = ["Run"] + (["Baseline"] if per_family else [])
    for k in keys:
        cols.append(f"{dirs.leaf(k)} Δ")
        if k in timed:
            cols.append(f"{dirs.leaf(k)} speedup")
    cells = {(r, k): (d, sp, imp) for r, k, d, sp, imp in zip(
        dg["run_id"], dg["key"], dg["delta"], dg["speedup"], dg["improved"], strict=True)}
    all_runs = list(dict.fromkeys(dg["run_id"]))
    run_order = all_runs[:max_rows]
    names = dict(zip(dg["run_id"], dg["run"], strict=True))
    bnames = dict(zip(dg["run_id"], dg["baseline"], strict=True))
    rows = []
    for rid in run_order:
        row = [_c(names[rid] + _flag(result, rid))] + ([_c(_s(bnames[rid]))] if per_family else [])
        for k in keys:
            hit = cells.get((rid, k))
            if hit is None:
                row += [_c(NA)] * (2 if k in timed else 1)
                continue
            delta, sp, imp = hit
            row.append(Cell(fmt(delta, dec.get(k, 4), sign=True),
                            {True: "good", False: "bad"}.get(_bool(imp))))
            if k in timed:
                txt = fmt(sp, 2, suffix="x")
                tone = None
                if pd.notna(sp) and txt != "1.00x":
                    tone = "good" if sp > 1 else "bad"
                row.append(Cell(txt, tone))
        rows.append(row)
    n_left = 1 + per_family
    out.append(Table(cols, rows, ["l"] * n_left + ["r"] * (len(cols) - n_left)))
    if len(all_runs) > len(run_order):
        out.append(Para(f"… {len(all_runs) - len(run_order)} more runs in ranking_delta.csv"))
    if lists is not None and len(lists):
        lg = lists[lists["benchmark"] == bench]
        for cat in _category_order(lg["category"].unique()):
            sel = lg[lg["category"] == cat]
            runs = [name + _flag(result, rid) for name, rid in zip(sel["run"], sel["run_id"], strict=True)]
            more = f" — first {max_rows}" if len(runs) > max_rows else ""
            out.append(Items(f"{cat[0].upper()}{cat[1:]} ({len(runs)}){more}", runs[:max_rows]))
    return out


def _category_order(cats) -> list[str]:
    from mlproject.compare.tables import ALL_BETTER, ALL_WORSE

    first = [c for c in (ALL_BETTER, "faster but less accurate", "more accurate but slower")
             if c in cats]
    last = [c for c in ("equal to baseline", ALL_WORSE) if c in cats]
    return first + sorted(c for c in cats if c not in first and c not in last) + last


# --- pareto

def _pareto_blocks(result, par, images: list[str]):
    out: list = []
    if par is None or par.empty:
        return out
    items = []
    if "front_acc_ppl" in par and par["front_acc_ppl"].any():
        f = par[par["front_acc_ppl"]].sort_values("ppl")
        items.append(f"accuracy vs PPL ({par['ppl_key'].iloc[0]}): " + ", ".join(
            f"{r.run} ({fmt(r.acc, 4)}, {fmt(r.ppl, 2)})" for r in f.head(20).itertuples()))
    if "front_acc_size" in par and par["front_acc_size"].any():
        f = par[par["front_acc_size"]].sort_values("params_b")
        items.append("accuracy vs size: " + ", ".join(
            f"{r.run} ({fmt(r.acc, 4)}, {fmt(r.params_b, 2)} B)" for r in f.head(20).itertuples()))
    if items or images:
        out.append(Heading(2, "Trade-offs"))
    if items:
        out.append(Items("Pareto front (no run is better on both axes)", items))
    for name in images:
        out.append(Image(name, name.rsplit(".", 1)[0].replace("_", " ")))
    return out


# ----------------------------------------------------------------------------- markdown

def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: Cell) -> str:
    pre, post = TONE_MD.get(cell.tone or "", ("", ""))
    if cell.text == NA:
        pre, post = "", ""
    return _md_escape(f"{pre}{cell.text}{post}")


def markdown(result, max_rows: int | None = None, images: list[str] | None = None) -> str:
    lines: list[str] = []
    for b in blocks(result, max_rows=max_rows, images=images):
        if isinstance(b, Heading):
            lines += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Items):
            if b.title:
                lines.append(f"**{b.title}**" + ("" if b.items else ": none"))
            lines += [f"- {x}".replace("\n", " ") for x in b.items]
            lines.append("")
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.columns)
            lines.append("| " + " | ".join(_md_escape(c) for c in b.columns) + " |")
            lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
            for row in b.rows:
                lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            lines.append("")
        elif isinstance(b, Image):
            lines += [f"![{b.caption}]({b.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- html

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #d0d7de;padding:4px 8px;font-size:13px}
th{background:#f6f8fa}
td.r{text-align:right;font-variant-numeric:tabular-nums}
.good,.up{color:#1ABD76}.bad,.down,.worst{color:#E33D30}.worst{font-weight:bold}
.gold::before{content:"🥇"}.silver::before{content:"🥈"}.bronze::before{content:"🥉"}
img{max-width:900px;display:block;margin:8px 0}
"""


def html(result, images: dict[str, bytes] | None = None) -> str:
    images = images or {}
    esc = _html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>{esc(result.spec.title or _title(result))}</title>",
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks(result, images=list(images)):
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Items):
            if b.title:
                parts.append(f"<p><b>{esc(b.title)}</b>{'' if b.items else ': none'}</p>")
            if b.items:
                parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b.items)
                             + "</ul>")
        elif isinstance(b, Table):
            align = b.align or ["l"] * len(b.columns)
            head = "".join(f"<th>{esc(c)}</th>" for c in b.columns)
            body = []
            for row in b.rows:
                tds = []
                for cell, a in zip(row, align, strict=False):
                    cls = " ".join(x for x in ("r" if a == "r" else "", cell.tone or "") if x)
                    tds.append(f"<td class='{cls}'>{esc(cell.text)}</td>" if cls
                               else f"<td>{esc(cell.text)}</td>")
                body.append("<tr>" + "".join(tds) + "</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
                         "</tbody></table>")
        elif isinstance(b, Image) and b.name in images:
            data = base64.b64encode(images[b.name]).decode("ascii")
            parts.append(f"<figure><img alt='{esc(b.caption)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>{esc(b.caption)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown we use in paragraphs: **bold** and `code`."""
    t = _html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


# ----------------------------------------------------------------------------- plots

def plots(result) -> dict[str, bytes]:
    """PNG bytes by file name: delta bars, accuracy vs PPL / size (Pareto front marked),
    and one trade-off scatter per ranked benchmark with exactly two directed metrics."""
    out: dict[str, bytes] = {}
    t = result.tables
    fig = None
    if "versus" in t and len(t["versus"]):
        fig = _versus_bars(t["versus"])
    elif "summary_tasks" in t and t["summary_tasks"]["change"].notna().any():
        fig = _summary_bars(t["summary_tasks"])
    if fig is not None:
        out["delta_bars.png"] = _png(fig)
    par = t.get("pareto")
    if par is not None and len(par):
        if "ppl" in par and par["ppl"].notna().any():
            out["acc_vs_ppl.png"] = _png(_scatter(
                par, "ppl", "acc", "front_acc_ppl", f"PPL ({par['ppl_key'].iloc[0]}) ↓",
                "mean accuracy ↑", "Accuracy vs perplexity"))
        if "params_b" in par and par["params_b"].notna().any():
            out["acc_vs_size.png"] = _png(_scatter(
                par, "params_b", "acc", "front_acc_size", "parameters (B) ↓",
                "mean accuracy ↑", "Accuracy vs size"))
    rk = t.get("ranking")
    if rk is not None and len(rk):
        from mlproject.compare.tables import pareto_front

        n = 0
        for bench, g in rk.groupby("benchmark", sort=False):
            keys = [k for k in dict.fromkeys(g["key"]) if result.directions(k)]
            if len(keys) != 2 or n >= 8:
                continue
            w = g.pivot(index="run_id", columns="key", values="value")
            names = g.drop_duplicates("run_id").set_index("run_id")["run"]
            kx, ky = sorted(keys, key=lambda k: not dirs.is_time_like(k))
            dx, dy = result.directions(kx), result.directions(ky)
            w = w.dropna()
            if len(w) < 2:
                continue
            df = pd.DataFrame({"x": w[kx], "y": w[ky], "run": names.reindex(w.index)})
            df["front"] = pareto_front(df["x"], df["y"], dx, dy)
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", bench)
            out[f"tradeoff_{safe}.png"] = _png(_scatter(
                df, "x", "y", "front", f"{dirs.leaf(kx)} {ARROW[dx]}",
                f"{dirs.leaf(ky)} {ARROW[dy]}", f"{bench}: {dirs.leaf(ky)} vs {dirs.leaf(kx)}"))
            n += 1
    return out


def _figure(w=8.0, h=4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _versus_bars(vs: pd.DataFrame):
    tasks = vs[~vs["task"].isin(["mean", "ppl", "overall"]) & vs["delta"].notna()]
    if tasks.empty:
        tasks = vs[vs["delta"].notna()]
    if tasks.empty:
        return None
    cands = list(dict.fromkeys(tasks["candidate_id"]))[:MAX_PLOT_PANELS]
    n_tasks = tasks.groupby("candidate_id")["task"].nunique().max()
    fig = _figure(4.5 * len(cands), max(2.5, 0.35 * n_tasks + 1.2))
    axes = fig.subplots(1, len(cands), squeeze=False)[0]
    for ax, cid in zip(axes, cands, strict=True):
        g = tasks[tasks["candidate_id"] == cid].iloc[::-1]
        colors = [GREEN if _bool(i) else RED if _bool(i) is False else "#8c959f"
                  for i in g["improved"]]
        alphas = [0.45 if _bool(s) is False else 1.0 for s in g["significant"]]
        bars = ax.barh(g["task"], g["delta_display"], color=colors)
        for bar, a, s in zip(bars, alphas, g["significant"], strict=True):
            bar.set_alpha(a)
            if _bool(s) is False:
                bar.set_hatch("//")
        ax.axvline(0, color="#57606a", lw=0.8)
        unit = "pts" if (g["unit"] == "pts").all() else ""
        ax.set_xlabel(f"Δ {unit}".strip())
        ax.set_title(f"{g['candidate'].iloc[0]}\nvs {g['baseline'].iloc[0]}", fontsize=9)
    fig.suptitle("Per-task change vs baseline (hatched: not significant)", fontsize=10)
    return fig


def _summary_bars(per_task: pd.DataFrame):
    g = per_task[per_task["change"].notna()]
    labels = list(dict.fromkeys(g["family"].astype(str) + " " + g["role"].astype(str)))[:8]
    g = g.assign(label=g["family"].astype(str) + " " + g["role"].astype(str))
    g = g[g["label"].isin(labels)]
    tasks = list(dict.fromkeys(g["task"]))
    fig = _figure(max(6.0, 0.9 * len(tasks) + 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(tasks))
    for i, lab in enumerate(labels):
        s = g[g["label"] == lab].set_index("task")["change"].reindex(tasks)
        ax.bar(x + i * width - 0.4 + width / 2, s.to_numpy(dtype=float) * 100, width, label=lab)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.axhline(0, color="#57606a", lw=0.8)
    ax.set_ylabel("after − before (pts)")
    ax.set_title("Per-task change after fine-tuning")
    ax.legend(fontsize=7, ncols=2)
    return fig


def _scatter(df, x, y, front, xlabel, ylabel, title):
    fig = _figure(7, 5)
    ax = fig.subplots()
    d = df[df[x].notna() & df[y].notna()]
    on = d[d[front].astype(bool)] if front in d else d.iloc[0:0]
    off = d.drop(on.index)
    ax.scatter(off[x], off[y], s=14, color="#8c959f", alpha=0.6, label="dominated")
    ax.scatter(on[x], on[y], s=30, color=GREEN, zorder=3, label="Pareto front")
    on_sorted = on.sort_values(x)
    ax.plot(on_sorted[x], on_sorted[y], color=GREEN, lw=1, zorder=2)
    label_rows = on if len(d) > 15 else d
    for _, r in label_rows.head(25).iterrows():
        ax.annotate(str(r["run"]), (r[x], r[y]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
