"""Which way is better for a metric, how to name metrics loosely, and which score a task reports.

Pure string logic (no pandas, no MLflow). The registry of known directions lives here and only
here; ``directions=avg_time=min,foo=max`` overrides it per call.

Metric keys follow the run conventions (ARCHITECTURE.md): ``ppl/<dataset>``, ``nll/<dataset>``, ``<task>/<metric>``
(``boolq/acc``, ``boolq/acc_stderr``), top-level ``avg_acc``, ``params_b``, ``eval_seconds`` …
A key's *leaf* is its last ``/`` segment; directions are decided on the leaf, except for the
families whose leaf is a dataset name: ``ppl/``, ``nll/`` and the KL families ``kl/``,
``kl_median/``, ``kl_p99/`` (lower is better), ``top1_agree/`` (higher).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from mlproject.errors import UserError
from mlproject.evaluation.harness import PREFERRED_METRICS

HIGHER = "max"
LOWER = "min"

_DIRECTION_WORDS = {
    "max": HIGHER, "higher": HIGHER, "high": HIGHER, "up": HIGHER, "maximize": HIGHER,
    "min": LOWER, "lower": LOWER, "low": LOWER, "down": LOWER, "minimize": LOWER,
}

#: Prefixes whose whole family is lower-is-better whatever the leaf (the leaf is a dataset).
LOWER_FAMILIES = ("ppl/", "nll/", "perplexity/", "loss/")
#: Families measured against a reference model over the PPL windows (evaluation.engine,
#: ``tracking.names.KL_PREFIX`` …; the leaf is a dataset): KL(reference ‖ model) per token —
#: mean, median, 99th percentile — is lower-is-better …
DIVERGENCE_FAMILIES = ("kl/", "kl_median/", "kl_p99/")
#: … and the share of tokens whose most likely next token is the reference's is higher-is-better.
AGREEMENT_FAMILIES = ("top1_agree/",)
#: Both: metrics a candidate logs against its reference (its baseline has none of its own).
REFERENCE_FAMILIES = DIVERGENCE_FAMILIES + AGREEMENT_FAMILIES
#: Prefixes that are never comparison metrics by default (curves, system metrics, copies).
RESERVED_PREFIXES = ("train/", "eval/", "system/", "before/", "delta/", "search/", "trial/")

#: Task score metrics in order of preference when a run does not record its choice
#: (tag ``mlproject.avg_acc_metrics``): the evaluation's own order (``harness.
#: PREFERRED_METRICS``: acc_norm > acc > math_verify > exact_match > f1 > em > mc2 > mc1),
#: then code-generation and other scores. lm-eval filter suffixes
#: (``exact_match,flexible-extract`` logged as ``exact_match.flexible-extract``) are matched
#: by prefix; unfiltered, then ``flexible-extract``, then ``strict-match``.
SCORE_PREFERENCE = (*PREFERRED_METRICS, "pass_at_1", "pass@1", "bleu", "rouge", "accuracy",
                    "score")

_HIGHER_LEAF = re.compile(
    r"^(acc|acc_norm|accuracy|avg_acc|mean_acc|exact_match|em|f1|math_verify|mc1|mc2|bleu|"
    r"rouge\w*|chrf\w*|ter_inv|score|win_rate|reward\w*|pass(_at_|@|_)?\d+|pass_at_k|"
    r"precision|recall|auc|map|ndcg\w*|throughput\w*|\w*tokens_per_s\w*|\w*per_second\w*|"
    r"speedup)(\b|_|,|$)"
)
_LOWER_LEAF = re.compile(
    r"(^|_)(ppl|perplexity|word_perplexity|byte_perplexity|bits_per_byte|nll|loss|"
    r"time|time_s|time_ratio|latency|seconds|secs|duration|ms|mb|gb|bytes|params_b|params|num_params|"
    r"model_size\w*|peak_\w+|ece|wer|cer|stderr)$"
)
# time_ratio: a code task's run time relative to the reference solution (a time, unit-free)
_TIME_LEAF = re.compile(r"(^|_)(time|latency|seconds|secs|sec|duration|ms|s|time_ratio)$")


def leaf(key: str) -> str:
    """``boolq/acc_norm`` → ``acc_norm``; ``avg_acc`` → ``avg_acc``."""
    return key.rsplit("/", 1)[-1]


def group(key: str) -> str:
    """``boolq/acc_norm`` → ``boolq``; top-level keys (``avg_acc``) → ``""``."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


