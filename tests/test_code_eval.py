"""`evaluate --tasks code_offline` end to end on a tiny model, recorded in a real mlflow server."""

from __future__ import annotations

import json

import pytest

import tiny
from conftest import assert_bad_input, mlflow_client
from mlproject.config import EvaluateConfig
from mlproject.steps import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def code_run(mlflow_uri, tmp_path_factory):
    # The tiny models' default 256 positions cannot hold a prompt plus 256 generated tokens.
    model = tiny.save_tiny(tmp_path_factory.mktemp("tiny-code") / "llama", "llama",
                           max_position_embeddings=1024)
    cfg = EvaluateConfig(model=str(model), tasks="code_offline,mlp_arith", limit="3",
                         ppl_dataset="none", batch_size="8", code_timeout=5,
                         code_timing_repeats=2, experiment="test-code-eval", tracking_uri=mlflow_uri)
    result = evaluate.run(cfg)
    client = mlflow_client(mlflow_uri)
    return result, client.get_run(result.run_id), client


def _artifact(client, run, path, tmp_path):
    return open(client.download_artifacts(run.info.run_id, path, str(tmp_path))).read()


def test_code_metrics_are_logged_and_agree_with_the_per_problem_artifact(code_run, tmp_path):
    result, run, client = code_run
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    doc = json.loads(_artifact(client, run, "code/code_offline.json", tmp_path))
    probs = doc["problems"]
    assert [p["id"] for p in probs] == ["code_offline/0", "code_offline/1", "code_offline/2"]
    assert all(p["status"] in ("passed", "wrong_answer", "syntax_error", "error", "timeout",
                               "exit", "memory", "forbidden", "no_result", "killed")
               for p in probs)
    assert m["code_offline/pass_at_1"] == pytest.approx(sum(p["pass_at_1"] for p in probs) / 3)
    assert m["code_offline/timed"] == sum(p["time_s"] is not None for p in probs)
    assert ("code_offline/avg_time_s" in m) == (m["code_offline/timed"] > 0)
    assert not any("@" in k or "," in k for k in m)
    # a code task counts in avg_acc with pass_at_1, beside a multiple-choice task with acc_norm
    used = json.loads(run.data.tags["mlproject.avg_acc_metrics"])
    assert used == {"code_offline": "pass_at_1", "mlp_arith": "acc_norm"}
    assert m["avg_acc"] == pytest.approx((m["code_offline/pass_at_1"] + m["mlp_arith/acc_norm"]) / 2)
    raw = json.loads(_artifact(client, run, "lm_eval/results.json", tmp_path))
    assert raw["results"]["code_offline"]["pass_at_1,none"] == m["code_offline/pass_at_1"]
    assert not any(k.startswith(("bypass", "sample_len")) for k in raw["results"]["code_offline"])
    assert "code_offline/sample_len" not in m
    assert raw["mlproject_code"]["gates"]["confirm_run_unsafe_code"] == "true"


def test_unsafe_code_gates_are_recorded_in_params_tag_and_report(code_run, tmp_path):
    _, run, client = code_run
    p = run.data.params
    assert p["code.gate.confirm_run_unsafe_code"] == "true"
    assert p["code.gate.HF_ALLOW_CODE_EVAL"] == "not needed"  # only lm-eval's own code tasks
    assert p["code.samples"] == "1" and p["code.timeout_s"] == "5.0"
    assert p["code.timing_repeats"] == "2"
    assert "confirm_run_unsafe_code=true" in run.data.tags["mlproject.unsafe_code"]
    md = _artifact(client, run, "report.md", tmp_path)
    assert "## Code execution" in md and "`confirm_run_unsafe_code` = true" in md
    assert "| code_offline | 3 |" in md


def test_gate_env_is_opened_only_while_loading_hub_code_tasks(monkeypatch):
    import os

    from mlproject.evaluation.code import lmeval

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with lmeval.code_eval_gate(True):
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
    assert lmeval.gates_for(["humaneval", "mbpp"])["HF_ALLOW_CODE_EVAL"].startswith("1 (while")


def test_bad_code_parameters_are_user_errors(mlflow_uri, capsys, monkeypatch):
    for flag, value, needle in (("--code-samples", "0", "code_samples 0"),
                                ("--code-timeout", "-1", "code_timeout -1"),
                                ("--code-timing-repeats", "x", "code_timing_repeats 'x'")):
        assert_bad_input(["evaluate", "--tasks", "code_offline", flag, value], needle, mlflow_uri,
                         "test-code-bad", capsys, monkeypatch)


def test_a_context_too_short_for_the_generation_is_refused_before_loading(tiny_dirs, mlflow_uri, capsys,
                                                                           monkeypatch):
    # The tiny model has 256 positions and code_offline generates up to 256 tokens: lm-eval
    # would assert after the weights loaded and the run opened (the run ended FAILED).
    assert_bad_input(["evaluate", "--model", str(tiny_dirs["llama"]), "--tasks", "code_offline,mlp_arith",
                      "--ppl-dataset", "none"],
                     "has a context of 256 tokens, but task code_offline generates up to 256", mlflow_uri,
                     "test-code-context", capsys, monkeypatch)
    from mlproject.errors import UserError

    cfg = EvaluateConfig(model=str(tiny_dirs["llama"]), tasks="code_offline,mlp_arith", ppl_dataset="none",
                         tracking_uri=mlflow_uri)
    with pytest.raises(UserError) as info:
        evaluate.check(cfg)
    assert "model=smollm2" in str(info.value) and "(tasks=mlp_arith)" in str(info.value), info.value


def test_a_context_longer_than_the_generation_passes_the_check(tmp_path, mlflow_uri):
    model = tiny.save_tiny(tmp_path / "llama", "llama", max_position_embeddings=257)
    cfg = EvaluateConfig(model=str(model), tasks="code_offline", ppl_dataset="none", tracking_uri=mlflow_uri)
    evaluate.check(cfg)  # one position is left for the prompt: lm-eval runs (left-truncating it)


def test_generation_lengths_come_from_the_task_configs():
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks._index import Entry, Kind

    from mlproject.evaluation import context

    assert context.generation_lengths(["code_offline", "mlp_arith", "mlp_nonce"]) == {"code_offline": 256}
    # lm-eval's own tasks through their index entry (includes resolved); building the real index
    # takes lm-eval seconds to minutes, so the entries are made here.
    root = Path(lm_eval.tasks.__file__).parent
    index = {"humaneval": Entry("humaneval", Kind.TASK, root / "humaneval" / "humaneval.yaml"),
             "arc_easy": Entry("arc_easy", Kind.TASK, root / "arc" / "arc_easy.yaml"),
             "mmlu": Entry("mmlu", Kind.GROUP, None)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context, "_task_index", lambda tasks: index)
        assert context.generation_lengths(["humaneval", "arc_easy", "mmlu"]) == {"humaneval": 1024}


def test_multiple_choice_tasks_need_no_task_index_nor_model_config(monkeypatch):
    from mlproject.evaluation import context

    monkeypatch.setattr(context, "_task_index", lambda tasks: pytest.fail("built lm-eval's task index"))
    assert not context.may_generate(["boolq", "arc_easy", "mmlu", "mlp_arith"])  # suites' MC tasks + bundled
    assert context.may_generate(["boolq", "code_offline"])  # bundled generation task: its YAML says so
    assert context.may_generate(["gsm8k"])  # unknown here: lm-eval's index decides (the run builds it anyway)
