"""matplotlib helpers for the compare plots: a figure on an Agg canvas (no pyplot state, no
display), its PNG bytes, the colours, and the labelled Pareto scatter several plots share.
matplotlib is imported on first use."""

from __future__ import annotations

import io

GREEN, RED, GREY = "#1ABD76", "#E33D30", "#8c959f"
AXIS = "#57606a"


def figure(w=8.0, h=4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def scatter(df, x, y, front, xlabel, ylabel, title):
    """Points of ``df`` (columns ``x``, ``y``, ``run``), the ``front`` ones green and joined."""
    fig = figure(7, 5)
    ax = fig.subplots()
    d = df[df[x].notna() & df[y].notna()]
    on = d[d[front].astype(bool)] if front in d else d.iloc[0:0]
    off = d.drop(on.index)
    ax.scatter(off[x], off[y], s=14, color=GREY, alpha=0.6, label="dominated")
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
