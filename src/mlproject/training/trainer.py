"""SFT / DPO training with trl on LoRA, QLoRA or full models. Knows nothing of MLflow.

The caller (the finetune step) loads the model and tokenizer, the dataset
(:func:`mlproject.training.datasets.load_training_data`) and passes ``on_log`` to receive each
training log (``loss``, ``learning_rate``, ``grad_norm``, ``epoch``; DPO adds
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/…``,
``logits/…``) with its optimizer step. transformers' own reporters are off (``report_to="none"``):
its MLflowCallback would end the run FINISHED even when training crashes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlproject import distributed
from mlproject.errors import UserError
from mlproject.training.adapters import count_parameters, is_4bit, prepare_model
from mlproject.training.callbacks import (LogForwarder, MemorySampler, NonFiniteGuard, OnLog, ProgressCallback,
                                          TrainingDiverged)
from mlproject.training.datasets import normalize, to_trl_format

if TYPE_CHECKING:
    import datasets

    from mlproject.training.config import FinetuneConfig

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class TrainResult:
    model: Any
    """The trained model (a ``PeftModel`` for lora/qlora)."""
    global_step: int
    """Optimizer steps done in total (including steps before a resumed checkpoint)."""
    train_seconds: float
    """Wall time of ``trainer.train()`` in this process."""
    final_loss: float | None
    """Last logged training loss (None when no step was logged, e.g. resumed at max_steps)."""
    trainable_params: int
    total_params: int
    peak_memory_mb: float
    """Peak CUDA memory allocated (``torch.cuda.max_memory_allocated``) or peak process RSS on CPU;
    under a distributed launch the largest over the ranks."""
    memory_kind: str
    """``cuda`` or ``rss``: which of the two ``peak_memory_mb`` is."""
    resumed_from_step: int = 0
    """Global step of the checkpoint training resumed from (0 = fresh start)."""
    logged_steps: list[int] = field(default_factory=list)
    """Steps passed to ``on_log`` in this process."""
    summary: dict[str, float] = field(default_factory=dict)
    """transformers' end-of-training summary (train_runtime, train_loss, …)."""
    saved_dir: Path | None = None
    """Where the trainer itself wrote the result (``save_dir`` given), else None."""

    def metrics(self) -> dict[str, float]:
        """Scalar summary metrics under the project's names (``peak_vram_mb`` on CUDA, ``peak_rss_mb`` on CPU)."""
        out = {
            "train_seconds": self.train_seconds,
            "train_steps": float(self.global_step),
            "trainable_params": float(self.trainable_params),
            "total_params": float(self.total_params),
            "trainable_pct": 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0,
            ("peak_vram_mb" if self.memory_kind == "cuda" else "peak_rss_mb"): self.peak_memory_mb,
        }
        if self.final_loss is not None:
            out["train/final_loss"] = self.final_loss
        return out


