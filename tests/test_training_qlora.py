"""QLoRA: a 4-bit NF4 base (bitsandbytes runs it on CPU too) + LoRA, trained, saved, reloaded, merged."""

from __future__ import annotations

import math

import pytest
import tiny
from conftest import model_device

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")
pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from mlproject.training import FinetuneConfig, qlora_quantization_config, save_output, train  # noqa: E402
from mlproject.training.adapters import dequantized_copy  # noqa: E402

ROWS = [
    {"prompt": "the quick", "completion": " fox"},
    {"prompt": "capital of France is", "completion": " Paris"},
]
PREF_ROWS = [{"prompt": "the quick brown", "chosen": " fox", "rejected": " dog"}] * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg(**kw):
    base = dict(finetuning="qlora", max_steps=3, train_batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                save_steps=0)
    base.update(kw)
    return FinetuneConfig(**base)


def load_4bit(path, compute_dtype=torch.float32):
    """The 4-bit base with float32 compute on every device: these tests check float32 numerics
    (the bf16 CUDA recipe has its own test, marked cuda)."""
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qlora_quantization_config(compute_dtype))


#: A 4-bit forward on CUDA runs bitsandbytes' fused kernels: same math as dequantize-then-matmul,
#: another summation order. On CPU the generic path is bit-for-bit the float one.
FOUR_BIT_ATOL = 1e-4 if torch.cuda.is_available() else 1e-5


def logits(model, tokenizer, text="the quick brown fox jumps over", exact=True):
    """Forward pass; ``exact`` keeps the model in train mode (no dropout is configured here).

    In eval mode without grad, bitsandbytes on AVX512-BF16 CPUs switches 4-bit layers to a fused
    bf16 kernel (~1e-3 off the fp32 result); train mode keeps the fp32 dequantize-then-matmul path.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    model.train(exact)
    with torch.no_grad():
        out = model(input_ids=ids).logits.float().cpu()
    model.eval()
    return out


class Snapshot(TrainerCallback):
    def __init__(self):
        self.trainable, self.frozen = {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for n, p in model.named_parameters():
            (self.trainable if p.requires_grad else self.frozen)[n] = p.detach().clone()


def test_quantization_config():
    q = qlora_quantization_config(torch.float32)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.float32
    assert qlora_quantization_config("bfloat16").bnb_4bit_compute_dtype == torch.bfloat16


def test_qlora_sft_trains_saves_reloads_and_merges(tiny_dirs, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    model = load_4bit(tiny_dirs["llama"])
    assert model.is_loaded_in_4bit
    logs, snap = [], Snapshot()
    rows = datasets.Dataset.from_list(ROWS * 4)
    result = train(model, tiny_tokenizer, rows, cfg(), on_log=lambda d, s: logs.append((s, d)),
                   output_dir=tmp_path / "ckpt", callbacks=[snap])

    assert [s for s, _ in logs] == [1, 2, 3] and all(math.isfinite(d["loss"]) for _, d in logs)
    after = dict(result.model.named_parameters())
    assert snap.trainable and all("lora_" in n for n in snap.trainable)
    # trl casts QLoRA adapters to bf16; with fp32 compute (CPU) train() puts them back to fp32.
    assert all(v.dtype == torch.float32 for v in snap.trainable.values())
    assert all(not torch.equal(after[n], v) for n, v in snap.trainable.items())
    # The packed 4-bit base weights (uint8) and everything else frozen are bit-identical.
    assert any(v.dtype == torch.uint8 for v in snap.frozen.values())
    assert all(torch.equal(after[n], v) for n, v in snap.frozen.items())
    # 4-bit weights count at their unpacked size: same total as the fp32 model plus the adapter.
    fp_total = sum(p.numel() for p in tiny.make_model("llama").parameters())
    assert result.total_params == fp_total + result.trainable_params

    trained = logits(result.model, tiny_tokenizer)
    saved = save_output(result.model, tiny_tokenizer, tmp_path / "out", merge=True)

    # Adapter on a freshly quantized base: NF4 quantization is deterministic, so same logits.
    reloaded = PeftModel.from_pretrained(load_4bit(tiny_dirs["llama"]), saved.adapter_dir)
    assert torch.allclose(logits(reloaded, tiny_tokenizer), trained, atol=FOUR_BIT_ATOL)
    inference = logits(result.model, tiny_tokenizer, exact=False)
    assert torch.allclose(logits(reloaded, tiny_tokenizer, exact=False), inference, atol=FOUR_BIT_ATOL)

    # Merged: the base is dequantized, then LoRA folded in full precision; a plain fp32 model results.
    merged = AutoModelForCausalLM.from_pretrained(saved.model_dir).to(model_device(result.model))
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert torch.allclose(logits(merged, tiny_tokenizer), trained, atol=1e-4)
    assert torch.allclose(inference, trained, atol=2e-2)
    # The trained 4-bit model is left usable (the eval forward above left its CPU quant state
    # bf16-rounded, hence the looser tolerance).
    assert torch.allclose(logits(result.model, tiny_tokenizer), trained, atol=1e-2)


def test_dequantized_copy_matches_4bit_forward(tiny_dirs, tiny_tokenizer):
    q = load_4bit(tiny_dirs["qwen2"])
    fp = dequantized_copy(q)
    assert torch.allclose(logits(fp, tiny_tokenizer), logits(q, tiny_tokenizer), atol=FOUR_BIT_ATOL)
    # After an eval-mode forward (which may repack CPU weights in place) dequantizing still works.
    logits(q, tiny_tokenizer, exact=False)
    again = dequantized_copy(q)
    assert torch.allclose(logits(again, tiny_tokenizer), logits(fp, tiny_tokenizer), atol=1e-2)
    # ... and differs from the original fp32 weights by the quantization error only.
    orig = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    w_fp = fp.model.layers[0].mlp.up_proj.weight
    w_orig = orig.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w_fp, w_orig)
    assert (w_fp - w_orig).abs().max() < 0.25 * w_orig.abs().max()


def test_qlora_dpo(tiny_dirs, tiny_tokenizer, tmp_path):
    logs = []
    result = train(load_4bit(tiny_dirs["mistral"]), tiny_tokenizer, datasets.Dataset.from_list(PREF_ROWS),
                   cfg(method="dpo", max_steps=2), on_log=lambda d, s: logs.append((s, d)), output_dir=tmp_path)
    assert [s for s, _ in logs] == [1, 2]
    assert logs[0][1]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert math.isfinite(result.final_loss) and "rewards/margins" in logs[-1][1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_bf16_compute_on_cuda(tiny_dirs, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dirs["llama"], quantization_config=qlora_quantization_config(torch.bfloat16), device_map={"": 0})
    logs = []
    result = train(model, tiny_tokenizer, datasets.Dataset.from_list(ROWS * 4), cfg(max_steps=3),
                   on_log=lambda d, s: logs.append((s, d)), output_dir=tmp_path)
    assert [s for s, _ in logs] == [1, 2, 3] and all(math.isfinite(d["loss"]) for _, d in logs)
    assert result.memory_kind == "cuda" and result.peak_memory_mb > 0
    # trl keeps QLoRA adapters in bf16 when the compute dtype is bf16 (QLoRA paper recipe).
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters() if p.requires_grad)
    saved = save_output(result.model, tiny_tokenizer, tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(saved.model_dir, dtype=torch.bfloat16, device_map={"": 0})
    assert torch.allclose(logits(merged, tiny_tokenizer), logits(result.model, tiny_tokenizer), atol=0.1)
