"""Structured pruning: ratios, real shrinkage, reload, and which channels/groups importance picks."""

from __future__ import annotations

import pytest
import torch

import tiny
from mlproject.compression.prune import PruneConfig, count_params, load_pruned_model, prune_model
from mlproject.errors import UserError

WIDE = dict(intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)  # head_dim 64/8 = 8


def _ids(n=4, seq=16, seed=0):
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", tiny.ARCHS)
@pytest.mark.parametrize("targets, ratio, importance", [
    ("mlp", 0.2, "magnitude"), ("both", 0.3, "activation"), ("heads", 0.075, "magnitude"),
])
def test_ratio_forward_and_reload(arch, targets, ratio, importance, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny.make_model(arch, **WIDE)
    before = count_params(model)
    rep = prune_model(model, PruneConfig(ratio=ratio, targets=targets, importance=importance),
                      calibration_ids=_ids())
    after = count_params(model)
    assert rep.params_before == before and rep.params_after == after
    assert rep.achieved_ratio == pytest.approx(1 - after / before)
    assert abs(rep.achieved_ratio - ratio) <= 0.01
    assert rep.uniform
    cfg = model.config
    assert cfg.intermediate_size == model.model.layers[0].mlp.down_proj.in_features
    assert cfg.num_key_value_heads * cfg.head_dim == model.model.layers[0].self_attn.k_proj.out_features
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 2  # GQA ratio preserved
    if targets != "heads":
        assert cfg.intermediate_size < 256
    if targets != "mlp":
        assert cfg.num_key_value_heads < 4 and cfg.head_dim == 8

    ids = _ids(2, 12, seed=1)
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert count_params(reloaded) == after
    assert torch.equal(_logits(reloaded, ids), logits)


def test_magnitude_removes_zeroed_channels_and_groups():
    model = tiny.make_model("llama", **WIDE)
    layer = model.model.layers[1]
    dead = [3, 50, 51, 200]
    with torch.no_grad():
        for i in dead:
            layer.mlp.gate_proj.weight[i] = 0
            layer.mlp.up_proj.weight[i] = 0
            layer.mlp.down_proj.weight[:, i] = 0
        # KV group 2 of layer 1: its k/v head, its 2 query heads and their o_proj columns
        for lin, rows in ((layer.self_attn.q_proj, slice(32, 48)), (layer.self_attn.k_proj, slice(16, 24)),
                          (layer.self_attn.v_proj, slice(16, 24))):
            lin.weight[rows] = 0
        layer.self_attn.o_proj.weight[:, 32:48] = 0
        survivors_up = layer.mlp.up_proj.weight[[i for i in range(256) if i not in dead]].clone()
        survivors_k = torch.cat([layer.self_attn.k_proj.weight[:16], layer.self_attn.k_proj.weight[24:]]).clone()

    # 1 group per layer: 2 layers · (16+8+8+16)·64 weights; 4 channels per layer: 2 · 4 · 3·64
    rep = prune_model(model, PruneConfig(ratio=2 * 48 * 64 / count_params(model), targets="heads"))
    assert rep.kv_groups_removed == 1
    rep = prune_model(model, PruneConfig(ratio=2 * 4 * 3 * 64 / count_params(model), targets="mlp"))
    assert rep.channels_removed == 4
    assert torch.equal(layer.mlp.up_proj.weight, survivors_up)
    assert torch.equal(layer.self_attn.k_proj.weight, survivors_k)


def test_activation_removes_channels_whose_inputs_never_fire():
    model = tiny.make_model("mistral", **WIDE)
    silent = [7, 8, 100, 255]
    with torch.no_grad():
        for layer in model.model.layers:
            for i in silent:
                layer.mlp.up_proj.weight[i] = 0  # act(gate)·up = 0: down_proj never sees this channel
                layer.mlp.gate_proj.weight[i] *= 20  # …while its weights are the largest
                layer.mlp.down_proj.weight[:, i] *= 20
    ratio = (2 * 4 * 3 * 64) / count_params(model)

    magnitude = tiny.make_model("mistral", **WIDE)
    magnitude.load_state_dict(model.state_dict())
    prune_model(magnitude, PruneConfig(ratio=ratio, importance="magnitude"))
    kept = magnitude.model.layers[0].mlp.gate_proj.weight
    assert (kept.abs().amax(1) > 0.3).sum() == 4  # magnitude keeps the loud-but-silent channels

    rep = prune_model(model, PruneConfig(ratio=ratio, importance="activation"), calibration_ids=_ids(8, 16))
    assert rep.channels_removed == 4
    for layer in model.model.layers:
        assert (layer.mlp.up_proj.weight.abs().sum(1) > 0).all()  # all silent channels are gone
        assert (layer.mlp.gate_proj.weight.abs().amax(1) < 0.3).all()


def test_activation_scores_heads_by_their_output():
    model = tiny.make_model("qwen2", **WIDE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[0:8] = 0  # KV group 0's values are 0: its heads output 0
            layer.self_attn.v_proj.bias[0:8] = 0
            layer.self_attn.q_proj.weight[0:16] *= 10  # …while its query weights are the largest
    group = 2 * (16 + 8 + 8 + 16) * 64 + 2 * (16 + 8 + 8)  # weights + q/k/v biases, 2 layers
    ratio = group / count_params(model)
    prune_model(model, PruneConfig(ratio=ratio, targets="heads", importance="activation"), calibration_ids=_ids())
    for layer in model.model.layers:
        assert layer.self_attn.v_proj.weight.abs().sum(1).min() > 0
        assert layer.self_attn.k_proj.out_features == 24


def test_keep_layers_non_uniform_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny.make_model("qwen2", num_hidden_layers=4, tie_word_embeddings=True, **WIDE)
    rep = prune_model(model, PruneConfig(ratio=0.15, targets="both", keep_layers=1))
    assert abs(rep.achieved_ratio - 0.15) <= 0.01
    assert rep.pruned_layers == [1, 2] and not rep.uniform
    sizes = [s["intermediate_size"] for s in rep.layer_sizes]
    assert sizes[0] == sizes[3] == 256 and sizes[1] == sizes[2] < 256
    ids = _ids(2, 12)
    logits = _logits(model, ids)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatch"):  # loud, never silently re-initialised
        AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = load_pruned_model(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_logits(reloaded, ids), logits)


def test_impossible_targets_and_bad_inputs():
    model = tiny.make_model("llama", **WIDE)
    with pytest.raises(UserError, match="reaches only"):
        prune_model(model, PruneConfig(ratio=0.1, targets="heads"))
    with pytest.raises(UserError, match="more than targets=mlp can remove"):
        prune_model(model, PruneConfig(ratio=0.8, targets="mlp"))
    with pytest.raises(UserError, match="calibration"):
        prune_model(model, PruneConfig(importance="activation"))
    with pytest.raises(UserError, match="keeps all 2"):
        prune_model(model, PruneConfig(keep_layers=1))
    assert model.config.intermediate_size == 256  # nothing touched by the failures


@pytest.mark.parametrize("kwargs, needle", [
    (dict(ratio=0), "ratio"), (dict(ratio=1.0), "ratio"), (dict(ratio="0.2"), "ratio"),
    (dict(importance="taylor"), "importance"), (dict(targets="layers"), "targets"),
    (dict(keep_layers=-1), "keep_layers"), (dict(layerwise="owl"), "layerwise"),
])
def test_bad_configs(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        PruneConfig(**kwargs)


def test_unsupported_architecture():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match=r"'gpt2'.*llama, mistral, qwen2"):
        prune_model(model, PruneConfig())
