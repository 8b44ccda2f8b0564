"""The compare report: its blocks in order — title, scope line, the evaluation-settings warning,
each selected view, the trade-offs (with every plot), the notes — written as Markdown or as
one HTML page, and its PNG plots. What each part shows is its module's business
(``mlproject.compare.views``); how blocks print is ``mlproject.compare.render``'s."""

from __future__ import annotations

from mlproject.compare import views
from mlproject.compare.render import figures
from mlproject.compare.render.blocks import FLAG, Heading, Items, Para
from mlproject.compare.render.html import to_html
from mlproject.compare.render.markdown import to_markdown
from mlproject.compare.views import pareto, settings


def blocks(result, max_rows: int | None = None, images: list[str] | None = None) -> list:
    spec = result.spec
    max_rows = max_rows or spec.max_rows
    chosen = views.selected(spec)
    out: list = [Heading(1, spec.title or title(result))]
    out.append(Para(_scope_line(result)))
    out += settings.blocks(result)
    for view in chosen:
        out += view.blocks(result, max_rows)
    out += pareto.blocks(result, images or [])
    notes = [n for view in chosen for n in view.method_notes(result)]
    # the settings warning has its own block at the top
    notes += [n for n in result.notes if not n.startswith(FLAG)]
    if notes:
        out += [Heading(2, "Notes"), Items("", notes)]
    return out


def title(result) -> str:
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


def markdown(result, max_rows: int | None = None, images: list[str] | None = None) -> str:
    return to_markdown(blocks(result, max_rows=max_rows, images=images))


def html(result, images: dict[str, bytes] | None = None) -> str:
    images = images or {}
    return to_html(blocks(result, images=list(images)), result.spec.title or title(result), images)


def plots(result) -> dict[str, bytes]:
    """PNG bytes by file name: the per-task change bars (one view draws them), accuracy vs PPL
    / size (Pareto front marked), then each view's own plots."""
    out: dict[str, bytes] = {}
    chosen = views.selected(result.spec)
    for bars in sorted((v.delta_bars for v in chosen if v.delta_bars), key=lambda b: b.rank):
        if bars.applies(result):
            fig = bars.draw(result)
            if fig is not None:
                out["delta_bars.png"] = figures.png(fig)
            break
    out.update(pareto.plots(result))
    for view in chosen:
        out.update(view.plots(result))
    return out
