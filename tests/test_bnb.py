"""bitsandbytes through transformers on CPU: layer types, finite logits, real sizes, save/reload."""

from __future__ import annotations

import pytest
import torch

from conftest import model_device
from mlproject.compression.bnb import BNB_METHODS, bnb_config, disable_cpu_repacking, model_size_bytes, model_size_mb
from mlproject.errors import UserError

bnb = pytest.importorskip("bitsandbytes")


def _load(path, method):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(method))


def _ids(model):
    """Token ids on the model's device (bitsandbytes puts quantized layers on CUDA when present)."""
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0)).to(model_device(model))


def test_configs():
    assert bnb_config("bnb-nf4").bnb_4bit_quant_type == "nf4"
    fp4 = bnb_config("bnb-fp4", compute_dtype="bfloat16", double_quant=True)
    assert fp4.load_in_4bit and fp4.bnb_4bit_quant_type == "fp4"
    assert fp4.bnb_4bit_compute_dtype == torch.bfloat16 and fp4.bnb_4bit_use_double_quant
    assert bnb_config("bnb-int8").load_in_8bit
    with pytest.raises(UserError, match="bnb-nf4, bnb-fp4, bnb-int8"):
        bnb_config("gptq")
    with pytest.raises(UserError, match="compute dtype"):
        bnb_config("bnb-nf4", compute_dtype="float7")


@pytest.mark.parametrize("method", BNB_METHODS)
def test_quantized_layers_forward_and_size(tiny_dirs, method):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    model = _load(tiny_dirs["llama"], method)
    layer_cls = bnb.nn.Linear8bitLt if method == "bnb-int8" else bnb.nn.Linear4bit
    quantized = [n for n, m in model.named_modules() if isinstance(m, layer_cls)]
    assert len(quantized) == 2 * 7  # every decoder linear; lm_head stays full precision
    assert not isinstance(model.lm_head, layer_cls)
    with torch.no_grad():
        logits = model(input_ids=_ids(model)).logits
    assert torch.isfinite(logits).all()
    full, small = model_size_mb(fp32), model_size_mb(model)
    assert small < full
    # the decoder linears hold ~0.5 (4-bit) or ~1 (int8) byte per weight + scales, whatever dtype
    # the rest of the model (and the float original) is in
    linear = sum(fp32.get_submodule(n).weight.numel() for n in quantized)
    per_weight = sum(model_size_bytes(model.get_submodule(n)) for n in quantized) / linear
    assert per_weight == pytest.approx(1.0 if method == "bnb-int8" else 0.5, abs=0.1)


def test_size_counts_fp32_exactly(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    n_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size()
                                                                     for b in model.buffers())
    assert model_size_mb(model) == n_bytes / 2**20


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_save_reload_identical_after_forward(tiny_dirs, tmp_path, method):
    """Lineage: the quantized model is saved and the next step reloads it with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    model = _load(tiny_dirs["llama"], method)
    layer_cls = bnb.nn.Linear8bitLt if method == "bnb-int8" else bnb.nn.Linear4bit
    assert disable_cpu_repacking(model) == (0 if method == "bnb-int8" else 14)
    ids = _ids(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits  # a forward before saving is the dangerous order
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        after_save = model(input_ids=ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # lands where the original did
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, layer_cls)
    disable_cpu_repacking(reloaded)  # same (generic) kernel path as the original, hence bit-equal
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.equal(before, after_save)
    assert torch.equal(before, again)


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_the_method_registry_sizes_and_prepares_bnb_checkpoints(tiny_dirs, tmp_path, method):
    """Evaluation sizes and loading prepares a model by the format its config declares, through
    the method registry: bitsandbytes checkpoints count their quant state and, reloaded on CPU,
    keep their 4-bit weights in the serializable layout; a float model is just its tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlproject.compression import methods
    from mlproject.compression.methods.bnb import BNB
    from mlproject.evaluation.engine import model_metrics
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    model = _load(tiny_dirs["llama"], method)
    assert methods.checkpoint_format(model) == "bitsandbytes" and methods.for_model(model) is BNB
    assert methods.model_size_mb(model) == model_size_mb(model) == model_metrics(model)["model_size_mb"]
    assert methods.model_size_mb(model) > methods.tensor_bytes(model) / 2**20  # quant state counted
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert methods.for_model(fp32) is None and methods.model_size_mb(fp32) == model_size_mb(fp32)
    model.save_pretrained(tmp_path / "q")
    AutoTokenizer.from_pretrained(tiny_dirs["llama"]).save_pretrained(tmp_path / "q")
    reloaded = loading.load_model(resolve(str(tmp_path / "q")), device="cpu").model
    four_bit = [m for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == (0 if method == "bnb-int8" else 14)
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)
