"""`mlproject <step> --flag value`: flags → step config → step.run(). Nothing else.

The flags are generated from each step's config dataclass, so the CLI, the MLproject file
(checked by a test) and the README document the same parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import signal
import sys
from typing import Any

# step name -> (config class "module:Class", step module); imported only when used.
STEPS: dict[str, tuple[str, str, str]] = {
    "evaluate": ("mlproject.config:EvaluateConfig", "mlproject.steps.evaluate",
                 "perplexity + lm-eval tasks of one model"),
    "finetune": ("mlproject.config:FinetuneStepConfig", "mlproject.steps.finetune",
                 "SFT / DPO with LoRA, QLoRA or full fine-tuning (trl), evaluated before/after"),
    "quantize": ("mlproject.config:QuantizeConfig", "mlproject.steps.quantize",
                 "weight quantization (RTN simulated, bitsandbytes nf4/fp4/int8) + evaluation"),
    "prune": ("mlproject.config:PruneStepConfig", "mlproject.steps.prune",
              "structured pruning to a fraction of parameters + evaluation"),
    "compare": ("mlproject.config:CompareConfig", "mlproject.steps.compare",
                "delta tables, rankings and plots from runs on the tracking server"),
}


def config_class(step: str):
    module, _, name = STEPS[step][0].partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlproject", description="MLflow-tracked LLM experiments.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for step, (_, _, summary) in STEPS.items():
        p = sub.add_parser(step, help=summary, description=config_class(step).__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(config_class(step)):
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata.get("help", "")}
            if f.type in ("bool", bool):
                kwargs.update(nargs="?", const="true")
            p.add_argument(flag, **kwargs)
    # `mlproject runs sync|reap`: housekeeping commands, not steps (no run of their own).
    from mlproject import housekeeping

    housekeeping.add_parser(sub)
    return parser


#: Exit code when the step ran but the tracking server did not get everything (sysexits' EX_TEMPFAIL).
EX_TEMPFAIL = 75


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    # Turn SIGTERM into an exception so the active run is closed as KILLED, not left RUNNING.
    raise SystemExit(128 + signum)


def _summary(result: Any) -> str:
    if hasattr(result, "text"):
        return result.text
    lines = [f"run_id: {getattr(result, 'run_id', '?')}"]
    for name, value in sorted((getattr(result, "metrics", None) or {}).items()):
        if "_stderr" in name:
            continue
        lines.append(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    for noisy in ("urllib3", "filelock", "httpx", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from mlproject import tracking
    from mlproject.errors import StepFailed, UserError

    if args.step == "runs":
        from mlproject import housekeeping

        return housekeeping.main(args)
    values = {k: v for k, v in vars(args).items() if k not in ("step", "verbose")}
    unsent_before = len(tracking.unsent_spools())
    try:
        cfg = config_class(args.step)(**{k: ("" if v is None else v) for k, v in values.items()})
        step = importlib.import_module(STEPS[args.step][1])
        result = step.run(cfg)
    except UserError as exc:
        print(f"error: {tracking.redact(exc)}", file=sys.stderr)
        # Under `mlflow run` the run exists already: it records the refusal.
        tracking.record_refusal(args.step, str(exc))
        return exc.exit_code
    except StepFailed as exc:
        logging.getLogger("mlproject").debug("step failed", exc_info=True)
        print(f"error: {tracking.redact(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); a run in progress was marked KILLED", file=sys.stderr)
        return 130
    except Exception as exc:
        if not tracking.is_transient(exc):
            raise
        logging.getLogger("mlproject").debug("tracking failed", exc_info=True)
        print(f"error: tracking server {tracking.redact(tracking.tracking_uri())} stopped answering: "
              f"{tracking.redact(str(exc).splitlines()[0])}", file=sys.stderr)
        return EX_TEMPFAIL
    print(tracking.redact(_summary(result)))
    unsent = tracking.unsent_spools()[unsent_before:]
    if unsent:
        print(f"error: results not delivered to tracking server {tracking.redact(tracking.tracking_uri())}; they are "
              f"kept in {', '.join(map(str, unsent))} — send them with: mlproject runs sync", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


if __name__ == "__main__":
    sys.exit(main())
