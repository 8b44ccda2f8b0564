"""Score code completions: pass@k from sandboxed test runs, then the run time of passing ones.

Two phases over the problems of one task:

1. correctness: every completion (n per problem) runs with its tests in its own sandboxed
   process (:mod:`.sandbox`), ``workers`` processes at a time;
2. timing: for each problem with a passing completion, the first one is run again, one
   problem at a time (concurrent timing on a shared machine measures the neighbours): its
   tests must pass again, then the task's timing input is timed in batches, interleaved with
   the reference solution's, in the same process; ``time_ratio`` = candidate / reference
   (medians).

Per task: ``pass_at_<k>`` (unbiased estimator, mean over problems) with ``pass_at_1_stderr``,
``avg_time_s`` (mean of the candidates' median seconds per call over timed problems),
``time_ratio`` (geometric mean of the per-problem ratios: ratios multiply, so a 2x speedup and
a 2x slowdown cancel) and ``timed`` (problems timed). Per problem: a record (status, error,
times) that the step logs as an artifact and ``compare`` reads back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlproject.evaluation.code import sandbox
from mlproject.evaluation.code.sandbox import Limits

log = logging.getLogger(__name__)

#: Sampling used when n > 1 completions are drawn per problem (Chen et al. 2021 used 0.2 for
#: pass@1 and 0.8 for pass@100; one setting for every k keeps the samples shared).
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_P = 0.95
PASS_KS = (1, 10, 100)
MAX_TEXT = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples, c correct.

    Computed as a product, 1 - prod_{i=n-c+1..n} (1 - k/i), which avoids huge binomials.
    """
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclass
class CodeProblem:
    """One problem as the sandbox sees it (built from an lm-eval sample by ``tasks.py``)."""

    task: str
    problem_id: str
    completions: list[str]   # what the model generated
    programs: list[str]      # complete programs (prompt + completion where the task says so)
    test: str                # code that raises when a program is wrong
    reference: str | None = None       # a correct program, timed against the candidate
    timing_setup: str = ""             # untimed code preparing the timing input
    timing_stmt: str | None = None     # the timed statement (default: the tests)


@dataclass
class CodeSettings:
    """How completions are scored. ``samples`` > 1 turns on sampling and pass@k."""

    samples: int = 1
    limits: Limits = field(default_factory=Limits)
    timing_repeats: int = 5
    timing_budget_s: float = 3.0
    min_batch_s: float = 0.005
    workers: int = 0  # 0: min(4, CPU count)

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.timing_repeats < 0:
            raise ValueError(f"timing_repeats must be >= 0, got {self.timing_repeats}")

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for k in PASS_KS if k <= self.samples)

    @property
    def pool_size(self) -> int:
        return self.workers or max(1, min(4, os.cpu_count() or 1))

    def gen_kwargs(self) -> dict[str, Any] | None:
        """lm-eval generation overrides: None keeps each task's own (greedy) settings."""
        if self.samples == 1:
            return None
        return {"do_sample": True, "temperature": SAMPLE_TEMPERATURE, "top_p": SAMPLE_TOP_P}

    def describe(self) -> dict[str, Any]:
        lim = self.limits
        return {"samples": self.samples, "ks": list(self.ks),
                "sampling": "greedy (task default)" if self.samples == 1 else
                f"temperature {SAMPLE_TEMPERATURE}, top_p {SAMPLE_TOP_P}",
                "timeout_s": lim.timeout_s, "cpu_s": lim.cpu_s or math.ceil(lim.timeout_s) + 1,
                "memory_mb": lim.memory_mb,
                "max_procs": lim.max_procs, "file_size_mb": lim.file_size_mb,
                "timing_repeats": self.timing_repeats, "timing_budget_s": self.timing_budget_s,
                "workers": self.pool_size}


@dataclass
class CodeTaskResult:
    task: str
    metrics: dict[str, float]        # pass_at_1, pass_at_1_stderr, avg_time_s, time_ratio, timed
    problems: list[dict[str, Any]]   # one record per problem (the artifact)
    statuses: dict[str, int]         # first completion's status -> problems
    landlock: int = 0                # Landlock ABI the sandbox applied (0: not available)

    def artifact(self, settings: CodeSettings) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "statuses": self.statuses,
                "settings": settings.describe(), "landlock_abi": self.landlock,
                "problems": self.problems}


