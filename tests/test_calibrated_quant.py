"""Calibrated and packed quantization methods (issue 19): llm-compressor GPTQ / AWQ, AutoRound, HQQ.

What is asserted, on tiny random models of several architectures:
* the algorithms' property: on the calibration inputs, a calibrated method's layer outputs are no
  further from the float layers' than RTN's at the same grid (bits, group size, scheme);
* the checkpoint each method writes (its own packed format) reloads to the same logits as the
  in-process model, and through ``runs:/<id>/model`` to the same PPL the quantize run measured;
* real sizes: the checkpoint's bytes shrink with the bits, and effective bits are the stored ones;
* calibration params and report.md's calibration lines; refusals one line, exit 2, no run;
  a method whose library is missing is refused with its install hint.

gptq/awq need llm-compressor, which pins transformers<=5.17: the extra ``llmcompressor``, tested by
.ci/run in a second environment (MLPROJECT_REQUIRE_LLMCOMPRESSOR=1 there turns its skips into
failures). awq also needs CUDA (``cuda`` marker).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import assert_bad_input, mlflow_client
from mlproject import tracking
from mlproject.compression import methods as quant_methods
from mlproject.compression import rtn
from mlproject.compression.methods import QuantContext, common
from mlproject.config import EvaluateConfig, QuantizeConfig
from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.models.reference import resolve
from mlproject.steps import evaluate, quantize
from mlproject.steps.shared import compress

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAVE_LLMC = importlib.util.find_spec("llmcompressor") is not None
HAVE_CUDA = torch.cuda.is_available()


def need_llmcompressor():
    if not HAVE_LLMC:
        if os.environ.get("MLPROJECT_REQUIRE_LLMCOMPRESSOR") == "1":
            pytest.fail("MLPROJECT_REQUIRE_LLMCOMPRESSOR=1 but llmcompressor is not installed")
        pytest.skip("llm-compressor is not installed (the llmcompressor extra; .ci/run tests it in its own venv)")


CALIBRATED = ["gptq", "autoround"]  # awq: CUDA only (test at the end)
GRID = dict(w_bits=3, group_size=32, calibration_samples=8, calibration_seqlen=32)
EVAL = dict(limit="4", batch_size="8", seqlen=32)


def settings(method: str, **kw) -> dict:
    if method == "hqq":
        base = dict(w_bits=3, group_size=32)
    else:
        base = dict(GRID, iters=20) if method == "autoround" else dict(GRID)
    return {**base, **kw}


def in_process(method: str, model_dir: Path, text_file: Path, workdir: Path, **kw):
    """Quantize through the method's own hooks, without a run, writing into ``workdir``:
    (Quantized, calibration ids, config)."""
    if method in ("gptq", "awq"):
        need_llmcompressor()
    calib = {} if method == "hqq" else {"calibration": str(text_file)}
    cfg = QuantizeConfig(model=str(model_dir), method=method, dtype="float32", device="cpu",
                         **calib, **settings(method, **kw))
    ref = resolve(str(model_dir))
    drawn = {}

    def calibration(tok):
        drawn["ids"] = compress.calibration_ids(tok, text_file.read_text(), cfg.calibration_samples,
                                                cfg.calibration_seqlen, cfg.seed)
        return drawn["ids"]

    def load(quantization_config=None):
        return loading.load_model(ref, dtype="float32", device="cpu")

    def reload(folder):
        return loading.load_model(resolve(str(folder)), dtype="float32", device="cpu")

    ctx = QuantContext(ref=ref, device="cpu", dtype=torch.float32, load=load, workdir=workdir,
                       calibration=calibration, reload=reload)
    out = quant_methods.get(method).quantize(cfg, ctx)
    return out, drawn.get("ids"), cfg


def layer_inputs(model, names: list[str], ids) -> dict[str, torch.Tensor]:
    """Each named layer's inputs over the calibration windows, from the float model."""
    mods = dict(model.named_modules())
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def output_error(quant_model, float_model, inputs: dict[str, torch.Tensor]) -> float:
    """Σ‖Q(X) - W X‖² / Σ‖W X‖² over the layers, every layer fed the float model's inputs."""
    qmods, fmods = dict(quant_model.named_modules()), dict(float_model.named_modules())
    num = den = 0.0
    with torch.no_grad():
        for name, x in inputs.items():
            q = qmods[name]
            dtype = next(t.dtype for t in (*q.parameters(), *q.buffers()) if t.dtype.is_floating_point)
            ref = fmods[name](x)
            got = q(x.to(dtype)).float()
            num += (got - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
    return num / den


def rtn_model(model_dir: Path, cfg):
    model = loading.load_model(resolve(str(model_dir)), dtype="float32", device="cpu").model
    rtn.quantize_model(model, rtn.RTNConfig(w_bits=cfg.w_bits, group_size=cfg.group_size, scheme=cfg.scheme))
    return model


# ------------------------------------------------------------------ the algorithms' property

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", CALIBRATED)
def test_calibrated_layer_outputs_are_at_most_rtns_error(method, arch, tiny_dirs, ppl_text_file, tmp_path):
    out, ids, cfg = in_process(method, tiny_dirs[arch], ppl_text_file, tmp_path)
    assert ids is not None and tuple(ids.shape) == (8, 32)  # the windows the method was given
    flo = loading.load_model(resolve(str(tiny_dirs[arch])), dtype="float32", device="cpu").model
    names = common.selected(flo, "all-linear")
    inputs = layer_inputs(flo, names, ids)
    out.loaded.tokenizer.save_pretrained(out.saved)
    packed = loading.load_model(resolve(str(out.saved)), dtype="float32", device="cpu").model
    err = output_error(packed, flo, inputs)
    base = output_error(rtn_model(tiny_dirs[arch], cfg), flo, inputs)
    assert 0 < err <= base, (method, arch, err, base)


# ------------------------------------------------------------------ the packed checkpoint

# (autoround's step scores the checkpoint as reloaded: its in-process model is that reload)
@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_the_checkpoint_reloads_to_the_in_process_logits(method, tiny_dirs, ppl_text_file, tmp_path):
    out, _, cfg = in_process(method, tiny_dirs["llama"], ppl_text_file, tmp_path)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = out.loaded.model(ids).logits
    out.loaded.tokenizer.save_pretrained(out.saved)
    back = loading.load_model(resolve(str(out.saved)), dtype="float32", device="cpu")
    with torch.no_grad():
        after = back.model(ids).logits
    assert torch.equal(before, after.to(before.dtype))
    fmt = {"gptq": "compressed-tensors", "hqq": "hqq"}[method]
    assert quant_methods.checkpoint_format(back.model) == fmt
    assert json.loads((out.saved / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    # the checkpoint holds packed codes: far smaller than the float input's 0.44 MB
    assert out.metrics["model_size_mb"] < 0.6 * out.metrics["model_size_mb_before"]
    assert quant_methods.model_size_mb(back.model) < 0.6 * out.metrics["model_size_mb_before"]
    # compress.peek_config refuses it as input to another compression step
    with pytest.raises(UserError, match=f"already quantized \\({fmt}\\)"):
        compress.peek_config(resolve(str(out.saved)), "quantize")


@pytest.mark.parametrize("method", ["gptq", "autoround", "hqq"])
def test_stored_bytes_shrink_with_the_bits(method, tiny_dirs, ppl_text_file, tmp_path):
    sizes, bits = [], []
    for w in (2, 4, 8):
        out, _, _ = in_process(method, tiny_dirs["qwen2"], ppl_text_file, tmp_path / f"w{w}", w_bits=w)
        sizes.append(out.metrics["model_size_mb"])
        bits.append(out.metrics["effective_bits"])
    assert sizes[0] < sizes[1] < sizes[2], sizes
    # stored bits per weight: at least the codes, plus scales (and zero points) per 32 weights
    assert all(b >= w for b, w in zip(bits, (2, 4, 8))) and bits[0] < bits[1] < bits[2], bits


# ------------------------------------------------------------------ the step, on a real server

def run_quantize(uri, model, ppl_file, **kw):
    cfg = QuantizeConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri, experiment="test-calibrated",
                         tasks="mlp_capitals", dtype="float32", **{**EVAL, **kw})
    return quantize.run(cfg)


@pytest.mark.parametrize("method", ["gptq", "autoround", "hqq"])
def test_the_step_records_calibration_and_the_packed_model(method, mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    if method == "gptq":
        need_llmcompressor()
    calib = {} if method == "hqq" else {"calibration": str(ppl_text_file)}
    result = run_quantize(mlflow_uri, tiny_dirs["mistral"], ppl_text_file, method=method,
                          **{**settings(method), **calib})
    client = mlflow_client(mlflow_uri)
    run = client.get_run(result.run_id)
    tags, params, m = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and tags["mlproject.quant.method"] == method
    assert tags["mlproject.quant.simulated"] == "false" and tags["mlproject.quant.serving"]
    assert params["w_bits"] == "3" and params["group_size"] == "32"
    if method == "hqq":
        assert params["calibration"] == "none" and "calibration.sequences" not in params
    else:
        assert params["calibration"] == str(ppl_text_file) and params["calibration_samples"] == "8"
        assert params["calibration_seqlen"] == "32" and params["calibration.seqlen"] == "32"
        assert 1 <= int(params["calibration.sequences"]) <= 8  # fewer when the text is short
    assert m["model_size_mb"] < 0.6 * m["model_size_mb_before"] and m["effective_bits"] > 3
    md = open(client.download_artifacts(run.info.run_id, "report.md", str(tmp_path))).read()
    if method == "hqq":
        assert "calibration dataset: N/A (calibration-free)" in md.replace("**", "").replace("- ", "")
    else:
        flat = md.replace("**", "").replace("- ", "")
        assert f"calibration dataset: {ppl_text_file}" in flat and "calibration sequence length: 32" in flat
    assert "Served by" in md
    # what was logged is the packed format, and reloads to the PPL the run measured
    ev = evaluate.run(EvaluateConfig(model=result.model_uri, ppl_dataset=str(ppl_text_file), tracking_uri=mlflow_uri,
                                     experiment="test-calibrated", tasks="none", dtype="float32", **EVAL))
    again = client.get_run(ev.run_id).data.metrics
    assert again["ppl/sample"] == pytest.approx(m["ppl/sample"], rel=1e-6)
    assert again["model_size_mb"] == pytest.approx(m["model_size_mb"], rel=0.1)


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("argv,needle", [
    (["--method", "hqq", "--w-bits", "5"], "w_bits=5: method=hqq supports 1, 2, 3, 4, 8"),
    (["--method", "autoround", "--w-bits", "5"], "w_bits=5: method=autoround supports 2, 3, 4, 8"),
    (["--method", "autoround", "--group-size", "48"], "group_size=48 does not divide in_features=64"),
    (["--method", "hqq", "--group-size", "-1"], "hqq needs a group size"),
    (["--method", "autoround", "--calibration-samples", "0"], "calibration_samples=0"),
    (["--method", "autoround", "--calibration", "/no/such.txt"], "calibration '/no/such.txt'"),
    (["--method", "hqq", "--calibration-seqlen", "64"], "calibration_seqlen=64 applies to method=gptq/awq/autoround"),
    (["--method", "rtn", "--iters", "5"], "iters=5 applies to method=autoround only"),
    (["--method", "autoround", "--iters", "-1"], "iters=-1"),
    (["--method", "autoround", "--w-bits", "8", "--scheme", "asymmetric"], "does not serve 8-bit asymmetric"),
    (["--method", "hqq", "--modules", "layers.0."], "hqq quantizes layers by type"),
])
def test_bad_settings_exit_2_before_a_run(argv, needle, mlflow_uri, tiny_dirs, capsys, monkeypatch):
    exp = "bad-calib-" + "-".join(a.strip("-/") for a in argv)[-50:].replace("/", "_")
    assert_bad_input(["quantize", "--model", str(tiny_dirs["llama"]), "--group-size", "32", *argv], needle,
                     mlflow_uri, exp, capsys, monkeypatch)


@pytest.mark.parametrize("method,module,hint", [
    ("gptq", "llmcompressor", "pip install 'mlproject[llmcompressor]'"),
    ("autoround", "auto_round", "pip install auto-round"),
    ("hqq", "hqq", "pip install hqq"),
])
def test_a_missing_library_is_refused_with_its_install_hint(method, module, hint, mlflow_uri, tiny_dirs, capsys,
                                                            monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert_bad_input(["quantize", "--model", str(tiny_dirs["llama"]), "--group-size", "32", "--method", method],
                     hint, mlflow_uri, f"missing-{method}", capsys, monkeypatch)


@pytest.mark.skipif(HAVE_CUDA, reason="the CPU-only refusal")
def test_awq_on_a_cpu_only_torch_is_refused(mlflow_uri, tiny_dirs, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "llmcompressor"
                        else real(name, *a))
    assert_bad_input(["quantize", "--model", str(tiny_dirs["llama"]), "--group-size", "32", "--method", "awq"],
                     "method=awq needs a CUDA device", mlflow_uri, "awq-cpu", capsys, monkeypatch)


@pytest.mark.parametrize("method", ["autoround", "hqq", "gptq"])
def test_a_packed_method_refuses_a_non_uniformly_pruned_input(method, tiny_dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dirs["llama"])
    config.pruned_layer_sizes = [{"intermediate_size": 96}, {"intermediate_size": 128}]
    cfg = QuantizeConfig(method=method, group_size=32)
    with pytest.raises(UserError, match=f"^method={method}: the input is a non-uniformly pruned checkpoint"):
        quant_methods.get(method).check_model(cfg, config, lambda: None)


def test_awq_refuses_an_architecture_llm_compressor_cannot_map():
    need_llmcompressor()
    from transformers import GPT2Config

    cfg = QuantizeConfig(method="awq", group_size=32)
    with pytest.raises(UserError, match=r"^method=awq: llm-compressor has no AWQ layer mapping for GPT2LMHeadModel"):
        quant_methods.get("awq").check_model(cfg, GPT2Config(architectures=["GPT2LMHeadModel"]), lambda: None)


# ------------------------------------------------------------------ pipelines: one grid for every method

def test_pipeline_wide_values_reach_only_the_methods_that_read_them(tmp_path):
    from mlproject.pipeline import spec

    raw = {"params": {"model": "m", "group_size": 64, "calibration": "wikitext2"},
           "steps": {"r": {"step": "quantize", "method": "rtn"}, "h": {"step": "quantize", "method": "hqq"},
                     "a": {"step": "quantize", "method": "autoround"}, "n": {"step": "quantize", "method": "bnb-nf4"},
                     "c": {"step": "compare", "runs": "${r.run_id},${h.run_id},${a.run_id},${n.run_id}"}}}
    pipe = spec.parse(raw)
    assert pipe.values("r")["group_size"] == 64 and "calibration" not in pipe.values("r")
    assert pipe.values("a")["calibration"] == "wikitext2" and "calibration" not in pipe.values("h")
    assert "group_size" not in pipe.values("n")
    gone = spec.skip_steps(pipe, ["a"])
    assert gone == {"a"} and pipe.values("c")["runs"] == "${r.run_id},${h.run_id},${n.run_id}"
    with pytest.raises(UserError, match=r"^skip 'zz': the pipeline has no step 'zz'"):
        spec.skip_steps(pipe, ["zz"])
    # a step that takes a skipped step's model goes too, and one whose only reference was skipped
    raw["steps"]["e"] = {"step": "evaluate", "model": "${h.model_uri}"}
    raw["steps"]["v"] = {"step": "compare", "runs": "${r.run_id},${n.run_id}", "baseline": "${n.run_id}"}
    pipe = spec.parse(raw)
    assert spec.skip_steps(pipe, ["h"]) == {"h", "e"} and "e" not in pipe.steps
    assert spec.skip_steps(pipe, ["n"]) == {"n", "v"} and pipe.values("c")["runs"] == "${r.run_id},${a.run_id}"


# ------------------------------------------------------------------ on a GPU

@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["awq", "gptq", "autoround"])
def test_calibrated_methods_on_cuda(method, mlflow_uri, tiny_dirs, ppl_text_file):
    if method in ("awq", "gptq"):
        need_llmcompressor()
    result = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method=method, device="cuda",
                          calibration=str(ppl_text_file), **settings(method))
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    m = run.data.metrics
    assert run.data.params["device"].startswith("cuda") and "peak_vram_mb" in m
    assert m["model_size_mb"] < 0.6 * m["model_size_mb_before"] and m["ppl/sample"] > 1
    back = loading.load_model(resolve(result.model_uri), fetch=tracking.download, device="cuda").model
    assert quant_methods.model_size_mb(back) < 0.6 * m["model_size_mb_before"]
    assert all(t.device.type == "cuda" for t in back.parameters())  # loaded onto the GPU, not left on CPU


# ------------------------------------------------------------------ fine-tuning on the packed model

@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_a_lora_trains_on_the_packed_model_and_reloads(method, mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    import tiny
    from mlproject.config import FinetuneStepConfig
    from mlproject.steps import finetune

    if method == "gptq":
        need_llmcompressor()
    calib = {} if method == "hqq" else {"calibration": str(ppl_text_file)}
    q = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method=method, evaluate="false",
                     **{**settings(method, w_bits=4), **calib})
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in tiny.SFT_ROWS * 4))
    ft = finetune.run(FinetuneStepConfig(
        model=q.model_uri, dataset=str(rows), max_steps=4, train_batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8,
        lora_dropout=0.0, tasks="none", ppl_dataset=str(ppl_text_file), seqlen=32, batch_size="8", limit="4",
        output_dir=str(tmp_path / "ckpt"), tracking_uri=mlflow_uri, experiment="test-calibrated", dtype="float32"))
    run = mlflow_client(mlflow_uri).get_run(ft.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlproject.upstream_run"] == q.run_id
    lora_b = [p for n, p in ft.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapter trained
    back = loading.load_model(resolve(ft.model_uri), fetch=tracking.download, dtype="float32")
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ft.model.eval()
        assert torch.allclose(back.model(ids).logits.float(), ft.model(ids).logits.float(), atol=1e-5)


@pytest.mark.parametrize("method,finetuning,needle", [
    ("autoround", "lora", "peft has no LoRA layer for auto-round's packed QuantLinear"),
    ("hqq", "full", "finetuning=full cannot train a hqq checkpoint's packed weights"),
    ("hqq", "qlora", "this model is already hqq"),
])
def test_finetuning_a_packed_model_it_cannot_train_is_refused(method, finetuning, needle, mlflow_uri, tiny_dirs,
                                                              ppl_text_file, capsys, monkeypatch):
    calib = {} if method == "hqq" else {"calibration": str(ppl_text_file)}
    q = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method=method, evaluate="false",
                     **{**settings(method, w_bits=4), **calib})
    assert_bad_input(["finetune", "--model", q.model_uri, "--dataset", "offline:sft_mlp_nonce", "--finetuning",
                      finetuning, "--max-steps", "1"], needle, mlflow_uri, f"ft-packed-{method}-{finetuning}",
                     capsys, monkeypatch)
