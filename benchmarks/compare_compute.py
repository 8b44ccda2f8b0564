"""How long compare's table computation takes: ``core.compute`` on N runs × 20 metrics, no server.

    python benchmarks/compare_compute.py                         # 10,000 runs, median of 5
    python benchmarks/compare_compute.py --runs 2000 --repeat 3
    python benchmarks/compare_compute.py --profile               # + cProfile, top 15 cumulative
    python benchmarks/compare_compute.py --save /tmp/compare_snapshot_10000.pkl
    python benchmarks/compare_compute.py --check /tmp/compare_snapshot_10000.pkl

The runs are ``compare_scale.synth_runs`` (10 families, every second run a fine-tune of the
evaluation before it, 7 tasks with stderr, PPL, avg_acc, size and time metrics), fed to
``RunSet.from_records`` as ``query.fetch_runs`` would (newest first, as the server orders them),
and computed with ``CompareSpec(view=all, baseline=role:base)`` — what ``compare_scale.py`` times
after the query as ``tables_s``. Wall and CPU seconds (``time.process_time``) are printed: on a
shared machine wall times stretch, CPU seconds much less.

``--save`` pickles every table of the result, its notes and scores; ``--check`` recomputes and
asserts that each table is identical to the saved one (``pandas.testing.assert_frame_equal``,
exact: same columns in the same order, dtypes and values) and the notes are the same, so an
optimisation can be shown to change no result.

Target (issue 20): a warm compare ≤ 5 s at 10,000 runs, of which the query takes 1.4–3 s.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pickle
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from compare_scale import synth_runs  # noqa: E402


def records(n: int) -> list[dict]:
    """What ``fetch_runs`` hands ``RunSet.from_records`` for the synthetic experiment."""
    out = []
    for rid, name, start, tags, metrics in synth_runs(n):
        out.append({"run_id": rid, "run_name": name, "experiment_id": "1", "experiment": "scale",
                    "status": "FINISHED", "start_time": start, "end_time": start + 500,
                    "tags": {**tags, "mlflow.runName": name}, "metrics": metrics, "params": {},
                    "in_scope": True})
    out.reverse()  # the server's order: newest first
    return out


def runset(n: int):
    from mlproject.compare.query import RunSet

    return RunSet.from_records(records(n))


def spec():
    from mlproject.compare import CompareSpec

    return CompareSpec.from_params(experiment="scale", baseline="role:base", view="all")


def snapshot(result) -> dict:
    """Everything compare computed, as plain picklable objects."""
    return {"tables": {k: v.copy() for k, v in result.tables.items()},
            "notes": list(result.notes),
            "scores": {"tasks": list(result.scores.tasks), "values": result.scores.values,
                       "keys": result.scores.keys, "stderr": result.scores.stderr}}


def check(result, path: Path) -> None:
    """Assert ``result`` equals the snapshot at ``path`` table by table; AssertionError if not."""
    import pandas.testing as pdt

    want, got = pickle.loads(path.read_bytes()), snapshot(result)
    assert list(got["tables"]) == list(want["tables"]), \
        f"tables {list(got['tables'])} != {list(want['tables'])}"
    for name, df in want["tables"].items():
        try:
            pdt.assert_frame_equal(got["tables"][name], df, check_exact=True)
        except AssertionError as exc:
            raise AssertionError(f"table {name!r} differs: {exc}") from None
    assert got["notes"] == want["notes"], f"notes differ:\n{got['notes']}\n!=\n{want['notes']}"
    assert got["scores"]["tasks"] == want["scores"]["tasks"]
    for part in ("values", "keys", "stderr"):
        pdt.assert_frame_equal(got["scores"][part], want["scores"][part], check_exact=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5, help="timed computes (median printed)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one compute: cProfile top 15 by cumulative time")
    ap.add_argument("--save", type=Path, help="pickle the result's tables and notes here")
    ap.add_argument("--check", type=Path, metavar="SNAPSHOT",
                    help="assert every table and note equals this snapshot (--save)")
    args = ap.parse_args(argv)

    from mlproject.compare import core

    t = time.perf_counter()
    rs, sp = runset(args.runs), spec()
    print(f"RunSet of {len(rs.runs)} runs × {rs.metrics.shape[1]} metrics built in "
          f"{time.perf_counter() - t:.2f} s")
    core.compute(rs, sp)  # warm: imports, lazy registries
    walls, cpus = [], []
    result = None
    for _ in range(max(1, args.repeat)):
        c0, w0 = time.process_time(), time.perf_counter()
        result = core.compute(rs, sp)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    print(f"compute: median {statistics.median(walls):.3f} s wall, "
          f"{statistics.median(cpus):.3f} s CPU over {len(walls)} runs "
          f"(wall {', '.join(f'{w:.2f}' for w in walls)})")
    print("tables: " + ", ".join(f"{k} {len(v)}" for k, v in result.tables.items()))
    if args.save:
        args.save.write_bytes(pickle.dumps(snapshot(result)))
        print(f"saved {args.save}")
    if args.check:
        check(result, args.check)
        print(f"identical to {args.check}: {len(result.tables)} tables, "
              f"{len(result.notes)} notes")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        core.compute(rs, sp)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(15)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
