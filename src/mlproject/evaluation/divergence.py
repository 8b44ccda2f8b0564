"""KL divergence of a candidate model to its reference over the PPL windows, in plain torch.

Perplexity says how well a compressed model predicts the text; it does not say how far its
predictions moved from the model it was made from. Per scored token this module measures
KL(reference ‖ candidate) of the two next-token distributions and whether both give the same
top token, over exactly the windows `perplexity.perplexity` scores (its ``on_logits`` hook)::

    rec = TopKRecorder(k=DEFAULT_TOPK)
    perplexity.perplexity(base, ids, seqlen, on_logits=rec)        # once per (model, text, windows, seqlen)
    ref = rec.result({"model": "smollm2", "dataset": "offline"})
    ref.save("ref.safetensors")                                    # reused by every candidate
    meter = KLMeter(TopK.load("ref.safetensors"), windows=8, seqlen=512)
    perplexity.perplexity(candidate, ids, seqlen, on_logits=meter)
    meter.result()  # {"kl_mean", "kl_median", "kl_p99", "top1_agree", "tokens", "kl_bound_mean"}

**What is stored.** Not the reference's full distributions but, per predicted token, its top-k
token ids (int32), their log-probabilities (float32) and the log of the remaining tail mass
(float32, computed from the full logits by a logsumexp, not as ``1 - Σ top-k``: that
difference loses all precision when the tail is tiny, and could even come out ≤ 0 for the
candidate, turning the tail term into inf/nan). That is ``8·k + 4`` bytes per scored token:
260 B at the default k = 32. For Mistral-7B on wikitext2 at seqlen 2048 (≈ 140 windows ×
2047 = 286,580 scored tokens) that is 74.5 MB, against 36.7 GB for the full 32k-vocabulary
float32 distributions and 18.3 GB for llama.cpp's ``--kl-divergence-base`` file, which keeps
every log-probability as uint16 (2·V + 8 bytes per token, 64,008 B at V = 32,000 — llama.cpp
scores only the second half of each context, so its own file for that text holds half the rows).

**What is computed.** Per token, with S the reference's top-k ids, T the rest of the
vocabulary, r_p / r_q the reference's / candidate's mass on T (q = the candidate's full
softmax), the *lumped* KL

    KL_k = Σ_{i∈S} p_i log(p_i / q_i) + r_p log(r_p / r_q),

the exact KL of the two distributions coarsened to k + 1 bins (S one by one, T as one bin).
Coarsening never increases KL (log-sum inequality), so KL_k ≤ KL, with equality at k = |V|.
Its error KL − KL_k is bounded per token from what is known (the candidate's full distribution,
the reference's k-th probability and tail mass): see `KLMeter` for the derivation.
`benchmarks/kl_topk_error.py` measures the error against the exact value on SmolLM2-135M
(4 windows x 512, V = 49,152): at k = 32 the lumped mean KL is 10.5 % below the exact one for
RTN w4 g64 (exact 0.495 nats) and 6.2 % below for RTN w3 g64 (exact 2.97); 4.9 % at k = 128,
2.0 % at k = 512. The stated value is thus a lower bound, a few to ~10 % low at the default k.

Both sides compute their log-probabilities with the same ops in the same chunks, so a candidate
identical to its reference (same weights, same batch layout) gives exactly 0.0, and top-1
agreement exactly 1.0. The float32 logits are normalised with float64 sums and the
log-probabilities rounded to float32 (see `_log_probs`); per-token terms are summed in float64
over the k stored entries. No [B, L, V] float64 tensor ever exists: the vocabulary-wide work
runs on chunks of at most `CHUNK_ELEMENTS` logits in reused scratch tensors (the error bound's
bisection in float32), so the extra memory stays under ~80 MB whatever the vocabulary: measured
on CPU with one 2047-token window, +73 MB recording and +64 MB comparing at V = 128,256
(1 GB of logits), +72 / +65 MB at V = 32,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlproject.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_TOPK = 32
"""Reference entries kept per token (260 bytes per scored token)."""
CHUNK_ELEMENTS = 2**22
"""Logits handled at once (16 MiB of float32); a window's tokens are split into chunks of
``max(1, CHUNK_ELEMENTS // V)`` tokens, the same way on the reference and the candidate side."""
BOUND_STEPS = 20
"""Bisection steps of the error bound's dual variable (any λ gives a valid bound; more steps
only tighten it)."""
FORMAT = "mlproject.topk/1"
"""The ``format`` entry of a saved reference's safetensors metadata."""
_TENSORS = ("indices", "logprobs", "tail_logmass")


@dataclass
class TopK:
    """A reference model's next-token distributions on the scored PPL windows, top-k only.

    ``indices`` int32 ``[W, L, k]``: token ids by descending probability (W windows, L = seqlen - 1
    predicted tokens each); ``logprobs`` float32 ``[W, L, k]``: their log-softmax values;
    ``tail_logmass`` float32 ``[W, L]``: log of the probability outside the top k (-inf when
    k is the whole vocabulary); ``meta``: free-form strings (dataset, seqlen, windows, k, key,
    model …), saved as the safetensors metadata.
    """

    indices: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        if self.indices.dim() != 3 or self.logprobs.shape != self.indices.shape:
            raise ValueError(f"TopK: indices {tuple(self.indices.shape)} and logprobs "
                             f"{tuple(self.logprobs.shape)} must both be [windows, tokens, k]")
        if tuple(self.tail_logmass.shape) != tuple(self.indices.shape[:2]):
            raise ValueError(f"TopK: tail_logmass {tuple(self.tail_logmass.shape)} must be "
                             f"{tuple(self.indices.shape[:2])}")
        if (self.indices.dtype, self.logprobs.dtype, self.tail_logmass.dtype) != (
                torch.int32, torch.float32, torch.float32):
            raise ValueError("TopK: indices must be int32, logprobs and tail_logmass float32")
        self.meta = {str(k): str(v) for k, v in self.meta.items()}

    @property
    def windows(self) -> int:
        return self.indices.size(0)

    @property
    def tokens_per_window(self) -> int:
        return self.indices.size(1)

    @property
    def k(self) -> int:
        return self.indices.size(2)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (``8·k + 4`` per scored token)."""
        return sum(t.numel() * t.element_size() for t in (self.indices, self.logprobs, self.tail_logmass))

    def to_bytes(self) -> bytes:
        """The safetensors file as bytes (what a run logs as its artifact); ``meta`` (plus
        ``format``) goes into its metadata."""
        from safetensors.torch import save

        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        return save(tensors, metadata={**self.meta, "format": FORMAT})

    def save(self, path: str | Path) -> None:
        """Write the file `to_bytes` makes."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> TopK:
        """Read a file written by `save`; a missing or foreign file is a UserError naming it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"reference distributions {str(path)!r} do not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.pop("format", None) != FORMAT or set(f.keys()) != set(_TENSORS):
                    raise UserError(f"{str(path)!r} is not a top-k reference file ({FORMAT})")
                tensors = {name: f.get_tensor(name) for name in _TENSORS}
        except SafetensorError as exc:
            raise UserError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
        try:
            return cls(**tensors, meta=meta)
        except ValueError as exc:
            raise UserError(f"{str(path)!r}: {exc}") from exc


def _chunks(length: int, vocab: int):
    """Token ranges of a window, the same on both sides (identical logits → identical sums)."""
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, length, step):
        yield start, min(start + step, length)


class _Scratch:
    """Two float32 and one float64 [chunk, V] work tensors (64 MiB at most), allocated once per
    hook and reused for every chunk: allocating and freeing tens of MB per chunk makes glibc's
    per-thread arenas keep gigabytes of freed memory resident on CPU (measured: +4 GB RSS
    recording one 2047-token window of a 128k vocabulary with fresh temporaries, +75 MB with
    these). For the same reason counts are sums of a float32 0/1 tensor: summing a bool tensor
    first copies it to int64."""

    def __init__(self):
        self._key = None

    def get(self, n: int, vocab: int, device) -> tuple[Tensor, Tensor, Tensor]:
        import torch

        rows = max(1, CHUNK_ELEMENTS // vocab)
        if self._key != (rows, vocab, device):
            self._key = (rows, vocab, device)
            self._f = (torch.empty(rows, vocab, device=device), torch.empty(rows, vocab, device=device),
                       torch.empty(rows, vocab, dtype=torch.float64, device=device))
        return self._f[0][:n], self._f[1][:n], self._f[2][:n]


def _log_probs(x: Tensor, idx: Tensor, scratch: _Scratch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For float32 logits ``x`` [n, V] and ids ``idx`` [n, k]: the float64 log-normaliser [n],
    the float32 log-probabilities at ``idx`` [n, k], the float32 log of the mass outside ``idx``
    [n] and the row maxima [n]. The reference and the candidate side both come through here, so
    identical logits give identical bits.

    The normaliser is max + log Σ exp(x − max), the sum and the final addition in float64: a
    float32 logsumexp of logits around 100 is off by ~1e-5 nats (the ulp at 100), the size of a
    good 8-bit model's whole KL, and a float32 sum alone leaves ~1e-7. The tail's mass is a
    logsumexp of its own (its own max), not ``1 − Σ top-k``, so a tiny tail keeps its precision
    and never underflows to 0 on one side only. The [n, V] work happens in the reused chunk
    tensors of `_Scratch` (the float64 one only for the two sums): no fresh [n, V] allocation."""
    import torch

    work, rest, wide = scratch.get(x.size(0), x.size(1), x.device)
    mx = x.amax(dim=-1)
    lse = mx.double() + wide.copy_(torch.sub(x, mx[:, None], out=work).exp_()).sum(dim=-1).log()
    at = (x.gather(-1, idx).double() - lse[:, None]).float()
    rest.copy_(x).scatter_(-1, idx, float("-inf"))
    mt = rest.amax(dim=-1)  # -inf when idx covers the vocabulary: then the tail mass is 0
    rest.sub_(torch.where(torch.isfinite(mt), mt, torch.zeros_like(mt))[:, None]).exp_()
    tail = (mt.double() + wide.copy_(rest).sum(dim=-1).log() - lse).float()
    return lse, at, tail, mx


def _plogratio(lp: Tensor, lq: Tensor) -> Tensor:
    """p·(log p − log q) from log-probabilities, 0 where p = 0 (no 0·inf = nan)."""
    import torch

    return torch.where(lp > float("-inf"), lp.exp() * (lp - lq), torch.zeros_like(lp))


class TopKRecorder:
    """``on_logits`` hook for the reference pass: keeps each window's top-k (see `TopK`)."""

    def __init__(self, k: int = DEFAULT_TOPK):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"top-k must be a positive integer, got {k!r}")
        self.k = k
        self._rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._shape: tuple[int, int] | None = None  # (L, V)
        self._scratch = _Scratch()

    def __call__(self, window_indices: list[int], logits: Tensor) -> None:
        import torch

        _, length, vocab = logits.shape
        if self._shape is None:
            self._shape = (length, vocab)
        elif self._shape != (length, vocab):
            raise ValueError(f"TopKRecorder: windows of {length} tokens x {vocab} logits after "
                             f"{self._shape[0]} x {self._shape[1]}")
        k = min(self.k, vocab)
        with torch.no_grad():
            for b, w in enumerate(window_indices):
                idx_parts, lp_parts, tail_parts = [], [], []
                for s, e in _chunks(length, vocab):
                    x = logits[b, s:e]
                    idx = x.topk(k, dim=-1).indices
                    _, logp, tail, _ = _log_probs(x, idx, self._scratch)
                    idx_parts.append(idx.to(torch.int32).cpu())
                    lp_parts.append(logp.cpu())
                    tail_parts.append(tail.cpu())
                self._rows[int(w)] = (torch.cat(idx_parts), torch.cat(lp_parts), torch.cat(tail_parts))

    @property
    def windows(self) -> list[int]:
        """Window indices recorded so far, ascending."""
        return sorted(self._rows)

    def result(self, meta: dict[str, str] | None = None) -> TopK:
        """The recorded windows as a `TopK` (they must be windows 0 … n-1: a sharded pass
        gathers its ranks' recorders first). ``meta`` gets ``k``, ``windows`` and ``tokens``
        unless it names them."""
        import torch

        seen = self.windows
        if not seen:
            raise ValueError("TopKRecorder: no window was recorded")
        if seen != list(range(len(seen))):
            missing = sorted(set(range(seen[-1] + 1)) - set(seen))
            raise ValueError(f"TopKRecorder: windows {missing[:5]} … missing; a reference covers 0..n-1")
        idx, lp, tail = (torch.stack([self._rows[w][i] for w in seen]) for i in range(3))
        info = {"k": idx.size(2), "windows": idx.size(0), "tokens": idx.size(1), **(meta or {})}
        return TopK(indices=idx, logprobs=lp, tail_logmass=tail, meta=info)


