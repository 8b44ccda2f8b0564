import copy
import math

import numpy as np
import pytest
import torch

import tiny
from mlproject.errors import UserError
from mlproject.evaluation import divergence, perplexity
from mlproject.evaluation.divergence import KLMeter, TopK, TopKRecorder, kl_exact

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 320
SEQLEN = 33


def text(n: int = 8 * SEQLEN + 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def peaked(model, scale: float = 40.0):
    """A random model predicts nearly uniformly; a scaled LM head makes its distributions as
    peaked as a trained model's, so that the top-k hold most of the mass and tails matter."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def perturbed(model, rel: float = 0.05, seed: int = 7):
    cand = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * rel * p.std().clamp(min=1e-3))
    return cand


def score(model, ids, hook, batch_size=2, **kw):
    """One PPL pass with ``hook`` as on_logits; returns the full logits it saw, by window."""
    seen = {}

    def both(windows, logits):
        hook(windows, logits)
        for b, w in enumerate(windows):
            seen[w] = logits[b].clone()

    res = perplexity.perplexity(model, ids, SEQLEN, batch_size=batch_size, on_logits=both, **kw)
    return res, torch.stack([seen[w] for w in sorted(seen)])


def reference(model, ids, k, **kw):
    rec = TopKRecorder(k)
    _, logits = score(model, ids, rec, **kw)
    return rec.result({"model": "tiny", "dataset": "random"}), logits


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_a_model_against_itself_gives_kl_exactly_zero(arch):
    model = peaked(tiny.make_model(arch))
    ids = text()
    ref, _ = reference(model, ids, divergence.DEFAULT_TOPK)
    meter = KLMeter(ref, windows=8, seqlen=SEQLEN)
    score(model, ids, meter)
    t = meter.per_token()
    assert t["kl"].shape == (8, SEQLEN - 1)
    assert torch.count_nonzero(t["kl"]) == 0 and bool(t["top1_agree"].all())
    res = meter.result()
    assert res["kl_mean"] == 0.0 and res["kl_median"] == 0.0 and res["kl_p99"] == 0.0
    assert res["top1_agree"] == 1.0 and res["tokens"] == 8 * (SEQLEN - 1)


def test_the_hook_sees_the_window_indices_and_logits_and_leaves_ppl_unchanged():
    model = tiny.make_model("llama")
    ids = text()
    calls = {}
    for shard in ((0, 2), (1, 2)):
        calls[shard] = []
        res = perplexity.perplexity(model, ids, SEQLEN, batch_size=2, max_windows=5, shard=shard,
                                    on_logits=lambda w, lg, c=calls[shard]: c.append((w, lg.clone())))
        plain = perplexity.perplexity(model, ids, SEQLEN, batch_size=2, max_windows=5, shard=shard)
        assert res == plain
    assert [w for w, _ in calls[(0, 2)]] == [[0, 2], [4]]
    assert [w for w, _ in calls[(1, 2)]] == [[1, 3]]
    windows = perplexity.make_windows(ids, SEQLEN)
    for w, lg in calls[(0, 2)] + calls[(1, 2)]:
        assert lg.dtype == torch.float32 and lg.shape == (len(w), SEQLEN - 1, VOCAB)
        with torch.no_grad():
            expected = model(input_ids=windows[w]).logits[:, :-1].float()
        torch.testing.assert_close(lg, expected)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_with_k_equal_to_the_vocabulary_the_lumped_kl_is_the_exact_kl(arch):
    model = peaked(tiny.make_model(arch))
    ids = text()
    ref, ref_logits = reference(model, ids, VOCAB)
    assert ref.k == VOCAB and bool(torch.isneginf(ref.tail_logmass).all())
    for cand in (perturbed(model), peaked(tiny.make_model(arch, seed=1))):
        meter = KLMeter(ref)
        _, cand_logits = score(cand, ids, meter)
        exact = kl_exact(ref_logits, cand_logits)
        t = meter.per_token()
        assert float(exact.min()) > 0
        torch.testing.assert_close(t["kl"], exact, rtol=1e-4, atol=1e-7)
        assert torch.count_nonzero(t["kl_bound"]) == 0
        agree = ref_logits.argmax(-1) == cand_logits.argmax(-1)
        assert torch.equal(t["top1_agree"], agree)
        res = meter.result()
        # median / p99 as torch.quantile (linear interpolation) of the exact per-token values
        assert res["kl_mean"] == pytest.approx(float(exact.mean()), rel=1e-4)
        assert res["kl_median"] == pytest.approx(float(torch.quantile(exact.flatten(), 0.5)), rel=1e-4)
        assert res["kl_p99"] == pytest.approx(float(torch.quantile(exact.flatten(), 0.99)), rel=1e-4)
        assert res["kl_p99"] == pytest.approx(float(np.percentile(t["kl"].numpy(), 99)), rel=1e-12)
        assert res["top1_agree"] == pytest.approx(float(agree.double().mean()), abs=1e-12)


def simple_bound(ref_logits, cand_logits, ref: TopK):
    """The brief's bound, by hand: every tail p ≤ m = min(p_k, r_p), every tail q ≥ min_T q."""
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(cand_logits.double(), -1)
    idx = ref.indices.long()
    tail = torch.ones_like(lp, dtype=torch.bool).scatter_(-1, idx, False)
    rp = (lp.exp() * tail).sum(-1)
    rq = (lq.exp() * tail).sum(-1)
    m = torch.minimum(lp.gather(-1, idx[..., -1:]).squeeze(-1).exp(), rp)
    qmin = torch.where(tail, lq.exp(), torch.ones_like(lq)).amin(-1)
    return rp * torch.log(m / qmin) - rp * torch.log(rp / rq)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_with_a_small_k_the_lumped_kl_is_a_lower_bound_and_the_error_stays_within_its_bound(arch):
    model = peaked(tiny.make_model(arch))
    ids = text()
    cand = perturbed(model, rel=0.1)
    for k in (1, 4, 16, 64):
        ref, ref_logits = reference(model, ids, k)
        meter = KLMeter(ref)
        _, cand_logits = score(cand, ids, meter)
        exact = kl_exact(ref_logits, cand_logits)
        t = meter.per_token()
        kl, bound = t["kl"], t["kl_bound"]
        assert float(kl.mean()) > 0
        assert bool((kl <= exact + 1e-6).all())
        assert bool((exact <= kl + bound + 1e-6).all())
        # the bisection over λ only tightens the simple bound, and strictly so on average
        simple = simple_bound(ref_logits, cand_logits, ref)
        assert bool((bound <= simple * (1 + 1e-6) + 1e-7).all())  # up to float32 rounding of g
        assert float(bound.mean()) < float(simple.mean())
        assert meter.result()["kl_bound_mean"] == pytest.approx(float(bound.mean()), rel=1e-12)


def test_the_error_bound_is_attained_by_the_worst_tail():
    # Reference: probabilities 0.4, 0.2, 0.1 and six tokens at 0.05, so the top 4 end with one of
    # them (p_k = 0.05) and the tail holds the other five at m = min(p_k, r_p = 0.25) = 0.05 each,
    # all on the tokens the candidate finds least likely: the worst tail the bound allows, where
    # the bound must equal the error.
    vocab, k = 40, 4
    p = torch.zeros(vocab, dtype=torch.float64)
    p[:3] = torch.tensor([0.4, 0.2, 0.1])
    p[3:9] = 0.05
    ref_logits = torch.where(p > 0, p.log(), torch.full_like(p, -1e4)).float()
    cand_logits = torch.linspace(3.0, 0.0, vocab)
    cand_logits[3:9] = -7.0  # the candidate's least likely tokens
    ref_logits, cand_logits = ref_logits.view(1, 1, vocab), cand_logits.view(1, 1, vocab)
    rec = TopKRecorder(k)
    rec([0], ref_logits)
    ref = rec.result()
    assert ref.indices[0, 0, :3].tolist() == [0, 1, 2] and 3 <= int(ref.indices[0, 0, 3]) < 9
    meter = KLMeter(ref)
    meter([0], cand_logits)
    t = meter.per_token()
    error = float(kl_exact(ref_logits, cand_logits)) - float(t["kl"])
    assert error > 0.5
    assert float(t["kl_bound"]) >= error - 1e-6
    assert float(t["kl_bound"]) == pytest.approx(error, rel=1e-3)


def test_a_synthetic_case_equals_a_hand_computation():
    # V = 4, k = 2; reference p = (.5, .3, .15, .05), candidate q = (.4, .4, .1, .1)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=torch.float64)
    rec = TopKRecorder(2)
    rec([0], p.log().float().view(1, 1, 4))
    meter = KLMeter(rec.result())
    meter([0], q.log().float().view(1, 1, 4))
    t = meter.per_token()
    lumped = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert float(t["kl"]) == pytest.approx(lumped, rel=1e-5)
    exact = float((p * (p / q).log()).sum())
    assert float(kl_exact(p.log().view(1, 4), q.log().view(1, 4))) == pytest.approx(exact, rel=1e-12)
    # m = min(p_k = .3, r_p = .2) = .2: all tail mass on the candidate's least likely tail token
    # (q = .1): g = .2·log(.2/.1), minus the lumped tail term .2·log(.2/.2) = 0.
    assert float(t["kl_bound"]) == pytest.approx(0.2 * math.log(2.0), rel=1e-4)
    assert bool(t["top1_agree"].all())  # both put the most mass on token 0 (a tie for q counts)


def test_save_and_load_keep_the_tensors_bit_identical(tmp_path):
    model = peaked(tiny.make_model("qwen2"))
    ids = text()
    for k in (8, VOCAB):  # VOCAB: a tail mass of -inf everywhere
        ref, _ = reference(model, ids, k)
        path = tmp_path / f"ref{k}.safetensors"
        ref.save(path)
        back = TopK.load(path)
        for name in ("indices", "logprobs", "tail_logmass"):
            a, b = getattr(ref, name), getattr(back, name)
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert back.meta == ref.meta == {"k": str(k), "windows": "8", "tokens": str(SEQLEN - 1),
                                         "model": "tiny", "dataset": "random"}
        assert back.nbytes == ref.nbytes == 8 * (SEQLEN - 1) * (8 * k + 4)
        assert path.stat().st_size >= ref.nbytes
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="other.safetensors"):
        TopK.load(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="missing.safetensors"):
        TopK.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="not a top-k reference"):
        TopK.load(tmp_path / "foreign.safetensors")


