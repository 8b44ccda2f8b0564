"""Training hyper-parameters (no model, data or tracking choices: the finetune step adds those)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mlproject.errors import UserError

METHODS = ("sft", "dpo")
FINETUNING = ("lora", "qlora", "full")
CHAT_TEMPLATE_MODES = ("auto", "on", "off")


@dataclass
class FinetuneConfig:
    """How to fine-tune: the method, the kind of fine-tuning and the optimisation schedule.

    Every field is a plain scalar so the step can log ``asdict(cfg)`` as MLflow params as is.
    """

    method: str = "sft"
    """``sft`` (supervised: prompt/completion, messages or instruction/input/output rows) or
    ``dpo`` (direct preference optimisation: prompt/chosen/rejected rows)."""
    finetuning: str = "lora"
    """``lora`` (peft LoRA on a full-precision base), ``qlora`` (LoRA on a 4-bit NF4 base; the
    base must be loaded with :func:`mlproject.training.adapters.qlora_quantization_config`) or
    ``full`` (every parameter trainable)."""
    lora_r: int = 16
    """LoRA rank (ignored by ``full``)."""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is scaled by ``lora_alpha / lora_r``."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: str = "all-linear"
    """Modules that get LoRA: ``all-linear`` (every linear layer except the output head) or a
    comma list of module names such as ``q_proj,v_proj``."""
    lr: float = 2e-4
    """Peak learning rate (linear decay, no warm-up)."""
    epochs: float = 1.0
    """Passes over the training set; ignored when ``max_steps`` > 0."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means use ``epochs``."""
    train_batch_size: int = 4
    """Examples per device per forward pass."""
    grad_accum: int = 1
    """Forward passes accumulated per optimizer step (effective batch = train_batch_size × grad_accum)."""
    max_length: int = 512
    """Tokens per example (prompt + completion); longer examples are truncated at the end."""
    beta: float = 0.1
    """DPO temperature: higher keeps the policy closer to the reference model (DPO only)."""
    seed: int = 42
    """Seed for adapter initialisation, data order and dropout."""
    merge: bool = False
    """Also write merged full weights (LoRA folded into the base) beside the adapter."""
    resume: bool = False
    """Continue from the last ``checkpoint-*`` in ``output_dir`` when there is one."""
    output_dir: str = "outputs/finetune"
    """Where checkpoints go (the final adapter/model is written by ``save_output``)."""
    save_steps: int = 50
    """Write a checkpoint every this many optimizer steps (0 = only at the end)."""
    save_total_limit: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""
    logging_steps: int = 1
    """Report training metrics every this many optimizer steps."""
    chat_template: str = "auto"
    """Format rows through the tokenizer's chat template: ``auto`` (when the tokenizer has one),
    ``on`` (required) or ``off`` (plain text: prompt and completion are concatenated)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~20% slower)."""

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        self.finetuning = str(self.finetuning).lower()
        self.chat_template = str(self.chat_template).lower()
        if self.method not in METHODS:
            raise UserError(f"method={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if self.finetuning not in FINETUNING:
            raise UserError(f"finetuning={self.finetuning!r} is not supported; choose one of {', '.join(FINETUNING)}")
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise UserError(
                f"chat_template={self.chat_template!r} is not supported; choose one of {', '.join(CHAT_TEMPLATE_MODES)}"
            )
        _positive_int(self, "lora_r", "lora_alpha", "train_batch_size", "grad_accum", "max_length", "logging_steps",
                      "save_total_limit")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise UserError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise UserError(f"lr={self.lr!r} must be a positive number")
        if not (math.isfinite(float(self.beta)) and float(self.beta) > 0):
            raise UserError(f"beta={self.beta!r} must be a positive number")
        if int(self.max_steps) == 0 or int(self.max_steps) < -1:
            raise UserError(f"max_steps={self.max_steps!r} must be a positive step count or -1 (use epochs)")
        if int(self.max_steps) == -1 and not (math.isfinite(float(self.epochs)) and float(self.epochs) > 0):
            raise UserError(f"epochs={self.epochs!r} must be positive when max_steps is -1")
        if int(self.save_steps) < 0:
            raise UserError(f"save_steps={self.save_steps!r} must be >= 0")
        if not str(self.target_modules).strip() or any(not m.strip() for m in str(self.target_modules).split(",")):
            raise UserError(f"target_modules={self.target_modules!r} must be 'all-linear' or a comma list of names")
        if not str(self.output_dir).strip():
            raise UserError("output_dir must not be empty")

    @property
    def target_modules_value(self) -> str | list[str]:
        """What peft's ``LoraConfig(target_modules=...)`` expects."""
        spec = str(self.target_modules).strip()
        if spec == "all-linear":
            return spec
        return [m.strip() for m in spec.split(",")]

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_params(self) -> dict[str, object]:
        """Flat dict for logging as run parameters."""
        return asdict(self)


def _positive_int(cfg: FinetuneConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive integer")