def canon(name: str) -> str:
    """Loose form for matching what users type against what was logged.

    MLflow forbids ``@`` and ``,`` in metric names, so ``pass@1`` is logged as ``pass_at_1``
    (or ``pass_1``) and lm-eval's ``exact_match,flexible-extract`` as
    ``exact_match_flexible-extract``; all of these compare equal here.
    """
    s = name.lower().replace("@", "_at_").replace("_at_", "")
    return re.sub(r"[^a-z0-9/]", "", s)


def is_stderr(key: str) -> bool:
    return leaf(key).endswith("_stderr") or leaf(key) == "stderr"


def is_reserved(key: str) -> bool:
    return key.startswith(RESERVED_PREFIXES)


def is_score(leaf_name: str) -> bool:
    """True for task score metrics (acc, acc_norm, exact_match…, f1, pass@k …)."""
    if leaf_name.endswith("_stderr"):
        return False
    return _rank_score(leaf_name) is not None


def _rank_score(leaf_name: str) -> int | None:
    low = leaf_name.lower()
    for i, pref in enumerate(SCORE_PREFERENCE):
        p = canon(pref)
        c = canon(low)
        # a filtered variant: exact_match,flexible-extract is logged as
        # exact_match.flexible-extract (mlproject) or exact_match_flexible-extract
        if c == p or (low.startswith(pref) and low[len(pref):len(pref) + 1] in ("_", ",", "-", ".")
                      and pref not in ("acc",)):
            return i
    if re.fullmatch(r"pass(_at_|_)?\d+", low):
        return SCORE_PREFERENCE.index("pass_at_1")
    return None


def score_preference_key(leaf_name: str) -> tuple[int, int, str]:
    """Sort key: lower is preferred. Among filters, ``flexible`` before ``strict``."""
    r = _rank_score(leaf_name)
    r = len(SCORE_PREFERENCE) if r is None else r
    low = leaf_name.lower()
    pref = SCORE_PREFERENCE[r] if r < len(SCORE_PREFERENCE) else ""
    unfiltered = canon(low) == canon(pref)
    filt = 0 if unfiltered else 1 if "flexible" in low else 2 if "strict" in low else 3
    return (r, filt, low)


def known_direction(key: str) -> str | None:
    """The registry's direction for a metric key, or None when unknown."""
    k = key[len("before/"):] if key.startswith("before/") else key
    if k.startswith(LOWER_FAMILIES) or k.startswith(DIVERGENCE_FAMILIES):
        return LOWER
    if k.startswith(AGREEMENT_FAMILIES):
        return HIGHER
    lf = leaf(k).lower()
    if lf.endswith("_stderr"):
        return LOWER
    if _HIGHER_LEAF.search(lf):
        return HIGHER
    if _LOWER_LEAF.search(lf):
        return LOWER
    return None


def is_time_like(key: str) -> bool:
    """Metrics for which a speedup (baseline / candidate) makes sense."""
    lf = leaf(key).lower()
    if "per_s" in lf or "throughput" in lf:
        return False
    return bool(_TIME_LEAF.search(lf))


def is_fraction_metric(key: str) -> bool:
    """Scores reported in [0, 1] (shown as %, deltas in percentage points in the versus view)."""
    lf = leaf(key).lower()
    return key == "avg_acc" or lf in ("avg_acc", "mean_acc") or (
        is_score(lf) and not lf.startswith(("bleu", "chrf", "ter")))


def parse_overrides(spec: str | Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """``"avg_time=min,foo=max"`` (or a mapping / list of ``k=v``) → ``{"avg_time": "min", …}``."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        items = []
        for part in parts:
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise UserError(f"direction {part!r} must look like metric=min or metric=max")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out = {}
    for k, v in items:
        word = _DIRECTION_WORDS.get(str(v).strip().lower())
        if not k or word is None:
            raise UserError(f"unknown direction {v!r} for metric {k!r}: use min or max "
                            "(lower / higher is better)")
        out[k] = word
    return out


class Directions:
    """Known directions plus user overrides; overrides match a full key or a leaf (loosely)."""

    def __init__(self, overrides: Mapping[str, str] | None = None):
        self.overrides = dict(overrides or {})
        self._canon = {canon(k): v for k, v in self.overrides.items()}
        self._cache: dict[str, str | None] = {}

    def __call__(self, key: str) -> str | None:
        if key not in self._cache:
            self._cache[key] = self._lookup(key)
        return self._cache[key]

    def _lookup(self, key: str) -> str | None:
        if key in self.overrides:
            return self.overrides[key]
        for cand in (canon(key), canon(leaf(key))):
            if cand in self._canon:
                return self._canon[cand]
        return known_direction(key)

    def better(self, key: str, a: float, b: float) -> bool | None:
        """Is ``a`` better than ``b``? None when the direction is unknown or a tie."""
        d = self(key)
        if d is None or a == b:
            return None
        return (a > b) if d == HIGHER else (a < b)
