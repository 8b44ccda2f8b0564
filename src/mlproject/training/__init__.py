"""Fine-tuning library: SFT / DPO with trl on LoRA, QLoRA or full models (no MLflow here).

Typical use (what the finetune step does)::

    cfg = FinetuneConfig(method="sft", finetuning="lora", max_steps=100)
    data = load_training_data("offline:<name>", cfg.method)        # cheap, before the model
    model = AutoModelForCausalLM.from_pretrained(
        ref, quantization_config=qlora_quantization_config() if cfg.finetuning == "qlora" else None)
    result = train(model, tokenizer, data, cfg, on_log=log_metrics, output_dir="ckpt")
    saved = save_output(result.model, tokenizer, "out", merge=cfg.merge)

Heavy imports (torch, transformers, trl, peft) happen inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlproject.training.config import FINETUNING, METHODS, FinetuneConfig
from mlproject.training.datasets import load_training_data, validate_columns

if TYPE_CHECKING:
    from mlproject.training.adapters import SavedModel, qlora_quantization_config, save_output
    from mlproject.training.callbacks import TrainingDiverged
    from mlproject.training.trainer import TrainResult, train

_LAZY = {
    "train": "mlproject.training.trainer",
    "TrainResult": "mlproject.training.trainer",
    "last_checkpoint": "mlproject.training.trainer",
    "TrainingDiverged": "mlproject.training.callbacks",
    "save_output": "mlproject.training.adapters",
    "SavedModel": "mlproject.training.adapters",
    "qlora_quantization_config": "mlproject.training.adapters",
    "prepare_model": "mlproject.training.adapters",
    "count_parameters": "mlproject.training.adapters",
}


def __getattr__(name: str) -> Any:
    # trainer/callbacks import transformers at module level; keep `import mlproject.training` light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FINETUNING", "METHODS", "FinetuneConfig", "SavedModel", "TrainResult", "TrainingDiverged",
    "count_parameters", "last_checkpoint", "load_training_data", "prepare_model",
    "qlora_quantization_config", "save_output", "train", "validate_columns",
]
