"""Whether an evaluation's generation tasks fit a model's context, known before the weights load.

lm-eval's HFLM keeps ``max_gen_toks`` of a model's positions for each generated answer and
asserts that some are left for the prompt, but only once the model has loaded and the step's
run has opened (the run then ends FAILED with a traceback). The model's config (read without
weights) and the tasks' generation settings tell the same thing up front.
"""

from __future__ import annotations

import logging

from mlproject.errors import UserError
from mlproject.evaluation import harness

log = logging.getLogger(__name__)

# lm-eval's HFLM generates this many tokens when a task's generation_kwargs name no length.
DEFAULT_MAX_GEN_TOKS = 256
#: lm-eval's own tasks of our suites (suites.yaml) that are scored by log-likelihood: they
#: generate nothing, so checking them needs no look into lm-eval's ~10k-file task index.
LOGLIKELIHOOD_TASKS = frozenset({"boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                 "openbookqa", "mmlu", "mmlu_stem"})


def may_generate(tasks: list[str]) -> bool:
    """Whether a task of ``tasks`` may generate text (cheap: bundled YAML and the list above)."""
    from mlproject.evaluation.tasks import BUNDLED_TASKS

    if any(t not in BUNDLED_TASKS and t not in LOGLIKELIHOOD_TASKS for t in tasks):
        return True
    return bool(generation_lengths([t for t in tasks if t in BUNDLED_TASKS]))


def generation_lengths(tasks: list[str]) -> dict[str, int]:
    """task -> the most tokens it generates per answer (``max_gen_toks``), for the generation
    tasks whose settings can be read without loading the task: the bundled ones from their
    YAML, lm-eval's own from its task index (which the run builds anyway). Multiple-choice
    tasks, groups and anything unreadable are left out (nothing to check before the run)."""
    from mlproject.evaluation.tasks import BUNDLED_TASKS, tasks_root

    out: dict[str, int] = {}
    tasks = [t for t in tasks if t not in LOGLIKELIHOOD_TASKS]
    hub = [t for t in tasks if t not in BUNDLED_TASKS]
    index = _task_index(hub) if hub else {}
    for task in tasks:
        try:
            cfg = _bundled_config(tasks_root(), task) if task in BUNDLED_TASKS else _hub_config(index.get(task))
        except Exception as exc:  # noqa: BLE001 - lm-eval's internals vary by version: check after loading
            log.debug("generation settings of %s unreadable: %s", task, exc)
            continue
        if not cfg or cfg.get("output_type") != "generate_until":
            continue
        gen = cfg.get("generation_kwargs") or {}
        n = gen.get("max_gen_toks", gen.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS))
        if isinstance(n, int) and n > 0:
            out[task] = n
    return out


def _bundled_config(root, task: str) -> dict:
    import yaml

    return yaml.safe_load((root / task / f"{task}.yaml").read_text(encoding="utf-8"))


def _task_index(tasks: list[str]) -> dict:
    try:
        return harness.task_manager_for(tasks).task_index
    except Exception as exc:  # noqa: BLE001 - as above
        log.debug("lm-eval task index unavailable: %s", exc)
        return {}


def _hub_config(entry) -> dict | None:
    """A single task's full YAML config (``include:`` resolved, ``!function`` left unresolved:
    resolving would import the task's utils.py, which for code tasks runs a self-test)."""
    if entry is None or getattr(entry, "yaml_path", None) is None or entry.kind.name != "TASK":
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(entry.yaml_path, resolve_func=False)


def context_length(config) -> int | None:
    """The context (positions) lm-eval's HFLM gives a model with this transformers config: the
    nested ``text_config`` first, then ``n_positions``, ``max_position_embeddings``, ``n_ctx``
    (as ``lm_eval.models.utils.resolve_max_length``); None when the config names none."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_generation_fits(tasks: list[str], context: int | None, model: str) -> None:
    """Refuse (one line) generation tasks that cannot run on a model with ``context`` positions:
    lm-eval keeps ``max_gen_toks`` of them for the answer and asserts that some are left for
    the prompt, after the model has loaded and the run has opened."""
    if not context:
        return
    too_long = {t: n for t, n in generation_lengths(tasks).items() if n >= context}
    if not too_long:
        return
    task, n = max(too_long.items(), key=lambda kv: kv[1])
    others = [t for t in tasks if t not in too_long]
    without = f"tasks={','.join(others)}" if others else "tasks=none"
    raise UserError(
        f"model {model!r} has a context of {context} tokens, but task {task} generates up to {n} "
        f"(max_gen_toks), which leaves no room for the prompt"
        + (f" (also: {', '.join(t for t in too_long if t != task)})" if len(too_long) > 1 else "")
        + f"; what to do: use a model with a longer context (e.g. model=smollm2, 8192 tokens) or "
        f"leave {'those tasks' if len(too_long) > 1 else 'it'} out ({without})")
