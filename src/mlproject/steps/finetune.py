"""`finetune`: SFT or DPO (trl) with LoRA, QLoRA or full fine-tuning, one MLflow run.

Order of work: everything cheap is checked first (model reference, hyper-parameters, the
dataset's columns, eval tasks, the tracking server), then the training data is loaded, and
only then is a run opened and the model loaded (once). A bad value therefore fails in a
second with one line, and leaves no run behind.

What the run holds
------------------
* Params: every resolved setting (model, dataset file, method, adapter, LoRA, schedule, eval
  settings, checkpoint folder, rows of data, row format).
* ``train/<name>`` at each optimizer step: ``loss``, ``learning_rate``, ``grad_norm``,
  ``epoch``, trl's ``num_tokens`` / ``mean_token_accuracy`` / ``entropy`` (SFT) and
  ``rewards/chosen|rejected|margins|accuracies``, ``logps/…``, ``logits/…`` (DPO). Points are
  buffered and sent with one ``log_batch`` per flush (every 25 steps, every 10 s, at each
  checkpoint save, and at the end or on failure), never one request per metric.
* Before / after (``eval_before`` / ``eval_after``: the evaluate step's code, same tasks,
  limit and PPL text):

  - ``before/<metric>``: the input model as given (for ``finetuning=qlora``: the full-precision
    input, loaded once for this and freed, so the delta is what the user gets from the
    artifact), logged at step 0;
  - ``<metric>`` (no prefix): the fine-tuned model as logged, logged at the final optimizer
    step, so ``compare`` reads plain names as "after" (it prefers ``before/`` on the same run
    as "before");
  - ``delta/<metric>`` = after − before for ``ppl/<dataset>``, ``avg_acc`` and each task's
    preferred metric (the one ``avg_acc`` used, e.g. ``mlp_nonce/acc_norm``).
* Summary: ``train_seconds``, ``train_steps``, ``trainable_params``, ``total_params``,
  ``trainable_pct``, ``train/peak_rss_mb`` (CPU) or ``train/peak_vram_mb`` (CUDA) during
  training, ``peak_rss_mb`` / ``peak_vram_mb`` of the whole step (loading and evaluation too),
  ``train/final_loss``, ``params_b``, ``model_size_mb`` (of the output model).
* Tags: the lineage (``shared.runs.lineage_tags`` with role ``finetuned``, ``mlproject.upstream_run``
  when the input is a run's model), ``mlproject.method``,
  ``mlproject.finetuning``, ``mlproject.cache_key``; on failure ``mlproject.error`` and status FAILED (a NaN/inf loss
  stops training and raises :class:`~mlproject.training.TrainingDiverged`).
* Artifacts: ``model/`` — the LoRA adapter (with ``mlproject_model.json`` naming the base
  reference, plus ``quantization: nf4`` for QLoRA) or, with ``merge=true`` or
  ``finetuning=full``, full weights; with merge the adapter also goes to ``adapter/``. Any step
  loads it as ``runs:/<run_id>/model``. Also ``report.md``, ``env.json`` and lm-eval JSONs.

Resume
------
Checkpoints go to ``output_dir`` (default ``outputs/finetune/<model>-<hash of the settings
that shape training>``, so the same command finds the same folder). A fresh start clears
old ``checkpoint-*`` folders there and writes ``mlflow_run_id.txt``; ``resume=true`` reads
it, reopens that run, continues from the last checkpoint and logs only steps after the
last ``train/loss`` step already in the run (checkpoints are written after the flush that
covers their step, so nothing between checkpoint and crash is lost or logged twice). A
resumed run whose ``before/`` metrics exist does not evaluate the input again.

Once the step has succeeded and the server has its model, nothing is left to resume: the
checkpoints go (the default folder whole; in an ``output_dir`` you named, only what training
wrote: ``checkpoint-*``, ``final``, the run id file, trl's README.md), unless ``keep_output=true``. A failed step
keeps them, and so does a model upload that did not reach the server (the model waits in the
spool for ``mlproject runs sync``; the warning names both folders).

Chat template
-------------
``chat_template`` defaults to ``off``: rows are trained as plain ``prompt + completion``
text, the format lm-eval scores (it does not apply chat templates here). ``auto`` would
render instruct models' rows as chat turns, so training and evaluation would see different
text.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlproject import distributed, tracking
from mlproject.compression import methods as quant_methods
from mlproject.config import FinetuneStepConfig
from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.models.reference import ModelRef, resolve
from mlproject.evaluation.engine import EvalOutcome, EvalPlan, model_metrics, plan_eval
from mlproject.steps import StepResult
from mlproject.steps.shared import checks, runs
from mlproject.steps.shared.evaluation import describe as describe_run
from mlproject.steps.shared.evaluation import evaluate_loaded, report
from mlproject.steps.shared.model_output import model_tags, source_model
from mlproject.training import datasets as tdata
from mlproject.tracking import names

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
FINAL_DIR = "final"  # under a distributed launch: the trainer's own save of the result
DEFAULT_OUTPUT_ROOT = Path("outputs") / "finetune"
_TRL_CARD = "trained using [TRL]"  # a line of the README.md trl writes into output_dir
# Settings that shape the trained weights: they name the default checkpoint folder. The
# length of training (max_steps, epochs) is left out so a longer resume finds the folder.
CHECKPOINT_KEY_FIELDS = ("model", "adapter", "method", "finetuning", "lora_r", "lora_alpha", "lora_dropout",
                         "target_modules", "lr", "train_batch_size", "grad_accum", "max_length", "beta", "seed",
                         "chat_template", "dtype")


# --------------------------------------------------------------------------- pure helpers

def deltas(before: dict[str, float], after: dict[str, float], task_metrics: dict[str, str]) -> dict[str, float]:
    """``delta/<metric>`` = after − before for ppl/*, avg_acc and each task's preferred metric.

    ``task_metrics`` maps task -> metric name used for avg_acc (``{"mlp_nonce": "acc_norm"}``).
    """
    keys = [k for k in after if k.startswith("ppl/")] + ["avg_acc"]
    keys += [f"{task}/{metric}" for task, metric in task_metrics.items()]
    return {f"delta/{k}": after[k] - before[k] for k in keys if k in after and k in before}


def checkpoint_dir(cfg: FinetuneStepConfig, ref: ModelRef) -> Path:
    if cfg.output_dir.strip():
        return Path(cfg.output_dir).expanduser()
    key = runs.cache_key(dataset=cfg.dataset_spec, **{k: getattr(cfg, k) for k in CHECKPOINT_KEY_FIELDS})
    return DEFAULT_OUTPUT_ROOT / f"{ref.label}-{key}"


def base_reference(ref: ModelRef, loaded: loading.LoadedModel, continued_adapter: bool) -> str:
    """What an adapter trained on `loaded` applies to, as a model reference any step resolves."""
    if continued_adapter:
        # The input was itself an adapter, trained further here: the result replaces it on its base.
        base = loaded.meta.get("base")
        if base:
            return base
        cfg = getattr(loaded.model, "peft_config", {}).get("default")
        return getattr(cfg, "base_model_name_or_path", None) or ref.raw
    if ref.kind == "registry" and loaded.meta.get("run_id"):
        # models:/name@alias can move later; pin the version this adapter was trained on.
        return f"runs:/{loaded.meta['run_id']}/model"
    if ref.kind == "local":
        return ref.target
    return ref.raw


# --------------------------------------------------------------------------- curve logging

class CurveLogger:
    """Buffers ``train/*`` points and sends many steps in one ``log_batch`` request."""

    def __init__(self, run: tracking.Run, every: int = 25, seconds: float = 10.0):
        self.run, self.every, self.seconds = run, every, seconds
        self.rows: list[tuple[int, dict[str, float], int]] = []
        self.last_flush = time.monotonic()
        self.last_step = 0

    def __call__(self, values: dict[str, float], step: int) -> None:
        if not self.rows:
            # the clock starts with the oldest unsent point, not at construction: building the
            # trainer (tokenizing the data) must not force a flush of the very first step
            self.last_flush = time.monotonic()
        self.rows.append((step, {f"train/{k}": v for k, v in values.items()}, int(time.time() * 1000)))
        if len(self.rows) >= self.every or time.monotonic() - self.last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            rows, self.rows = self.rows, []
            self.run.log_metric_steps(rows)
            self.last_step = rows[-1][0]
        self.last_flush = time.monotonic()

    def callback(self):
        """A TrainerCallback flushing before each checkpoint is final: a checkpoint's steps are
        always in the run before it exists on disk, so a resume never leaves a gap."""
        from transformers import TrainerCallback

        logger = self

        class FlushOnSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                logger.flush()

        return FlushOnSave()


# --------------------------------------------------------------------------- the step

def _prepare_fresh_dir(out: Path, run_id: str, clear: bool) -> None:
    """Record the new run in the folder; without resume, old checkpoints go (a later resume
    would otherwise pick up another run's newest checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("checkpoint-*")) if clear else []
    if stale:
        log.warning("removing %d old checkpoint(s) in %s (resume=false starts over)", len(stale), out)
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
    (out / RUN_ID_FILE).write_text(run_id + "\n")


def _settle_output(out: Path, unsent: dict[str, Path], keep: bool, named: bool, run_id: str = "") -> None:
    """After a successful step: the checkpoint folder goes once the server has the model (nothing
    is left to resume); it stays when the upload is waiting in the spool, or with ``keep``.
    ``named``: the user gave the folder, so only what training wrote there is removed (checkpoints,
    the distributed result, the run id file, trl's model card)."""
    if unsent:
        waiting = ", ".join(f"{name} in {path}" for name, path in unsent.items())
        log.warning("the fine-tuned model did not reach the tracking server: it waits in the spool (%s; send it "
                    "with: mlproject runs sync); the checkpoints stay in %s until then", waiting, out)
        return
    if keep or not out.is_dir():
        return
    with contextlib.suppress(OSError):
        owner = (out / RUN_ID_FILE).read_text().strip()
        if run_id and owner and owner != run_id:  # another run (a concurrent trial, same settings) trains there now
            log.info("left %s in place: it belongs to run %s now", out, owner)
            return
    if not named:
        shutil.rmtree(out, ignore_errors=True)
    else:
        ours = [*out.glob("checkpoint-*"), out / FINAL_DIR, out / RUN_ID_FILE]
        card = out / "README.md"  # trl's model card, rewritten at every checkpoint
        with contextlib.suppress(OSError, UnicodeError):
            if _TRL_CARD in card.read_text():
                ours.append(card)
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty: the user's own files stay
    log.info("removed the checkpoints in %s (the model is logged; keep_output=true keeps them)", out)


def _resume_target(out: Path) -> str | None:
    """The run a resume continues (checked on the server before anything heavy), or None."""
    f = out / RUN_ID_FILE
    if not f.is_file():
        log.warning("resume=true but %s has no %s: a new run records this training (it still "
                    "continues from a checkpoint there, if any)", out, RUN_ID_FILE)
        return None
    run_id = f.read_text().strip()
    try:
        tracking.run_data(run_id)
    except UserError:
        raise UserError(f"{out} belongs to run {run_id}, which is not on tracking server "
                        f"{tracking.redact(tracking.tracking_uri())}; use resume=false or another output_dir") from None
    return run_id


def _reload_output(saved: Path, cfg: FinetuneStepConfig, device: str, base: str, quantized: bool) -> Any:
    """The fine-tuned model as the trainer wrote it to ``saved``, loaded on every rank (one copy
    per process, for the evaluation after training and the logged artifact)."""

    def describe() -> None:  # what the folder holds, so the loader finds an adapter's base
        if (saved / "adapter_config.json").is_file() and not (saved / "config.json").is_file():
            loading.write_meta(saved, kind="adapter", base=base, quantization="nf4" if quantized else None)
        else:
            loading.write_meta(saved, kind="full")

    distributed.on_main(describe)
    return loading.load_model(resolve(str(saved)), dtype=cfg.dtype, device=device, fetch=tracking.download).model


def _trainable_adapter(model: Any) -> None:
    """An adapter loaded for inference (runs:/<sft>/model) keeps training: unfreeze it."""
    for name in list(model.peft_config):
        model.peft_config[name].inference_mode = False
    model.set_requires_grad(list(model.peft_config), requires_grad=True)


def _load(ref: ModelRef, cfg: FinetuneStepConfig, device: str, quantized: bool) -> loading.LoadedModel:
    kwargs: dict[str, Any] = {}
    if quantized:
        from mlproject.training import qlora_quantization_config

        kwargs["quantization_config"] = qlora_quantization_config()
    return loading.load_model(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter or None,
                              fetch=tracking.download, **kwargs)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def check(cfg: FinetuneStepConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()):
    """Every cheap check, before a run or weights exist: reference, hyper-parameters, the
    dataset's columns, eval tasks, the tracking server. Returns (ref, dataset spec, plan,
    device, torch dtype)."""
    # Everything cheap first: a bad value fails here, before a run or weights exist.
    ref = resolve(cfg.model)
    spec = cfg.dataset_spec
    columns = tdata.peek_columns(spec)
    if columns is not None:
        fmt = tdata.validate_columns(columns, cfg.method)
        log.info("dataset %s: %s rows (%s)", spec, fmt, ", ".join(columns))
    plan = plan_eval(cfg.eval_options())
    _, device, dtype = checks.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    if cfg.finetuning == "qlora":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("finetuning=qlora needs bitsandbytes: pip install bitsandbytes")
    checks.check_tracking(cfg.tracking_uri, ref, cfg.adapter, parent=parent, pending=pending)
    config = None if ref.run_id in pending else loading.peek_config(ref, fetch=tracking.download)
    why = quant_methods.finetune_refusal(config, cfg.finetuning) if config is not None else None
    if why:  # a packed checkpoint (gptq, autoround, hqq …): what LoRA can and cannot train on
        raise UserError(f"model {cfg.model!r}: {why}")
    # weights, adapters or gradients and Adam states, activations, the evaluations before / after
    checks.check_model_sources(ref, cfg.adapter, device, dtype, pending, step="finetune", plan=plan, training=cfg,
                               strict=cfg.strict_memory)
    evaluates = cfg.eval_before or cfg.eval_after
    checks.check_data_sources({"ppl_dataset": plan.opts.ppl_dataset} if evaluates else {}, training=spec)
    if evaluates:
        checks.check_eval_fits(ref, plan, pending)
    return ref, spec, plan, device, dtype


def reuse_key(cfg: FinetuneStepConfig, upstream_key: Any = None) -> str:
    """The run's reuse key: the config, and the launch's world size (it sets the effective batch)."""
    return runs.step_key("finetune", cfg, upstream_key=upstream_key, extra={"world_size": distributed.world_size()})


def run(cfg: FinetuneStepConfig, parent: tracking.Run | None = None, *,
        callbacks: list[Any] | None = None) -> StepResult:
    """Fine-tune ``cfg.model`` and record it as one MLflow run (see the module docstring).

    ``callbacks``: extra transformers ``TrainerCallback``s (tests, search pruning).
    """
    checks.check_launch(cfg)
    ref, spec, plan, device, _ = check(cfg, parent)
    world = distributed.world_size()
    key = reuse_key(cfg)
    out_dir = checkpoint_dir(cfg, ref)
    resume_id = distributed.on_main(_resume_target, out_dir) if cfg.resume else None
    data = tdata.load_training_data(spec, cfg.method)  # full load + row checks, still before the run
    ft = cfg.finetune_config(str(out_dir))

    params = {
        "model": cfg.model, "adapter": cfg.adapter or "none", "dataset": spec, "dataset_rows": len(data),
        "dataset_columns": ",".join(data.column_names),
        **{k: v for k, v in ft.to_params().items() if k != "resume"},
        # What one optimizer step sees: per-device batch x processes x accumulation.
        "world_size": world, "effective_batch_size": ft.train_batch_size * world * ft.grad_accum,
        "distributed": distributed.kind(),
        "dtype": cfg.dtype, "device": device, "eval_before": cfg.eval_before, "eval_after": cfg.eval_after,
        **{k: v for k, v in plan.params().items() if k != "seed"},
    }
    with tracking.step_run(
        "finetune", experiment=cfg.experiment or None, run_name=runs.run_name("finetune", cfg.run_name, ref),
        tags={names.CACHE_KEY_TAG: key, names.METHOD_TAG: cfg.method, names.FINETUNING_TAG: cfg.finetuning},
        run_id=resume_id, parent=parent,
    ) as run, runs.PeakMemory() as memory:
        return _run_in(run, cfg, ref, plan, device, data, ft, out_dir, params, resume_id, callbacks, memory, key)


def _run_in(run: tracking.Run, cfg: FinetuneStepConfig, ref: ModelRef, plan: EvalPlan, device: str, data: Any,
            ft: Any, out_dir: Path, params: dict, resume_id: str | None,
            callbacks: list[Any] | None, memory: runs.PeakMemory, key: str) -> StepResult:
    from mlproject.training import trainer
    from mlproject.training.adapters import is_4bit, save_output

    skip = 0
    before: dict[str, float] = {}
    if resume_id:
        skip = tracking.last_metric_step(run.run_id, "train/loss")
        recorded = tracking.run_data(run.run_id)["metrics"]
        if "before/eval_seconds" in recorded:
            before = {k[len("before/"):]: v for k, v in recorded.items() if k.startswith("before/")}
        run.delete_tag(names.ERROR_TAG)
        run.set_tags({names.RESUMED_AFTER_STEP_TAG: skip})
        log.info("resuming run %s after logged step %d from %s", run.run_id, skip, out_dir)
    else:
        distributed.on_main(_prepare_fresh_dir, out_dir, run.run_id, clear=not cfg.resume)
    run.log_params(params)
    run.log_datasets([tdata.input_spec(cfg.dataset_spec, data)])
    evaluating_before = cfg.eval_before and not before and (plan.tasks or plan.ppl_name)

    quantized = cfg.finetuning == "qlora"
    if evaluating_before and quantized:
        # "before" is the input as the user has it (full precision), not the 4-bit copy we train.
        fp = _load(ref, cfg, device, quantized=False)
        before = evaluate_loaded(fp, plan, run, prefix="before/").metrics
        del fp
        gc.collect()
        _empty_cuda_cache()
    loaded = _load(ref, cfg, device, quantized)
    run.set_tags(runs.lineage_tags(ref, loaded, "finetuned"))
    if evaluating_before and not quantized:
        before = evaluate_loaded(loaded, plan, run, prefix="before/").metrics

    model = loaded.model
    continued = _is_peft(model)
    if continued and cfg.finetuning == "full":
        model = model.merge_and_unload()
        continued = False
    elif continued:
        log.info("the input is an adapter: training it further (lora_r/alpha/target_modules of the input apply)")
        _trainable_adapter(model)
    run.log_params({"resolved_model": loaded.ref.target, "model_dtype": str(model.dtype),
                    "continued_adapter": continued})

    curves = CurveLogger(run)
    # Under a distributed launch the trainer writes the result itself (gathering FSDP / ZeRO-3
    # shards) and every rank continues with that output, reloaded: one code path for DDP and
    # sharded training, and what is evaluated is exactly what is logged.
    save_dir = out_dir / FINAL_DIR if distributed.active() else None
    try:
        result = trainer.train(model, loaded.tokenizer, data, ft, on_log=curves, output_dir=out_dir,
                               callbacks=[curves.callback(), *(callbacks or [])], skip_logged_through=skip,
                               save_dir=save_dir)
    except BaseException:
        # The steps up to a failure (a NaN loss included) stay in the run; a failing flush
        # must not hide the training error.
        with contextlib.suppress(Exception):
            curves.flush()
        raise
    curves.flush()
    step = result.global_step
    # The training loop's own peak goes under train/; the step's peak (loading and
    # evaluation included) is logged at the end as peak_rss_mb / peak_vram_mb.
    summary = {(f"train/{k}" if k.startswith("peak_") else k): v for k, v in result.metrics().items()}
    if "train_samples_per_second" in result.summary:
        summary["train/samples_per_second"] = result.summary["train_samples_per_second"]
    run.log_metrics(summary, step=step)

    if result.saved_dir is not None:
        base = base_reference(ref, loaded, continued)
        model = loaded.model = result.model = None  # the training copy goes before the output loads
        gc.collect()
        _empty_cuda_cache()
        result.model = _reload_output(result.saved_dir, cfg, device, base, quantized)

    # -- the output, logged as the run's `model` (and `adapter`) artifact
    four_bit = is_4bit(result.model)
    lineage = {"base_model": loaded.base_model, "family": loaded.family, "instruct": loaded.instruct,
               "run_id": run.run_id, "method": cfg.method, "source": cfg.model}
    base_ref = base_reference(ref, loaded, continued)
    tags = {**model_tags(loaded, "finetune", cfg.model), names.METHOD_TAG: cfg.method, names.FINETUNING_TAG: cfg.finetuning}
    with tempfile.TemporaryDirectory(prefix="mlproject-finetune-") as tmp:
        # Every rank holds the same trained weights (DDP); only the run's owner writes them.
        saved = save_output(result.model, loaded.tokenizer, tmp, merge=cfg.merge, write=run.records)
        # Each folder becomes an MLflow model of the run (transformers flavor; an adapter as the
        # flavor's PEFT adapter on its base), fetched as runs:/<run_id>/model (and /adapter).
        adapter_flavor = None
        if saved.adapter_dir is not None:
            loading.write_meta(saved.adapter_dir, kind="adapter", base=base_ref,
                               quantization="nf4" if four_bit else None, **lineage)
            adapter_flavor = loading.mlflow_flavor(result.model, loaded.tokenizer, saved.adapter_dir,
                                                   source=source_model(loaded),
                                                   base_path=loading.mlflow_base_path(base_ref))
        if saved.model_dir is not None:
            loading.write_meta(saved.model_dir, kind="full", merged=saved.adapter_dir is not None, **lineage)
            flavor = loading.mlflow_flavor(saved.model, loaded.tokenizer, saved.model_dir, source=source_model(loaded))
            run.log_model_dir(saved.model_dir, "model", flavor=flavor, tags=tags)
            if saved.adapter_dir is not None:
                run.log_model_dir(saved.adapter_dir, "adapter", flavor=adapter_flavor, tags=tags)
        elif saved.adapter_dir is not None:  # (neither on the other ranks of a launch: nothing written)
            run.log_model_dir(saved.adapter_dir, "model", flavor=adapter_flavor, tags={**tags, names.MODEL_BASE_TAG: base_ref})
    run.set_tags({names.STORE_TAG: "adapter" if saved.model_dir is None else "weights"})
    final = saved.model
    final.eval()  # the trainer leaves it in train mode (LoRA dropout on)

    after_loaded = replace(loaded, model=final, ref=ref, adapter=None)
    outcome = EvalOutcome()
    metrics: dict[str, float] = dict(summary)
    if cfg.eval_after and (plan.tasks or plan.ppl_name):
        outcome = evaluate_loaded(after_loaded, plan, run, step=step)
        metrics.update(outcome.metrics)
        if before:
            used = outcome.harness.avg_metrics if outcome.harness else {}
            delta = deltas(before, outcome.metrics, used)
            run.log_metrics(delta, step=step)
            metrics.update(delta)
    metrics.update({f"before/{k}": v for k, v in before.items()})
    system = {**model_metrics(final), **memory.peak()}
    run.log_metrics(system, step=step)
    metrics.update(system)

    md = report(f"finetune: {ref.label}", run, "finetune", params, plan, outcome,
                {**system, **{k: v for k, v in summary.items() if not k.startswith("train/")}},
                extra_sections=_report_sections(cfg, result, before, outcome, params))
    run.log_text(md, "report.md")
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    describe_run(run, f"finetune · {cfg.model} · {cfg.method} {cfg.finetuning}, {step} steps{loss}", plan, outcome,
                 {**outcome.metrics, **system, "train_seconds": result.train_seconds}, before=before or None,
                 evaluated=bool(outcome.metrics),
                 settings={"data": f"{params['dataset']} ({params['dataset_rows']} rows)", "lr": cfg.lr,
                           "train batch": cfg.train_batch_size, "device": device},
                 notes=("Not evaluated after training (eval_after=false)." if not outcome.metrics else "",))
    distributed.on_main(_settle_output, out_dir, dict(run.unsent_models), cfg.keep_output, bool(cfg.output_dir.strip()),
                        run.run_id)
    # the model handed on in memory carries the lineage the logged folder does (a later
    # fine-tune continuing this adapter reads its base from it)
    handed = replace(after_loaded, local_dir=None,
                     meta={**lineage, "kind": "adapter" if saved.adapter_dir is not None and saved.model_dir is None
                           else "full", **({"base": base_ref} if saved.model_dir is None else {})})
    return StepResult(step="finetune", run_id=run.run_id, model_uri=run.model_uri(), metrics=metrics, key=key,
                      details={"global_step": step, "final_loss": result.final_loss, "output_dir": str(out_dir)},
                      model=final,
                      # what runs:/…/model reloads, but for QLoRA (k-bit training upcasts norms in place)
                      # and a launch's ranks: those reload it
                      loaded=handed if cfg.finetuning != "qlora" and distributed.world_size() == 1 else None)


def _report_sections(cfg: FinetuneStepConfig, result: Any, before: dict[str, float], outcome: EvalOutcome,
                     params: dict) -> dict[str, str]:
    from mlproject.report import bullet, md_table

    training = bullet({
        "method / finetuning": f"{cfg.method} / {cfg.finetuning}",
        "data": f"{params['dataset']} ({params['dataset_rows']} rows)",
        "optimizer steps": result.global_step,
        "resumed from checkpoint step": result.resumed_from_step or "no",
        "final loss": f"{result.final_loss:.4f}" if result.final_loss is not None else None,
        "train seconds": f"{result.train_seconds:.1f}",
        "trainable / total params": f"{result.trainable_params:,} / {result.total_params:,} "
                                    f"({100.0 * result.trainable_params / max(result.total_params, 1):.3f}%)",
        "chat template": cfg.chat_template,
        "checkpoints": params["output_dir"],
    })
    sections = {"Training": training}
    if before and outcome.metrics:
        used = outcome.harness.avg_metrics if outcome.harness else {}
        keys = [k for k in outcome.metrics if k.startswith("ppl/")] + ["avg_acc"] + [f"{t}/{m}" for t, m in used.items()]
        rows = [(k, before.get(k), outcome.metrics.get(k),
                 outcome.metrics[k] - before[k] if k in before and k in outcome.metrics else None) for k in keys]
        sections["Before / after"] = (
            "`before/<metric>` is the input model, plain names the fine-tuned one, `delta/<metric>` = after − before.\n\n"
            + md_table(["metric", "before", "after", "delta"], rows))
    return sections
