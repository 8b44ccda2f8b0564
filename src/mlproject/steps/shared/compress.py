"""What the compression steps (quantize, prune) share: cheap pre-run checks on the model's
config, loading the input as one plain model, and the run's final metrics / report.md."""

from __future__ import annotations

import logging
from typing import Any

from mlproject import tracking
from mlproject.errors import UserError
from mlproject.evaluation.engine import EvalOutcome, EvalPlan
from mlproject.models import loading
from mlproject.models.reference import ModelRef
from mlproject.steps import StepResult
from mlproject.steps.shared import model_output
from mlproject.steps.shared.evaluation import describe as describe_run
from mlproject.steps.shared.evaluation import evaluate_loaded, report
from mlproject.steps.shared.runs import PeakMemory

log = logging.getLogger(__name__)


def peek_config(ref: ModelRef, step: str):
    """The input's config when it is cheap to read (else None), refusing already-quantized input."""
    config = loading.peek_config(ref, fetch=tracking.download)
    if config is not None and getattr(config, "quantization_config", None):
        qc = config.quantization_config
        kind = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise UserError(f"model {ref.raw!r} is already quantized ({kind}); {step} needs a float model")
    return config


def meta_model(config):
    """A weightless model from `config` for shape checks; None where transformers cannot build one."""
    try:
        return loading.meta_model(config)
    except (ValueError, KeyError, TypeError, ImportError) as exc:
        log.debug("no meta model for %s: %s", getattr(config, "model_type", "?"), exc)
        return None


def load_input(ref: ModelRef, *, dtype: str, device: str, adapter: str,
               quantization_config: Any = None) -> loading.LoadedModel:
    """Load the input as one plain model: a PEFT adapter (given, or an adapter-only artifact) is
    merged into its base; with `quantization_config` the merged float weights are quantized."""
    return loading.load_merged(ref, dtype=dtype, device=device, adapter=adapter or None, fetch=tracking.download,
                               quantization_config=quantization_config)


def calibration_ids(tokenizer, text: str, samples: int, seqlen: int, seed: int):
    """[n, seqlen] token windows at seeded random offsets (GPTQ/Wanda style); fewer, or one
    shorter window, when the text is short."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < 2:
        raise UserError("the calibration text has fewer than 2 tokens")
    if ids.numel() <= seqlen:
        return ids[None, :]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_spec(calibration: str, tokenizer, ids) -> dict:
    """The calibration windows as a dataset spec for the run's inputs (context ``calibration``)."""
    from mlproject.evaluation.perplexity import text_path

    source = ({"kind": "hf", "path": "wikitext", "config_name": "wikitext-2-raw-v1", "split": "train"}
              if calibration == "wikitext2" else {"kind": "file", "path": str(text_path(calibration))})
    rows = [{"window": i, "text": t} for i, t in enumerate(tokenizer.batch_decode(ids))]
    return {"name": f"calibration {calibration} ({ids.shape[0]} × {ids.shape[1]} tokens)", "context": "calibration",
            "source": source, "rows": rows}


def calibrate(run: tracking.Run, tokenizer, calibration: str, samples: int, seqlen: int, seed: int):
    """Draw the calibration windows of ``calibration`` and record them on the run: the params
    ``calibration.sequences`` / ``calibration.seqlen`` (what was really drawn) and a dataset input."""
    from mlproject.evaluation.perplexity import load_text

    # a hub text calibrates on its train split: the PPL is scored on its test split
    ids = calibration_ids(tokenizer, load_text(calibration, split="train"), samples, seqlen, seed)
    # (a key containing "token" would be redacted as a secret by tracking)
    run.log_params({"calibration.sequences": ids.shape[0], "calibration.seqlen": ids.shape[1]})
    run.log_datasets([calibration_spec(calibration, tokenizer, ids)])
    return ids


def finish(run: tracking.Run, *, step: str, title: str, loaded: loading.LoadedModel, plan: EvalPlan,
           evaluate: bool, report_params: dict, metrics: dict[str, float], section: tuple[str, str],
           model_uri: str, memory: PeakMemory, key: str, headline: str = "",
           notes: tuple[str, ...] = ()) -> StepResult:
    """Evaluate (unless told not to), log the metrics and write report.md."""
    out = evaluate_loaded(loaded, plan, run) if evaluate else EvalOutcome()
    system = {**metrics, **memory.peak()}
    if evaluate:
        system["eval_seconds"] = out.seconds
    run.log_metrics(system)
    heading, body = section
    if not evaluate:
        body += "\n\nNot evaluated (evaluate=false); run `evaluate` on the model artifact later."
    md = report(title, run, step, report_params, plan, out, system, extra_sections={heading: body})
    run.log_text(md, "report.md")
    caveat = model_output.gguf_caveat(loaded)
    describe_run(run, headline or title, plan, out, {**out.metrics, **system}, evaluated=evaluate,
                 settings={"dtype": str(loaded.model.dtype).removeprefix("torch."),
                           "device": str(next(loaded.model.parameters()).device)},
                 notes=(*notes, "Not evaluated (evaluate=false)." if not evaluate else "",
                        "Caveat: the base is a Q4_1 GGUF (weights already on a 4-bit grid); see report.md."
                        if caveat and step == "quantize" else ""))
    return StepResult(step=step, run_id=run.run_id, model_uri=model_uri, metrics={**out.metrics, **system},
                      key=key, loaded=loaded)
