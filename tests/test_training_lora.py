"""SFT / DPO with LoRA (and full fine-tuning) on tiny random models: a few real optimizer steps each."""

from __future__ import annotations

import math

import pytest
import tiny
from conftest import model_device

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from transformers import TrainerCallback  # noqa: E402

from mlproject.errors import UserError  # noqa: E402
from mlproject.training import FinetuneConfig, TrainingDiverged, save_output, train  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_torch_thread")


SFT_ROWS, DPO_ROWS = tiny.SFT_ROWS, tiny.DPO_ROWS


def sft_data(n=8):
    return datasets.Dataset.from_list((SFT_ROWS * n)[:n])


def cfg(**kw):
    base = dict(max_steps=3, train_batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, save_steps=0)
    base.update(kw)
    return FinetuneConfig(**base)


class Snapshot(TrainerCallback):
    """Copies the trainable parameters as training starts (after peft wrapped the model)."""

    def __init__(self):
        self.before = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def base_weights(model):
    """Frozen base weights by their original (un-peft-wrapped) names."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        n.replace(".base_layer.", "."): p.detach().clone()
        for n, p in base.named_parameters() if "lora_" not in n
    }


def logits(model, tokenizer, text="the quick brown fox jumps over"):
    """CPU logits, computed where the model lives (the Trainer moves it to CUDA when present)."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model_device(model))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def on_device_of(model, other):
    """``model`` moved to where ``other`` lives, so both compute with the same kernels."""
    return model.to(model_device(other))


def assert_trained(result, snap, before_base, logs, steps):
    assert [s for s, _ in logs] == list(range(1, steps + 1))
    assert all(math.isfinite(d["loss"]) for _, d in logs)
    assert result.global_step == steps and result.final_loss == logs[-1][1]["loss"]
    assert 0 < result.trainable_params < result.total_params
    assert result.peak_memory_mb > 0 and result.train_seconds > 0
    after = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert after.keys() == snap.before.keys() and after
    assert sum(p.numel() for p in after.values()) == result.trainable_params
    changed = [n for n in after if not torch.equal(after[n], snap.before[n])]
    assert len(changed) == len(after), f"unchanged trainable params: {set(after) - set(changed)}"
    for name, value in base_weights(result.model).items():
        assert torch.equal(value.cpu(), before_base[name].cpu()), f"frozen weight {name} changed"


def test_sft_lora_trains_saves_and_merges(tmp_path, tiny_tokenizer):
    model = tiny.make_model("llama")
    before_base = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs, snap = [], Snapshot()
    result = train(model, tiny_tokenizer, sft_data(), cfg(), on_log=lambda d, s: logs.append((s, d)),
                   output_dir=tmp_path / "ckpt", callbacks=[snap])
    assert_trained(result, snap, before_base, logs, steps=3)
    assert {"loss", "learning_rate", "grad_norm"} <= logs[0][1].keys()
    metrics = result.metrics()
    assert metrics["train_steps"] == 3 and metrics["trainable_params"] == result.trainable_params
    assert ("peak_vram_mb" if torch.cuda.is_available() else "peak_rss_mb") in metrics
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))  # save_steps=0: no checkpoints

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained_logits = logits(result.model, tiny_tokenizer)
    saved = save_output(result.model, tiny_tokenizer, tmp_path / "out", merge=True)
    assert (saved.adapter_dir / "adapter_config.json").is_file()
    assert (saved.adapter_dir / "tokenizer.json").is_file()

    reloaded = on_device_of(PeftModel.from_pretrained(tiny.make_model("llama"), saved.adapter_dir), result.model)
    assert torch.allclose(logits(reloaded, tiny_tokenizer), trained_logits, atol=1e-6)

    merged = on_device_of(AutoModelForCausalLM.from_pretrained(saved.model_dir), result.model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, tiny_tokenizer), trained_logits, atol=1e-5)
    assert torch.allclose(logits(saved.model, tiny_tokenizer), trained_logits, atol=1e-5)


