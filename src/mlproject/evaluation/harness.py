"""lm-evaluation-harness: task suites, running tasks on a loaded model, and reading results.

Task names and suites come from one table (``suites.yaml``); bundled offline tasks live in
``evaluation/tasks``. Metric keys become MLflow names ``<task>/<metric>`` (``acc,none`` ->
``acc``; another filter ``f`` -> ``<metric>.<f>``, e.g. ``gsm8k/exact_match.flexible-extract``).
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import math
from dataclasses import dataclass
from typing import Any

from mlproject.errors import UserError

log = logging.getLogger(__name__)

# The accuracy-like metric a task contributes to avg_acc: the first one it reports.
PREFERRED_METRICS = ("acc_norm", "acc", "math_verify", "exact_match", "f1", "em", "mc2", "mc1")
# For metrics reported under several filters: flexible-extract beats strict-match.
PREFERRED_FILTERS = ("none", "flexible-extract", "strict-match")


@functools.cache
def suites() -> dict[str, list[str]]:
    import yaml

    from mlproject.evaluation.tasks import OFFLINE_TASKS

    raw = yaml.safe_load(importlib.resources.files("mlproject.evaluation").joinpath("suites.yaml").read_text())
    return {name: list(OFFLINE_TASKS) if members == "@bundled" else list(members)
            for name, members in raw.items()}


def known_tasks() -> set[str]:
    return {t for members in suites().values() for t in members}


def expand_tasks(spec: str) -> list[str]:
    """'zeroshot7,mlp_capitals' -> the task list, in order, without duplicates."""
    out: list[str] = []
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item or item == "none":
            continue
        for task in suites().get(item, [item]):
            if task not in out:
                out.append(task)
    return out


@functools.cache
def task_manager(with_defaults: bool = True):
    """lm-eval's task index plus the bundled tasks. Indexing lm-eval's own ~10k task files
    takes seconds, so runs that need only bundled tasks skip it (with_defaults=False)."""
    from lm_eval.tasks import TaskManager

    from mlproject.evaluation.tasks import include_path

    return TaskManager(include_path=str(include_path()), include_defaults=with_defaults)


def task_manager_for(tasks: list[str]):
    from mlproject.evaluation.tasks import OFFLINE_TASKS

    return task_manager(with_defaults=not set(tasks) <= set(OFFLINE_TASKS))


def validate_tasks(tasks: list[str]) -> None:
    """Unknown task names fail with one line; lm-eval's index is consulted only if needed."""
    unknown = [t for t in tasks if t not in known_tasks()]
    if not unknown:
        return
    import difflib

    available = set(task_manager().all_tasks)
    missing = [t for t in unknown if t not in available]
    if missing:
        hints = difflib.get_close_matches(missing[0], sorted(available | set(suites())), n=3)
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise UserError(
            f"unknown task {missing[0]!r}{hint}; suites: {', '.join(suites())}"
        )


def parse_limit(value: str | float | int | None) -> int | float | None:
    """'' / 0 / None -> all documents; '0.2' -> 20% of each task; '50' -> 50 documents."""
    if value in (None, "", "none", 0, "0"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"limit {value!r} is not a number (an int count or a fraction in (0, 1])") from None
    if number <= 0 or math.isnan(number):
        raise UserError(f"limit {value!r} must be positive")
    if number <= 1 and "." in str(value):
        return number
    if not number.is_integer():
        raise UserError(f"limit {value!r}: use a whole count or a fraction in (0, 1]")
    return int(number)


def parse_batch_size(value: str | int) -> int | str:
    s = str(value).strip()
    if s == "auto" or s.startswith("auto:"):
        return s
    try:
        n = int(s)
    except ValueError:
        raise UserError(f"batch_size {value!r} is not a positive integer or 'auto'") from None
    if n < 1:
        raise UserError(f"batch_size {value!r} must be at least 1")
    return n


