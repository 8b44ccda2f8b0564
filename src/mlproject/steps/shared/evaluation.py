"""How every step measures a model and records it: the evaluation engine (``evaluation.engine``,
usable with no run) on a loaded model, its numbers logged on the step's run, the run's
report.md and its description. evaluate measures its input; finetune, quantize and prune
measure their outputs (finetune also its input, with the prefix ``before/``), so every step
measures the same way."""

from __future__ import annotations

from typing import Any

from mlproject import tracking
from mlproject.evaluation.engine import EvalOutcome, EvalPlan, measure, scored_datasets
from mlproject.models import loading
from mlproject.report import description, render
from mlproject.tracking import names


TOPK_ARTIFACT = "kl/reference_topk.safetensors"


def evaluate_loaded(loaded: loading.LoadedModel, plan: EvalPlan, run: tracking.Run, prefix: str = "",
                    step: int = 0, *, is_root: bool = False) -> EvalOutcome:
    """measure() and log the result on `run`, metric names prefixed (e.g. 'before/'), at `step`
    (finetune logs the trained model's scores at its optimizer step).

    KL (``plan.opts.reference``): ``is_root`` — the model evaluated is a lineage's root, unchanged
    (evaluate of a base model) — stores its own top-k distributions over the PPL windows for the
    candidates that follow; any other model is measured against its reference's stored ones
    (:class:`Reference`)."""
    explicit = plan.opts.reference not in ("auto", "none")
    reference = Reference(plan, loaded, run) if explicit or (plan.opts.reference == "auto" and not is_root) else None
    # A root evaluated against another reference stores that reference's distributions (one set
    # per run, found by one key), not its own.
    out = measure(loaded, plan,
                  lambda metrics: run.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step),
                  reference=reference, record_topk=is_root and not explicit)
    run.log_params({prefix + k: v for k, v in out.ppl_params.items()})
    run.log_datasets(scored_datasets(plan, out))
    if out.topk is not None:
        _store_topk(run, out.topk, identity=loaded.base_model or loaded.ref.target)
    if reference is not None:
        reference.record(out, prefix)
    if out.documents is not None:
        from mlproject.evaluation import documents

        name = documents.DOCUMENTS_ARTIFACT
        if prefix:
            head, _, tail = name.rpartition("/")
            name = f"{head}/{prefix.strip('/')}_{tail}"
        run.log_bytes(documents.to_parquet(out.documents), name)
    if out.harness is not None:
        run.log_dict(out.harness.raw, f"lm_eval/{prefix.strip('/') or 'results'}{'_results' if prefix else ''}.json")
        import json

        run.set_tags({prefixed_tag(names.AVG_ACC_METRICS_TAG, prefix): json.dumps(out.harness.avg_metrics)})
        if out.harness.code is not None:  # per-problem results: compare reads them back
            for task, res in out.harness.code.results.items():
                run.log_dict(res.artifact(plan.code), f"code/{prefix}{task}.json")
            run.set_tags({names.UNSAFE_CODE_TAG: "lm-eval gates opened on purpose ("
                          + "; ".join(f"{k}={v}" for k, v in out.harness.code.gates.items()) + ")"})
    return out


def topk_key(identity: str, meta: dict[str, str]) -> str:
    """What a candidate finds a reference's stored distributions by (tag ``mlproject.kl.topk_key``):
    the reference model and the scored windows (text, count, length, token digest) and k."""
    from mlproject.steps.shared.runs import cache_key

    return cache_key(reference=identity, **{k: meta[k] for k in ("dataset", "windows", "seqlen", "tokens_sha256", "k")})


def _store_topk(run: tracking.Run, topk, identity: str) -> None:
    key = topk_key(identity, topk.meta)
    topk.meta = {**topk.meta, "model": identity, "key": key}
    run.log_bytes(topk.to_bytes(), TOPK_ARTIFACT)
    run.set_tags({names.TOPK_KEY_TAG: key})


def prefixed_tag(tag: str, prefix: str) -> str:
    """``mlproject.<x>`` of an evaluation logged under a metric prefix: ``before/`` →
    ``mlproject.before.<x>`` (finetune's input model)."""
    return names.TAG_PREFIX + prefix.replace("/", ".") + tag[len(names.TAG_PREFIX):]


#: distributions this process computed for an explicit reference, by key: finetune's before/ and
#: after evaluations (one run, not FINISHED between them) score the reference once
_COMPUTED: dict[str, tuple] = {}  # key → (TopK, the run that stores it)


