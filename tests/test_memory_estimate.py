"""The peak-memory estimate every model step makes before loading (steps/shared/memory.py), on a
Mistral-7B-shaped weightless model, and the check that warns or, with strict_memory, refuses
before any run exists."""

import logging

import pytest

from conftest import assert_bad_input, mlflow_client
from mlproject.errors import UserError
from mlproject.steps.shared import memory as mem

GB = 1e9


@pytest.fixture(scope="module")
def mistral():
    """Mistral-7B's shape (transformers' MistralConfig defaults), from a meta-device model."""
    from transformers import MistralConfig

    from mlproject.models import loading

    config = MistralConfig()
    meta = loading.meta_model(config)
    return mem.ModelShape.from_config(config, loading.count_params(meta), meta)


def train(shape, dtype_bytes=2, cuda=True, **kw):
    return mem.estimate(shape, mem.Work("finetune", dtype_bytes, cuda=cuda, training=mem.Training(**kw)))


def test_the_shape_is_read_from_the_config(mistral):
    assert 7.23e9 < mistral.params < 7.25e9
    assert (mistral.layers, mistral.hidden, mistral.heads, mistral.kv_heads, mistral.head_dim, mistral.vocab) == \
        (32, 4096, 32, 8, 128, 32000)
    assert len(mistral.linears) == 32 * 7  # q k v o gate up down per layer; lm_head is not counted
    assert not any(name.endswith("lm_head") for name, _, _ in mistral.linears)


def test_weights_at_bf16_are_14_5_gb(mistral):
    est = mem.estimate(mistral, mem.Work("evaluate", 2, cuda=True))
    assert est.part("weights") == pytest.approx(14.48 * GB, rel=2e-3)
    assert est.total == est.part("weights")  # nothing evaluated: weights only
    fp32 = mem.estimate(mistral, mem.Work("evaluate", 4))
    assert fp32.part("weights") == pytest.approx(2 * est.part("weights"))


def test_quantize_while_loading_counts_bits_per_linear_weight(mistral):
    est = mem.estimate(mistral, mem.Work("quantize", 2, cuda=True, load_bits=4))
    linear = mistral.linear_params
    # linear layers at 4 bits, embeddings, head and norms in bf16
    assert est.part("weights") == pytest.approx(linear / 2 + (mistral.params - linear) * 2)
    assert 3.9 * GB < est.part("weights") < 4.1 * GB
    # an adapter is merged in float first: that float copy is the peak
    merged = mem.estimate(mistral, mem.Work("quantize", 2, cuda=True, load_bits=4, merge_first=True))
    assert merged.peak_phase == "adapter merge" and merged.total == pytest.approx(mistral.params * 2)


def test_lora_params_by_hand(mistral):
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)  # q,o + k,v + gate,up,down
    assert mem.lora_params(mistral, 16) == 32 * per_layer == 41_943_040
    assert 40e6 < mem.lora_params(mistral, 16) < 44e6
    assert mem.lora_params(mistral, 16, "q_proj,v_proj") == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert mem.lora_params(mistral, 8) == mem.lora_params(mistral, 16) // 2


def test_lora_trains_adapters_in_fp32_with_adam(mistral):
    est = train(mistral)
    n = mem.lora_params(mistral, 16)
    assert est.peak_phase == "training"
    assert est.part("LoRA adapters") == n * 4 and est.part("gradients") == n * 4
    assert est.part("optimizer") == 2 * n * 4
    assert est.part("weights") == pytest.approx(mistral.params * 2)


def test_full_finetune_optimizer_state(mistral):
    fp32 = train(mistral, dtype_bytes=4, cuda=False, finetuning="full")
    assert fp32.part("optimizer") == 2 * 4 * mistral.params  # two AdamW moments, fp32 parameters
    assert fp32.part("gradients") == 4 * mistral.params
    bf16 = train(mistral, finetuning="full")  # the moments follow the parameters' dtype
    assert bf16.part("optimizer") == 2 * 2 * mistral.params
    assert bf16.total > bf16.part("weights") + bf16.part("gradients") + bf16.part("optimizer")
    # full DPO keeps a frozen reference copy; LoRA DPO disables the adapter instead
    assert train(mistral, finetuning="full", method="dpo").part("reference model") == mistral.params * 2
    assert train(mistral, method="dpo").part("reference model") == 0


def test_qlora_base_is_nf4(mistral):
    est = train(mistral, finetuning="qlora")
    linear = mistral.linear_params
    assert est.part("weights (nf4)") == pytest.approx(linear * mem.NF4_BITS / 8 + (mistral.params - linear) * 4)
    assert est.part("weights (nf4)") < 0.35 * train(mistral).part("weights")