@dataclass
class HarnessResult:
    raw: dict  # lm-eval's results JSON (serializable part)
    metrics: dict[str, float]  # <task>/<metric> -> value, stderr included
    avg_acc: float | None
    avg_metrics: dict[str, str]  # task -> metric key used for avg_acc
    # with log_samples: {task: [{"doc_id": i, "filter": f, <metric>: per-document value, …}]}
    samples: dict[str, list[dict[str, Any]]] | None = None


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    seed: int = 42,
    apply_chat_template: bool = False,
    samples: dict[str, list[int]] | None = None,
    log_samples: bool = False,
) -> HarnessResult:
    """Run lm-eval on an already loaded model (loaded once, shared with PPL).

    ``samples``: explicit document indices per (leaf) task instead of ``limit`` (the search
    scores nested random subsets); ``log_samples``: keep each document's metric values."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        samples=samples,
        task_manager=task_manager_for(tasks),
        log_samples=log_samples,
        # Never share lm-eval's request cache: its key omits the model identity.
        use_cache=None,
        cache_requests=False,
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    raw = serializable(dict(results))
    metrics = flatten_metrics(raw.get("results", {}))
    avg, chosen = mean_accuracy(raw.get("results", {}), tasks)
    per_doc = None
    if log_samples:
        per_doc = {task: [_numeric_sample(s) for s in rows] for task, rows in (results.get("samples") or {}).items()}
    return HarnessResult(raw=raw, metrics=metrics, avg_acc=avg, avg_metrics=chosen, samples=per_doc)


def _numeric_sample(sample: dict) -> dict[str, Any]:
    """A logged sample reduced to its document id, filter and numeric per-document metric values."""
    out: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "filter": str(sample.get("filter") or "none")}
    for key, value in sample.items():
        if key in ("doc_id", "filter", "doc", "arguments", "resps", "filtered_resps", "target", "metrics") or key.endswith("_hash"):
            continue
        if isinstance(value, (int, float)):  # bools too: some tasks log correctness as True/False
            out[key] = float(value)
    return out


def serializable(results: dict) -> dict:
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
            "higher_is_better", "n-samples", "config", "git_hash", "date", "total_evaluation_time_seconds")
    import json

    return json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=str))


def split_key(key: str) -> tuple[str, str]:
    """'acc,none' -> ('acc', 'none')."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def metric_name(task: str, key: str) -> str:
    metric, filt = split_key(key)
    return f"{task}/{metric}" if filt == "none" else f"{task}/{metric}.{filt}"


def flatten_metrics(task_results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every numeric task/group metric, stderr included, under its MLflow name."""
    out: dict[str, float] = {}
    for task, values in task_results.items():
        for key, value in values.items():
            if key == "alias" or isinstance(value, (str, bool)) or value is None:
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out[metric_name(task, key)] = v
    return out


def preferred_metric(values: dict[str, Any]) -> str | None:
    """The lm-eval key (e.g. 'acc_norm,none') a task contributes to avg_acc."""
    numeric = {k for k, v in values.items() if k != "alias" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for metric in PREFERRED_METRICS:
        for filt in PREFERRED_FILTERS:
            key = f"{metric},{filt}"
            if key in numeric:
                return key
        for key in sorted(numeric):
            if split_key(key)[0] == metric:
                return key
    return None


def mean_accuracy(task_results: dict[str, dict[str, Any]], top_level: list[str]) -> tuple[float | None, dict[str, str]]:
    """avg_acc: the plain mean over the requested top-level tasks/groups, each counted once.

    A group (e.g. mmlu) contributes its own aggregate, never its subtasks; each task uses
    its preferred metric (acc_norm if reported, else acc, else math_verify / exact_match /
    f1 …). Returns the mean and {task: metric name used}.
    """
    chosen: dict[str, str] = {}
    values: list[float] = []
    for task in top_level:
        entry = task_results.get(task)
        if not entry:
            continue
        key = preferred_metric(entry)
        if key is None:
            continue
        chosen[task] = metric_name(task, key).split("/", 1)[1]
        values.append(float(entry[key]))
    return (sum(values) / len(values) if values else None), chosen
