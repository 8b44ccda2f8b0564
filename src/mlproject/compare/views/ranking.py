"""``view=ranking``: medals per benchmark and metric (🥇🥈🥉 for the best three, 🔻 the worst);
with a baseline, each run's deltas and speedups against it and its category ("better than
baseline on every metric", "faster but less accurate" …) and, where both runs have
per-document results, its flips against it (``tables.paired``); the Markdown/HTML sections and
one trade-off scatter per benchmark with exactly two directed metrics."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.directions import HIGHER, LOWER, Directions
from mlproject.compare.render import figures
from mlproject.compare.render.blocks import (
    ARROW, NA, Cell, Heading, Items, Para, Table, as_bool, cell, decimals, flag, fmt, text_or_na)
from mlproject.compare.tables.baseline import Baseline, baseline_values
from mlproject.compare.tables.code_common import COMMON_TIME_METRICS
from mlproject.compare.tables.deltas import improved
from mlproject.compare.tables.frames import join_by, map_once, run_labels
from mlproject.compare.tables.paired import paired_tests
from mlproject.compare.tables.scores import Scores, benchmark_of
from mlproject.compare.views import View
from mlproject.compare.views.pareto import pareto_front
from mlproject.compare.views.versus import flips_text

MEDALS = {1: "gold", 2: "silver", 3: "bronze"}
RANKING_COLUMNS = ["benchmark", "metric", "key", "direction", "run_id", "run", "value",
                   "rank", "medal", "worst"]
#: flips against the baseline on paired documents (``tables.paired``), NA without them
FLIP_COLUMNS = ["n_pairs", "correct_to_wrong", "wrong_to_correct", "flip_rate", "p_value", "test"]
DELTA_COLUMNS = ["benchmark", "metric", "key", "direction", "run_id", "run", "baseline_id",
                 "baseline", "baseline_value", "value", "delta", "rel_pct", "speedup",
                 "improved", *FLIP_COLUMNS]
LIST_COLUMNS = ["benchmark", "category", "run_id", "run", "better", "worse"]
ALL_BETTER = "better than baseline on every metric"
ALL_WORSE = "worse than baseline on every metric"
#: trade-off scatters drawn at most
MAX_TRADEOFF_PLOTS = 8


# ----------------------------------------------------------------------------- tables

def default_ranking_metrics(columns: Sequence[str], scores: Scores, d: Directions) -> list[str]:
    """Per task its (most used) headline score; per other group every metric whose direction
    is known; top-level ``avg_acc``; every ``ppl/*``."""
    keys: list[str] = []
    task_set = set(scores.tasks)
    for t in scores.tasks:
        k = scores.mode_key(t)
        if k:
            keys.append(k)
    for k in columns:
        g = dirs.group(k)
        if dirs.is_stderr(k) or dirs.is_reserved(k) or k in keys:
            continue
        if g in task_set and dirs.is_score(dirs.leaf(k)):
            continue  # another score of a task already ranked by its headline
        if k.startswith("nll/"):
            continue
        if not g and k != "avg_acc":
            continue  # params_b, memory, seconds: context, not a contest
        if dirs.is_score(dirs.leaf(k)) and g not in task_set:
            keys.append(k)
        elif d(k) is not None:
            keys.append(k)
    return keys


def ranking(runs: pd.DataFrame, metrics: pd.DataFrame, keys: Sequence[str],
            d: Directions) -> pd.DataFrame:
    """Per (benchmark, metric): value per run, rank by direction, medals for the best three,
    ``worst`` for the last when more than three runs compete (no medal/worst if the
    direction is unknown). Ties share the better rank."""
    scope = runs.index[runs["in_scope"].astype(bool)]
    labels = run_labels(runs)
    keys = [k for k in keys if k in metrics]
    if not keys or not len(scope):
        return pd.DataFrame(columns=RANKING_COLUMNS)
    m = metrics.loc[scope, keys]
    long = (m.rename_axis(index="run_id").reset_index()
            .melt(id_vars="run_id", var_name="key", value_name="value").dropna(subset=["value"]))
    long["benchmark"] = map_once(long["key"], benchmark_of)
    long["metric"] = map_once(long["key"], dirs.leaf)
    long["direction"] = map_once(long["key"], d)
    long["run"] = long["run_id"].map(labels)
    sign = np.select([long["direction"] == HIGHER, long["direction"] == LOWER], [1.0, -1.0],
                     np.nan)
    long["_signed"] = long["value"] * sign
    grp = long.groupby("key", sort=False)["_signed"]
    long["rank"] = grp.rank(method="min", ascending=False)
    n = grp.transform("count")
    worst_val = grp.transform("min")
    long["medal"] = long["rank"].map(MEDALS).fillna("")
    long["worst"] = (long["_signed"] == worst_val) & (n > 3)
    order = {k: i for i, k in enumerate(keys)}
    run_order = {r: i for i, r in enumerate(scope)}
    long["_k"] = long["key"].map(order)
    long["_r"] = long["run_id"].map(run_order)
    bench_order = {b: i for i, b in enumerate(dict.fromkeys(benchmark_of(k) for k in keys))}
    long["_b"] = long["benchmark"].map(bench_order)
    long = long.sort_values(["_b", "_k", "_r"])
    return long[RANKING_COLUMNS].reset_index(drop=True)


def ranking_delta(rank: pd.DataFrame, runs: pd.DataFrame, metrics: pd.DataFrame,
                  base: Baseline, d: Directions,
                  documents: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each run against the baseline: delta, relative %, speedup (time-like metrics), and its
    flips on the paired per-document results (``documents``) where both runs have them."""
    if rank.empty:
        return pd.DataFrame(columns=DELTA_COLUMNS)
    df = rank[~rank["run_id"].isin(base.run_ids)].copy()
    keys = pd.Series(df["key"].to_numpy(), index=df["run_id"].to_numpy())
    vals, _, bids = baseline_values(base, metrics, keys, d)
    labels = run_labels(runs)
    df["baseline_value"] = vals
    df["baseline_id"] = bids
    df["baseline"] = (pd.Series(bids, index=df.index).map(labels) if base.mode != "best_of"
                      else base.label)
    df["delta"] = df["value"] - df["baseline_value"]
    b = df["baseline_value"].where(df["baseline_value"] != 0)
    df["rel_pct"] = df["delta"] / b.abs() * 100.0
    time_like = map_once(df["key"], dirs.is_time_like).astype(bool)
    v = df["value"].where(df["value"] != 0)
    df["speedup"] = np.where(time_like, df["baseline_value"] / v, np.nan)
    df["improved"] = improved(df["delta"], df["direction"])
    df = df[df["baseline_value"].notna()]
    paired = paired_tests(documents, df.rename(columns={"run_id": "candidate_id"}))
    for col in FLIP_COLUMNS:
        df[col] = paired[col]
    return df[DELTA_COLUMNS].reset_index(drop=True)


def ranking_lists(delta: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark, each run's category against the baseline; plus benchmark ``*`` for
    runs better on every metric of every benchmark (when there are several)."""
    if delta.empty:
        return pd.DataFrame(columns=LIST_COLUMNS)
    df = delta[delta["direction"].notna()]
    if df.empty:
        return pd.DataFrame(columns=LIST_COLUMNS)
    better = df["improved"].fillna(False).astype(bool).to_numpy()
    worse = (df["improved"] == False).fillna(False).astype(bool).to_numpy()  # noqa: E712
    timed = map_once(df["key"], dirs.is_time_like).astype(bool).to_numpy()
    score = map_once(df["metric"], dirs.is_score).astype(bool).to_numpy()
    df = df.assign(_b=better, _w=worse, _bt=better & timed, _wt=worse & timed,
                   _bs=better & score, _ws=worse & score)
    g = df.groupby(["benchmark", "run_id"], sort=False)
    a = pd.DataFrame({"run": g["run"].first(), "n": g.size(),
                      **{c: g[c].sum() for c in ("_b", "_w", "_bt", "_wt", "_bs", "_ws")}})
    # the metrics better / worse per (benchmark, run), in row order, by group number (the
    # groups of ``a``, in order of first appearance as ``ngroup`` numbers them)
    group = g.ngroup().fillna(-1).to_numpy(dtype="int64")
    metric = df["metric"].to_numpy(dtype=object)
    for col, mask in (("better", better), ("worse", worse)):
        mask = mask & (group >= 0)
        a[col] = join_by(group[mask], len(a), metric[mask])
    mixed = (a["_b"] > 0) & (a["_w"] > 0)
    faster = mixed & (a["_bt"] == a["_b"]) & (a["_wt"] == 0)
    slower = mixed & (a["_wt"] == a["_w"]) & (a["_bt"] == 0)
    a["category"] = np.select(
        [(a["_b"] == a["n"]), (a["_w"] == a["n"]), (a["_b"] == 0) & (a["_w"] == 0),
         faster & (a["_ws"] == a["_w"]), faster,
         slower & (a["_bs"] == a["_b"]), slower, mixed, a["_b"] > 0],
        [ALL_BETTER, ALL_WORSE, "equal to baseline",
         "faster but less accurate", "faster but worse on " + a["worse"],
         "more accurate but slower", "better on " + a["better"] + " but slower",
         "better on " + a["better"] + "; worse on " + a["worse"],
         "better on " + a["better"] + ", equal on the rest"],
        "worse on " + a["worse"] + ", equal on the rest")
    out = a.reset_index()[LIST_COLUMNS]
    n_bench = out["benchmark"].nunique()
    if n_bench > 1:
        per = out.assign(_ok=out["category"] == ALL_BETTER).groupby("run_id", sort=False)
        allb = per["_ok"].all() & (per.size() == n_bench)
        runs_ok = allb[allb].index
        if len(runs_ok):
            first = out.drop_duplicates("run_id").set_index("run_id").loc[runs_ok, "run"]
            out = pd.concat([out, pd.DataFrame({
                "benchmark": "*", "category": ALL_BETTER + " of every benchmark",
                "run_id": runs_ok, "run": first.to_numpy(), "better": "", "worse": ""})],
                ignore_index=True)
    return out


def compute(inp) -> dict[str, pd.DataFrame]:
    d = inp.directions
    keys = inp.selected or default_ranking_metrics(inp.metrics.columns, inp.scores, d)
    rk = ranking(inp.runs, inp.metrics, keys, d)
    out = {"ranking": rk}
    unknown = sorted({k for k in keys if d(k) is None})
    if unknown:
        inp.notes.append("direction unknown (no medals): " + ", ".join(unknown)
                         + " — pass directions=<metric>=min|max")
    if inp.base is not None:
        delta = ranking_delta(rk, inp.runs, inp.metrics, inp.base, d, inp.runset.documents)
        out["ranking_delta"] = delta
        out["ranking_lists"] = ranking_lists(delta)
    return out


# ----------------------------------------------------------------------------- render

def blocks(result, max_rows: int) -> list:
    t = result.tables
    if "ranking" not in t:
        return []
    rk, delta, lists = t["ranking"], t.get("ranking_delta"), t.get("ranking_lists")
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
            row = [cell(names[rid] + flag(result, rid))]
            for k in keys:
                hit = cells.get((rid, k))
                if hit is None or pd.isna(hit[0]):
                    row.append(cell(NA))
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
        # KL and top-1 agreement are measured against a reference (the base, usually): the
        # baseline has none of its own, so no "vs baseline" section for them
        reference_only = all(str(k).startswith(dirs.REFERENCE_FAMILIES) for k in keys)
        if delta is not None and base is not None and not reference_only:
            out += _delta_blocks(result, bench, keys, delta[delta["benchmark"] == bench],
                                 lists, max_rows, dec)
    if lists is not None and len(lists):
        overall = lists[lists["benchmark"] == "*"]
        if len(overall):
            out.append(Heading(3, "Across benchmarks"))
            out.append(Items(overall["category"].iloc[0].capitalize(),
                             [name + flag(result, rid) for name, rid in zip(overall["run"], overall["run_id"],
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
    flipped = set(dg.loc[dg["correct_to_wrong"].notna(), "key"])
    per_family = base.mode == "family"
    cols = ["Run"] + (["Baseline"] if per_family else [])
    for k in keys:
        cols.append(f"{dirs.leaf(k)} Δ")
        if k in timed:
            cols.append(f"{dirs.leaf(k)} speedup")
        if k in flipped:
            cols.append(f"{dirs.leaf(k)} flips (c→w / w→c)")
    n_extra = {k: (k in timed) + (k in flipped) for k in keys}
    cells = {(r, k): (d, sp, imp, cw, wc) for r, k, d, sp, imp, cw, wc in zip(
        dg["run_id"], dg["key"], dg["delta"], dg["speedup"], dg["improved"],
        dg["correct_to_wrong"], dg["wrong_to_correct"], strict=True)}
    all_runs = list(dict.fromkeys(dg["run_id"]))
    run_order = all_runs[:max_rows]
    names = dict(zip(dg["run_id"], dg["run"], strict=True))
    bnames = dict(zip(dg["run_id"], dg["baseline"], strict=True))
    rows = []
    for rid in run_order:
        row = [cell(names[rid] + flag(result, rid))] + ([cell(text_or_na(bnames[rid]))] if per_family else [])
        for k in keys:
            hit = cells.get((rid, k))
            if hit is None:
                row += [cell(NA)] * (1 + n_extra[k])
                continue
            delta, sp, imp, cw, wc = hit
            row.append(Cell(fmt(delta, dec.get(k, 4), sign=True),
                            {True: "good", False: "bad"}.get(as_bool(imp))))
            if k in timed:
                txt = fmt(sp, 2, suffix="x")
                tone = None
                if pd.notna(sp) and txt != "1.00x":
                    tone = "good" if sp > 1 else "bad"
                row.append(Cell(txt, tone))
            if k in flipped:
                row.append(cell(flips_text(cw, wc)))
        rows.append(row)
    n_left = 1 + per_family
    out.append(Table(cols, rows, ["l"] * n_left + ["r"] * (len(cols) - n_left)))
    if len(all_runs) > len(run_order):
        out.append(Para(f"… {len(all_runs) - len(run_order)} more runs in ranking_delta.csv"))
    if lists is not None and len(lists):
        lg = lists[lists["benchmark"] == bench]
        for cat in _category_order(lg["category"].unique()):
            sel = lg[lg["category"] == cat]
            runs = [name + flag(result, rid) for name, rid in zip(sel["run"], sel["run_id"], strict=True)]
            more = f" — first {max_rows}" if len(runs) > max_rows else ""
            out.append(Items(f"{cat[0].upper()}{cat[1:]} ({len(runs)}){more}", runs[:max_rows]))
    return out


def _category_order(cats) -> list[str]:
    first = [c for c in (ALL_BETTER, "faster but less accurate", "more accurate but slower")
             if c in cats]
    last = [c for c in ("equal to baseline", ALL_WORSE) if c in cats]
    return first + sorted(c for c in cats if c not in first and c not in last) + last


def method_notes(result) -> list[str]:
    t = result.tables
    if "ranking" not in t or not len(t["ranking"]):
        return []
    delta = t.get("ranking_delta")
    flips = delta is not None and bool(delta["correct_to_wrong"].notna().any())
    return ["Ranking: 🥇🥈🥉 best three per column, 🔻 worst (when more than three "
            "runs); ↑ higher is better, ↓ lower is better; speedup = baseline / run "
            "for time-like metrics."
            + (" Flips: documents right for the baseline and wrong for the run (c→w) and the "
               "reverse (w→c), on the documents both scored (per-document results; "
               "ranking_delta.csv has the paired tests' p-values)." if flips else "")]


# ----------------------------------------------------------------------------- plots

def plots(result) -> dict[str, bytes]:
    """One trade-off scatter per benchmark with exactly two directed metrics (front marked)."""
    out: dict[str, bytes] = {}
    rk = result.tables.get("ranking")
    if rk is None or not len(rk):
        return out
    n = 0
    for bench, g in rk.groupby("benchmark", sort=False):
        keys = [k for k in dict.fromkeys(g["key"]) if result.directions(k)]
        if len(keys) != 2 or n >= MAX_TRADEOFF_PLOTS:
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
        out[f"tradeoff_{safe}.png"] = figures.png(figures.scatter(
            df, "x", "y", "front", f"{dirs.leaf(kx)} {ARROW[dx]}",
            f"{dirs.leaf(ky)} {ARROW[dy]}", f"{bench}: {dirs.leaf(ky)} vs {dirs.leaf(kx)}"))
        n += 1
    return out


VIEW = View("ranking", compute=compute, blocks=blocks, method_notes=method_notes, plots=plots,
            uses_code_problems=True, uses_documents=True)