def test_activations_grow_linearly_in_batch(mistral):
    a1, a2, a4 = (train(mistral, train_batch_size=b).part("activations") for b in (1, 2, 4))
    assert a2 == pytest.approx(2 * a1) and a4 == pytest.approx(4 * a1)
    # Korthikanti et al.'s 34·s·b·h bytes per layer (fused attention: no s² term), by hand
    assert a1 == pytest.approx(32 * 512 * 1 * 4096 * 34)
    assert train(mistral, train_batch_size=1, max_length=1024).part("activations") == pytest.approx(2 * a1)
    # dpo runs chosen and rejected in one forward
    assert train(mistral, train_batch_size=1, method="dpo").part("activations") == pytest.approx(2 * a1)
    ckpt = train(mistral, train_batch_size=1, gradient_checkpointing=True).part("activations")
    assert ckpt == pytest.approx(32 * 512 * 4096 * 2 + 512 * 4096 * 34) and ckpt < a1 / 8
    assert train(mistral, train_batch_size=1).part("logits") == 512 * 32000 * (2 + 4)


def test_evaluation_kv_cache_and_ppl_logits_by_hand(mistral):
    ev = mem.Evaluation(batch_size=8, generation_tokens=256, ppl_seqlen=2048, ppl_batch_size=2)
    est = mem.estimate(mistral, mem.Work("evaluate", 2, cuda=True, evaluation=ev))
    context = mem.GEN_PROMPT_TOKENS + 256
    assert est.part("KV cache") == 2 * 32 * 8 * 128 * context * 8 * 2
    assert est.part("PPL logits") == 2 * 2048 * 32000 * 4 * 2
    # the phases do not overlap: the peak is weights plus the larger of the two
    assert est.total == pytest.approx(est.part("weights") + max(est.part("KV cache"), est.part("PPL logits")))
    # the PPL window and the generation context are capped by the model's context
    short = mem.ModelShape(**{**mistral.__dict__, "context": 512})
    capped = mem.estimate(short, mem.Work("evaluate", 2, evaluation=ev))
    assert capped.part("PPL logits") == 2 * 512 * 32000 * 8 and capped.part("KV cache") == 2 * 32 * 8 * 128 * 512 * 8 * 2


def test_prune_evaluates_the_smaller_model(mistral):
    ev = mem.Evaluation(ppl_seqlen=2048)
    est = mem.estimate(mistral, mem.Work("prune", 2, evaluation=ev, kept=0.8))
    phases = est.phases
    assert phases["prune"][0].bytes == pytest.approx(mistral.params * 2)
    assert phases["evaluation perplexity"][0].bytes == pytest.approx(0.8 * mistral.params * 2)


def test_qlora_evaluates_the_full_precision_input_before(mistral):
    ev = mem.Evaluation(ppl_seqlen=2048)
    est = mem.estimate(mistral, mem.Work("finetune", 2, cuda=True, evaluation=ev,
                                         training=mem.Training(finetuning="qlora", eval_before=True, merge=True)))
    assert est.phases["evaluation before perplexity"][0].bytes == pytest.approx(mistral.params * 2)
    after = est.phases["evaluation after perplexity"]
    assert [p.name for p in after] == ["weights (nf4)", "merged copy", "PPL logits"]


def test_the_description_names_the_largest_parts_and_their_knobs(mistral):
    est = train(mistral, finetuning="full", train_batch_size=8)
    text = est.describe()
    assert text.startswith(f"~{est.total / GB:.1f} GB at its peak (training: optimizer 29.0 GB, ")
    knobs = est.knobs()
    assert knobs[0] == "finetuning=lora" and "train_batch_size" in knobs and "gradient_checkpointing=true" in knobs
    assert knobs[-1].startswith("a smaller model")
    assert "gradient_checkpointing=true" not in train(mistral, gradient_checkpointing=True).knobs()


def test_alias_table_only_gives_weights():
    est = mem.estimate(mem.ModelShape(params=7_000_000_000), mem.Work("evaluate", 2, evaluation=mem.Evaluation(
        generation_tokens=256, ppl_seqlen=2048)))
    assert est.part("weights") == 14e9 and est.part("KV cache") == 0 and est.notes


# ------------------------------------------------------------------ the check, before any run

class Mem:
    available = 100 * 2**10  # 100 KiB: the tiny model's 115,008 fp32 parameters do not fit


