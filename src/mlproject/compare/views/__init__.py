"""The compare views, one module each, behind a registry.

``VIEWS`` maps a view name to the ``"module:object"`` of its :class:`View`, imported on first
use (as lm-eval's registry does): reading the names — what ``CompareSpec`` checks ``view=``
against — imports nothing heavy. The registry's order is the display order, and ``view=all``
is all of them. A view module holds its tables (pure pandas), its render blocks and its plots
and ends with ``VIEW = View(...)``; adding a view is such a module plus one line in ``VIEWS``
(``core`` computes and ``document`` renders whatever is registered).

Two parts of every compare are not views (nobody picks them) but have the same shape:
``settings`` (the evaluation-settings warning at the top) and ``pareto`` (the trade-offs at
the end).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlproject.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from mlproject.compare.directions import Directions
    from mlproject.compare.query import RunSet
    from mlproject.compare.tables.baseline import Baseline
    from mlproject.compare.tables.lineage import Lineage
    from mlproject.compare.tables.scores import Scores

#: view name → "module:object" of its View, in display order
VIEWS: dict[str, str] = {
    "summary": "mlproject.compare.views.summary:VIEW",
    "versus": "mlproject.compare.views.versus:VIEW",
    "ranking": "mlproject.compare.views.ranking:VIEW",
}


@dataclass
class Inputs:
    """What the views compute from; ``core.compute`` builds it once per compare."""

    spec: Any  # the CompareSpec
    runset: RunSet
    runs: pd.DataFrame
    #: the runs' metrics, code tasks' times already recomputed on their common problems
    metrics: pd.DataFrame
    scores: Scores
    lineage: Lineage
    directions: Directions
    #: the keys ``metrics=`` selected; None: each view's defaults
    selected: list[str] | None
    #: the resolved ``baseline=``; a view's ``prepare`` may supply one
    base: Baseline | None
    #: notes for the report, in order; views append theirs
    notes: list[str]

    @property
    def scope(self) -> pd.Index:
        """The runs compared (lineage runs fetched only as "before" sources are not)."""
        return self.runs.index[self.runs["in_scope"].astype(bool)]

    def alone(self, view: str) -> bool:
        """Whether ``view`` is the only view asked for (it then shows even when it is thin)."""
        return tuple(self.spec.view) == (view,)


def _no_notes(result) -> list[str]:
    return []


def _no_plots(result) -> dict[str, bytes]:
    return {}


@dataclass(frozen=True)
class DeltaBars:
    """The per-task change chart (``delta_bars.png``), which more than one view can draw: the
    view with the lowest ``rank`` whose ``applies(result)`` is true draws it (``draw`` returns a
    matplotlib Figure, or None when there is nothing to plot after all)."""

    rank: int
    applies: Callable[[Any], bool]
    draw: Callable[[Any], Any]


@dataclass(frozen=True)
class View:
    """One compare view. ``result`` below is the ``CompareResult`` being rendered."""

    name: str
    #: (Inputs) → {table name: DataFrame}, or {} when it has nothing to show (a note says why)
    compute: Callable[[Inputs], dict]
    #: (result, max_rows) → render blocks; [] when its tables are absent
    blocks: Callable[[Any, int], list]
    #: (result) → how its numbers were made, for the report's Notes
    method_notes: Callable[[Any], list[str]] = _no_notes
    #: (result) → {PNG file name: bytes}
    plots: Callable[[Any], dict[str, bytes]] = _no_plots
    #: (Inputs) → None, run for every selected view before any computes (versus picks the
    #: implicit baseline of a two-run compare, which the other views then use too)
    prepare: Callable[[Inputs], None] | None = None
    delta_bars: DeltaBars | None = None
    #: its tables show code tasks' times: fetch the per-problem results they are recomputed on
    uses_code_problems: bool = False
    #: it shows those times without saying they are on the common problems, so a note must
    notes_common_problems: bool = False
    #: it pairs runs on their per-document results against the baseline (flips, paired
    #: tests): with a baseline, fetch them (``RunSet.documents``)
    uses_documents: bool = False


def unknown_view(name: str) -> UserError:
    return UserError(f"unknown view {name!r}: choose from {', '.join(VIEWS)}, all")


def get(name: str) -> View:
    """The registered view ``name`` (its module imported now); UserError listing what exists."""
    target = VIEWS.get(name)
    if target is None:
        raise unknown_view(name)
    module, _, obj = target.partition(":")
    return getattr(importlib.import_module(module), obj)


def selected(spec) -> list[View]:
    """The views a CompareSpec asks for, in display order."""
    return [get(name) for name in spec.view]
