"""Which lm-eval tasks are code tasks, and how a logged sample becomes a :class:`CodeProblem`.

lm-eval generates (each task's own prompt, stop sequences and greedy settings); these adapters
turn each logged sample (``doc``, ``target``, raw ``resps``) into the program to run, its
tests, the reference solution and the timing input, following what the task's own scoring
would execute:

* ``humaneval``, ``humaneval_plus`` (lm-eval's ``build_predictions`` filter): program =
  ``doc["prompt"] + completion``; tests = the target (``{{test}}\\ncheck({{entry_point}})``);
  reference = ``prompt + canonical_solution``; timing input = the tests themselves.
* ``mbpp``, ``mbpp_plus`` (no filter): program = the completion (generated up to ``[DONE]``);
  tests = the target (the asserts); reference = ``doc["code"]``; timing input = the tests.
* ``code_offline`` (bundled): as humaneval, with its own timing input (``timing_setup`` /
  ``timing_stmt``) sized to separate complexity classes.

Raw ``resps`` rather than lm-eval's ``filtered_resps``: its default ``take_first`` filter keeps
one completion, and pass@k needs all n.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlproject.evaluation.code.scoring import CodeProblem

#: lm-eval's own code tasks: loading them imports the task's utils.py, which loads HF
#: `evaluate`'s code_eval and runs its fixed self-test, so they need HF_ALLOW_CODE_EVAL=1.
HUB_CODE_TASKS = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")
BUNDLED_CODE_TASKS = ("code_offline",)


def _completions(sample: dict[str, Any]) -> list[str]:
    resps = sample.get("resps") or [[]]
    first = resps[0]
    return [str(r) for r in (first if isinstance(first, list) else [first])]


def _problem_id(task: str, sample: dict[str, Any]) -> str:
    doc = sample.get("doc") or {}
    return str(doc.get("task_id", f"{task}/{sample.get('doc_id')}"))


def humaneval_like(task: str, sample: dict[str, Any]) -> CodeProblem:
    doc = sample["doc"]
    completions = _completions(sample)
    return CodeProblem(
        task=task, problem_id=_problem_id(task, sample), completions=completions,
        programs=[doc["prompt"] + c for c in completions], test=str(sample["target"]),
        reference=doc["prompt"] + doc["canonical_solution"] if doc.get("canonical_solution")
        else None,
        timing_setup=doc.get("timing_setup") or "", timing_stmt=doc.get("timing_stmt") or None)


def mbpp_like(task: str, sample: dict[str, Any]) -> CodeProblem:
    doc = sample["doc"]
    completions = _completions(sample)
    return CodeProblem(
        task=task, problem_id=_problem_id(task, sample), completions=completions,
        programs=list(completions), test=str(sample["target"]), reference=doc.get("code"))


ADAPTERS: dict[str, Callable[[str, dict[str, Any]], CodeProblem]] = {
    "humaneval": humaneval_like, "humaneval_plus": humaneval_like,
    "mbpp": mbpp_like, "mbpp_plus": mbpp_like,
    "code_offline": humaneval_like,
}


def is_code_task(name: str) -> bool:
    return name in ADAPTERS


def problems(task: str, samples: list[dict[str, Any]]) -> list[CodeProblem]:
    adapt = ADAPTERS[task]
    return [adapt(task, s) for s in sorted(samples, key=lambda s: s.get("doc_id", 0))]
