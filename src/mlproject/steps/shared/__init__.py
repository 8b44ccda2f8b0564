"""What the steps share, one idea per module, so that no step module imports another:

* ``checks``: the cheap checks before a run opens (model reference, device, launch, tracking
  server, hub models and data sets, memory, generation tasks vs. the model's context);
* ``runs``: run bookkeeping (names, lineage tags, reuse keys, peak memory);
* ``evaluation``: measuring a loaded model on the step's run, report.md, the run description;
* ``model_output``: logging the output model with its lineage (finetune, quantize, prune);
* ``compress``: what quantize and prune share (input checks and loading, the run's finish).

Nothing here imports a step module (``mlproject.steps.evaluate`` …); an import-linter contract
in pyproject.toml holds that.
"""
