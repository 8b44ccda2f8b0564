"""The evaluate step end to end on tiny models, recorded in a real `mlflow server`."""

import json
import math

import pytest

import tiny
from conftest import mlflow_client
from mlproject.config import EvaluateConfig
from mlproject.steps import evaluate
from test_perplexity import hand_ppl


def run_eval(uri, model_dir, ppl_file, **kw):
    cfg = EvaluateConfig(model=str(model_dir), tasks=kw.pop("tasks", "offline"), limit=kw.pop("limit", "6"),
                         batch_size="8", ppl_dataset=str(ppl_file), seqlen=kw.pop("seqlen", 32),
                         experiment=kw.pop("experiment", "test-evaluate"), tracking_uri=uri, **kw)
    return evaluate.run(cfg)


@pytest.fixture(scope="module")
def llama_run(mlflow_uri, tiny_dirs, ppl_text_file):
    result = run_eval(mlflow_uri, tiny_dirs["llama"], ppl_text_file, run_name="evaluate:tiny-llama")
    return result, mlflow_client(mlflow_uri).get_run(result.run_id)


def test_run_is_recorded_on_the_server(llama_run, tiny_dirs):
    result, run = llama_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "evaluate:tiny-llama"
    tags = run.data.tags
    assert tags["mlproject.step"] == "evaluate"
    assert tags["mlproject.model"] == str(tiny_dirs["llama"])
    assert tags["mlproject.role"] == "base"
    assert tags["mlproject.family"] == "llama"
    assert len(tags["mlproject.cache_key"]) == 24
    assert tags["env.python"] and tags["env.pkg.torch"] and tags["env.pkg.lm_eval"]
    params = run.data.params
    assert params["tasks"] == "mlp_capitals,mlp_arith,mlp_nonce"
    assert params["limit"] == "6" and params["batch_size"] == "8" and params["ppl.seqlen"] == "32"
    m = run.data.metrics
    assert m["params_b"] == pytest.approx(115008 / 1e9)
    # the weights at the dtype the run used (dtype=auto: float32 on CPU, bfloat16 on CUDA) plus
    # the rotary-embedding buffers
    nbytes = run_dtype(run).itemsize
    assert 115008 * nbytes / 2**20 <= m["model_size_mb"] < 115008 * nbytes / 2**20 + 0.01
    assert m["peak_rss_mb"] > 50 and m["eval_seconds"] > 0
    if params["device"].startswith("cuda"):
        assert m["peak_vram_mb"] > 0


def run_dtype(run):
    import torch

    return getattr(torch, run.data.params["model_dtype"].removeprefix("torch."))


def ppl_rel(dtype) -> float:
    """Agreement to expect between two computations of one PPL: float32 sums in another order
    differ in the 6th digit; bfloat16/float16 logits only carry 2-3 digits."""
    import torch

    return 1e-5 if dtype == torch.float32 else 2e-2