def test_sft_on_messages(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]} for r in SFT_ROWS]
    logs = []
    result = train(tiny.make_model("qwen2"), tiny_tokenizer, datasets.Dataset.from_list(rows),
                   cfg(max_steps=2, target_modules="q_proj,v_proj"),
                   on_log=lambda d, s: logs.append((s, d)), output_dir=tmp_path)
    assert [s for s, _ in logs] == [1, 2] and math.isfinite(result.final_loss)
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)


def test_dpo_lora(tmp_path, tiny_tokenizer):
    model = tiny.make_model("mistral")
    before_base = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs, snap = [], Snapshot()
    data = datasets.Dataset.from_list(DPO_ROWS * 2)
    result = train(model, tiny_tokenizer, data, cfg(method="dpo", max_steps=3, beta=0.1),
                   on_log=lambda d, s: logs.append((s, d)), output_dir=tmp_path / "ckpt", callbacks=[snap])
    assert_trained(result, snap, before_base, logs, steps=3)
    first, last = logs[0][1], logs[-1][1]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= first.keys()
    # Step 1: policy == reference (LoRA B starts at 0), so the DPO loss is log 2 and margins 0.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["rewards/margins"] == pytest.approx(0)
    assert last["rewards/margins"] > 0 and last["loss"] < first["loss"]

    saved = save_output(result.model, tiny_tokenizer, tmp_path / "out")
    assert saved.model_dir is None and not (saved.adapter_dir / "ref").exists()


def test_full_finetune(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny.make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, tiny_tokenizer, sft_data(), cfg(finetuning="full", max_steps=2, lr=1e-3),
                   output_dir=tmp_path / "ckpt")
    assert result.trainable_params == result.total_params == sum(p.numel() for p in before.values())
    unchanged = [n for n, p in result.model.named_parameters() if torch.equal(p.cpu(), before[n])]
    assert not unchanged
    saved = save_output(result.model, tiny_tokenizer, tmp_path / "out", merge=True)
    assert saved.adapter_dir is None
    reloaded = on_device_of(AutoModelForCausalLM.from_pretrained(saved.model_dir), result.model)
    assert torch.allclose(logits(reloaded, tiny_tokenizer), logits(result.model, tiny_tokenizer), atol=1e-6)


def completion_accuracy(model, tokenizer):
    """Fraction of (prompt, wrong completion) pairs where the right completion is more likely."""
    def logp(prompt, completion):
        p = tokenizer(prompt).input_ids
        ids = tokenizer(prompt + completion).input_ids
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([ids], device=model_device(model))).logits.float().log_softmax(-1)[0]
        return sum(lp[i - 1, ids[i]].item() for i in range(len(p), len(ids)))

    model.eval()
    wins = total = 0
    for row in SFT_ROWS:
        right = logp(row["prompt"], row["completion"])
        for other in SFT_ROWS:
            if other is not row:
                wins += right > logp(row["prompt"], other["completion"])
                total += 1
    return wins / total


def test_sft_learns_toy_mapping(tmp_path, tiny_tokenizer):
    # initializer_range=0.2: the default 0.02 gives near-uniform logits that a few LoRA steps
    # barely move (real checkpoints have far larger weights than a fresh 0.02 init).
    model = tiny.make_model("llama", seed=1, initializer_range=0.2)
    before = completion_accuracy(model, tiny_tokenizer)
    result = train(model, tiny_tokenizer, sft_data(8),
                   cfg(max_steps=16, train_batch_size=4, lr=1e-2, lora_r=8, chat_template="off"),
                   output_dir=tmp_path)
    after = completion_accuracy(result.model, tiny_tokenizer)
    assert before < 0.6 and after == 1.0, (before, after)