class KLMeter:
    """``on_logits`` hook for a candidate pass: per token the lumped KL(reference ‖ candidate),
    top-1 agreement and an upper bound of the lumped value's error, against a `TopK`.

    Per token (p reference, q candidate's full softmax; S the reference's top-k ids, T the rest;
    r_p = Σ_T p, r_q = Σ_T q; p_k the smallest probability in S; m = min(p_k, r_p)):

    * lumped  KL_k = Σ_S p log(p/q) + r_p log(r_p/r_q) — the KL of the two distributions
      coarsened to k + 1 bins; ≥ 0 by Gibbs' inequality, so a negative float result is rounding
      (the float32 log-probabilities sum to 1 only up to ~1e-7) and is clamped to 0. It is
      ≤ the exact KL by the log-sum inequality Σ_T p log(p/q) ≥ r_p log(r_p/r_q).
    * error   KL − KL_k = Σ_T p log(p/q) − r_p log(r_p/r_q). The unknown tail probabilities x_i
      satisfy 0 ≤ x_i ≤ m (each is ≤ p_k, the list being sorted, and ≤ r_p, being part of it)
      and Σ_T x_i = r_p, so Σ_T p log(p/q) ≤ F = max { Σ_T x_i log(x_i/q_i) : 0 ≤ x_i ≤ m,
      Σ x_i = r_p }. For any real λ (weak duality), on that set
          Σ_T x_i log(x_i/q_i) = λ r_p + Σ_T (x_i log(x_i/q_i) − λ x_i)
                               ≤ λ r_p + Σ_T max_{0≤x≤m} (x log(x/q_i) − λ x)
                               = λ r_p + m Σ_T (log(m/q_i) − λ)_+  =: g(λ),
      because x log(x/q_i) − λx is convex in x, so its maximum over [0, m] sits at an end
      (0 at x = 0, m (log(m/q_i) − λ) at x = m). Hence, for every λ,
          KL − KL_k ≤ g(λ) − r_p log(r_p/r_q)   (clamped at 0; it is 0 when r_p = 0).
      λ = log(m / min_T q) gives g = r_p log(m / min_T q), the simple bound "every tail token
      has p ≤ m and q ≥ min_T q". g is convex and piecewise linear with slope
      r_p − m·#{i ∈ T : log(m/q_i) > λ}; `BOUND_STEPS` bisection steps on the sign of the slope,
      starting from [log m − log r_q, log m − min_T log q], approach its minimum, where g
      exceeds F (the worst tail consistent with what is known: mass m on the ⌊r_p/m⌋ tail tokens
      the candidate finds least likely, the remainder ρ on the next) by at most ρ log(m/ρ) ≤ m/e.
      The result is never looser than the simple bound: g at the final right end of the bracket
      is ≤ g at the first. The float32 arithmetic of g is ~1e-6 relative; the bound is
      valid up to that rounding.

    Top-1 agreement: the candidate's logit at the reference's top token equals the candidate's
    maximum (so a tie for first place counts as agreement, and identical models agree exactly).

    ``windows`` / ``seqlen`` (the evaluation's PPL window count and seqlen) are checked against
    the reference at once when given; each batch is checked too (tokens per window, window index,
    vocabulary). A mismatch is a UserError with one line naming what differs.
    """

    def __init__(self, reference: TopK, windows: int | None = None, seqlen: int | None = None):
        self.ref = reference
        self._max_index = int(reference.indices.max()) if reference.indices.numel() else -1
        if (windows is not None and windows != reference.windows) or (
                seqlen is not None and seqlen - 1 != reference.tokens_per_window):
            raise UserError(self._has() + f", this evaluation {windows if windows is not None else '?'} of "
                            f"{seqlen - 1 if seqlen is not None else '?'}")
        self._rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._scratch = _Scratch()

    def _has(self) -> str:
        return f"reference has {self.ref.windows} windows of {self.ref.tokens_per_window} tokens"

    def __call__(self, window_indices: list[int], logits: Tensor) -> None:
        import torch

        _, length, vocab = logits.shape
        if length != self.ref.tokens_per_window:
            raise UserError(self._has() + f", this evaluation windows of {length}")
        if vocab <= self._max_index:
            raise UserError(f"reference top-k holds token id {self._max_index}, this model's vocabulary "
                            f"has {vocab} tokens")
        bad = [w for w in window_indices if not 0 <= w < self.ref.windows]
        if bad:
            raise UserError(self._has() + f", this evaluation scores window index {max(bad)}")
        with torch.no_grad():
            for b, w in enumerate(window_indices):
                parts = [self._score(logits[b, s:e], w, s, e) for s, e in _chunks(length, vocab)]
                self._rows[int(w)] = tuple(torch.cat(col) for col in zip(*parts))

    def _score(self, x: Tensor, w: int, s: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """(lumped KL, top-1 agreement, error bound) of the tokens s:e of window w; x = logits."""
        import torch

        device = x.device
        idx = self.ref.indices[w, s:e].to(device=device, dtype=torch.long)
        logp = self.ref.logprobs[w, s:e].to(device)
        tail_p = self.ref.tail_logmass[w, s:e].to(device)
        # The candidate's side, with the recorder's exact ops (identical logits → identical bits).
        lse, logq, tail_q, mx = _log_probs(x, idx, self._scratch)
        agree = x.gather(-1, idx[:, :1]).squeeze(-1) >= mx

        lp, lq, tp, tq = logp.double(), logq.double(), tail_p.double(), tail_q.double()
        rp = tp.exp()
        has_tail = rp > 0
        tail_term = torch.where(has_tail, rp * (tp - tq), torch.zeros_like(rp))
        kl = (_plogratio(lp, lq).sum(-1) + tail_term).clamp(min=0.0)
        bound = self._bound(x, lse.float(), idx, logp, tail_p, tail_q, has_tail, tail_term)
        return kl.cpu(), agree.cpu(), bound.cpu()

    def _bound(self, x, lse, idx, logp, tail_p, tail_q, has_tail, tail_term) -> Tensor:
        """Per-token upper bound of KL − KL_k: min over λ of g(λ), minus r_p log(r_p/r_q)."""
        import torch

        if self.ref.k >= x.size(-1) or not bool(has_tail.any()):
            return torch.zeros(x.size(0), dtype=torch.float64, device=x.device)
        a, work, _ = self._scratch.get(x.size(0), x.size(1), x.device)
        log_m = torch.minimum(logp[:, -1], tail_p)  # [n]
        # a_i = log(m / q_i) on the tail, -inf on the top k (they contribute nothing to g).
        torch.sub(x, lse[:, None], out=a).scatter_(-1, idx, float("inf")).neg_().add_(log_m[:, None])
        hi = a.amax(dim=-1)  # log m − min_T log q: the simple bound's λ, where the slope is r_p > 0
        lo = log_m - tail_q  # ≤ log m − max_T log q = min_T a (max_T q ≤ r_q): slope r_p − m|T| ≤ 0
        ratio = (tail_p.double() - log_m.double()).exp()  # r_p / m ≥ 1: slope < 0 iff count > ratio
        for _ in range(BOUND_STEPS):
            mid = (lo + hi) / 2
            left = torch.gt(a, mid[:, None], out=work).sum(dim=-1).double() > ratio  # 0/1 floats
            lo = torch.where(left, mid, lo)
            hi = torch.where(left, hi, mid)
        m, rp = log_m.double().exp(), tail_p.double().exp()
        g = hi.double() * rp + m * torch.sub(a, hi[:, None], out=work).clamp_(min=0).sum(dim=-1).double()
        bound = (g - tail_term).clamp(min=0.0)
        bound = torch.where(torch.isfinite(hi), bound, torch.full_like(bound, math.inf))
        return torch.where(has_tail, bound, torch.zeros_like(bound))

    @property
    def windows(self) -> list[int]:
        """Window indices scored so far, ascending."""
        return sorted(self._rows)

    def per_token(self) -> dict[str, Tensor]:
        """The scored windows' per-token values, by ascending window index: ``windows`` int64
        [n], ``kl`` float64 [n, L], ``top1_agree`` bool [n, L], ``kl_bound`` float64 [n, L]
        (what a distributed caller gathers before `kl_summary`)."""
        import torch

        seen = self.windows
        if not seen:
            raise ValueError("KLMeter: no window was scored")
        kl, agree, bound = (torch.stack([self._rows[w][i] for w in seen]) for i in range(3))
        return {"windows": torch.tensor(seen, dtype=torch.int64), "kl": kl, "top1_agree": agree,
                "kl_bound": bound}

    def result(self) -> dict[str, float]:
        """`kl_summary` of the windows this meter scored."""
        t = self.per_token()
        return kl_summary(t["kl"], t["top1_agree"], t["kl_bound"])


def kl_summary(kl: Tensor, top1_agree: Tensor, kl_bound: Tensor) -> dict[str, float]:
    """Mean, median and 99th percentile (linear interpolation, numpy's default) of the per-token
    KL, the share of tokens whose top token agrees, the token count and the mean error bound."""
    import numpy as np

    values = kl.reshape(-1).double().cpu().numpy()
    if values.size == 0:
        raise ValueError("kl_summary: no tokens")
    return {
        "kl_mean": float(values.mean()),
        "kl_median": float(np.quantile(values, 0.5)),
        "kl_p99": float(np.quantile(values, 0.99)),
        "top1_agree": float(top1_agree.reshape(-1).double().mean()),
        "tokens": int(values.size),
        "kl_bound_mean": float(kl_bound.reshape(-1).double().mean()),
    }


def kl_exact(ref_logits: Tensor, cand_logits: Tensor) -> Tensor:
    """Exact per-token KL(ref ‖ cand) in float64 from full logits ``[..., V]`` (the ground truth
    for tests and the benchmark); works through the tokens in chunks of `CHUNK_ELEMENTS`."""
    import torch

    if ref_logits.shape != cand_logits.shape:
        raise UserError(f"kl_exact: logits of shapes {tuple(ref_logits.shape)} and "
                        f"{tuple(cand_logits.shape)} differ")
    vocab = ref_logits.size(-1)
    r, c = ref_logits.reshape(-1, vocab), cand_logits.reshape(-1, vocab)
    out = torch.empty(r.size(0), dtype=torch.float64, device=r.device)
    with torch.no_grad():
        for s, e in _chunks(r.size(0), vocab):
            lp = torch.log_softmax(r[s:e].double(), dim=-1)
            lq = torch.log_softmax(c[s:e].to(r.device).double(), dim=-1)
            out[s:e] = _plogratio(lp, lq).sum(-1)
    return out.reshape(ref_logits.shape[:-1])
