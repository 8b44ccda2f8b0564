"""Code tasks through lm-eval: lm-eval generates, the sandbox scores.

lm-eval's own ``pass_at_1`` runs HF ``code_eval``, which executes the generated programs in
threads of the evaluating process (3 s timeout, no isolation: a fork bomb, ``os._exit`` or a
memory hog takes the evaluation down, and the program sees every secret in its environment).
So code tasks run with ``predict_only=True`` (lm-eval swaps every metric for ``bypass`` and
logs the samples) and each completion is then run by :mod:`.scoring` in its own confined
process.

Both of lm-eval's unsafe-code gates are opened here, deliberately, and recorded by the step:

* ``confirm_run_unsafe_code=True``: lm-eval refuses tasks marked ``unsafe_code`` without it
  (its humaneval/mbpp and our ``code_offline``);
* ``HF_ALLOW_CODE_EVAL=1`` (for lm-eval's own code tasks only, and only while they load):
  their ``utils.py`` loads HF ``code_eval`` at import and runs its fixed self-test program
  (``add(2, 3)``) in-process. That constant program is the only code this process executes;
  nothing the model writes runs here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mlproject.evaluation.code import tasks as code_tasks
from mlproject.evaluation.code.scoring import CodeSettings, CodeTaskResult, score

log = logging.getLogger(__name__)

GATE_ENV = "HF_ALLOW_CODE_EVAL"


@dataclass
class CodeRun:
    """What running the code tasks produced: lm-eval's raw results (metrics replaced by ours)
    and one :class:`CodeTaskResult` per task; ``gates`` records the unsafe-code switches."""

    raw: dict[str, Any]
    results: dict[str, CodeTaskResult]
    gates: dict[str, str] = field(default_factory=dict)


def gates_for(tasks: list[str]) -> dict[str, str]:
    """The unsafe-code switches a run of ``tasks`` opens (logged as params and in report.md)."""
    hub = [t for t in tasks if t in code_tasks.HUB_CODE_TASKS]
    return {"confirm_run_unsafe_code": "true",
            GATE_ENV: "1 (while loading " + ", ".join(hub) + ")" if hub else "not needed",
            "executed_by": "mlproject sandbox (one confined subprocess per program)"}


@contextlib.contextmanager
def code_eval_gate(open_it: bool) -> Iterator[None]:
    """HF_ALLOW_CODE_EVAL=1 for the duration of the block (restored afterwards)."""
    if not open_it:
        yield
        return
    before = os.environ.get(GATE_ENV)
    os.environ[GATE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GATE_ENV, None)
        else:
            os.environ[GATE_ENV] = before


def check_requirements(tasks: list[str]) -> None:  # noqa: ARG001 - one place for future checks
    """Cheap checks before any model loads (raise UserError)."""
    from mlproject.errors import UserError

    try:
        import resource  # noqa: F401 - the sandbox's limits are POSIX rlimits
    except ImportError:
        raise UserError("code tasks need a POSIX system (the sandbox uses resource limits)") from None


def run_code_tasks(lm, tasks: list[str], *, settings: CodeSettings, task_manager,
                   limit: int | float | None = None, num_fewshot: int | None = None,
                   seed: int = 42, apply_chat_template: bool = False) -> CodeRun:
    """Generate completions for ``tasks`` with lm-eval (``lm`` an lm-eval LM), then score them."""
    import lm_eval

    unknown = [t for t in tasks if not code_tasks.is_code_task(t)]
    if unknown:
        raise ValueError(f"not code tasks: {unknown}")
    hub = any(t in code_tasks.HUB_CODE_TASKS for t in tasks)
    with code_eval_gate(hub):
        loaded = task_manager.load(list(tasks))["tasks"]
        if settings.samples > 1:
            for task in loaded.values():
                task.set_config("repeats", settings.samples)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[loaded[t] for t in tasks], task_manager=task_manager,
            predict_only=True, log_samples=True, confirm_run_unsafe_code=True,
            gen_kwargs=settings.gen_kwargs(), limit=limit, num_fewshot=num_fewshot,
            use_cache=None, cache_requests=False, apply_chat_template=apply_chat_template,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    samples = results.pop("samples", {}) or {}
    scored: dict[str, CodeTaskResult] = {}
    for task in tasks:
        scored[task] = score(code_tasks.problems(task, samples.get(task, [])), settings)
        # only our metrics: lm-eval's entry holds `bypass` (999) and `sample_len` here
        entry = {k: v for k, v in results["results"].get(task, {}).items() if k == "alias"}
        entry.update({f"{k},none": v for k, v in scored[task].metrics.items()})
        results["results"][task] = entry
        hib = results.setdefault("higher_is_better", {}).setdefault(task, {})
        hib.clear()
        hib.update({m.split(",")[0]: not m.startswith(("avg_time", "time_ratio"))
                    for m in scored[task].metrics if not m.endswith("_stderr")})
    gates = gates_for(tasks)
    results["mlproject_code"] = {
        "scored_by": "mlproject.evaluation.code (lm-eval ran with predict_only=True)",
        "gates": gates, "settings": settings.describe(),
        "statuses": {t: r.statuses for t, r in scored.items()},
        "landlock_abi": max((r.landlock for r in scored.values()), default=0)}
    return CodeRun(raw=dict(results), results=scored, gates=gates)


def report_section(run: CodeRun | dict[str, CodeTaskResult], settings: CodeSettings,
                   gates: dict[str, str] | None = None) -> str:
    """The report.md section: what ran where, limits, per-task outcome counts."""
    results = run.results if isinstance(run, CodeRun) else run
    gates = gates or (run.gates if isinstance(run, CodeRun) else {})
    s = settings.describe()
    abi = max((r.landlock for r in results.values()), default=0)
    lines = [
        "Generated programs never ran in this process: each one ran in its own subprocess "
        "(temporary directory, environment built from scratch, CPU "
        f"{s['cpu_s']:.0f} s, memory {s['memory_mb']} MiB, file size "
        f"{s['file_size_mb']} MiB, wall clock {s['timeout_s']:.0f} s with the process group "
        "killed, output truncated), "
        + (f"confined by Landlock (ABI {abi}: reads limited to Python and system libraries, "
           "writes to its temporary directory, no TCP)" if abi else
           "without Landlock (not offered by this kernel)")
        + " and a Python audit hook refusing process creation, ctypes, sockets and writes "
          "outside its directory. See README, \"Running generated code\", for what this does "
          "not protect against.",
        "",
        "lm-eval's unsafe-code gates, opened on purpose: "
        + "; ".join(f"`{k}` = {v}" for k, v in gates.items()) + ".",
        "",
        f"Sampling: {s['sampling']}; {s['samples']} completion(s) per problem; pass@k by the "
        "unbiased estimator 1 - C(n-c, k)/C(n, k). Timing: the first passing completion and "
        f"the reference solution, {s['timing_repeats']} interleaved batches each in one "
        "process, one problem at a time; time_ratio = candidate / reference (medians), "
        "geometric mean over problems.",
        "",
        "| task | problems | pass@1 | timed | avg_time_s | time_ratio | outcomes |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        m = r.metrics
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {task} | {len(r.problems)} | {m['pass_at_1']:.4f} | {int(m['timed'])} | "
                     + (f"{m['avg_time_s']:.3g}" if "avg_time_s" in m else "N/A") + " | "
                     + (f"{m['time_ratio']:.3g}" if "time_ratio" in m else "N/A")
                     + f" | {outcomes} |")
    lines += ["", "Per-problem results (status, error, times, first completion): "
              "`code/<task>.json`."]
    return "\n".join(lines)
