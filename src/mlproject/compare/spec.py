"""What to compare (``CompareSpec``), validated up front. Imports nothing heavy: the view
names come from the registry (``mlproject.compare.views.VIEWS``), which imports a view's
module only when the view is used."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlproject.compare.views import VIEWS, unknown_view
from mlproject.errors import UserError

FORMATS = ("md", "csv", "json", "html", "png")
STATUSES = ("FINISHED", "RUNNING", "FAILED", "KILLED", "SCHEDULED")


def split_list(value) -> tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``; lists/tuples pass through (stripped)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s for s in (str(x).strip() for x in items) if s)


@dataclass
class CompareSpec:
    """Parameters of the compare entry point (MLproject names in brackets).

    experiments [experiment]: experiment names or ids; comma-separated in MLproject.
    runs [runs]: run ids compared in addition to (or instead of) whole experiments; their
        order matters for ``view=versus`` without a baseline (first = baseline).
    filter [filter]: an MLflow search filter applied within the experiments, e.g.
        ``tags.`mlproject.role` != 'best_ppl'`` or ``metrics.avg_acc > 0.5``.
    baseline [baseline]: ``<run id>``, ``id:<id>``, ``name:<run name>``, a bare run name,
        ``role:<role>`` (the run with that role in each model family), or several joined by
        ``|`` (per metric the best of them). Empty: versus needs exactly two runs.
    view [view]: summary | versus | ranking | all (comma-separated subsets allowed; the names
        are the registry's, ``mlproject.compare.views.VIEWS``).
    metrics [metrics]: restrict versus / ranking to these metrics: full keys (``mbpp/avg_time``),
        leaves (``pass@1`` matches ``*/pass_at_1``), task names (their headline score) or
        prefixes (``ppl``). Empty: task scores, ``avg_acc``, ``ppl/*`` and directed metrics.
    directions [directions]: overrides such as ``avg_time=min,novelty=max``.
    formats [format]: any of md, csv, json, html, png.
    statuses [status]: run statuses compared (default FINISHED only: a RUNNING run may be
        dead or half-measured, a FAILED one incomplete); ``all`` for every status. Runs
        listed by id in ``runs`` are compared whatever their status. Labels show any status
        other than FINISHED.
    max_rows: rows per table (and versus sections) shown in Markdown/HTML; CSV/JSON are full.
    page_size: runs per ``runs/search`` page (the server allows at most 50,000).
    parallel: page requests in flight at once after the first page (1 = one by one).
    cache [cache]: the local run table (``mlproject.compare.cache``): ``on`` fetches only runs
        changed since the last compare of an experiment (checked against the server's count;
        tag edits by other clients show after ``MLPROJECT_COMPARE_CACHE_TTL`` seconds),
        ``refresh`` fetches everything and rewrites the table, ``off`` neither reads nor writes it.
    """

    experiments: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    filter: str = ""
    baseline: str = ""
    view: tuple[str, ...] = ("all",)
    metrics: tuple[str, ...] = ()
    directions: dict[str, str] = field(default_factory=dict)
    formats: tuple[str, ...] = FORMATS
    statuses: tuple[str, ...] = ("FINISHED",)
    max_rows: int = 200
    page_size: int = 2_500
    parallel: int = 4
    title: str = ""
    cache: str = "on"

    def __post_init__(self):
        from mlproject.compare.directions import parse_overrides

        self.experiments = split_list(self.experiments)
        self.runs = split_list(self.runs)
        self.metrics = split_list(self.metrics)
        self.filter = (self.filter or "").strip()
        self.baseline = (self.baseline or "").strip()
        views = split_list(self.view) or ("all",)
        for v in views:
            if v not in VIEWS and v != "all":
                raise unknown_view(v)
        self.view = tuple(VIEWS) if "all" in views else tuple(v for v in VIEWS if v in views)
        self.formats = split_list(self.formats) or FORMATS
        for f in self.formats:
            if f.lower() not in FORMATS:
                raise UserError(f"unknown format {f!r}: choose from {', '.join(FORMATS)}")
        self.formats = tuple(dict.fromkeys(f.lower() for f in self.formats))
        statuses = tuple(x.upper() for x in split_list(self.statuses)) or ("FINISHED",)
        if "ALL" in statuses:
            statuses = STATUSES
        for st in statuses:
            if st not in STATUSES:
                raise UserError(f"unknown run status {st!r}: choose from {', '.join(STATUSES)}, all")
        self.statuses = tuple(dict.fromkeys(statuses))
        self.directions = parse_overrides(self.directions)
        if self.max_rows < 1:
            raise UserError(f"max_rows must be positive, got {self.max_rows}")
        if not 1 <= self.page_size <= 50_000:
            raise UserError(f"page_size must be within 1..50000, got {self.page_size}")
        if not 1 <= self.parallel <= 32:
            raise UserError(f"parallel must be within 1..32, got {self.parallel}")
        from mlproject.compare.cache import check_mode

        self.cache = check_mode(self.cache)

    @classmethod
    def from_params(cls, experiment: str = "", runs: str = "", filter: str = "",  # noqa: A002
                    baseline: str = "", view: str = "all", metrics: str = "",
                    directions: str = "", format: str = "md,csv,json,html,png",  # noqa: A002
                    status: str = "FINISHED", cache: str = "on", **extra) -> CompareSpec:
        """From the MLproject parameter names (all strings, comma-separated lists)."""
        return cls(experiments=experiment, runs=runs, filter=filter, baseline=baseline,
                   view=view, metrics=metrics, directions=directions, formats=format,
                   statuses=status, cache=cache, **extra)

    @property
    def all_views(self) -> bool:
        return set(self.view) == set(VIEWS)
