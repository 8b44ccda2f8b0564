"""The quantize step end to end on tiny models, recorded in a real `mlflow server`."""

import time

import pytest

import tiny
from conftest import assert_bad_input, mlflow_client
from mlproject.compression import methods as quant_methods
from mlproject.config import EvaluateConfig, QuantizeConfig
from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.steps import evaluate, quantize

EVAL = dict(limit="4", batch_size="8", seqlen=32)


def run_quantize(uri, model, ppl_file, **kw):
    cfg = QuantizeConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri,
                         experiment=kw.pop("experiment", "test-quantize"), tasks=kw.pop("tasks", "mlp_capitals"),
                         **{**EVAL, **kw})
    return quantize.run(cfg)


def run_eval(uri, model, ppl_file, **kw):
    cfg = EvaluateConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri,
                         experiment="test-quantize", tasks=kw.pop("tasks", "mlp_capitals"), **{**EVAL, **kw})
    return evaluate.run(cfg)


@pytest.fixture(scope="module")
def rtn8(mlflow_uri, tiny_dirs, ppl_text_file):
    result = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, w_bits=8, group_size=32)
    return result, mlflow_client(mlflow_uri).get_run(result.run_id)


def test_rtn_run_is_recorded(rtn8, tiny_dirs, mlflow_uri, tmp_path):
    result, run = rtn8
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "quantize:llama:rtn-w8"
    tags, params, m = run.data.tags, run.data.params, run.data.metrics
    assert tags["mlproject.step"] == "quantize" and tags["mlproject.role"] == "quantized"
    assert tags["mlproject.quant.simulated"] == "true" and tags["mlproject.quant.method"] == "rtn"
    assert tags["mlproject.family"] == "llama" and tags["mlproject.base_model"] == str(tiny_dirs["llama"])
    assert "mlproject.upstream_run" not in tags  # the input is a local directory
    assert {k: params[k] for k in ("method", "w_bits", "group_size", "granularity", "scheme", "seed", "simulated")} \
        == {"method": "rtn", "w_bits": "8", "group_size": "32", "granularity": "per_group",
            "scheme": "symmetric", "seed": "42", "simulated": "true"}
    # 14 decoder linears at 8 + 16/32 bits; embeddings, norms and lm_head keep the load dtype
    # (dtype=auto: float32 on CPU, bfloat16 on CUDA: 4 or 2 bytes per weight before)
    assert params["quant.layers"] == "14" and m["effective_bits"] == pytest.approx(8.5)
    nbytes = round(m["model_size_mb_before"] * 2**20 / 115008)
    assert nbytes == (2 if params["device"].startswith("cuda") else 4)
    linear = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # q,o 64x64; k,v 32x64; gate/up/down
    assert m["model_size_mb_before"] - m["model_size_mb"] == pytest.approx(linear * (nbytes - 8.5 / 8) / 2**20)
    assert m["params_b"] == pytest.approx(115008 / 1e9)
    peak = "peak_vram_mb" if params["device"].startswith("cuda") else "peak_rss_mb"
    assert {"ppl/sample", "mlp_capitals/acc", "avg_acc", "quant_seconds", peak} <= set(m)
    md = open(mlflow_client(mlflow_uri).download_artifacts(run.info.run_id, "report.md", str(tmp_path))).read()
    assert "## Quantization" in md and "Simulated quantization" in md and "stored dequantized" in md
    assert '"w_bits": 8' in md and f"{m['ppl/sample']:.4f}" in md
    assert result.model_uri == f"runs:/{run.info.run_id}/model"


def test_rtn8_ppl_within_1pct_of_unquantized(rtn8, mlflow_uri, tiny_dirs, ppl_text_file):
    _, run = rtn8
    base = run_eval(mlflow_uri, tiny_dirs["llama"], ppl_text_file, tasks="none")
    q = run.data.metrics["ppl/sample"]
    assert q == pytest.approx(base.ppl["sample"], rel=0.01)
    assert q != base.ppl["sample"]  # the weights did change


def test_rtn_model_feeds_evaluate(rtn8, mlflow_uri, ppl_text_file):
    _, qrun = rtn8
    result = run_eval(mlflow_uri, f"runs:/{qrun.info.run_id}/model", ppl_text_file)
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlproject.upstream_run"] == qrun.info.run_id
    assert run.data.tags["mlproject.role"] == "eval"
    assert run.data.tags["mlproject.base_model"] == qrun.data.tags["mlproject.base_model"]
    # same weights, same numbers
    assert result.ppl["sample"] == pytest.approx(qrun.data.metrics["ppl/sample"], rel=1e-5)
    assert run.data.metrics["mlp_capitals/acc"] == pytest.approx(qrun.data.metrics["mlp_capitals/acc"])


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_rtn_other_families(arch, mlflow_uri, tiny_dirs, ppl_text_file):
    result = run_quantize(mlflow_uri, tiny_dirs[arch], ppl_text_file, w_bits=4, group_size=64,
                          scheme="asymmetric", tasks="none")
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlproject.family"] == arch
    assert run.data.metrics["effective_bits"] == pytest.approx(4 + (16 + 4) / 64)
    assert run.data.metrics["ppl/sample"] > 1