def test_nan_guard_raises_training_diverged(tmp_path, tiny_tokenizer):
    logs = []
    with pytest.raises(TrainingDiverged) as err:
        train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=6, lr=1e30, save_steps=1),
              on_log=lambda d, s: logs.append((s, d)), output_dir=tmp_path)
    step = err.value.step
    assert err.value.key in ("loss", "grad_norm") and not math.isfinite(err.value.value)
    assert 1 < step < 6 and "diverged" in str(err.value)
    assert [s for s, _ in logs] == list(range(1, step + 1))  # the bad step is still reported
    assert not all(math.isfinite(v) for v in (logs[-1][1]["loss"], logs[-1][1]["grad_norm"]))
    # Stopped at once, and the diverged weights were not checkpointed.
    assert (tmp_path / f"checkpoint-{step - 1}").is_dir() and not (tmp_path / f"checkpoint-{step}").exists()


class InjectInf(TrainerCallback):
    """Poisons one LoRA weight after step 2, as a numerical blow-up would."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            p = next(p for n, p in model.named_parameters() if "lora_B" in n)
            p.data.fill_(float("inf"))


def test_injected_inf_stops_at_next_step(tmp_path, tiny_tokenizer):
    logs = []
    with pytest.raises(TrainingDiverged) as err:
        train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=6),
              on_log=lambda d, s: logs.append((s, d)), output_dir=tmp_path, callbacks=[InjectInf()])
    assert err.value.step == 3 and [s for s, _ in logs] == [1, 2, 3]


class Crash(TrainerCallback):
    """Kills training as step ``at + 1`` begins (checkpoint ``at`` is already on disk)."""

    def __init__(self, at):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_from_last_checkpoint(tmp_path, tiny_tokenizer):
    ckpt = tmp_path / "ckpt"
    first = []
    with pytest.raises(KeyboardInterrupt):
        train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=6, save_steps=2),
              on_log=lambda d, s: first.append(s), output_dir=ckpt, callbacks=[Crash(at=4)])
    assert first == [1, 2, 3, 4] and (ckpt / "checkpoint-4").is_dir()

    second = []
    resumed = train(tiny.make_model("llama"), tiny_tokenizer, sft_data(),
                    cfg(max_steps=6, save_steps=2, resume=True),
                    on_log=lambda d, s: second.append(s), output_dir=ckpt)
    assert second == [5, 6] and resumed.resumed_from_step == 4 and resumed.global_step == 6
    assert resumed.logged_steps == [5, 6]

    # Same weights as an uninterrupted run: adapter, optimizer, scheduler and data order were restored.
    straight = train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=6),
                     output_dir=tmp_path / "straight")
    a = dict(resumed.model.named_parameters())
    for name, p in straight.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, a[name].to(p.device), atol=1e-6), name


def test_resume_with_more_steps(tmp_path, tiny_tokenizer):
    """A finished 4-step run extended to 6 with resume; skip_logged_through drops steps already logged."""
    train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=4, save_steps=2), output_dir=tmp_path)
    steps = []
    result = train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=6, save_steps=2, resume=True),
                   on_log=lambda d, s: steps.append(s), output_dir=tmp_path, skip_logged_through=5)
    assert steps == [6] and result.global_step == 6 and math.isfinite(result.final_loss)


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_tokenizer):
    steps = []
    result = train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(max_steps=2, resume=True),
                   on_log=lambda d, s: steps.append(s), output_dir=tmp_path)
    assert steps == [1, 2] and result.resumed_from_step == 0


def test_bad_inputs(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="missing column"):
        train(tiny.make_model("llama"), tiny_tokenizer, datasets.Dataset.from_list([{"prompt": "a"}]), cfg(),
              output_dir=tmp_path)
    with pytest.raises(UserError, match="4-bit"):
        train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(finetuning="qlora"), output_dir=tmp_path)
    from peft import LoraConfig, get_peft_model

    frozen = get_peft_model(tiny.make_model("llama"), LoraConfig(r=2, target_modules="all-linear"))
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        train(frozen, tiny_tokenizer, sft_data(), cfg(), output_dir=tmp_path)
    for bad in ("nonexistent_proj", "q_proj,lm_head"):
        with pytest.raises(UserError, match="target_modules"):
            train(tiny.make_model("llama"), tiny_tokenizer, sft_data(), cfg(target_modules=bad),
                  output_dir=tmp_path)
