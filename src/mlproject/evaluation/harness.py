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

# The accuracy-like metric a task contributes to avg_acc: the first one it reports. A code
# task (humaneval, mbpp, code_offline …) reports only pass_at_k, and counts with pass_at_1.
PREFERRED_METRICS = ("acc_norm", "acc", "math_verify", "exact_match", "f1", "em", "mc2", "mc1",
                     "pass_at_1")
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
    from mlproject.evaluation.tasks import BUNDLED_TASKS

    return task_manager(with_defaults=not set(tasks) <= set(BUNDLED_TASKS))


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
    if value in (None, "", "none", "all", 0, "0"):
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
    code: Any = None  # code.lmeval.CodeRun when code tasks ran (per-problem records, gates)
    # with log_samples: {task: [{"doc_id": i, "filter": f, "doc_hash": h, <metric>: value, …}]}
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
    code=None,
    samples: dict[str, list[int]] | None = None,
    log_samples: bool = False,
) -> HarnessResult:
    """Run lm-eval on an already loaded model (loaded once, shared with PPL).

    ``samples``: explicit document indices per (leaf) task instead of ``limit`` (the search
    scores nested random subsets); ``log_samples``: keep each document's metric values.

    Code tasks (``evaluation.code.tasks``) go through ``evaluation.code.lmeval``: lm-eval
    generates, mlproject's sandbox runs the programs (``code``: a ``CodeSettings``).

    Under a distributed launch this is lm-eval's data-parallel mode: every rank holds its own
    copy of the model, scores every ``world_size``-th document of each task, and lm-eval gathers
    the per-document results on rank 0 before aggregating; the aggregate is then sent to every
    rank, so all ranks return the same numbers. (Code tasks run in one process only.)
    """
    from lm_eval.models.huggingface import HFLM

    from mlproject import distributed
    from mlproject.evaluation.code.tasks import is_code_task
    from mlproject.progress import route_tqdm

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    code_tasks = [t for t in tasks if is_code_task(t)]
    if distributed.active():
        if code_tasks:
            raise UserError(f"code tasks ({', '.join(code_tasks)}) run in one process; evaluate them with nproc=1")
        _data_parallel(lm)
    other = [t for t in tasks if t not in code_tasks]
    raw: dict = {}
    per_doc = None
    code_run = None
    # lm-eval draws its own tqdm bars (building contexts, tokenizing, the request loops: most of
    # an evaluation's time); routed, they show as our bars in a terminal and as log lines with
    # an ETA elsewhere.
    with route_tqdm(*LM_EVAL_TQDM_MODULES, prefix="lm-eval: ", default="building requests"):
        if other:
            raw, per_doc = _run_lm_eval(lm, other, limit=limit, num_fewshot=num_fewshot, seed=seed,
                                        apply_chat_template=apply_chat_template, samples=samples,
                                        log_samples=log_samples)
        if code_tasks:
            from mlproject.evaluation.code.lmeval import run_code_tasks
            from mlproject.evaluation.code.scoring import CodeSettings

            code_run = run_code_tasks(lm, code_tasks, settings=code or CodeSettings(),
                                      task_manager=task_manager_for(tasks), limit=limit,
                                      num_fewshot=num_fewshot, seed=seed,
                                      apply_chat_template=apply_chat_template)
            raw = _merge(raw, serializable(code_run.raw))
    metrics = flatten_metrics(raw.get("results", {}))
    avg, chosen = mean_accuracy(raw.get("results", {}), tasks)
    return HarnessResult(raw=raw, metrics=metrics, avg_acc=avg, avg_metrics=chosen, code=code_run,
                         samples=per_doc)


def _merge(a: dict, b: dict) -> dict:
    """Two lm-eval results JSONs as one: per-task tables joined, a's scalars kept."""
    out = dict(b)
    out.update({k: v for k, v in a.items() if not isinstance(v, dict)})
    for k in set(a) | set(b):
        if isinstance(a.get(k), dict) or isinstance(b.get(k), dict):
            out[k] = {**(a.get(k) or {}), **(b.get(k) or {})}
    return out