def test_bnb_nf4_real_layers(mlflow_uri, tiny_dirs, ppl_text_file):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from mlproject import tracking
    from mlproject.models.reference import resolve

    result = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method="bnb-nf4", tasks="none")
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    m, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and run.data.tags["mlproject.quant.simulated"] == "false"
    assert params["w_bits"] == "4" and params["group_size"] == "64" and params["granularity"] == "per_block"
    assert m["model_size_mb"] < m["model_size_mb_before"] - 0.1
    assert m["params_b"] == pytest.approx(115008 / 1e9)  # logical weights, not packed bytes
    assert 4 < m["effective_bits"] < 5
    assert m["ppl/sample"] > 1
    reloaded = loading.load_model(resolve(result.model_uri), fetch=tracking.download)
    assert sum(isinstance(x, bnb.nn.Linear4bit) for x in reloaded.model.modules()) == 14
    assert reloaded.meta["run_id"] == run.info.run_id and reloaded.meta["kind"] == "recipe"
    ev = run_eval(mlflow_uri, result.model_uri, ppl_text_file, tasks="none")
    assert ev.ppl["sample"] == pytest.approx(m["ppl/sample"], rel=1e-4)
    ev_m = mlflow_client(mlflow_uri).get_run(ev.run_id).data.metrics
    assert ev_m["params_b"] == pytest.approx(m["params_b"]) and ev_m["model_size_mb"] == pytest.approx(m["model_size_mb"])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tiny.save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2")