def test_logged_ppl_equals_hand_computation(llama_run, tiny_dirs, ppl_text_file):
    _, run = llama_run
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # by hand, with the model on the device and in the dtype the run used
    dtype = run_dtype(run)
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=dtype).to(run.data.params["device"])
    ids = tok(ppl_text_file.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    # limit=6 with ppl_windows=-1 (auto): the first 6 windows of 32 tokens
    windows = min(6, ids.numel() // 32)
    expected = hand_ppl(model, ids[:windows * 32], 32)
    assert run.data.metrics["ppl/sample"] == pytest.approx(expected, rel=ppl_rel(dtype))
    assert run.data.metrics["nll/sample"] == pytest.approx(math.log(expected), rel=ppl_rel(dtype))
    assert int(run.data.params["ppl.windows"]) == windows
    assert int(run.data.params["ppl.windows_total"]) == ids.numel() // 32


def test_logged_task_metrics_equal_the_lm_eval_json(llama_run, mlflow_uri, tmp_path):
    from mlproject.evaluation import harness

    result, run = llama_run
    client = mlflow_client(mlflow_uri)
    raw = json.loads(open(client.download_artifacts(run.info.run_id, "lm_eval/results.json", str(tmp_path))).read())
    checked = 0
    for task, values in raw["results"].items():
        for key, value in values.items():
            if key in harness.NOT_SCORES or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" if filt in ("none", "") else f"{task}/{metric}.{filt}"
            assert run.data.metrics[name] == pytest.approx(value), name
            checked += 1
    assert checked >= 12  # acc, acc_norm and their stderr for three tasks
    # sample_len (documents scored) describes the run, not the model: not a metric
    assert not [k for k in run.data.metrics if k.endswith("/sample_len")]
    used = json.loads(run.data.tags["mlproject.avg_acc_metrics"])
    assert used == {"mlp_capitals": "acc_norm", "mlp_arith": "acc_norm", "mlp_nonce": "acc_norm"}
    expected_avg = sum(raw["results"][t]["acc_norm,none"] for t in used) / 3
    assert run.data.metrics["avg_acc"] == pytest.approx(expected_avg)
    assert result.avg_acc == pytest.approx(expected_avg)


def test_report_has_the_sections_and_the_runs_numbers(llama_run, mlflow_uri, tmp_path):
    _, run = llama_run
    client = mlflow_client(mlflow_uri)
    md = open(client.download_artifacts(run.info.run_id, "report.md", str(tmp_path))).read()
    for section in ("## Run info", "## Datasets", "## Parameters", "## Perplexity", "## lm-eval results",
                    "## Mean accuracy", "## System metrics", "## Environment"):
        assert section in md
    m = run.data.metrics
    assert f"{m['ppl/sample']:.4f}" in md
    assert f"avg_acc = {m['avg_acc']:.4f}" in md
    assert f"| mlp_arith | acc_norm | none | {m['mlp_arith/acc_norm']:.4f} | {m['mlp_arith/acc_norm_stderr']:.4f} |" in md
    assert run.info.run_id in md
    env = json.loads(open(client.download_artifacts(run.info.run_id, "env.json", str(tmp_path))).read())
    assert env["python"] and "pkg.transformers" in env


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_go_through_evaluate(arch, mlflow_uri, tiny_dirs, ppl_text_file):
    result = run_eval(mlflow_uri, tiny_dirs[arch], ppl_text_file, tasks="mlp_capitals", limit="4")
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlproject.family"] == arch
    assert "ppl/sample" in run.data.metrics and "mlp_capitals/acc" in run.data.metrics


def test_failure_marks_the_run_failed_with_the_error(mlflow_uri, tiny_dirs, ppl_text_file, monkeypatch):
    from mlproject.evaluation import harness

    def boom(*a, **k):
        raise RuntimeError("harness exploded on purpose")

    monkeypatch.setattr(harness, "run_tasks", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_eval(mlflow_uri, tiny_dirs["llama"], ppl_text_file, experiment="test-failure")
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name("test-failure")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert "harness exploded on purpose" in runs[0].data.tags["mlproject.error"]
    # what was measured before the failure is kept
    assert "ppl/sample" in runs[0].data.metrics


def test_runs_model_reference_carries_lineage(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    """A model logged by a run feeds evaluate as runs:/<id>/model, with upstream tags."""
    import mlflow

    from mlproject import tracking
    from mlproject.models.loading import write_meta

    model_dir = tmp_path / "model"
    tiny.save_tiny(model_dir, "llama", seed=3)
    mlflow.set_tracking_uri(mlflow_uri)
    with tracking.step_run("prune", experiment="test-lineage", log_env=False) as producer:
        write_meta(model_dir, base_model="smollm2", family="SmolLM2-Instruct", run_id=producer.run_id)
        producer.log_artifacts(model_dir, "model")
    result = run_eval(mlflow_uri, f"runs:/{producer.run_id}/model", ppl_text_file, tasks="none",
                      experiment="test-lineage")
    tags = mlflow_client(mlflow_uri).get_run(result.run_id).data.tags
    assert tags["mlproject.upstream_run"] == producer.run_id
    assert tags["mlproject.base_model"] == "smollm2"
    assert tags["mlproject.family"] == "SmolLM2-Instruct"
    assert tags["mlproject.role"] == "eval"
