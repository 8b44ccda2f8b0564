"""The prune step end to end on tiny models, recorded in a real `mlflow server`."""

import pytest

import tiny
from conftest import assert_bad_input, mlflow_client
from mlproject.config import EvaluateConfig, PruneStepConfig
from mlproject.steps import evaluate, prune

EVAL = dict(limit="4", batch_size="8", seqlen=32)


def run_prune(uri, model, ppl_file, **kw):
    cfg = PruneStepConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri,
                          experiment=kw.pop("experiment", "test-prune"), tasks=kw.pop("tasks", "mlp_capitals"),
                          **{**EVAL, **kw})
    return prune.run(cfg)


@pytest.fixture(scope="module")
def pruned(mlflow_uri, tiny_dirs, ppl_text_file):
    result = run_prune(mlflow_uri, tiny_dirs["llama"], ppl_text_file, ratio=0.2)
    return result, mlflow_client(mlflow_uri).get_run(result.run_id)


def test_prune_run_is_recorded(pruned, tiny_dirs, mlflow_uri, tmp_path):
    result, run = pruned
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "prune:llama:mlp-0.2-activation"
    tags, params, m = run.data.tags, run.data.params, run.data.metrics
    assert tags["mlproject.step"] == "prune" and tags["mlproject.role"] == "pruned"
    assert tags["mlproject.family"] == "llama" and tags["mlproject.base_model"] == str(tiny_dirs["llama"])
    assert params["ratio"] == "0.2" and params["importance"] == "activation" and params["targets"] == "mlp"
    assert params["calibration"] == "offline"  # the defaults: activation on 8 x 256 tokens of the bundled text
    assert params["calibration.sequences"] == "8" and params["calibration.seqlen"] == "256"
    assert m["params_b_before"] == pytest.approx(115008 / 1e9)
    assert abs(1 - m["params_b"] / m["params_b_before"] - 0.2) <= 0.01
    assert m["achieved_ratio"] == pytest.approx(1 - m["params_b"] / m["params_b_before"])
    assert m["model_size_mb"] < m["model_size_mb_before"]
    assert {"ppl/sample", "mlp_capitals/acc", "avg_acc", "prune_seconds", "peak_rss_mb"} <= set(m)
    md = open(mlflow_client(mlflow_uri).download_artifacts(run.info.run_id, "report.md", str(tmp_path))).read()
    assert "## Pruning" in md and f"{m['achieved_ratio']:.4f}" in md and f"{m['ppl/sample']:.4f}" in md
    assert "Calibration: 8 × 256 tokens of `offline`" in md


def test_pruned_model_feeds_evaluate(pruned, mlflow_uri, ppl_text_file):
    _, prun = pruned
    cfg = EvaluateConfig(model=f"runs:/{prun.info.run_id}/model", ppl_dataset=str(ppl_text_file),
                         tracking_uri=mlflow_uri, experiment="test-prune", tasks="mlp_capitals", **EVAL)
    result = evaluate.run(cfg)
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlproject.upstream_run"] == prun.info.run_id
    assert run.data.metrics["params_b"] == pytest.approx(prun.data.metrics["params_b"])
    assert result.ppl["sample"] == pytest.approx(prun.data.metrics["ppl/sample"], rel=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_activation_pruning_with_a_calibration_file(arch, mlflow_uri, tiny_dirs, ppl_text_file):
    result = run_prune(mlflow_uri, tiny_dirs[arch], ppl_text_file, ratio=0.3, importance="activation",
                       targets="both", calibration=str(ppl_text_file), calibration_samples=3,
                       calibration_seqlen=16, evaluate="false")
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    m, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and run.data.tags["mlproject.family"] == arch
    assert params["calibration.sequences"] == "3" and params["calibration.seqlen"] == "16"
    assert abs(m["achieved_ratio"] - 0.3) <= 0.01
    assert params["prune.kv_groups_removed"] == "1" and int(params["prune.channels_removed"]) > 0
    assert "ppl/sample" not in m  # evaluate=false


def test_pruned_prune_input_from_a_run(pruned, mlflow_uri, ppl_text_file):
    """A pruned model can be pruned again from its runs:/ URI; lineage points at the first run."""
    _, first = pruned
    result = run_prune(mlflow_uri, f"runs:/{first.info.run_id}/model", ppl_text_file, ratio=0.1, tasks="none",
                       evaluate="false", importance="magnitude")
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.data.params["calibration"] == "none"
    assert run.data.tags["mlproject.upstream_run"] == first.info.run_id
    assert run.data.metrics["params_b_before"] == pytest.approx(first.data.metrics["params_b"])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tiny.save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2")


BAD = [
    (["--ratio", "1.5"], "1.5"),
    (["--ratio", "lots"], "lots"),
    (["--targets", "bogus"], "bogus"),
    (["--importance", "random"], "random"),
    (["--importance", "activation", "--calibration", "/no/such.txt"], "/no/such.txt"),
    (["--targets", "heads", "--ratio", "0.3"], "0.3"),  # heads alone reach at most ~0.107 here
    (["--keep-layers", "1"], "keep_layers=1"),  # 2 layers: nothing left to prune
    (["--model", "GPT2"], "gpt2"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_before_a_run(argv, needle, mlflow_uri, tiny_dirs, gpt2_dir, capsys, monkeypatch):
    argv = [str(gpt2_dir) if a == "GPT2" else a for a in argv]
    exp = "bad-prune-" + "-".join(a.strip("-/") for a in argv)[-50:].replace("/", "_")
    assert_bad_input(["prune", "--model", str(tiny_dirs["llama"]), *argv], needle, mlflow_uri, exp,
                     capsys, monkeypatch)
