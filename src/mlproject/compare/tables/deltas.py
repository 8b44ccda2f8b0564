"""How a difference is judged: better or worse by the metric's direction, significant by the
paired test where both runs have per-document results (``tables.paired``) or else against the
standard errors, and the percent change."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlproject.compare.directions import HIGHER, LOWER
from mlproject.compare.tables.paired import ALPHA, STDERR


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


def significance(delta: pd.Series, se: pd.Series, p_value: pd.Series,
                 test: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(significant, test used) per row. Where a paired test gave a p-value (``test`` and
    ``p_value`` from ``paired.paired_tests``): p < ``paired.ALPHA`` — the right test for two
    runs scored on the same documents. Elsewhere the independent-samples rule
    ``significant(delta, se)``, test ``"stderr"`` where it could decide; NA and None where
    neither could."""
    sig = significant(delta, se)
    used = pd.Series(np.where(sig.notna(), STDERR, None), index=delta.index, dtype=object)
    paired = test.notna() & p_value.notna()
    sig[paired] = (p_value < ALPHA)[paired]
    used[paired] = test[paired]
    return sig, used


def pct_change(before: pd.Series, after: pd.Series) -> pd.Series:
    b = before.where(before != 0)
    return (after - b) / b.abs() * 100.0
