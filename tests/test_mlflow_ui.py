"""What the MLflow UI shows (issue 11, item 3): a description with the headline numbers, the data
scored as dataset inputs, step outputs as MLflow models (Models column, registry,
mlflow.transformers.load_model) that every step still takes as runs:/<id>/model, bookkeeping
out of the model metrics, and a saved view whose runs table shows the headline numbers.
The last test renders the UI in headless Chromium (skipped where it is not installed)."""

import json
import shutil
import subprocess

import pytest
import torch

from conftest import mlflow_client
from mlproject import tracking
from mlproject.config import EvaluateConfig, QuantizeConfig
from mlproject.models import loading
from mlproject.models.reference import resolve
from mlproject.steps import evaluate, quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXP = "ui-checks"


@pytest.fixture(scope="module")
def quantized(mlflow_uri, tiny_dirs, ppl_text_file):
    cfg = QuantizeConfig(model=str(tiny_dirs["llama"]), method="rtn", w_bits=8, group_size=32, tasks="mlp_nonce",
                         limit="4", batch_size="4", ppl_dataset=str(ppl_text_file), seqlen=32, experiment=EXP,
                         tracking_uri=mlflow_uri, store="weights")  # weights: MLflow's own flavor loads them
    result = quantize.run(cfg)
    return result, mlflow_client(mlflow_uri).get_run(result.run_id)


def test_the_output_is_an_mlflow_model_every_step_still_loads(quantized):
    import mlflow

    result, run = quantized
    model = tracking.logged_model(result.run_id)
    assert model is not None and model.tags["mlproject.step"] == "quantize"
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.flavors["transformers"]["model_binary"] == "."
    ours = loading.load_model(resolve(result.model_uri), fetch=tracking.download).model
    theirs = mlflow.transformers.load_model(result.model_uri, return_type="components")["model"]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True))
    # the model's page lists the numbers measured on it
    linked = {m.key: m.value for m in mlflow_client(tracking.tracking_uri()).get_logged_model(model.model_id).metrics}
    assert linked["ppl/sample"] == pytest.approx(run.data.metrics["ppl/sample"])
    assert "system/" not in "".join(linked)


def test_the_registry_takes_the_model(quantized):
    import mlflow

    result, _ = quantized
    version = tracking.register_model(result.run_id, "ui-tiny", alias="best_ppl")
    assert version == "1"
    reg = loading.load_model(resolve("models:/ui-tiny@best_ppl"), fetch=tracking.download).model
    run_model = loading.load_model(resolve(result.model_uri), fetch=tracking.download).model
    assert all(torch.equal(a, b) for a, b in zip(reg.state_dict().values(), run_model.state_dict().values(), strict=True))
    assert mlflow.transformers.load_model("models:/ui-tiny@best_ppl", return_type="components")["model"] is not None


def test_description_datasets_and_metric_namespaces(quantized, ppl_text_file):
    result, run = quantized
    note = run.data.tags["mlflow.note.content"]
    m = run.data.metrics
    assert note.startswith(f"**quantize · {resolve(run.data.params['model']).raw} · rtn w8 g32 symmetric**")
    assert f"PPL sample **{m['ppl/sample']:.3f}**" in note and f"avg_acc **{m['avg_acc']:.4f}**" in note
    assert f"acc_norm: mlp_nonce {m['mlp_nonce/acc_norm']:.4f}" in note and "limit 4" in note
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    total = run.data.params["ppl.windows_total"]
    assert f"ppl sample (4 of {total} × 32 tokens)" in inputs
    assert "mlp_nonce (4 of 200 docs)" in inputs
    nonce = inputs["mlp_nonce (4 of 200 docs)"]
    assert json.loads(nonce.dataset.profile)["num_rows"] == 4 and nonce.dataset.source_type == "local"
    assert {t.key: t.value for t in nonce.tags}["mlflow.data.context"] == "evaluation"
    assert not [k for k in m if k.endswith("sample_len") or k.startswith(("quant/layers", "compare/", "pipeline/"))]
    assert run.data.params["quant.layers"] == "14"


def test_headline_view_and_link(quantized, mlflow_uri):
    result, run = quantized
    exp = mlflow_client(mlflow_uri).get_experiment(run.info.experiment_id)
    envelope = json.loads(exp.tags["mlflow.sharedViewState.mlproject-headline"])
    columns = json.loads(envelope["state"])["selectedColumns"]
    assert columns[:3] == ["metrics.`avg_acc`", "metrics.`ppl/sample`", "metrics.`mlp_nonce/acc_norm`"]
    assert "attributes.`Dataset`" in columns and "attributes.`Models`" in columns
    text = tracking.where_to_look(result.run_id)
    assert f"runs?viewStateShareKey=mlproject-headline" in text and f"/runs/{result.run_id}" in text


def test_params_under_mlflow_run_are_words_not_quotes():
    import yaml

    from mlproject.tracking import command_line

    doc = yaml.safe_load(open(tracking.__file__.rsplit("/src/", 1)[0] + "/MLproject"))
    defaults = {k: v["default"] for k, v in doc["entry_points"]["evaluate"]["parameters"].items()}
    assert "" not in defaults.values()
    assert defaults["adapter"] == "none" and defaults["limit"] == "all" and defaults["role"] == "auto"
    assert EvaluateConfig(adapter="none", limit="all", role="auto").adapter == ""
    import sys

    argv, sys.argv = sys.argv, ["/x/src/mlproject/__main__.py", "evaluate", "--limit", "all"]
    try:
        assert command_line() == "mlproject evaluate --limit all"
    finally:
        sys.argv = argv


def rendered(url: str) -> str:
    """The UI page after its scripts ran, as headless Chromium sees it."""
    import tempfile

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--window-size=3000,1200",
                              "--virtual-time-budget=20000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180)
    return out.stdout


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium not installed (apt-get install chromium)")
def test_the_ui_shows_the_headline_numbers(quantized, mlflow_uri):
    result, run = quantized
    exp_id = run.info.experiment_id
    table = rendered(f"{mlflow_uri}/#/experiments/{exp_id}/runs?viewStateShareKey=mlproject-headline")
    assert "Headline numbers (mlproject)" in table
    assert "ppl/sample" in table and "mlp_nonce/acc_norm" in table and "mlp_nonce (4 of 200 docs)" in table
    page = rendered(f"{mlflow_uri}/#/experiments/{exp_id}/runs/{result.run_id}")
    assert "rtn w8 g32 symmetric" in page  # the description
