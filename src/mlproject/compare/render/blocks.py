"""The block model a compare report is made of (headings, paragraphs, item lists, tables of
toned cells, images), the cell helpers the views share, and how numbers print."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.directions import HIGHER, LOWER

NA = "N/A"
ARROW = {HIGHER: "↑", LOWER: "↓", None: ""}
#: Marks a run whose evaluation settings differ from its reference (and the note saying so).
FLAG = "⚠"


# ----------------------------------------------------------------------------- numbers

def decimals(key: str, values=None) -> int:
    """Display precision for a metric key (see ``mlproject.compare.render``)."""
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


# ----------------------------------------------------------------------------- cell helpers

def cell(text, tone=None) -> Cell:
    return Cell(str(text), tone)


def text_or_na(v) -> str:
    return NA if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def good(delta, direction) -> bool | None:
    if delta is None or pd.isna(delta) or delta == 0:
        return None
    return bool(delta > 0) if direction == HIGHER else bool(delta < 0)


def tone_cell(text: str, is_good: bool | None) -> Cell:
    # Tone only for the HTML colours; Markdown keeps before/after deltas unadorned.
    return Cell(text, None if is_good is None else ("up" if is_good else "down"))


def plural(n, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def as_bool(v) -> bool | None:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return bool(v)


def flag(result, run_id) -> str:
    """`` ⚠`` after a run whose evaluation settings differ from its reference (see the block)."""
    return f" {FLAG}" if run_id in result.setting_flags else ""
