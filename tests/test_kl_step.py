"""KL to the reference and per-document results, end to end through the steps on a real server.

A base model's evaluation stores its top-k next-token distributions over the PPL windows; the
quantized model's own evaluation finds them by key (``reference=auto``) and logs KL metrics equal
to a direct computation from both models' logits (k = the tiny vocabulary: the top-k value is
exact); a model against itself gives 0 exactly; per-document results agree with the task metric.
"""

import pytest
import torch

from conftest import assert_bad_input, mlflow_client
from mlproject.config import EvaluateConfig, QuantizeConfig
from mlproject.evaluation import divergence, documents
from mlproject.steps import evaluate, quantize
from mlproject.tracking import names

VOCAB = 320  # tests/tiny.py
EVAL = dict(limit="4", batch_size="8", seqlen=32, tasks="mlp_capitals", kl_topk=VOCAB)
EXP = "test-kl"


def run_eval(uri, model, ppl_file, **kw):
    return evaluate.run(EvaluateConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri,
                                       experiment=kw.pop("experiment", EXP), **{**EVAL, **kw}))


@pytest.fixture(scope="module")
def base_and_rtn(mlflow_uri, tiny_dirs, ppl_text_file):
    base = run_eval(mlflow_uri, tiny_dirs["llama"], ppl_text_file)
    q = quantize.run(QuantizeConfig(model=str(tiny_dirs["llama"]), ppl_dataset=str(ppl_text_file),
                                    tracking_uri=mlflow_uri, experiment=EXP, w_bits=3, group_size=32, **EVAL))
    client = mlflow_client(mlflow_uri)
    return client.get_run(base.run_id), client.get_run(q.run_id)


def download(uri, run_id, path, tmp_path):
    return mlflow_client(uri).download_artifacts(run_id, path, str(tmp_path))


def test_base_stores_its_distributions_and_documents(base_and_rtn, mlflow_uri, tmp_path):
    base, _ = base_and_rtn
    assert len(base.data.tags[names.TOPK_KEY_TAG]) == 16
    assert not any(k.startswith("kl/") for k in base.data.metrics)  # a root has no reference
    topk = divergence.TopK.load(download(mlflow_uri, base.info.run_id, "kl/reference_topk.safetensors", tmp_path))
    windows = int(base.data.params["ppl.windows"])
    assert tuple(topk.indices.shape) == (windows, 31, VOCAB)
    docs = documents.read_parquet(download(mlflow_uri, base.info.run_id, documents.DOCUMENTS_ARTIFACT, tmp_path))
    acc = docs[(docs["task"] == "mlp_capitals") & (docs["metric"] == "acc")]
    assert sorted(acc["doc_id"]) == [0, 1, 2, 3] and set(acc["group"]) == {"mlp_capitals"}
    assert acc["value"].mean() == pytest.approx(base.data.metrics["mlp_capitals/acc"])


def test_quantized_kl_equals_a_direct_computation(base_and_rtn, mlflow_uri, tiny_dirs, ppl_text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlproject import tracking
    from mlproject.evaluation import perplexity
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    base, q = base_and_rtn
    m = q.data.metrics
    assert q.data.tags[names.KL_REFERENCE_TAG] == f"{tiny_dirs['llama']} (run {base.info.run_id})"
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    ids = tok(ppl_text_file.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = perplexity.make_windows(ids, 32)[:int(q.data.params["ppl.windows"])]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    cand = loading.load_model(resolve(f"runs:/{q.info.run_id}/model"), fetch=tracking.download).model
    with torch.inference_mode():
        per_token = divergence.kl_exact(ref_model(windows).logits[:, :-1].float(),
                                        cand(windows).logits[:, :-1].float()).reshape(-1)
        agree = (ref_model(windows).logits[:, :-1].argmax(-1) == cand(windows).logits[:, :-1].argmax(-1)).float()
    assert m["kl/sample"] > 0
    assert m["kl/sample"] == pytest.approx(per_token.mean().item(), rel=1e-4)
    assert m["kl_median/sample"] == pytest.approx(torch.quantile(per_token.double(), 0.5).item(), rel=1e-3)
    assert m["kl_p99/sample"] == pytest.approx(torch.quantile(per_token.double(), 0.99).item(), rel=1e-3)
    assert m["top1_agree/sample"] == pytest.approx(agree.mean().item())


def test_a_model_against_itself_is_zero_computed_once_then_found(mlflow_uri, tiny_dirs, ppl_text_file):
    # seqlen 16: no stored distributions on these windows, so the first run scores the reference itself
    first = run_eval(mlflow_uri, tiny_dirs["llama"], ppl_text_file, seqlen=16, reference=str(tiny_dirs["llama"]),
                     kl_topk=8)
    client = mlflow_client(mlflow_uri)
    r1 = client.get_run(first.run_id)
    assert r1.data.metrics["kl/sample"] == 0.0 and r1.data.metrics["kl_p99/sample"] == 0.0
    assert r1.data.metrics["top1_agree/sample"] == 1.0
    assert r1.data.tags[names.KL_REFERENCE_TAG].endswith(f"(run {r1.info.run_id})")
    second = run_eval(mlflow_uri, tiny_dirs["qwen2"], ppl_text_file, seqlen=16, reference=str(tiny_dirs["llama"]),
                      kl_topk=8, tasks="none")
    r2 = client.get_run(second.run_id)
    # the tiny models share a tokenizer: the windows agree, so the stored distributions serve
    assert r2.data.tags[names.KL_REFERENCE_TAG] == f"{tiny_dirs['llama']} (run {r1.info.run_id})"
    assert r2.data.metrics["kl/sample"] > 1e-4  # another model (near-uniform tiny ones: small)


def test_auto_without_stored_distributions_measures_no_kl(mlflow_uri, tiny_dirs, ppl_text_file):
    q = quantize.run(QuantizeConfig(model=str(tiny_dirs["qwen2"]), ppl_dataset=str(ppl_text_file),
                                    tracking_uri=mlflow_uri, experiment=EXP, w_bits=4, group_size=32,
                                    **{**EVAL, "tasks": "none"}))
    run = mlflow_client(mlflow_uri).get_run(q.run_id)
    assert run.info.status == "FINISHED" and "ppl/sample" in run.data.metrics
    assert not any(k.startswith(("kl/", "top1_agree/")) for k in run.data.metrics)


@pytest.mark.parametrize("argv,needle", [
    (["--reference", "no-such-alias"], "no-such-alias"),
    (["--reference", "smollm2", "--ppl-dataset", "none"], "ppl_dataset"),
    (["--kl-topk", "-1"], "kl_topk"),
])
def test_bad_reference_exits_2_before_a_run(argv, needle, mlflow_uri, tiny_dirs, capsys, monkeypatch):
    assert_bad_input(["evaluate", "--model", str(tiny_dirs["llama"]), *argv], needle, mlflow_uri,
                     "bad-kl-" + argv[1].replace("/", "_"), capsys, monkeypatch)