def _run_lm_eval(lm, tasks: list[str], *, limit, num_fewshot, seed, apply_chat_template,
                 samples=None, log_samples=False) -> tuple[dict, dict | None]:
    """lm-eval's results JSON, and with ``log_samples`` the per-document numbers per task."""
    import lm_eval

    from mlproject import distributed

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
    per_doc = None
    if results is not None and log_samples:
        per_doc = {task: [_numeric_sample(s) for s in rows] for task, rows in (results.get("samples") or {}).items()}
    # lm-eval returns the results on rank 0 only.
    return distributed.broadcast_object((serializable(dict(results)), per_doc) if results is not None else None)


def _numeric_sample(sample: dict) -> dict[str, Any]:
    """A logged sample reduced to its document id, filter and numeric per-document metric values."""
    out: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "filter": str(sample.get("filter") or "none")}
    if sample.get("doc_hash"):  # pairs two runs' documents only when the text agrees (documents.py)
        out["doc_hash"] = str(sample["doc_hash"])
    for key, value in sample.items():
        if key in ("doc_id", "filter", "doc", "arguments", "resps", "filtered_resps", "target", "metrics") or key.endswith("_hash"):
            continue
        if isinstance(value, (int, float)):  # bools too: some tasks log correctness as True/False
            out[key] = float(value)
    return out


class _Collectives:
    """The three things lm-eval's HFLM asks of ``self.accelerator`` in data-parallel mode, on the
    launch's process group (any backend: gloo on CPU, NCCL on GPUs)."""

    def gather(self, tensor):
        """Every rank's ``tensor`` concatenated along dim 0 (a 0-d tensor counts as shape [1])."""
        import torch
        import torch.distributed as dist

        t = tensor.reshape(1) if tensor.ndim == 0 else tensor.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def wait_for_everyone(self) -> None:
        from mlproject import distributed

        distributed.barrier()

    def unwrap_model(self, model):
        return model


def _data_parallel(lm) -> None:
    """Switch an HFLM built around a model object to lm-eval's data-parallel mode.

    HFLM enables that mode only when it loads the model itself from a name on several GPUs
    (``gpus > 1``; never on CPU), and for a model object it logs "assuming single-process call
    to evaluate() or custom distributed integration" and sets rank 0 of 1: every rank would
    then score every document. This is that custom integration: the rank and world size of the
    launch (the *global* rank: HFLM's own uses accelerate's local process index, which repeats
    on every node) and collectives on the launch's process group.
    """
    from mlproject import distributed

    distributed.init()
    lm._rank = distributed.rank()
    lm._world_size = distributed.world_size()
    lm.accelerator = _Collectives()
    log.info("lm-eval data-parallel: rank %d of %d", lm._rank, lm._world_size)


#: Modules whose module-level ``tqdm`` lm-eval uses with HF models: api.task (building
#: contexts), api.model (tokenizing), models.huggingface (loglikelihood / generate_until).
LM_EVAL_TQDM_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def serializable(results: dict) -> dict:
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
            "higher_is_better", "n-samples", "config", "git_hash", "date", "total_evaluation_time_seconds",
            "mlproject_code")
    import json

    return json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=str))


def split_key(key: str) -> tuple[str, str]:
    """'acc,none' -> ('acc', 'none')."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def metric_name(task: str, key: str) -> str:
    metric, filt = split_key(key)
    return f"{task}/{metric}" if filt == "none" else f"{task}/{metric}.{filt}"


#: Keys of lm-eval's per-task results that describe the run, not the model: ``sample_len`` is
#: the number of documents scored (in ``n-samples`` and the logged datasets, not a metric).
NOT_SCORES = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})


def flatten_metrics(task_results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every numeric task/group metric, stderr included, under its MLflow name."""
    out: dict[str, float] = {}
    for task, values in task_results.items():
        for key, value in values.items():
            if key in NOT_SCORES or isinstance(value, (str, bool)) or value is None:
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