def last_checkpoint(output_dir: str | Path) -> tuple[Path | None, int]:
    """(path, global_step) of the newest ``checkpoint-*`` in ``output_dir``, or (None, 0)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    if not out.is_dir():
        return None, 0
    ckpt = get_last_checkpoint(str(out))
    if ckpt is None:
        return None, 0
    state_file = Path(ckpt) / "trainer_state.json"
    step = int(json.loads(state_file.read_text())["global_step"]) if state_file.is_file() else int(
        Path(ckpt).name.split("-")[-1])
    return Path(ckpt), step


def _precision(model: Any = None) -> dict[str, bool]:
    """Mixed precision flags: bf16 autocast on CUDA that supports it, fp32 on CPU.

    trl's configs default to ``bf16=True``; on CPU that would autocast the tiny/test models
    to bf16 (slow on most CPUs and lossy), so it is set explicitly either way.
    """
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False, "use_cpu": True}
    if torch.cuda.is_bf16_supported():
        return {"bf16": True, "fp16": False, "use_cpu": False}
    # fp16 autocast needs fp32 master weights (a grad scaler cannot unscale fp16 weights' grads).
    dtype = next(model.parameters()).dtype if model is not None else torch.float32
    return {"bf16": False, "fp16": dtype != torch.float16, "use_cpu": False}


def build_args(cfg: "FinetuneConfig", output_dir: str | Path, model: Any = None):
    """The trl ``SFTConfig`` / ``DPOConfig`` for ``cfg`` (exposed for inspection and tests)."""
    from trl import DPOConfig, SFTConfig

    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=False,
        logging_nan_inf_filter=False,  # a NaN loss must reach the logs (and the guard), not be masked
        report_to="none",  # we log through on_log; transformers' MLflowCallback must never touch the run
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=True,
        disable_tqdm=True,  # library code never prints; progress reaches the caller through on_log
        **_precision(model),
    )
    # trl defaults gradient checkpointing to True; transformers 5 renamed it activation_checkpointing
    # (the old name still works but warns).
    cls = SFTConfig if cfg.method == "sft" else DPOConfig
    names = {f.name for f in dataclasses.fields(cls)}
    ckpt_name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    common[ckpt_name] = cfg.gradient_checkpointing
    if cfg.gradient_checkpointing:
        common[f"{ckpt_name}_kwargs"] = {"use_reentrant": False}
    if cfg.method == "sft":
        # completion_only_loss=None: loss on the completion for prompt/completion rows, on the
        # whole sequence for messages/text rows (trl's default).
        return SFTConfig(packing=False, **common)
    return DPOConfig(beta=cfg.beta, **common)


def train(
    model: Any,
    tokenizer: Any,
    train_dataset: "datasets.Dataset",
    cfg: "FinetuneConfig",
    *,
    on_log: OnLog | None = None,
    output_dir: str | Path | None = None,
    callbacks: list[Any] | None = None,
    skip_logged_through: int = 0,
    save_dir: str | Path | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``train_dataset`` as ``cfg`` says and return the trained model.

    ``model`` is the base model (4-bit for ``finetuning=qlora``) or an existing ``PeftModel`` whose
    adapter keeps training. ``train_dataset`` is what :func:`load_training_data` returned (it is
    normalised again, cheaply, if not). Checkpoints go to ``output_dir`` (default
    ``cfg.output_dir``); with ``cfg.resume`` training continues from the last one there, and
    ``on_log`` only receives steps after it (and after ``skip_logged_through``: pass the last step
    an earlier attempt already logged to the same run, so steps between its last checkpoint and
    its crash are not reported twice). ``callbacks`` are extra ``TrainerCallback``s.

    ``save_dir``: the trainer writes the result there itself (``Trainer.save_model``: the adapter
    or the whole model, and the tokenizer). Under FSDP / DeepSpeed ZeRO-3 that is what gathers
    the shards into whole weights (on the main process); every rank calls it and returns once
    the files are complete. Use it under any distributed launch: the sharded ``model`` returned
    is then not usable on its own.

    Raises :class:`TrainingDiverged` when the loss or grad norm became NaN/inf (training stops
    at that step and no checkpoint is written for it), UserError on unusable data.
    """
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer, SFTTrainer

    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset = to_trl_format(normalize(train_dataset, cfg.method), tokenizer, cfg.chat_template)

    ckpt, ckpt_step = last_checkpoint(out) if cfg.resume else (None, 0)
    if cfg.resume and ckpt is None:
        log.info("resume requested but no checkpoint in %s; starting from scratch", out)
    elif not cfg.resume and last_checkpoint(out)[0] is not None:
        log.warning("%s already holds checkpoints; they are ignored (resume=False) and may be replaced", out)

    model = prepare_model(model, cfg)
    # Counted before the trainer exists: DPOTrainer adds a frozen "ref" copy of an existing adapter.
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise UserError("the model has no trainable parameters (a PeftModel must be loaded with is_trainable=True)")
    log.info("trainable params: %d / %d (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    args = build_args(cfg, out, model)
    forwarder = LogForwarder(on_log, skip_through=max(ckpt_step, int(skip_logged_through)))
    guard = NonFiniteGuard()
    memory = MemorySampler()
    bar = ProgressCallback(f"training ({cfg.method}, {cfg.finetuning})")
    trainer_cls = SFTTrainer if cfg.method == "sft" else DPOTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[forwarder, guard, memory, bar, *(callbacks or [])],
    )
    # With disable_tqdm transformers installs PrinterCallback, which prints every log dict.
    trainer.remove_callback(PrinterCallback)
    trained = trainer.model
    _restore_fp32_adapters(trained)

    cuda = torch.cuda.is_available()  # the Trainer moves the model to the GPU when there is one
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    finally:
        bar.close()  # a crash skips on_train_end
    seconds = time.perf_counter() - start

    _drop_reference_adapter(trained)
    if guard.diverged is not None:
        raise guard.diverged
    if save_dir is not None:
        import shutil

        # A folder left by an earlier run (full weights, say) must not mix with this one's files.
        distributed.on_main(shutil.rmtree, save_dir, ignore_errors=True)
        trainer.save_model(str(save_dir))
        distributed.barrier()  # rank 0 writes; the others read the files next

    peak = torch.cuda.max_memory_allocated() / MB if cuda else memory.peak_rss / MB
    peak = distributed.max_over_ranks({"peak": peak})["peak"]  # the launch's largest process
    final_loss = forwarder.last.get("loss")
    return TrainResult(
        model=trained,
        global_step=int(trainer.state.global_step),
        train_seconds=seconds,
        final_loss=final_loss,
        trainable_params=trainable,
        total_params=total,
        peak_memory_mb=peak,
        memory_kind="cuda" if cuda else "rss",
        resumed_from_step=ckpt_step,
        logged_steps=list(forwarder.steps),
        summary=dict(forwarder.summary),
        saved_dir=Path(save_dir) if save_dir is not None else None,
    )


def _restore_fp32_adapters(model: Any) -> None:
    """Undo trl's bf16 cast of QLoRA adapters when the base computes in fp32 (CPU).

    trl casts trainable params of quantized models to bf16 (QLoRA paper recipe, meant for
    bf16 compute on GPUs). With fp32 compute on CPU that only loses update precision.
    """
    import torch

    if not is_4bit(model):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    qcfg = getattr(base.config, "quantization_config", None)
    compute = getattr(qcfg, "bnb_4bit_compute_dtype", None)
    if isinstance(compute, str):
        compute = getattr(torch, compute, None)
    if compute != torch.float32:
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.float()


def _drop_reference_adapter(model: Any) -> None:
    """DPOTrainer given a PeftModel adds a frozen copy named "ref"; it is not part of the result."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and "ref" in peft_config and len(peft_config) > 1:
        model.delete_adapter("ref")


__all__ = ["TrainResult", "TrainingDiverged", "build_args", "last_checkpoint", "train"]
