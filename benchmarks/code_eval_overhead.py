"""Overhead of the code sandbox over bare subprocess runs of the same programs.

The programs: every code_offline reference solution with its tests (47 problems), run
  bare    = ``subprocess.run([python, "-c", program + tests])`` one after another, nothing else;
  sandbox = ``sandbox.run(program, tests)`` one after another (fresh temporary directory,
            clean environment, rlimits, Landlock, audit hook, result pipe, output files);
  pool    = ``scoring.score`` (the evaluation's own path: the same sandbox, ``workers`` at a
            time), timing off.
Prints problems per second of each, the ratio sandbox / bare (time per problem), the
harness's share of the sandboxed time beyond a bare run, (sandbox - bare) / sandbox, and how
much of a sandboxed problem is the program and its tests at all (the rest is starting and
confining a Python process).

    python benchmarks/code_eval_overhead.py                  # 3 rounds, median
    python benchmarks/code_eval_overhead.py --rounds 5 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def load_problems() -> list[tuple[str, str]]:
    from mlproject.evaluation.tasks import tasks_root

    docs = [json.loads(line) for line in
            (tasks_root() / "code_offline" / "test.jsonl").read_text().splitlines()]
    return [(d["prompt"] + d["canonical_solution"], f"{d['test']}\ncheck({d['entry_point']})")
            for d in docs]


def bare(problems) -> float:
    start = time.perf_counter()
    for program, test in problems:
        proc = subprocess.run([sys.executable, "-c", program + "\n" + test],
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    return time.perf_counter() - start


def sandboxed(problems) -> tuple[float, float]:
    from mlproject.evaluation.code import sandbox

    start = time.perf_counter()
    inside = 0.0
    for program, test in problems:
        res = sandbox.run(program, test)
        assert res.passed, res
        inside += res.run_s or 0.0
    return time.perf_counter() - start, inside


def pooled(problems, workers: int) -> float:
    from mlproject.evaluation.code.scoring import CodeProblem, CodeSettings, score

    probs = [CodeProblem("code_offline", str(i), [""], [p], t) for i, (p, t) in enumerate(problems)]
    start = time.perf_counter()
    res = score(probs, CodeSettings(timing_repeats=0, workers=workers))
    assert res.metrics["pass_at_1"] == 1.0
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    problems = load_problems()
    n = len(problems)
    b, s, inside, p = [], [], [], []
    for r in range(args.rounds):
        b.append(bare(problems))
        t, i = sandboxed(problems)
        s.append(t)
        inside.append(i)
        p.append(pooled(problems, args.workers))
        print(f"round {r + 1}: bare {b[-1]:.2f}s  sandbox {s[-1]:.2f}s  "
              f"pool({args.workers}) {p[-1]:.2f}s", flush=True)
    mb, ms, mp, mi = (statistics.median(x) for x in (b, s, p, inside))
    print(f"\n{n} programs (code_offline references + tests), median of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print(f"  bare subprocess : {n / mb:6.1f} problems/s  ({mb / n * 1000:.1f} ms each)")
    print(f"  sandbox (serial): {n / ms:6.1f} problems/s  ({ms / n * 1000:.1f} ms each)")
    print(f"  scoring pool    : {n / mp:6.1f} problems/s  ({args.workers} workers)")
    print(f"  ratio sandbox / bare (time per problem): {ms / mb:.2f}")
    print(f"  harness share of sandboxed time, beyond a bare run: {(ms - mb) / ms:.1%}")
    print(f"  the programs and tests themselves: {mi / n * 1000:.2f} ms each, "
          f"{mi / ms:.1%} of sandboxed time (the rest: process start-up and confinement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
