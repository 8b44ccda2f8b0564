"""RTN quantization: grid properties on hand-made tensors, then whole tiny models."""

from __future__ import annotations

import math

import pytest
import torch

import tiny
from mlproject.compression.rtn import RTNConfig, effective_bits, quantize_model, quantize_tensor
from mlproject.errors import UserError


def _weight(out_f=16, in_f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_and_half_step_error(scheme, bits):
    w = _weight()
    deq, scales, zeros = quantize_tensor(w, bits, 16, scheme, "per_group")
    assert deq.shape == w.shape and deq.dtype == w.dtype
    groups = deq.reshape(16, 4, 16)
    for r in range(16):
        for gi in range(4):
            assert groups[r, gi].unique().numel() <= 2**bits
            # every value lies on the group's grid: (ŵ / s + z) is an integer in range
            codes = groups[r, gi] / scales[r, gi] + zeros[r, gi]
            assert torch.allclose(codes, codes.round(), atol=1e-4)
    err = (w - deq).abs().reshape(16, 4, 16)
    assert (err <= scales[..., None] / 2 + 1e-6).all()


def test_symmetric_grid_is_symmetric():
    w = _weight()
    w_neg = -w
    deq, scales, zeros = quantize_tensor(w, 3, 16, "symmetric", "per_group")
    deq_neg, scales_neg, _ = quantize_tensor(w_neg, 3, 16, "symmetric", "per_group")
    assert torch.equal(zeros, torch.zeros_like(zeros))
    assert torch.equal(scales, scales_neg)
    assert torch.equal(deq_neg, -deq)
    # the largest magnitude of each group maps to ±qmax·s exactly, both signs reachable
    codes = (deq.reshape(16, 4, 16) / scales[..., None]).round()
    assert codes.abs().max() == 3 and codes.min() == -3
    # 2-bit symmetric is the ternary grid {-s, 0, s}
    d2, s2, _ = quantize_tensor(w, 2, 64, "symmetric", "per_group")
    assert set((d2 / s2).round().unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_asymmetric_uses_all_levels_and_integer_zero():
    w = torch.linspace(-1.0, 3.0, 64).repeat(4, 1)
    deq, scales, zeros = quantize_tensor(w, 4, 64, "asymmetric", "per_group")
    assert torch.equal(zeros, zeros.round())
    assert deq[0].unique().numel() == 16  # 2^4 levels spread over [min, max]
    assert (w - deq).abs().max() <= scales.max() / 2 + 1e-6


def test_all_zero_group_has_no_nan():
    w = _weight()
    w[:, :16] = 0
    for scheme in ("symmetric", "asymmetric"):
        deq, scales, _ = quantize_tensor(w, 4, 16, scheme, "per_group")
        assert torch.isfinite(deq).all() and torch.isfinite(scales).all()
        assert torch.equal(deq[:, :16], torch.zeros(16, 16))


def test_dtype_is_preserved():
    w = _weight().to(torch.bfloat16)
    deq, _, _ = quantize_tensor(w, 4, 32, "asymmetric", "per_group")
    assert deq.dtype == torch.bfloat16


def test_per_group_beats_per_channel_when_scales_vary_along_the_row():
    w = _weight(8, 64)
    w[:, :32] *= 100.0  # first half of every row is 100x larger than the second half
    deq_c, scales_c, _ = quantize_tensor(w, 4, 32, "symmetric", "per_channel")
    deq_g, scales_g, _ = quantize_tensor(w, 4, 32, "symmetric", "per_group")
    assert scales_c.shape == (8, 1) and scales_g.shape == (8, 2)
    assert scales_c.unique().numel() == 8 and scales_g.unique().numel() == 16
    err_c = (w - deq_c)[:, 32:].norm()
    err_g = (w - deq_g)[:, 32:].norm()
    assert err_g < err_c / 10  # the small half gets its own scale
    assert (w - deq_g).norm() <= (w - deq_c).norm()
    # per_channel == per_group with group_size=-1 semantics (one scale per row)
    assert torch.equal(deq_c, quantize_tensor(w, 4, 64, "symmetric", "per_group")[0])


def test_effective_bits_formula():
    assert effective_bits(4, 128, "symmetric") == 4 + 16 / 128
    assert effective_bits(4, 128, "asymmetric") == 4 + 20 / 128
    assert effective_bits(8, 64, "asymmetric") == 8 + 24 / 64


@pytest.mark.parametrize("kwargs, needle", [
    (dict(w_bits=1), "w_bits"), (dict(w_bits=9), "w_bits"), (dict(w_bits=4.0), "w_bits"),
    (dict(scheme="nf4"), "scheme"), (dict(granularity="per_tensor"), "granularity"),
    (dict(group_size=0), "group_size"), (dict(group_size=-2), "group_size"),
    (dict(granularity="per_group", group_size=-1), "group_size"), (dict(modules=" , "), "modules"),
])
def test_bad_configs_raise_user_error(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        RTNConfig(**kwargs)


def test_group_size_must_divide_input_dim():
    with pytest.raises(UserError, match=r"group_size=48 does not divide .*64"):
        quantize_tensor(_weight(), 4, 48, "symmetric", "per_group")
    model = tiny.make_model("llama")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(UserError, match=r"group_size=128 does not divide in_features=64 of model\.layers\.0\.self_attn\.q_proj"):
        quantize_model(model, RTNConfig(group_size=128))  # divides down_proj's 128, not q_proj's 64
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # checked before touching


# ------------------------------------------------------------------ whole models

def _trained_tiny_model():
    """A tiny Llama trained for a few steps on the tiny corpus, so its PPL means something."""
    tok = tiny.make_tokenizer()
    text = "\n".join(tiny.corpus())
    ids = torch.tensor(tok(text)["input_ids"])
    n = (ids.numel() // 32) * 32
    data = ids[:n].reshape(-1, 32)
    model = tiny.make_model("llama", seed=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(30):
        batch = data[torch.randint(0, data.shape[0], (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, data[:16]


def hand_ppl(model, ids) -> float:
    """exp(mean next-token NLL) over every position of every row."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


@pytest.fixture(scope="module")
def trained():
    return _trained_tiny_model()


def test_ppl_and_error_grow_as_bits_fall(trained):
    model, ids = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = hand_ppl(model, ids)
    assert base < 100  # training worked: well below the ~320 of a uniform guess
    ppl, err = {}, {}
    for bits in (8, 4, 2):
        model.load_state_dict(state)
        rep = quantize_model(model, RTNConfig(w_bits=bits, group_size=32))
        ppl[bits], err[bits] = hand_ppl(model, ids), rep.mean_rel_error
    model.load_state_dict(state)
    assert abs(ppl[8] - base) / base < 0.01
    assert err[8] < err[4] < err[2]
    assert ppl[8] < ppl[4] < ppl[2]
    assert ppl[2] > base * 1.05


def test_report_and_lm_head_untouched():
    model = tiny.make_model("llama")
    head = model.lm_head.weight.clone()
    emb = model.model.embed_tokens.weight.clone()
    total = sum(p.numel() for p in model.parameters())
    rep = quantize_model(model, RTNConfig(w_bits=4, group_size=32, scheme="asymmetric"))
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, emb)
    assert rep.layers == 2 * 7
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert rep.params == linear and rep.total_params == total
    assert rep.effective_bits == pytest.approx(4 + 20 / 32)
    expected_mb = ((total - linear) * 4 + linear * (4 + 20 / 32) / 8) / 2**20
    assert rep.model_size_mb == pytest.approx(expected_mb, rel=1e-3)  # + rotary buffers, a few bytes
    assert rep.model_size_mb < rep.original_size_mb
    assert 0 < rep.mean_rel_error < 0.2
    # weights really sit on the grid: at most 16 values per group of 32
    w = model.model.layers[0].self_attn.q_proj.weight.reshape(64, 2, 32)
    assert max(w[r, g].unique().numel() for r in range(64) for g in range(2)) <= 16


def test_modules_filter_and_per_channel_bits():
    model = tiny.make_model("qwen2")
    untouched = {n: m.weight.clone() for n, m in model.named_modules() if n.endswith(("v_proj", "mlp.up_proj"))}
    rep = quantize_model(model, RTNConfig(w_bits=8, granularity="per_channel", modules="q_proj,k_proj"))
    assert rep.layers == 4
    assert rep.effective_bits == pytest.approx(8 + 16 / 64)  # one fp16 scale per 64-wide row
    for n, w in untouched.items():
        assert torch.equal(model.get_submodule(n).weight, w)
    with pytest.raises(UserError, match="matched no"):
        quantize_model(model, RTNConfig(modules="nonexistent_proj"))


def test_lm_head_only_when_named():
    model = tiny.make_model("mistral")
    head = model.lm_head.weight.clone()
    rep = quantize_model(model, RTNConfig(w_bits=4, group_size=32, modules="lm_head"))
    assert rep.layers == 1 and not torch.equal(model.lm_head.weight, head)


def test_the_rtn_method_checks_layer_shapes_on_a_weightless_model():
    """The registry's RTN method: the step's settings are the library's RTNConfig, checked against
    every layer of a meta-device model (no weights) before a run; what its run records."""
    from mlproject.compression.methods import get
    from mlproject.compression.methods.rtn import RTN
    from mlproject.config import QuantizeConfig
    from mlproject.models.loading import meta_model

    config = tiny.make_config("llama")
    ok = QuantizeConfig(group_size=32, w_bits=8)
    assert get("rtn") is RTN and RTN.settings(ok) == RTNConfig(w_bits=8, group_size=32)
    built = []
    RTN.check_model(ok, config, lambda: built.append(1) or meta_model(config))
    assert built == [1]
    RTN.check_model(ok, config, lambda: None)  # no meta model (e.g. non-uniformly pruned): checked after loading
    with pytest.raises(UserError, match=r"group_size=128 does not divide in_features=64"):
        RTN.check_model(QuantizeConfig(), config, lambda: meta_model(config))
    assert RTN.simulated(ok) and RTN.run_name_suffix(ok) == "-w8"
    assert RTN.run_params(ok) == {"w_bits": 8, "group_size": 32, "granularity": "per_group", "scheme": "symmetric"}
    assert RTN.tags(ok) == {"mlproject.quant.method": "rtn", "mlproject.quant.simulated": "true",
                            "mlproject.quant.serving": RTN.serving}
    assert "not smaller" in RTN.serving  # a float checkpoint: says so