class Reference:
    """The ``reference`` of one evaluation, called by the engine once the PPL windows are known.

    ``auto``: the lineage's root base model (``loaded.base_model``), when a run stored its top-k
    distributions on the same windows (evaluate of the base model does); else no KL, and a note
    says why. A model reference: its stored distributions when some run has them, else the model
    is loaded now, scores the windows once, is freed, and its distributions are stored on this run
    (tagged with their key, so the next candidate finds them)."""

    def __init__(self, plan: EvalPlan, loaded: loading.LoadedModel, run: tracking.Run):
        self.plan, self.loaded, self.run = plan, loaded, run
        self.spec = plan.opts.reference
        self.identity = loaded.base_model or loaded.ref.target if self.spec == "auto" else None
        self.source = ""  # the run the distributions came from
        self.computed = None  # distributions computed here, stored by record()
        self.stored = False
        self.note = ""

    def __call__(self, meta: dict[str, str], windows):
        import logging

        from mlproject.evaluation import divergence

        if self.spec == "none":
            return None
        identity = self.identity or _explicit_identity(self.spec)
        self.identity = identity
        key = topk_key(identity, meta)
        if key in _COMPUTED:
            found, self.source = _COMPUTED[key]
            return found
        try:  # the tracking server is asked mid-measurement: a failure costs the KL, not the step
            run_id = tracking.find_tagged_run(names.TOPK_KEY_TAG, key, self.run.experiment_id)
            if run_id is not None:
                found = divergence.TopK.load(tracking.download(f"runs:/{run_id}/{TOPK_ARTIFACT}"))
                self.source = run_id
                return found
        except Exception as exc:  # noqa: BLE001 - MlflowException, UserError (cannot fetch), OSError
            logging.getLogger(__name__).warning("KL reference lookup failed (%s); %s", str(exc).splitlines()[0],
                                                "scoring the reference here" if self.spec != "auto" else "no KL")
        if self.spec == "auto":
            self.note = (f"no run stored {identity}'s distributions on these PPL windows ({meta['windows']} × "
                         f"{meta['seqlen']} tokens of {meta['dataset']}, k={meta['k']}): evaluate {identity} with the "
                         "same ppl settings first, or pass reference=<model>")
            logging.getLogger(__name__).info("no KL: %s", self.note)
            return None
        self.computed = _score_reference(self.spec, self.plan, windows, meta, like=self.loaded)
        self.source = self.run.run_id
        _COMPUTED[key] = (self.computed, self.source)
        return self.computed

    def record(self, out: EvalOutcome, prefix: str) -> None:
        if self.computed is not None and not self.stored:
            _store_topk(self.run, self.computed, identity=self.identity)
            self.stored = True
        tag = prefixed_tag(names.KL_REFERENCE_TAG, prefix)
        if out.kl is not None:
            label = f"{self.identity} (run {self.source})"
            self.run.set_tags({tag: label})
            self.run.kl_reference = label
        elif self.note:  # why there is no KL, where the runs table shows it
            self.run.set_tags({tag: f"none: {self.note}"})


def _explicit_identity(spec: str) -> str:
    """A hub model or alias by its name (as a root's own evaluation stores it); a run or registry
    model by the reuse key of the run behind it, so a registry alias that moves to another model
    never serves the old one's distributions."""
    from mlproject.models.reference import resolve

    ref = resolve(spec)
    if ref.kind in ("run", "registry"):
        key = tracking.upstream_key(ref.raw)
        return f"key:{key}" if key else ref.raw
    return ref.alias or ref.target


def _score_reference(spec: str, plan: EvalPlan, windows, meta: dict[str, str], like: loading.LoadedModel):
    """Load the reference model (in the candidate's dtype, on its device), record its top-k on
    ``windows``, free it: a second model load, so memory holds both models for a moment."""
    import gc

    from mlproject.evaluation import divergence, perplexity
    from mlproject.models.reference import resolve
    from mlproject.progress import progress

    param = next(like.model.parameters())
    dtype = str(param.dtype).removeprefix("torch.") if param.dtype.is_floating_point else "auto"
    ref_loaded = loading.load_model(resolve(spec), dtype=dtype, device=str(param.device), fetch=tracking.download)
    if ref_loaded.tokenizer.get_vocab() != like.tokenizer.get_vocab():
        from mlproject.errors import UserError

        raise UserError(f"reference={spec} has another tokenizer than the model evaluated: KL compares "
                        "next-token distributions over the same vocabulary")
    recorder = divergence.TopKRecorder(plan.opts.kl_topk)
    flat = windows.reshape(-1)
    with progress(f"reference distributions ({spec})", windows.size(0), unit="windows") as advance:
        perplexity.perplexity(ref_loaded.model, flat, windows.size(1), plan.opts.ppl_batch_size,
                              dataset=meta["dataset"], on_batch=advance, max_windows=windows.size(0),
                              on_logits=recorder)
    del ref_loaded
    gc.collect()
    return recorder.result(dict(meta))


