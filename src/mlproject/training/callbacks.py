"""Trainer callbacks: forward logs to the caller, stop at the first non-finite loss, sample memory."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from mlproject.errors import StepFailed

log = logging.getLogger(__name__)

OnLog = Callable[[dict[str, float], int], None]

# Keys transformers adds to the final summary log; they describe the run, not a step.
SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
GUARDED_KEYS = ("loss", "grad_norm")


class TrainingDiverged(StepFailed):
    """The loss (or gradient norm) became NaN/inf; training was stopped at that step."""

    def __init__(self, key: str, value: float, step: int):
        self.key, self.value, self.step = key, value, step
        super().__init__(
            f"training diverged: {key}={value} at step {step} (lower the learning rate or check the data)"
        )


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
            out[k] = float(v.item())
    return out


class LogForwarder(TrainerCallback):
    """Hands each per-step log dict (loss, learning_rate, grad_norm, rewards/…) to ``on_log``.

    Steps ``<= skip_through`` are dropped: after resuming from a checkpoint the caller has
    already recorded them. The end-of-training summary (train_runtime, …) is not forwarded;
    it is kept in ``summary``.
    """

    def __init__(self, on_log: OnLog | None, skip_through: int = 0):
        self.sink = on_log  # not `self.on_log`: that name is the hook itself
        self.skip_through = skip_through
        self.summary: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.steps: list[int] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - transformers hook
        if not logs:
            return
        values = _numeric(logs)
        if SUMMARY_KEYS & values.keys():
            self.summary.update(values)
            return
        step = int(state.global_step)
        if step <= self.skip_through or not values:
            return
        self.last = values
        self.steps.append(step)
        if self.sink is not None:
            self.sink(values, step)


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first logged non-finite loss or grad_norm.

    The trainer cannot raise from a callback cleanly (it would skip its own clean-up), so the
    guard sets ``should_training_stop`` and records the failure; :func:`train` raises
    :class:`TrainingDiverged` after ``trainer.train()`` returns. This only works because
    ``logging_nan_inf_filter=False`` (transformers' default replaces NaN losses by the running mean).
    """

    def __init__(self):
        self.diverged: TrainingDiverged | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.diverged is not None:
            return
        for key in GUARDED_KEYS:
            value = logs.get(key)
            if value is None:
                continue
            value = float(value.item() if hasattr(value, "item") else value)
            if not math.isfinite(value):
                self.diverged = TrainingDiverged(key, value, int(state.global_step))
                log.error("%s", self.diverged)
                control.should_training_stop = True
                control.should_save = False  # never checkpoint the diverged weights
                return


class MemorySampler(TrainerCallback):
    """Peak resident memory (CPU) sampled at each step; CUDA peaks come from torch directly."""

    def __init__(self):
        self.peak_rss = 0
        self._proc = None

    def sample(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a dependency
            return
        if self._proc is None:
            self._proc = psutil.Process()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def on_train_begin(self, args, state, control, **kwargs):
        self.sample()

    def on_step_end(self, args, state, control, **kwargs):
        self.sample()

    def on_train_end(self, args, state, control, **kwargs):
        self.sample()


class ProgressCallback(TrainerCallback):
    """Optimizer steps as a progress bar (log lines with an ETA when not on a terminal).

    transformers' own bar is off (``disable_tqdm=True``: its printer would write every log
    dict to stdout); this one reports through ``mlproject.progress`` with the latest loss.
    """

    def __init__(self, description: str = "training"):
        self.description = description
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        from mlproject.progress import task

        self.task = task(self.description, total=state.max_steps or None, unit="steps")
        self.task.update(completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.task.update(completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.task is not None and logs and "loss" in logs:
            try:
                self.task.update(postfix=f"loss {float(logs['loss']):.4f}")
            except (TypeError, ValueError):
                pass

    def on_train_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.task.update(completed=state.global_step)
        self.close()

    def close(self) -> None:
        if self.task is not None:
            self.task.close()
            self.task = None
