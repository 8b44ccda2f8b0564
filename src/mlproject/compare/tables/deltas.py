"""How a difference is judged: better or worse by the metric's direction, significant against
the standard errors, and the percent change."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlproject.compare.directions import HIGHER, LOWER


def improved(delta: pd.Series, direction: pd.Series) -> pd.Series:
    """True / False per row by direction; NA for ties, unknown direction or missing data."""
    out = pd.Series(pd.NA, index=delta.index, dtype="boolean")
    up = (direction == HIGHER) & delta.notna() & (delta != 0)
    down = (direction == LOWER) & delta.notna() & (delta != 0)
    out[up] = (delta > 0)[up]
    out[down] = (delta < 0)[down]
    return out


def combined_stderr(se_a: pd.Series, se_b: pd.Series) -> pd.Series:
    """Standard error of a difference of two independent estimates: sqrt(se_a² + se_b²)."""
    return np.sqrt(se_a ** 2 + se_b ** 2)


def significant(delta: pd.Series, se: pd.Series) -> pd.Series:
    """|Δ| ≥ 2·se per row (about 95 %); NA where the standard error or the delta is unknown."""
    sig = pd.Series(pd.NA, index=delta.index, dtype="boolean")
    known = se.notna() & delta.notna()
    sig[known] = (delta.abs() >= 2 * se)[known]
    return sig


def pct_change(before: pd.Series, after: pd.Series) -> pd.Series:
    b = before.where(before != 0)
    return (after - b) / b.abs() * 100.0
