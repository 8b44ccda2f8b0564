"""How a model is evaluated: the option dataclasses the evaluation engine takes.

``EvalOptions`` (perplexity text and windows, lm-eval tasks, limit, few-shot, batch sizes,
seed) and ``CodeEvalOptions`` (how code tasks are sampled, sandboxed and timed) live beside
the engine that consumes them, so the engine can be called with no step config at all::

    from mlproject.evaluation.options import EvalOptions
    from mlproject.evaluation.engine import evaluate_model
    out = evaluate_model("smollm2", EvalOptions(tasks="mlp_nonce", limit="50", ppl_windows=4))

Every step that evaluates its result inherits these fields (``mlproject.config``), so the
names mean the same on every entry point.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlproject.errors import UserError
from mlproject.params import coerce_fields, param


@dataclass
class EvalOptions:
    """How a model is evaluated; shared by every step that evaluates its result."""

    tasks: str = param("offline", "comma list of lm-eval tasks/groups and suites (zeroshot7, quant7, offline); 'none' to skip")
    limit: str = param("", "documents per task: a count (50), a fraction (0.2) or all", empty="all")
    num_fewshot: int = param(-1, "few-shot examples per task; -1 = each task's default")
    batch_size: str = param("16", "lm-eval batch size (an integer or 'auto')")
    ppl_dataset: str = param("offline", "perplexity text: offline, wikitext2, a .txt path, or none")
    seqlen: int = param(2048, "perplexity window length in tokens (capped by the model's context)")
    ppl_batch_size: int = param(1, "windows per forward pass when computing perplexity")
    ppl_windows: int = param(-1, "perplexity windows scored: N = the first N (a quick, still deterministic PPL), "
                             "0 = every window of the text, -1 = auto: every window, or with limit set as many "
                             "as limit takes documents (limit=N: N windows, limit=f: that fraction of them)")
    reference: str = param("auto", "KL divergence to a reference model over the PPL windows (kl/<text>, kl_p99/…, "
                           "top1_agree/…): auto = the lineage's root base model, when an evaluation of it stored "
                           "its distributions on the same PPL windows (evaluate stores them for a base model); "
                           "none; or a model reference, whose distributions are computed now when none are stored "
                           "(a second model load) and kept for every later candidate")
    kl_topk: int = param(32, "next-token probabilities kept per scored token for KL (the reference's top k and "
                         "the rest as one bin: a lower bound of the exact KL; k × 8 bytes per token); "
                         "0 = no KL and no stored distributions")
    seed: int = param(42, "random seed of the run: lm-eval sampling and few-shot order, torch, calibration "
                      "windows, and for finetune the LoRA init, data order and dropout")

    def __post_init__(self):
        coerce_fields(self)
        from mlproject.evaluation.harness import parse_batch_size, parse_limit

        parse_limit(self.limit)
        parse_batch_size(self.batch_size)
        if self.seqlen < 2:
            raise UserError(f"seqlen {self.seqlen} must be at least 2")
        if self.ppl_batch_size < 1:
            raise UserError(f"ppl_batch_size {self.ppl_batch_size} must be at least 1")
        if self.ppl_windows < -1:
            raise UserError(f"ppl_windows {self.ppl_windows} must be -1 (auto), 0 (all windows) or a positive count")
        self.reference = (self.reference or "auto").strip()
        if self.kl_topk < 0:
            raise UserError(f"kl_topk {self.kl_topk} must be >= 0 (0 = no KL)")
        if self.num_fewshot < -1:
            raise UserError(f"num_fewshot {self.num_fewshot} must be -1 (task default) or >= 0")


@dataclass
class CodeEvalOptions:
    """How code tasks (humaneval, mbpp, their _plus variants, code_offline) are scored."""

    code_samples: int = param(1, "code tasks: completions per problem; 1 = greedy pass@1, n > 1 samples "
                              "(temperature 0.8, top_p 0.95) and adds pass@10/pass@100 where k <= n "
                              "(unbiased estimator)")
    code_timeout: float = param(10.0, "code tasks: wall-clock seconds per program run (the process group is "
                                "killed after it); CPU time, 1 GiB of memory, processes and file size are "
                                "limited too")
    code_timing_repeats: int = param(7, "code tasks: timed batches of each passing solution and of the "
                                     "reference (interleaved, medians -> time_ratio); 0 = no timing")

    def __post_init__(self):
        coerce_fields(self)
        if self.code_samples < 1:
            raise UserError(f"code_samples {self.code_samples} must be at least 1")
        if not 0 < self.code_timeout <= 3600:
            raise UserError(f"code_timeout {self.code_timeout} must be in (0, 3600] seconds")
        if self.code_timing_repeats < 0:
            raise UserError(f"code_timing_repeats {self.code_timing_repeats} must be >= 0")

    def code_settings(self):
        from mlproject.evaluation.code.sandbox import Limits
        from mlproject.evaluation.code.scoring import CodeSettings

        return CodeSettings(samples=self.code_samples, limits=Limits(timeout_s=self.code_timeout),
                            timing_repeats=self.code_timing_repeats)
