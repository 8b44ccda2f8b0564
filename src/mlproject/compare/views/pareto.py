"""Trade-offs, shown by every compare (not a selectable view): mean accuracy against PPL,
against size and against the mean KL divergence from the reference model per run, with
Pareto-front flags — the table, its block and its scatter plots; also the front computation
the ranking's trade-off plots use."""

from __future__ import annotations

import math

import pandas as pd

from mlproject.compare.directions import HIGHER, LOWER
from mlproject.compare.render import figures
from mlproject.compare.render.blocks import Heading, Image, Items, fmt
from mlproject.compare.tables.frames import run_labels
from mlproject.compare.tables.scores import Scores, mean_accuracy

#: ``kl/<dataset>``: mean KL(reference ‖ model) per token (tracking.names.KL_PREFIX)
KL_PREFIX = "kl/"


def pareto_front(x: pd.Series, y: pd.Series, x_dir: str, y_dir: str) -> pd.Series:
    """Boolean mask of points no other point beats on both axes (NaN rows are False)."""
    ok = x.notna() & y.notna()
    xs = x[ok] * (1 if x_dir == HIGHER else -1)
    ys = y[ok] * (1 if y_dir == HIGHER else -1)
    order = pd.DataFrame({"x": xs, "y": ys}).sort_values(["x", "y"], ascending=False)
    best = -math.inf
    front = pd.Series(False, index=x.index)
    for idx, yy in zip(order.index, order["y"].to_numpy(), strict=True):
        if yy > best:
            front[idx] = True
            best = yy
    return front


def pareto_table(runs: pd.DataFrame, metrics: pd.DataFrame, scores: Scores) -> pd.DataFrame:
    """Accuracy vs PPL, vs size and vs mean KL per in-scope run, with Pareto-front flags.

    ``kl``: the mean over the run's ``kl/<dataset>`` metrics (KL(reference ‖ model) per token,
    logged by runs measured against a reference; the others have none and no point)."""
    scope = runs.index[runs["in_scope"].astype(bool)]
    acc = mean_accuracy(metrics, scores).reindex(scope)
    df = pd.DataFrame({"run_id": scope, "run": run_labels(runs).reindex(scope).to_numpy(),
                       "acc": acc.to_numpy()}, index=scope)
    ppl_keys = sorted(k for k in metrics.columns if k.startswith("ppl/"))
    if ppl_keys:
        df["ppl"] = metrics.loc[scope, ppl_keys[0]]
        df["ppl_key"] = ppl_keys[0]
        df["front_acc_ppl"] = pareto_front(df["ppl"], df["acc"], LOWER, HIGHER)
    if "params_b" in metrics:
        df["params_b"] = metrics.loc[scope, "params_b"]
        df["front_acc_size"] = pareto_front(df["params_b"], df["acc"], LOWER, HIGHER)
    kl_keys = sorted(k for k in metrics.columns if k.startswith(KL_PREFIX))
    if kl_keys:
        df["kl"] = metrics.loc[scope, kl_keys].mean(axis=1, skipna=True)
        df["kl_keys"] = ", ".join(kl_keys)
        df["front_acc_kl"] = pareto_front(df["kl"], df["acc"], LOWER, HIGHER)
    df = df[df["acc"].notna()]
    return df.reset_index(drop=True)


def compute(inp) -> dict[str, pd.DataFrame]:
    return {"pareto": pareto_table(inp.runs, inp.metrics, inp.scores)}


def blocks(result, images: list[str]) -> list:
    """The fronts as text, then every plot of the report (``images``: their file names)."""
    par = result.tables.get("pareto")
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
    if "front_acc_kl" in par and par["front_acc_kl"].any():
        f = par[par["front_acc_kl"]].sort_values("kl")
        items.append(f"accuracy vs mean KL from the reference ({par['kl_keys'].iloc[0]}): "
                     + ", ".join(f"{r.run} ({fmt(r.acc, 4)}, KL {fmt(r.kl, 4)})"
                                 for r in f.head(20).itertuples()))
    if items or images:
        out.append(Heading(2, "Trade-offs"))
    if items:
        out.append(Items("Pareto front (no run is better on both axes)", items))
    for name in images:
        out.append(Image(name, name.rsplit(".", 1)[0].replace("_", " ")))
    return out


def plots(result) -> dict[str, bytes]:
    """Accuracy vs PPL, vs size and vs mean KL, the front marked."""
    out: dict[str, bytes] = {}
    par = result.tables.get("pareto")
    if par is not None and len(par):
        if "ppl" in par and par["ppl"].notna().any():
            out["acc_vs_ppl.png"] = figures.png(figures.scatter(
                par, "ppl", "acc", "front_acc_ppl", f"PPL ({par['ppl_key'].iloc[0]}) ↓",
                "mean accuracy ↑", "Accuracy vs perplexity"))
        if "params_b" in par and par["params_b"].notna().any():
            out["acc_vs_size.png"] = figures.png(figures.scatter(
                par, "params_b", "acc", "front_acc_size", "parameters (B) ↓",
                "mean accuracy ↑", "Accuracy vs size"))
        if "kl" in par and par["kl"].notna().any():
            out["kl_vs_acc.png"] = figures.png(figures.scatter(
                par, "kl", "acc", "front_acc_kl", f"mean KL(reference ‖ model) per token "
                f"({par['kl_keys'].iloc[0]}) ↓", "mean accuracy ↑",
                "Accuracy vs KL divergence from the reference"))
    return out
