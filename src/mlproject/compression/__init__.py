"""Model compression: RTN weight quantization (pure tensors), bitsandbytes configs, structured pruning.

The quantization methods the quantize step offers are registered in ``compression.methods``
(one module per method family). No MLflow here; ``mlproject.steps`` composes these with
tracking. Submodules import torch / transformers lazily, so importing this package is cheap.
"""

from mlproject.compression.bnb import BNB_METHODS, bnb_config, disable_cpu_repacking, model_size_mb
from mlproject.compression.prune import (
    PruneConfig, PrunePlan, PruneReport, check_plan, load_pruned_model, prune_model,
)
from mlproject.compression.rtn import RTNConfig, RTNReport, check_layers, quantize_model, quantize_tensor

__all__ = [
    "BNB_METHODS", "bnb_config", "disable_cpu_repacking", "model_size_mb",
    "PruneConfig", "PrunePlan", "PruneReport", "check_plan", "load_pruned_model", "prune_model",
    "RTNConfig", "RTNReport", "check_layers", "quantize_model", "quantize_tensor",
]