@contextlib.contextmanager
def _bar(description: str, total: int) -> Iterator[Callable[[], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  transient=True) as bar:
        t = bar.add_task(description, total=total)
        yield lambda: bar.advance(t)


def _short(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" [… {len(text) - MAX_TEXT} chars]"


def score(problems: Sequence[CodeProblem], settings: CodeSettings | None = None) -> CodeTaskResult:
    """Run every completion's tests, time the passing problems; metrics and per-problem records."""
    settings = settings or CodeSettings()
    if not problems:
        raise ValueError("no problems to score")
    task = problems[0].task
    jobs = [(i, j) for i, p in enumerate(problems) for j in range(len(p.programs))]
    results: dict[tuple[int, int], sandbox.ExecResult] = {}

    def check(ij):
        p = problems[ij[0]]
        return ij, sandbox.run(p.programs[ij[1]], p.test, limits=settings.limits)

    with _bar(f"{task}: running tests", len(jobs)) as advance, \
            ThreadPoolExecutor(settings.pool_size) as pool:
        for ij, res in pool.map(check, jobs):
            results[ij] = res
            advance()

    timings: dict[int, tuple[int, sandbox.ExecResult]] = {}
    passing = {i: next((j for j in range(len(p.programs)) if results[(i, j)].passed), None)
               for i, p in enumerate(problems)}
    to_time = [i for i, j in passing.items() if j is not None] if settings.timing_repeats else []
    with _bar(f"{task}: timing passing solutions", len(to_time)) as advance:
        for i in to_time:  # one at a time: timings must not share the CPU with each other
            p, j = problems[i], passing[i]
            timing = {"setup": p.timing_setup, "stmt": p.timing_stmt or p.test,
                      "reference": p.reference, "repeats": settings.timing_repeats,
                      "budget_s": settings.timing_budget_s, "min_batch_s": settings.min_batch_s}
            timings[i] = (j, sandbox.run(p.programs[j], p.test, timing=timing,
                                         limits=settings.limits))
            advance()

    records = []
    for i, p in enumerate(problems):
        n = len(p.programs)
        res = [results[(i, j)] for j in range(n)]
        c = sum(r.passed for r in res)
        first_fail = next((r for r in res if not r.passed), None)
        rec: dict[str, Any] = {
            "id": p.problem_id, "n": n, "c": c, "pass_at_1": pass_at_k(n, c, 1),
            "status": res[0].status, "error": _short(first_fail.error if first_fail else ""),
            "stderr": _short(first_fail.stderr if first_fail else ""),
            "completion": _short(p.completions[0] if p.completions else ""),
            "time_s": None, "ref_time_s": None, "time_ratio": None, "timing_error": None,
        }
        if n > 1:
            rec["statuses"] = dict(Counter(r.status for r in res))
            for k in settings.ks:
                rec[f"pass_at_{k}"] = pass_at_k(n, c, k)
        if i in timings:
            j, tres = timings[i]
            rec["timed_sample"] = j
            t = tres.timing
            if not tres.passed:  # flaky: passed once, failed when run again for timing
                rec["timing_error"] = f"{tres.status}: {tres.error}"[:MAX_TEXT]
            elif t is None or t.cand_s is None:
                rec["timing_error"] = (t.error if t else "no timing") or "no timing"
            else:
                rec["time_s"], rec["ref_time_s"], rec["time_ratio"] = t.cand_s, t.ref_s, t.ratio
                if t.ref_status not in (None, "passed"):
                    rec["timing_error"] = f"reference: {t.ref_status}: {t.error}"[:MAX_TEXT]
        records.append(rec)

    metrics = task_metrics(records, settings.ks)
    statuses = dict(Counter(r["status"] for r in records))
    abi = max((r.landlock for r in results.values()), default=0)
    log.info("%s: pass@1 %.4f over %d problems, %d timed; statuses %s", task,
             metrics["pass_at_1"], len(records), metrics["timed"], statuses)
    return CodeTaskResult(task=task, metrics=metrics, problems=records, statuses=statuses,
                          landlock=abi)


def task_metrics(records: Sequence[dict[str, Any]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Task-level metrics from per-problem records (see the module docstring)."""
    n = len(records)
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass_at_{k}"] = sum(r.get(f"pass_at_{k}", r["pass_at_1"] if k == 1 else 0.0)
                                  for r in records) / n
    p1 = [r["pass_at_1"] for r in records]
    if n > 1:  # as lm-eval's mean_stderr: sample standard deviation / sqrt(n)
        mean = sum(p1) / n
        out["pass_at_1_stderr"] = math.sqrt(sum((x - mean) ** 2 for x in p1) / (n - 1) / n)
    timed = [r for r in records if r.get("time_s") is not None]
    out["timed"] = float(len(timed))
    if timed:
        out["avg_time_s"] = sum(r["time_s"] for r in timed) / len(timed)
    ratios = [r["time_ratio"] for r in timed if r.get("time_ratio")]
    if ratios:
        out["time_ratio"] = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return out
