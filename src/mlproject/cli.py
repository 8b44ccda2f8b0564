"""`mlproject <step> --flag value`: flags → step config → step.run(). Nothing else.

The flags are generated from each step's config dataclass, so the CLI, the MLproject file
(checked by a test) and the README document the same parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from typing import Any

from mlproject.steps import COMMANDS, STEPS, entry


def config_class(step: str):
    return entry(step).config_class()


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default, said once (a help that names its default gets none added)."""
    from mlproject.params import shown_default

    text = f.metadata.get("help", "")
    shown = shown_default(f)
    if shown not in ("", None) and "(default" not in text:
        text += f" (default: {str(shown).lower() if isinstance(shown, bool) else shown})"
    return text.replace("%", "%%")


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": _help(f)}
        if f.type in ("bool", bool):
            kwargs.update(nargs="?", const="true")
        if f.metadata.get("repeat"):
            # --set a=1 --set 'b=2 c=3': every value is a shell-quoted list of assignments,
            # the same string MLproject passes once (-P set="b=2 c=3").
            kwargs.update(action="append", default=[])
        p.add_argument(flag, **kwargs)
        if f.metadata.get("positional"):
            p.add_argument(f"{f.name}_positional", nargs="?", default=None, metavar=f.name.upper(),
                           help=f"same as {flag}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlproject", description="MLflow-tracked LLM experiments.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for info in [*STEPS.values(), *COMMANDS.values()]:
        cls = info.config_class()
        p = sub.add_parser(info.name, help=info.summary, description=cls.__doc__,
                           aliases=[info.entry_point] if info.entry_point else [])
        p.set_defaults(step=info.name)
        _add_config_flags(p, cls)
    # `mlproject runs sync|reap`: housekeeping commands, not steps (no run of their own).
    from mlproject import housekeeping

    housekeeping.add_parser(sub)
    # `mlproject export MODEL DIR`: a standalone Hugging Face folder; reads runs, makes none.
    from mlproject import export

    export.add_parser(sub)
    return parser


#: Exit code when the step ran but the tracking server did not get everything (sysexits' EX_TEMPFAIL).
EX_TEMPFAIL = 75


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed flags → the config's keyword arguments (strings; the config coerces them)."""
    values = {k: v for k, v in vars(args).items() if k not in ("step", "verbose")}
    for name in [k for k in values if k.endswith("_positional")]:
        positional = values.pop(name)
        if positional is not None:
            values[name[: -len("_positional")]] = positional
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = " ".join(value)
    return {k: ("" if v is None else v) for k, v in values.items()}


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    # Turn SIGTERM into an exception so the active run is closed as KILLED, not left RUNNING.
    raise SystemExit(128 + signum)


def _summary(result: Any) -> str:
    if getattr(result, "text", None):
        return result.text
    from mlproject.report import fmt_metric

    lines = [f"run_id: {getattr(result, 'run_id', '?')}"]
    for name, value in sorted((getattr(result, "metrics", None) or {}).items()):
        if "_stderr" in name:
            continue
        lines.append(f"{name}: {fmt_metric(name, value)}")
    if getattr(result, "run_id", None):
        from mlproject.tracking import where_to_look

        lines.append(where_to_look(result.run_id))
    return "\n".join(lines)


def _rank_prefix() -> str:
    from mlproject import distributed

    return f"[rank{distributed.rank()}] " if distributed.active() else ""


def main(argv: list[str] | None = None) -> int:
    from mlproject import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from mlproject import progress

    # Under torchrun / accelerate launch every rank runs this; the others log warnings only.
    quiet = distributed.active() and not distributed.is_main()
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    # In a terminal, log lines go through rich so they print above the progress bars.
    handler = progress.log_handler(level)
    if distributed.active():  # one process per rank: say which one speaks
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_rank_prefix() + "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("urllib3", "filelock", "httpx", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from mlproject import tracking
    from mlproject.errors import StepFailed, UserError

    if args.step == "runs":
        from mlproject import housekeeping

        return housekeeping.main(args)
    if args.step == "export":
        from mlproject import export

        return export.main(args)
    unsent_before = len(tracking.unsent_spools())
    try:
        info = entry(args.step)
        cfg = info.config_class()(**config_values(args))
        nproc = getattr(cfg, "nproc", 1)
        if nproc > 1 and not distributed.active():
            info.load().check(cfg)  # bad input fails here, in one process, before any is started
            return distributed.relaunch(argv, nproc)
        if nproc > 1 and nproc != distributed.world_size():
            logging.getLogger("mlproject").warning("nproc=%d ignored: this launch already has %d processes",
                                                   nproc, distributed.world_size())
        result = info.run(cfg)
    except UserError as exc:
        print(f"{_rank_prefix()}error: {tracking.redact(exc)}", file=sys.stderr)
        if distributed.is_main():
            # Under `mlflow run` the run exists already: it records the refusal.
            tracking.record_refusal(args.step, str(exc))
        return exc.exit_code
    except StepFailed as exc:
        logging.getLogger("mlproject").debug("step failed", exc_info=True)
        print(f"{_rank_prefix()}error: {tracking.redact(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}error: interrupted (Ctrl-C); a run in progress was marked KILLED", file=sys.stderr)
        return 130
    except Exception as exc:
        if not tracking.is_transient(exc):
            raise
        logging.getLogger("mlproject").debug("tracking failed", exc_info=True)
        print(f"error: tracking server {tracking.redact(tracking.tracking_uri())} stopped answering: "
              f"{tracking.redact(str(exc).splitlines()[0])}", file=sys.stderr)
        return EX_TEMPFAIL
    if distributed.is_main():
        print(tracking.redact(_summary(result)))
    distributed.shutdown()
    unsent = tracking.unsent_spools()[unsent_before:]
    if unsent:
        print(f"error: results not delivered to tracking server {tracking.redact(tracking.tracking_uri())}; they are "
              f"kept in {', '.join(map(str, unsent))} — send them with: mlproject runs sync", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


if __name__ == "__main__":
    sys.exit(main())
