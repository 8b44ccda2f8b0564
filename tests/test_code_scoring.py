"""pass@k, task metrics and timing of code completions; the bundled code_offline problems."""

from __future__ import annotations

import doctest
import json
import math

import pytest

from mlproject.evaluation.code import scoring, tasks
from mlproject.evaluation.code.sandbox import Limits
from mlproject.evaluation.code.scoring import CodeProblem, CodeSettings, pass_at_k
from mlproject.evaluation.tasks import tasks_root

DOCS = [json.loads(line) for line in
        (tasks_root() / "code_offline" / "test.jsonl").read_text().splitlines()]
BY_NAME = {d["entry_point"]: d for d in DOCS}


def test_pass_at_k_equals_the_hand_computation():
    # n = 5 samples, c = 2 correct: 1 - C(3, k) / C(5, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(1 - 3 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)
    assert pass_at_k(5, 2, 4) == 1.0  # fewer than k wrong samples: some draw of k passes
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_task_metrics_average_problems_and_time_ratio_is_geometric():
    recs = [
        {"pass_at_1": pass_at_k(4, 1, 1), "pass_at_2": pass_at_k(4, 1, 2), "time_s": 0.2,
         "time_ratio": 4.0},
        {"pass_at_1": 0.0, "pass_at_2": 0.0, "time_s": None, "time_ratio": None},
        {"pass_at_1": 1.0, "pass_at_2": 1.0, "time_s": 0.1, "time_ratio": 0.25},
    ]
    m = scoring.task_metrics(recs, ks=(1, 2))
    assert m["pass_at_1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["pass_at_2"] == pytest.approx((0.5 + 0 + 1) / 3)
    p = [0.25, 0.0, 1.0]
    mean = sum(p) / 3
    assert m["pass_at_1_stderr"] == pytest.approx(
        math.sqrt(sum((x - mean) ** 2 for x in p) / 2 / 3))
    assert m["timed"] == 2 and m["avg_time_s"] == pytest.approx(0.15)
    assert m["time_ratio"] == pytest.approx(1.0)  # 4x slower and 4x faster cancel


def _problem(name: str, *bodies: str) -> CodeProblem:
    d = BY_NAME[name]
    return CodeProblem(task="code_offline", problem_id=d["task_id"], completions=list(bodies),
                       programs=[d["prompt"] + b for b in bodies],
                       test=f"{d['test']}\ncheck({d['entry_point']})",
                       reference=d["prompt"] + d["canonical_solution"],
                       timing_setup=d["timing_setup"], timing_stmt=d["timing_stmt"])


def test_hostile_completions_fail_their_problem_not_the_run():
    probs = [
        _problem("add", "    return a + b\n"),
        _problem("sum_list", "    while True:\n        pass\n"),
        _problem("max_of_list", "    import os\n    while True:\n        os.fork()\n"),
        _problem("count_vowels", "    x = bytearray(10 ** 11)\n"),
        _problem("reverse_string", "    return s[::-1\n"),
        _problem("is_even", "    return n % 2 == 1\n"),
    ]
    res = scoring.score(probs, CodeSettings(limits=Limits(timeout_s=1.0, memory_mb=256),
                                            timing_repeats=1, timing_budget_s=0.5))
    status = {r["id"]: r["status"] for r in res.problems}
    assert list(status.values()) == ["passed", "timeout", "forbidden", "memory",
                                     "syntax_error", "wrong_answer"]
    assert res.metrics["pass_at_1"] == pytest.approx(1 / 6)
    assert res.metrics["timed"] == 1 and res.problems[0]["time_s"] > 0
    assert res.statuses["passed"] == 1
    art = res.artifact(CodeSettings())
    assert art["problems"][1]["error"].startswith("killed after")
    assert json.loads(json.dumps(art)) == art  # logged as JSON as it is


def test_n_samples_give_pass_at_k_per_problem():
    right, wrong = "    return a + b\n", "    return a - b\n"
    res = scoring.score([_problem("add", right, wrong, wrong, wrong),
                         _problem("gcd", "    return 0\n", "    return 1\n", "    return 1\n",
                                  "    return 1\n")],
                        CodeSettings(samples=4, timing_repeats=0))
    first, second = res.problems
    assert (first["n"], first["c"]) == (4, 1) and second["c"] == 0
    assert first["pass_at_1"] == pytest.approx(0.25)
    assert res.metrics["pass_at_1"] == pytest.approx(0.125)
    assert first["statuses"] == {"passed": 1, "wrong_answer": 3}
    assert res.metrics["timed"] == 0 and "avg_time_s" not in res.metrics  # timing off


@pytest.mark.parametrize("name", ["remove_duplicates", "has_duplicates"])
def test_timing_tells_a_quadratic_solution_from_the_reference(name):
    d = BY_NAME[name]
    probs = [_problem(name, d["canonical_solution"]), _problem(name, d["slow_solution"])]
    probs[1].problem_id += "/slow"
    res = scoring.score(probs, CodeSettings(timing_repeats=3, timing_budget_s=2))
    same, slow = res.problems
    assert same["status"] == slow["status"] == "passed"
    # orderings, not times: the O(n^2) body is slower than the reference and than a copy of it
    assert slow["time_ratio"] > same["time_ratio"]
    assert slow["time_s"] > same["time_s"] and slow["time_s"] > slow["ref_time_s"]


def test_code_offline_documents():
    assert len(DOCS) >= 40
    assert len({d["entry_point"] for d in DOCS}) == len(DOCS)
    assert sum(d["heavy"] for d in DOCS) >= 10
    for d in DOCS:
        assert d["prompt"].startswith(f"def {d['entry_point']}(") and d["timing_stmt"]
        assert d["heavy"] == (d["slow_solution"] is not None)
        # the docstring examples are right (they were computed from the reference)
        ns: dict = {}
        exec(d["prompt"] + d["canonical_solution"], ns)  # noqa: S102 - our own reference
        runner = doctest.DocTestRunner(verbose=False)
        for test in doctest.DocTestFinder().find(ns[d["entry_point"]], d["entry_point"],
                                                 globs=ns):
            runner.run(test)
        assert runner.failures == 0 and runner.tries >= 1, d["entry_point"]


def test_every_reference_and_slow_solution_passes_in_the_sandbox():
    probs = [_problem(d["entry_point"], d["canonical_solution"]) for d in DOCS]
    probs += [_problem(d["entry_point"], d["slow_solution"]) for d in DOCS if d["slow_solution"]]
    res = scoring.score(probs, CodeSettings(timing_repeats=0))
    assert res.metrics["pass_at_1"] == 1.0, [p for p in res.problems if p["status"] != "passed"]


def test_adapters_build_programs_as_the_tasks_score_them():
    d = BY_NAME["add"]
    sample = {"doc_id": 0, "doc": d, "target": d["test"] + "\ncheck(add)",
              "resps": [["    return a + b\n", "    return a - b\n"]]}
    p = tasks.problems("code_offline", [sample])[0]
    assert p.programs == [d["prompt"] + "    return a + b\n", d["prompt"] + "    return a - b\n"]
    assert p.reference == d["prompt"] + d["canonical_solution"] and p.timing_stmt == d["timing_stmt"]
    mbpp = {"doc_id": 3, "doc": {"task_id": 11, "code": "def f(x):\n    return x"},
            "target": "assert f(1) == 1", "resps": [["def f(x):\n    return x\n"]]}
    p = tasks.problems("mbpp", [mbpp])[0]
    assert (p.problem_id, p.programs, p.reference, p.timing_stmt) == (
        "11", ["def f(x):\n    return x\n"], "def f(x):\n    return x", None)
    assert tasks.is_code_task("humaneval_plus") and not tasks.is_code_task("mlp_arith")
