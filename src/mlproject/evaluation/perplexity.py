"""Perplexity as quantization papers measure it (GPTQ, AWQ, …), in plain torch.

The test text is tokenized once and concatenated, cut into non-overlapping windows of
`seqlen` tokens (the tail shorter than a window is dropped), and every window is scored
independently: PPL = exp(mean next-token NLL over all predicted tokens). A window of
`seqlen` tokens predicts `seqlen - 1` of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mlproject.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("offline", "wikitext2")


@dataclass(frozen=True)
class PPLResult:
    dataset: str
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    windows: int
    tokens: int  # tokens predicted (windows * (seqlen - 1))
    seqlen: int


def check_dataset(spec: str) -> str | None:
    """Validate a ppl_dataset argument cheaply; returns its short name (None = skip PPL)."""
    if spec in ("", "none"):
        return None
    if spec in BUILTIN_DATASETS:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        from mlproject.redaction import redact

        # The name becomes metric names (ppl/<name>) and printed lines: no secret from a
        # signed-URL-like file name (…?token=…) may pass through it.
        return redact(path.stem)
    raise UserError(
        f"unknown ppl_dataset {spec!r}: use {', '.join(BUILTIN_DATASETS)}, none, or a text file path"
    )


def text_path(spec: str) -> Path:
    """The file behind a local PPL text (``offline``: the bundled one)."""
    if spec == "offline":
        import importlib.resources

        return Path(str(importlib.resources.files("mlproject.evaluation").joinpath("data/offline_ppl.txt")))
    return Path(spec).expanduser().resolve()


# The built-in texts that come from the Hugging Face hub: name -> (data set id, config).
HUB_TEXTS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}


def hub_source(spec: str) -> tuple[str, str] | None:
    """The hub data set a PPL / calibration text loads from (checked before a run), or None."""
    return HUB_TEXTS.get(spec)


def load_text(spec: str, split: str = "test") -> str:
    """A PPL or calibration text: the bundled one, a file, or a hub text's ``split`` (PPL scores
    the test split; calibration reads the train split, so the two never share text)."""
    if spec == "offline":
        return text_path(spec).read_text()
    if spec in HUB_TEXTS:
        from datasets import load_dataset

        rows = load_dataset(*HUB_TEXTS[spec], split=split)
        return "\n\n".join(rows["text"])
    return Path(spec).expanduser().read_text()


def make_windows(ids, seqlen: int):
    """[N] token ids -> [N // seqlen, seqlen] non-overlapping windows."""
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def next_token_logits(model, batch):
    """float32 next-token logits ``[B, T-1, V]`` of a ``[B, T]`` batch (position t predicts t+1)."""
    import torch

    with torch.inference_mode():
        return model(input_ids=batch).logits[:, :-1, :].float()


def window_nll(model, batch, logits=None) -> tuple[float, int]:
    """Summed next-token NLL of a [B, T] batch and the number of tokens predicted; ``logits``
    (from `next_token_logits`) saves the forward when the caller already has them."""
    import torch.nn.functional as F

    if logits is None:
        logits = next_token_logits(model, batch)
    target = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
    return nll.item(), target.numel()


def perplexity(
    model,
    ids,
    seqlen: int,
    batch_size: int = 1,
    dataset: str = "text",
    on_batch: Callable[[int], None] | None = None,
    max_windows: int = 0,
    shard: tuple[int, int] = (0, 1),
    reduce_sum: Callable[[list[float]], list[float]] | None = None,
    on_logits: Callable[[list[int], "Tensor"], None] | None = None,
) -> PPLResult:
    """Score `ids` (1-D tensor of token ids) in windows of `seqlen`, `batch_size` at a time;
    `max_windows` > 0 scores only the first that many windows.

    Data-parallel: ``shard=(rank, world_size)`` scores windows ``rank, rank + world_size, …`` of
    the same window list and ``reduce_sum`` adds ``[nll_sum, tokens]`` over the ranks (float64),
    so every rank returns the PPL of all windows (equal to one process's up to the order of the
    float64 additions; each window is scored alone when ``batch_size`` is 1).

    ``on_logits(window_indices, logits)`` is called after each batch's NLL with the batch's
    indices into the full window list (``max_windows`` and ``shard`` applied) and its float32
    next-token logits ``[B, seqlen - 1, V]``, the very tensor the NLL came from (read it, do not
    modify it): how `divergence` records a reference's distributions or compares a candidate's."""
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise UserError(f"ppl_dataset {dataset!r} has fewer than 2 tokens")
    if ids.numel() < seqlen:
        log.warning("text has %d tokens < seqlen %d; using one window of %d", ids.numel(), seqlen, ids.numel())
        seqlen = ids.numel()
    windows = make_windows(ids, seqlen)
    if max_windows > 0:
        windows = windows[:max_windows]
    rank, world = shard
    mine = windows[rank::world]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, mine.size(0), batch_size):
        batch = mine[start : start + batch_size].to(device)
        logits = next_token_logits(model, batch)
        nll, count = window_nll(model, batch, logits)
        if on_logits is not None:
            on_logits([rank + world * (start + j) for j in range(batch.size(0))], logits)
        del logits
        total_nll += nll
        total_tokens += count
        if on_batch:
            on_batch(batch.size(0))
    if reduce_sum is not None:
        total_nll, tokens = reduce_sum([total_nll, float(total_tokens)])
        total_tokens = int(round(tokens))
    mean = total_nll / total_tokens
    return PPLResult(dataset=dataset, ppl=math.exp(mean), nll=mean, windows=windows.size(0),
                     tokens=total_tokens, seqlen=seqlen)


def context_length(model) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