def report(title: str, run: tracking.Run, step: str, params: dict, plan: EvalPlan, out: EvalOutcome,
           system: dict, extra_sections: dict | None = None) -> str:
    import json

    from mlproject import envinfo

    # The snapshot step_run logged as env.json: report and artifact agree, collected once.
    env = run.env or envinfo.collect()
    if out.kl:
        extra_sections = {**(extra_sections or {}), "KL divergence to the reference": kl_section(plan, out, run)}
    if out.harness is not None and out.harness.code is not None:
        from mlproject.evaluation.code.lmeval import report_section

        extra_sections = {"Code execution": report_section(out.harness.code, plan.code),
                          **(extra_sections or {})}
    return render(
        title=title,
        run_info={"run id": run.run_id, "step": step, "started": env["time"],
                  "command": f"`{tracking.command_line()}`"},
        datasets={"PPL dataset": plan.opts.ppl_dataset, "PPL windows": plan.ppl_windows_setting,
                  "lm-eval tasks": ", ".join(plan.tasks) or "none",
                  "limit": plan.limit if plan.limit is not None else "all",
                  **calibration_lines(params.get("calibration"))},
        parameters=params,
        ppl=out.ppl,
        ppl_windows_total=out.ppl_available or None,
        task_results=out.harness.raw.get("results") if out.harness else None,
        avg_acc=out.avg_acc,
        avg_metrics=out.harness.avg_metrics if out.harness else None,
        system=system,
        environment=json.loads(json.dumps(env, default=str)),
        extra_sections=extra_sections,
    )


def calibration_lines(calibration) -> dict[str, Any]:
    """report.md's calibration lines (dataset, samples, sequence length), as the reference run
    reports have them; N/A for a calibration-free step. ``calibration``: a dict with ``dataset``,
    ``samples``, ``seqlen``, or None / a string saying why there is none."""
    if not isinstance(calibration, dict) or not calibration:
        why = calibration if isinstance(calibration, str) and calibration else "N/A"
        return {"calibration dataset": why, "calibration samples": "N/A", "calibration sequence length": "N/A"}
    return {"calibration dataset": calibration.get("dataset", "N/A"),
            "calibration samples": calibration.get("samples", "N/A"),
            "calibration sequence length": calibration.get("seqlen", "N/A")}


def kl_section(plan: EvalPlan, out: EvalOutcome, run: tracking.Run) -> str:
    """report.md's KL lines: against what, over which tokens, and how exact the top-k value is."""
    kl, res = out.kl, out.ppl[0]
    ref = getattr(run, "kl_reference", "") or plan.opts.reference
    return "\n".join([
        f"Reference: {ref}. KL(reference ‖ model) per token over the {res.windows} PPL windows × "
        f"{res.seqlen - 1} predicted tokens of {res.dataset} ({int(kl['tokens'])} tokens).",
        "",
        "| mean | median | p99 | top-1 agreement | mean error bound |",
        "|---:|---:|---:|---:|---:|",
        f"| {kl['kl_mean']:.5f} | {kl['kl_median']:.5f} | {kl['kl_p99']:.5f} | {kl['top1_agree'] * 100:.2f}% | "
        f"≤ {kl['kl_bound_mean']:.5f} |",
        "",
        f"The reference's top {plan.opts.kl_topk} probabilities per token are kept and the rest is one bin, so "
        "the value is a lower bound of the exact KL; the exact value is at most the mean error bound above it.",
    ])


def describe(run: tracking.Run, title: str, plan: EvalPlan, out: EvalOutcome, metrics: dict, *,
             settings: dict | None = None, before: dict | None = None, notes: tuple = (),
             evaluated: bool = True) -> None:
    """The run's description: headline numbers, then the settings that make them comparable."""
    avg = out.harness.avg_metrics if out.harness else None
    evaluation = plan.settings(out) if evaluated and not plan.empty else {}
    run.set_description(description(title, metrics, avg_metrics=avg, before=before, notes=notes,
                                    settings={**(settings or {}), **evaluation}))
