"""`prune`: structured pruning to a target fraction of parameters, logged as the run's `model`,
then evaluated.

The library (``compression.prune``) removes whole MLP channels and/or KV head groups from
Llama / Mistral / Qwen2 decoders, so the model and its checkpoint really shrink. Other
architectures are refused before the run starts whenever the input's config can be read
cheaply (local dir, converted alias, hub cache, a run's config.json), else right after loading.

Calibration (``importance=activation`` only): ``calibration_samples`` windows of
``calibration_seqlen`` tokens (default 8 × 256 = 2,048 tokens, the amount Wanda-style scores
settle with on small models) at seeded random offsets of the calibration text; the text is
tokenized once. With the default ``calibration=offline`` the text is the bundled PPL text, so
the report flags that calibration and PPL overlap.
"""

from __future__ import annotations

import logging
import time

from mlproject import tracking
from mlproject.compression import prune as prune_lib
from mlproject.config import PruneStepConfig
from mlproject.errors import UserError
from mlproject.evaluation.engine import plan_eval
from mlproject.report import md_table
from mlproject.steps import StepResult
from mlproject.steps.shared import checks, compress, model_output, runs
from mlproject.tracking import names

log = logging.getLogger(__name__)

MB = 2**20


def check(cfg: PruneStepConfig, parent: tracking.Run | None = None, pending: frozenset[str] = frozenset()):
    """Every cheap check, before a run or weights exist: values, server, architecture, layer
    shapes and whether the ratio is reachable. Returns (ref, device, torch dtype, plan)."""
    ref, device, torch_dtype = checks.check_model_args(cfg.model, cfg.adapter, cfg.device, cfg.dtype)
    plan = plan_eval(cfg)
    pcfg = cfg.prune_config()
    checks.check_tracking(cfg.tracking_uri, ref, cfg.adapter, parent=parent, pending=pending)
    checks.check_model_sources(ref, cfg.adapter, device, torch_dtype, pending, step="prune",
                               plan=plan if cfg.evaluate else None, kept=1 - cfg.ratio, strict=cfg.strict_memory)
    checks.check_data_sources({**({"calibration": cfg.calibration} if cfg.importance == "activation" else {}),
                               **({"ppl_dataset": cfg.ppl_dataset} if cfg.evaluate else {})})
    config = None if ref.run_id in pending else compress.peek_config(ref, "prune")
    if config is not None:
        meta = compress.meta_model(config)
        if meta is not None and not getattr(config, "pruned_layer_sizes", None):
            # architecture, layer shapes and whether the ratio is reachable, without weights
            prune_lib.check_plan(meta, pcfg)
        elif getattr(config, "model_type", None) not in prune_lib.SUPPORTED_ARCHS:
            raise UserError(f"structured pruning does not support architecture {config.model_type!r}; "
                            f"supported: {', '.join(prune_lib.SUPPORTED_ARCHS)}")
    if cfg.evaluate:
        checks.check_eval_fits(ref, plan, pending, config)
    return ref, device, torch_dtype, plan