def test_a_shape_mismatch_names_the_numbers():
    model = tiny.make_model("mistral")
    ids = text()
    ref, _ = reference(model, ids, 4)
    with pytest.raises(UserError, match=r"^reference has 8 windows of 32 tokens, this evaluation 4 of 32$"):
        KLMeter(ref, windows=4, seqlen=SEQLEN)
    with pytest.raises(UserError, match=r"^reference has 8 windows of 32 tokens, this evaluation 8 of 19$"):
        KLMeter(ref, windows=8, seqlen=20)
    with pytest.raises(UserError, match=r"this evaluation windows of 19$"):
        perplexity.perplexity(model, ids, 20, on_logits=KLMeter(ref))
    with pytest.raises(UserError, match=r"this evaluation scores window index 8$"):
        perplexity.perplexity(model, torch.cat([ids, ids]), SEQLEN, batch_size=3, on_logits=KLMeter(ref))
    top = int(ref.indices.max())
    with pytest.raises(UserError, match=rf"token id {top}, this model's vocabulary has {top} tokens"):
        KLMeter(ref)([0], torch.zeros(1, SEQLEN - 1, top))
    with pytest.raises(UserError, match="top-k must be a positive integer, got 0"):
        TopKRecorder(0)


def test_sharded_meters_together_give_the_one_process_values():
    model = peaked(tiny.make_model("llama"))
    cand = perturbed(model)
    ids = text(11 * SEQLEN)
    ref, _ = reference(model, ids, 8, batch_size=1)
    whole = KLMeter(ref)
    score(cand, ids, whole, batch_size=1)
    parts = []
    for rank in range(2):
        meter = KLMeter(ref)
        score(cand, ids, meter, batch_size=1, shard=(rank, 2))
        parts.append(meter.per_token())
    assert parts[0]["windows"].tolist() == [0, 2, 4, 6, 8, 10] and parts[1]["windows"].tolist() == [1, 3, 5, 7, 9]
    order = torch.cat([p["windows"] for p in parts]).argsort()
    one = whole.per_token()
    for name in ("windows", "kl", "top1_agree", "kl_bound"):
        assert torch.equal(torch.cat([p[name] for p in parts])[order], one[name])
    gathered = divergence.kl_summary(*(torch.cat([p[n] for p in parts]) for n in ("kl", "top1_agree", "kl_bound")))
    assert gathered == pytest.approx(whole.result(), rel=1e-12)
    # a recorder that saw one shard cannot pass for a whole reference
    rec = TopKRecorder(4)
    perplexity.perplexity(model, ids, SEQLEN, shard=(1, 2), on_logits=rec)
    with pytest.raises(ValueError, match="missing"):
        rec.result()


def test_kl_exact_works_in_chunks_on_a_large_vocabulary(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 1000, generator=gen), torch.randn(2, 5, 1000, generator=gen)
    whole = kl_exact(a, b)
    monkeypatch.setattr(divergence, "CHUNK_ELEMENTS", 3000)  # 3 tokens a chunk
    torch.testing.assert_close(kl_exact(a, b), whole, rtol=1e-12, atol=0)
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    torch.testing.assert_close(whole, (lp.exp() * (lp - lq)).sum(-1), rtol=1e-12, atol=0)
    # the meter in chunks gives the same per-token values as in one piece
    rec = TopKRecorder(16)
    rec([0, 1], a)
    chunked = KLMeter(rec.result())
    chunked([0, 1], b)
    monkeypatch.setattr(divergence, "CHUNK_ELEMENTS", 2**22)
    rec = TopKRecorder(16)
    rec([0, 1], a)
    single = KLMeter(rec.result())
    single([0, 1], b)
    torch.testing.assert_close(chunked.per_token()["kl"], single.per_token()["kl"], rtol=1e-6, atol=1e-9)
