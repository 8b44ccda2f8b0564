import math

import pytest
import torch

import tiny
from mlproject.errors import UserError
from mlproject.evaluation import perplexity


def hand_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """Token by token, in float64: the definition, with no batching or reshaping tricks."""
    total, count = 0.0, 0
    n = ids.numel() // seqlen
    ids = ids.to(next(model.parameters()).device)
    for w in range(n):
        window = ids[w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        for t in range(seqlen - 1):
            total -= torch.log_softmax(logits[t], -1)[window[t + 1]].item()
            count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_ppl_equals_hand_computation(arch):
    model = tiny.make_model(arch)
    ids = torch.randint(0, 320, (203,), generator=torch.Generator().manual_seed(1))
    expected = hand_ppl(model, ids, 25)
    for batch_size in (1, 3, 8):
        res = perplexity.perplexity(model, ids, 25, batch_size=batch_size)
        assert res.windows == 8 and res.tokens == 8 * 24 and res.seqlen == 25
        assert res.ppl == pytest.approx(expected, rel=1e-5)
        assert res.nll == pytest.approx(math.log(expected), rel=1e-5)


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    w = perplexity.make_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_short_text_uses_one_window():
    model = tiny.make_model("llama")
    ids = torch.randint(0, 320, (7,), generator=torch.Generator().manual_seed(0))
    res = perplexity.perplexity(model, ids, 64)
    assert res.windows == 1 and res.seqlen == 7
    assert res.ppl == pytest.approx(hand_ppl(model, ids, 7), rel=1e-5)


def test_random_model_ppl_is_near_vocab_size():
    # A freshly initialized model predicts nearly uniformly: PPL close to |V|, far from 1.
    model = tiny.make_model("qwen2")
    ids = torch.randint(0, 320, (512,), generator=torch.Generator().manual_seed(2))
    assert 200 < perplexity.perplexity(model, ids, 64, batch_size=4).ppl < 500


def test_dataset_specs(tmp_path):
    assert perplexity.check_dataset("offline") == "offline"
    assert perplexity.check_dataset("none") is None
    f = tmp_path / "my_text.txt"
    f.write_text("hello")
    assert perplexity.check_dataset(str(f)) == "my_text"
    with pytest.raises(UserError, match="nope.txt"):
        perplexity.check_dataset(str(tmp_path / "nope.txt"))


def test_offline_text_is_bundled_and_long_enough():
    text = perplexity.load_text("offline")
    assert len(text.split()) > 15000