def run(cfg: PruneStepConfig, parent: tracking.Run | None = None) -> StepResult:
    ref, device, torch_dtype, plan = check(cfg, parent)
    key = runs.step_key("prune", cfg)
    pcfg = cfg.prune_config()
    activation = cfg.importance == "activation"

    calib = {"calibration": cfg.calibration, "calibration_samples": cfg.calibration_samples,
             "calibration_seqlen": cfg.calibration_seqlen} if activation else {"calibration": "none"}
    params = {"model": cfg.model, "adapter": cfg.adapter or "none", "dtype": cfg.dtype, "device": device,
              "ratio": cfg.ratio, "importance": cfg.importance, "targets": cfg.targets,
              "keep_layers": cfg.keep_layers, **calib, "evaluate": str(cfg.evaluate).lower(), **plan.params()}
    with tracking.step_run(
        "prune", experiment=cfg.experiment or None,
        run_name=cfg.run_name or f"prune:{ref.label}:{cfg.targets}-{cfg.ratio:g}-{cfg.importance}",
        tags={names.CACHE_KEY_TAG: key}, parent=parent,
    ) as run, runs.PeakMemory() as memory:
        run.log_params(params)
        start = time.perf_counter()
        loaded = compress.load_input(ref, dtype=cfg.dtype, device=device, adapter=cfg.adapter)
        load_seconds = time.perf_counter() - start
        size_before = _size_mb(loaded.model)
        ids = None
        if activation:
            ids = compress.calibrate(run, loaded.tokenizer, cfg.calibration, cfg.calibration_samples,
                                     cfg.calibration_seqlen, cfg.seed)
        start = time.perf_counter()
        rep = prune_lib.prune_model(loaded.model, pcfg, calibration_ids=ids)
        prune_seconds = time.perf_counter() - start
        run.set_tags(runs.lineage_tags(ref, loaded, role="pruned"))
        run.log_params({"resolved_model": loaded.ref.target, "uniform": rep.uniform,
                        "pruned_layers": f"{rep.pruned_layers[0]}-{rep.pruned_layers[-1]}"
                        if rep.pruned_layers else "none"})
        metrics = {"params_b_before": rep.params_before / 1e9, "params_b": rep.params_after / 1e9,
                   "achieved_ratio": rep.achieved_ratio, "prune_seconds": prune_seconds,
                   "load_seconds": load_seconds, "model_size_mb_before": size_before,
                   "model_size_mb": _size_mb(loaded.model)}
        # counts that describe the pruned architecture: params, not scores
        run.log_params({"prune.channels_removed": rep.channels_removed,
                        "prune.kv_groups_removed": rep.kv_groups_removed})
        recipe = model_output.Recipe("prune", {"ratio": cfg.ratio, "importance": cfg.importance,
                                               "targets": cfg.targets, "keep_layers": cfg.keep_layers},
                                     adapter=cfg.adapter, dtype=torch_dtype, device=device, tensors=rep.kept)
        model_uri = model_output.log_model(run, loaded, ref, step="prune", recipe=recipe, store=cfg.store)

        first = rep.layer_sizes[rep.pruned_layers[0]] if rep.pruned_layers else {}
        body = [
            f"**Structured pruning**, target ratio {cfg.ratio:g} of all parameters, achieved "
            f"**{rep.achieved_ratio:.4f}** ({rep.params_before:,} → {rep.params_after:,} parameters). "
            f"importance={cfg.importance}, targets={cfg.targets}; each of the {len(rep.pruned_layers)} pruned "
            f"decoder layers lost {rep.channels_removed} MLP channels and {rep.kv_groups_removed} KV groups "
            f"(now intermediate_size {first.get('intermediate_size')}, {first.get('num_attention_heads')} "
            f"query / {first.get('num_key_value_heads')} KV heads).",
            md_table(["", "before", "after"], [
                ("params_b", rep.params_before / 1e9, rep.params_after / 1e9),
                ("model_size_mb", size_before, metrics["model_size_mb"]),
            ]),
            f"Pruned in {prune_seconds:.2f} s; the model is logged as `{model_uri}`"
            + ("." if rep.uniform else
               f" (non-uniform sizes: first/last {cfg.keep_layers} layers kept; mlproject's loader reloads it)."),
        ]
        if activation:
            body.append(f"Calibration: {ids.shape[0]} × {ids.shape[1]} tokens of `{cfg.calibration}` at random "
                        f"offsets (seed {cfg.seed}).")
            if cfg.calibration == cfg.ppl_dataset and cfg.evaluate:
                body.append("Note: the calibration text is also the PPL text, so the PPL is slightly optimistic.")
        report_params = {"model": cfg.model, "method": "structured pruning", "ratio": cfg.ratio,
                         "importance": cfg.importance, "targets": cfg.targets, "keep_layers": cfg.keep_layers,
                         "dtype": str(torch_dtype).removeprefix("torch."), "device": device, "seed": cfg.seed,
                         "calibration": ({"dataset": cfg.calibration, "samples": ids.shape[0], "seqlen": ids.shape[1]}
                                         if activation else "N/A (magnitude)")}
        note = (f"Removed {rep.achieved_ratio:.2%} of the parameters ({rep.params_before / 1e9:.4g} B → "
                f"{rep.params_after / 1e9:.4g} B): {rep.channels_removed} MLP channels and {rep.kv_groups_removed} "
                f"KV groups in each of {len(rep.pruned_layers)} layers.")
        return compress.finish(
            run, step="prune", title=f"prune: {ref.label} {cfg.targets} {cfg.ratio:g}", loaded=loaded, plan=plan,
            evaluate=cfg.evaluate, report_params=report_params, metrics=metrics,
            section=("Pruning", "\n\n".join(body)), model_uri=model_uri, memory=memory, key=key,
            headline=f"prune · {cfg.model} · {cfg.targets} {cfg.ratio:g} ({cfg.importance})", notes=(note,),
        )


def _size_mb(model) -> float:
    from mlproject.compression.bnb import model_size_mb

    return model_size_mb(model)