BAD = [
    (["--w-bits", "9"], "9"),
    (["--group-size", "7"], "group_size=7"),
    (["--method", "quip"], "quip"),
    (["--method", "bnb-nf4", "--w-bits", "3"], "w_bits=3"),
    (["--scheme", "skewed"], "skewed"),
    (["--group-size", "128"], "group_size=128"),  # does not divide the 64-wide layers
    (["--model", "GPT2"], "gpt2"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_before_a_run(argv, needle, mlflow_uri, tiny_dirs, gpt2_dir, capsys, monkeypatch):
    argv = [str(gpt2_dir) if a == "GPT2" else a for a in argv]
    exp = "bad-quantize-" + "-".join(a.strip("-/") for a in argv)[-50:].replace("/", "_")
    assert_bad_input(["quantize", "--model", str(tiny_dirs["llama"]), "--group-size", "32", *argv], needle,
                     mlflow_uri, exp, capsys, monkeypatch)


@pytest.mark.parametrize("method", ["rtn", "bnb-nf4"])
def test_adapter_is_merged_before_quantizing(method, mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from mlproject import tracking
    from mlproject.compression.rtn import quantize_tensor
    from mlproject.models.reference import resolve

    if method.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    base = tiny.make_model("llama")  # the weights saved in tiny_dirs["llama"]
    base_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_q = peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach().clone()
    # float32 on every device: the test compares the stored weights with a float32 merge
    result = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method=method, adapter=str(tmp_path / "adapter"),
                          evaluate="false", tasks="none", dtype="float32",
                          **({"w_bits": 8, "group_size": 32} if method == "rtn" else {}))
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlproject.adapter"] == str(tmp_path / "adapter")
    assert "ppl/sample" not in run.data.metrics
    files = {a.path.split("/")[-1] for a in mlflow_client(mlflow_uri).list_artifacts(result.run_id, "model")}
    assert "config.json" in files and "adapter_config.json" not in files
    reloaded = loading.load_model(resolve(result.model_uri), fetch=tracking.download).model
    q = reloaded.model.layers[0].self_attn.q_proj
    if method == "rtn":
        expected, got = quantize_tensor(merged_q, 8, 32)[0], q.weight.detach().cpu()
        if run.data.params["device"] == "cpu":
            assert torch.equal(got, expected)
        else:  # merged on the GPU: a last-bit difference may move a weight to the next grid point
            assert (got - expected).abs().max() <= merged_q.abs().max() / 127 + 1e-6
    else:
        import bitsandbytes as bnb

        assert isinstance(q, bnb.nn.Linear4bit)
        deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float().cpu()
        assert (deq - merged_q).abs().max() < 0.2 * merged_q.abs().max()  # nf4 of the merged weight
        assert (deq - merged_q).abs().mean() < 0.5 * (deq - base_q).abs().mean()


# ------------------------------------------------------------------ the method registry

def test_the_method_parameter_comes_from_the_registry():
    import dataclasses

    from mlproject.compression import methods as quant_methods

    f = next(f for f in dataclasses.fields(QuantizeConfig) if f.name == "method")
    assert tuple(f.metadata["choices"]) == quant_methods.names() == (
        "rtn", "bnb-nf4", "bnb-fp4", "bnb-int8", "gptq", "awq", "autoround", "hqq")
    assert f.metadata["help"] == quant_methods.help_text()
    with pytest.raises(UserError, match=r"^method 'quip' is not one of: rtn, bnb-nf4, bnb-fp4, bnb-int8, gptq, awq, "
                                        r"autoround, hqq$"):
        QuantizeConfig(method="quip")
    with pytest.raises(UserError, match=r"^unknown quantization method 'quip'; choose one of: rtn, bnb-nf4"):
        quant_methods.get("quip")
    # a field only another method reads is refused, not ignored; the value a method implies is no error
    with pytest.raises(UserError, match=r"^scheme='asymmetric' applies to method=rtn/gptq/awq/autoround only; "
                                        r"bnb-fp4 stores 4-bit"):
        QuantizeConfig(method="bnb-fp4", scheme="asymmetric")
    assert QuantizeConfig(method="bnb-int8", w_bits=8).w_bits == 8


def test_listing_methods_imports_nothing_heavy():
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("import sys; from mlproject.compression import methods; from mlproject.config import QuantizeConfig; "
            "methods.names(); methods.help_text(); [methods.get(n) for n in methods.names()]; "
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class NoopMethod(quant_methods.QuantMethod):
    """The smallest method there is: the weights are stored as loaded. Adding it to the platform
    is this class in one module plus one line in ``compression.methods.METHODS``."""

    names = ("noop",)
    help = "noop (weights stored unchanged)"

    def quantize(self, cfg, ctx):
        start = time.perf_counter()
        loaded = ctx.load()
        size = quant_methods.model_size_mb(loaded.model)
        return quant_methods.Quantized(
            loaded=loaded, report=["**No quantization (noop).** The weights are stored as loaded."],
            metrics={"quant_seconds": time.perf_counter() - start,
                     "params_b": sum(p.numel() for p in loaded.model.parameters()) / 1e9,
                     "model_size_mb": size, "model_size_mb_before": size,
                     "effective_bits": 8 * ctx.dtype.itemsize},
            note="noop: the weights are unchanged.")


NOOP = NoopMethod()


def test_a_new_method_is_one_module_and_one_registry_line(monkeypatch, mlflow_uri, tiny_dirs, ppl_text_file,
                                                          tmp_path, capsys):
    import dataclasses

    import torch

    from mlproject import tracking
    from mlproject.models.reference import resolve

    monkeypatch.setitem(quant_methods.METHODS, "noop", f"{__name__}:NOOP")
    assert quant_methods.names()[-1] == "noop" and quant_methods.get("noop") is NOOP
    assert "noop" in next(f for f in dataclasses.fields(QuantizeConfig) if f.name == "method").metadata["choices"]
    assert quant_methods.help_text().endswith(", noop (weights stored unchanged)")
    with pytest.raises(UserError, match=r"^group_size=64 applies to method=rtn/gptq/awq/autoround/hqq only; noop does not use it"):
        QuantizeConfig(method="noop", group_size=64)
    result = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method="noop", dtype="float32")
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    tags, params, m = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and run.info.run_name == "quantize:llama:noop"
    assert tags["mlproject.quant.method"] == "noop" and tags["mlproject.quant.simulated"] == "false"
    assert tags["mlproject.role"] == "quantized" and tags["mlproject.base_model"] == str(tiny_dirs["llama"])
    assert params["method"] == "noop" and params["simulated"] == "false" and "w_bits" not in params
    assert m["model_size_mb"] == m["model_size_mb_before"] and m["effective_bits"] == 32
    assert m["params_b"] == pytest.approx(115008 / 1e9) and {"ppl/sample", "mlp_capitals/acc", "avg_acc"} <= set(m)
    md = open(mlflow_client(mlflow_uri).download_artifacts(run.info.run_id, "report.md", str(tmp_path))).read()
    assert "## Quantization" in md and "No quantization (noop)" in md and "calibration-free" in md
    # the logged model is the input, weight for weight, and feeds the next step
    reloaded = loading.load_model(resolve(result.model_uri), fetch=tracking.download, dtype="float32").model
    original = loading.load_model(resolve(str(tiny_dirs["llama"])), dtype="float32").model
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(reloaded.state_dict().values(),
                                                             original.state_dict().values()))
    ev = run_eval(mlflow_uri, result.model_uri, ppl_text_file, tasks="none", dtype="float32")
    assert ev.ppl["sample"] == pytest.approx(m["ppl/sample"], rel=1e-5)
    # through the CLI, a field it does not read still fails before any run or weights
    assert_bad_input(["quantize", "--model", str(tiny_dirs["llama"]), "--method", "noop", "--w-bits", "3"],
                     "w_bits=3 applies to method=rtn/gptq/awq/autoround/hqq only; noop does not use it (leave w_bits at its default)",
                     mlflow_uri, "bad-quantize-noop", capsys, monkeypatch)