def test_strict_memory_refuses_before_any_run(tiny_dirs, mlflow_uri, capsys, monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    assert_bad_input(["evaluate", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--dtype", "float32",
                      "--ppl-dataset", "none", "--tasks", "none", "--strict-memory"],
                     "strict_memory: evaluate of", mlflow_uri, "memory-strict", capsys, monkeypatch)
    # the refusal names the numbers and the knobs
    from mlproject import cli

    cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--dtype", "float32",
              "--tasks", "none", "--ppl-dataset", "none", "--strict-memory", "true",
              "--tracking-uri", mlflow_uri, "--experiment", "memory-strict"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs ~0.5 MB at its peak (load: weights 0.5 MB)" in line and "this host's RAM has 0.1 MB free" in line
    assert "dtype=bfloat16" in line and "model=smollm2" in line
    found = mlflow_client(mlflow_uri).get_experiment_by_name("memory-strict")
    assert found is None or not mlflow_client(mlflow_uri).search_runs([found.experiment_id])


def test_without_strict_memory_it_only_warns(tiny_dirs, mlflow_uri, monkeypatch, caplog):
    import psutil

    from mlproject.config import EvaluateConfig
    from mlproject.steps import evaluate

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    caplog.set_level(logging.WARNING, logger="mlproject.steps.shared.checks")
    cfg = EvaluateConfig(model=str(tiny_dirs["llama"]), tasks="none", ppl_dataset="offline", device="cpu",
                         dtype="float32", tracking_uri=mlflow_uri)
    evaluate.check(cfg)  # no error
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "mlproject.steps.shared.checks"]
    assert "evaluation perplexity: PPL logits" in msg and "ppl_batch_size" in msg
    assert "strict_memory=true refuses" in msg
    # the step's check is the gate: with the memory there, nothing is said
    caplog.clear()

    class Plenty:
        available = 64 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Plenty())
    evaluate.check(cfg)
    assert not [r for r in caplog.records if r.name == "mlproject.steps.shared.checks"]


def test_finetune_refusal_names_training_knobs(tiny_dirs, mlflow_uri, monkeypatch):
    import psutil

    from mlproject.config import FinetuneStepConfig
    from mlproject.steps import finetune

    class Some:
        available = 2 * 2**20  # 2 MiB: the tiny weights fit, training's activations and logits do not

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Some())
    cfg = FinetuneStepConfig(model=str(tiny_dirs["llama"]), device="cpu", dtype="float32", tasks="none",
                             ppl_dataset="none", train_batch_size=8, max_length=512, strict_memory=True,
                             tracking_uri=mlflow_uri)
    with pytest.raises(UserError) as info:
        finetune.check(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "(training: " in msg and "train_batch_size" in msg and "max_length" in msg
    assert "gradient_checkpointing=true" in msg
    finetune.check(FinetuneStepConfig(**{**cfg.__dict__, "train_batch_size": 1, "max_length": 16}))  # fits


def test_strict_memory_is_not_part_of_the_reuse_key():
    from mlproject.config import EvaluateConfig
    from mlproject.steps.shared import runs

    keys = {runs.step_key("evaluate", EvaluateConfig(model="smollm2", device="cpu", strict_memory=s),
                          upstream_key=lambda _: None) for s in (False, True)}
    assert len(keys) == 1


def test_cuda_compares_with_the_device_free_memory(tiny_dirs, monkeypatch):
    import torch

    from mlproject.models.reference import resolve
    from mlproject.steps.shared import checks

    seen = []

    def mem_get_info(device):
        seen.append(str(device))
        return 100_000, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with pytest.raises(UserError) as info:
        checks.check_memory(resolve(str(tiny_dirs["llama"])), "cuda:1", torch.bfloat16, strict=True)
    assert seen == ["cuda:1"]
    msg = str(info.value)
    assert "bfloat16) needs ~0.2 MB at its peak (load: weights 0.2 MB)" in msg and "cuda:1 has 0.1 MB free" in msg
    assert "device=cuda" not in msg and "dtype=bfloat16" not in msg  # already both


def test_quantize_and_prune_checks_refuse_under_strict_memory(tiny_dirs, mlflow_uri, monkeypatch):
    import psutil

    from mlproject.config import PruneStepConfig, QuantizeConfig
    from mlproject.steps import prune, quantize

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    common = dict(model=str(tiny_dirs["llama"]), device="cpu", dtype="float32", tasks="none", ppl_dataset="none",
                  tracking_uri=mlflow_uri, strict_memory=True)
    with pytest.raises(UserError, match=r"^strict_memory: quantize of .* \(quantize: weights "):
        quantize.check(QuantizeConfig(method="rtn", group_size=32, **common))
    with pytest.raises(UserError, match=r"^strict_memory: prune of .* \(prune: weights "):
        prune.check(PruneStepConfig(importance="magnitude", **common))
    prune.check(PruneStepConfig(importance="magnitude", **{**common, "strict_memory": False}))  # a warning only
