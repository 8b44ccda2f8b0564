"""`mlproject runs sync | reap`: looking after runs rather than making them.

    mlproject runs sync                       # send every spool left by a lost tracking server
    mlproject runs sync ~/.cache/mlproject/spool/<run_id> --tracking-uri http://host:5000
    mlproject runs reap --experiment demo     # RUNNING runs whose process is gone -> FAILED
                                              # (and those `mlflow run` left when it could not build the environment)
    mlproject runs reap --dry-run             # only say what would be failed, and why

Neither opens a run of its own. Bad input (unknown experiment, unreachable server, a spool
still being written) is one line and exit code 2, like the steps.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("runs", help="housekeeping: send spooled results (sync), fail runs whose process is gone (reap)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    s = cmds.add_parser("sync", help="send what runs logged while the tracking server was unreachable")
    s.add_argument("spools", nargs="*", metavar="SPOOL",
                   help="spool folders (default: every one under $MLPROJECT_SPOOL or ~/.cache/mlproject/spool)")
    s.add_argument("--tracking-uri", default="",
                   help="server to send to (default: $MLFLOW_TRACKING_URI, else the one each run was logged to)")
    r = cmds.add_parser("reap", help="mark RUNNING runs whose process is gone FAILED, with the reason")
    r.add_argument("--experiment", default="", help="comma-separated experiment names or ids (default: all)")
    r.add_argument("--stale-seconds", type=float, default=None,
                   help="a run on another host is dead after this long without a heartbeat "
                        "(default: 10 x $MLPROJECT_HEARTBEAT_SECONDS, at least 600), and a run `mlflow run` "
                        "created, in which no step started, after this long (default: 3600)")
    r.add_argument("--dry-run", action="store_true", help="only list what would be failed")
    r.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def main(args: argparse.Namespace) -> int:
    from mlproject import tracking
    from mlproject.errors import UserError

    try:
        if args.runs_command == "sync":
            return _sync(args, tracking)
        tracking.check_server(args.tracking_uri or None)
        names = [e.strip() for e in args.experiment.split(",") if e.strip()]
        rows = tracking.reap_runs(names or None, args.stale_seconds, args.dry_run, entry_points=_entry_points())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for row in rows:
        print(f"{row['run_id']}  {row['action']:<10}  {row['name'] or ''}: {row['reason']}")
    failed = sum(r["action"] != "kept" for r in rows)
    print(f"{len(rows)} RUNNING run(s) looked at, {failed} {'would be ' if args.dry_run else ''}marked FAILED")
    return 0


def _entry_points() -> dict[str, list[str]]:
    """MLproject's entry points and the parameters each declares (what `mlflow run` logs on the
    run it creates; scripts/write_mlproject.py writes MLproject from the same fields)."""
    import dataclasses

    from mlproject.steps import COMMANDS, STEPS

    return {info.entry_point or name: [f.name for f in dataclasses.fields(info.config_class())
                                       if not f.metadata.get("cli_only")]
            for name, info in [*STEPS.items(), *COMMANDS.items()]}


def _sync(args, tracking) -> int:
    from mlproject.errors import UserError
    from mlproject.tracking.spool import all_spools

    paths = args.spools or [s.path for s in all_spools()]
    if not paths:
        print("nothing to sync: no spool left")
        return 0
    errors = 0
    for path in paths:
        try:
            counts = tracking.sync_spool(path, args.tracking_uri or None)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            errors += 1
            continue
        sent = ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "nothing (already sent)"
        print(f"{path}: sent {sent}")
    return 2 if errors else 0
