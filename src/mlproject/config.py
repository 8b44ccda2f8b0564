"""Step configurations: dataclasses whose fields are the steps' parameters.

Each field is documented once, in its metadata ``help`` (``mlproject.params``); the CLI builds
its flags from these fields and a test checks that ``MLproject`` declares the same parameters
with the same defaults. Validation that needs no heavy import happens in ``__post_init__``.
The options shared with other owners live beside the code that consumes them: how a model is
evaluated in ``mlproject.evaluation.options``, the pipeline and search commands' options in
``mlproject.pipeline.config`` and ``mlproject.search.config``; ``RunOptions`` (where a run is
recorded) is here, for every one of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mlproject.compare.views import VIEWS
from mlproject.compression import methods as quant_methods
from mlproject.errors import UserError
from mlproject.evaluation.options import CodeEvalOptions, EvalOptions
from mlproject.params import coerce_fields, param


@dataclass
class RunOptions:
    """Where a run is recorded (CLI only; under `mlflow run`, MLflow decides)."""

    experiment: str = param("", "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'mlproject')", cli_only=True)
    run_name: str = param("", "run name (default: '<step>:<model>')", cli_only=True)
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store ./mlflow.db)", cli_only=True)


@dataclass
class ModelOptions:
    """Which model, and how it is placed."""

    model: str = param("smollm2", "model: alias, Hugging Face id, local dir, runs:/<id>/<path> or models:/<name>@<alias>")
    adapter: str = param("", "optional PEFT adapter on top of the model (dir, hub id or runs:/ URI); none = no adapter",
                         empty="none")
    dtype: str = param("auto", "weights dtype (auto = bfloat16 on CUDA, float32 on CPU)",
                       choices=("auto", "float32", "bfloat16", "float16"))
    device: str = param("auto", "auto, cpu, cuda or cuda:N")
    strict_memory: bool = param(False, "refuse (exit 2, before the run) when the step's estimated peak memory "
                                "exceeds what the device has free (CUDA) or the host's available RAM (CPU); "
                                "false = a warning")


@dataclass
class LaunchOptions:
    """How many processes run the step (data-parallel on one machine, through torchrun)."""

    nproc: int = param(1, "processes on this machine: > 1 re-launches the step under torchrun "
                       "(one per GPU; data-parallel training / evaluation, one MLflow run); leave it out "
                       "when starting the command with torchrun or accelerate launch yourself")

    def __post_init__(self):
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise UserError(f"nproc {self.nproc!r} must be a positive integer")


@dataclass
class EvaluateConfig(LaunchOptions, CodeEvalOptions, EvalOptions, ModelOptions, RunOptions):
    """`evaluate`: perplexity + lm-eval tasks of one model, recorded as one MLflow run."""

    role: str = param("", "role tag for compare; auto = 'base' for a model not produced by a run, else 'eval'",
                      empty="auto")

    def __post_init__(self):
        EvalOptions.__post_init__(self)
        CodeEvalOptions.__post_init__(self)
        LaunchOptions.__post_init__(self)


EVALUATE_RESULT_HELP = "evaluate the step's output model (PPL + tasks) in the same run"
# Calibration, shared by prune (importance=activation) and quantize (gptq, awq, autoround).
CALIBRATION_HELP = ("calibration text (prune importance=activation; quantize gptq/awq/autoround): offline (the "
                    "bundled PPL text), wikitext2 (hub) or a .txt path")
CALIBRATION_SAMPLES_HELP = "calibration sequences: random windows of the calibration text, drawn with seed"
CALIBRATION_SEQLEN_HELP = "tokens per calibration sequence"
STORE_HELP = ("what the run's model holds: recipe (the input's reference, the parameters and a digest of the weights: "
              "KBs, re-made and checked when loaded; rtn, bnb and prune) or weights (a full checkpoint); gptq, awq, "
              "autoround and hqq always store their packed weights")
STORE_CHOICES = ("recipe", "weights")


def _field_default(cls, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class QuantizeConfig(EvalOptions, ModelOptions, RunOptions):
    """`quantize`: weight quantization (RTN, bitsandbytes, GPTQ/AWQ, AutoRound, HQQ), logged as a model, then evaluated."""

    # Names, help and checks come from the method registry (one module per method family).
    method: str = param("rtn", quant_methods.help_text(), choices=quant_methods.CHOICES)
    w_bits: int = param(4, "integer bits per weight: rtn 2..8, gptq/awq/autoround 2..8 (awq 4 or 8 on GPU kernels), "
                        "hqq 1, 2, 3, 4 or 8 (bnb methods fix their own: 4 or 8)")
    group_size: int = param(128, "input columns sharing one scale (rtn/gptq/awq/autoround/hqq); must divide every "
                            "quantized layer's in_features (SmolLM2's 576: use 64 or 32); -1 = whole row")
    scheme: str = param("symmetric", "rtn/gptq/awq/autoround: symmetric (grid around 0) or asymmetric (min/max, "
                        "integer zero point); hqq is always asymmetric (optimized float zero point)")
    granularity: str = param("per_group", "rtn: per_group (one scale per group_size columns) or per_channel (per row)")
    modules: str = param("all-linear", "layers quantized: all-linear (every nn.Linear but the LM head) or a comma "
                         "list of layer-name substrings, e.g. q_proj,k_proj")
    # the calibration fields mean what prune's mean (one help text each); the defaults are GPTQ's usual amount
    calibration: str = param("offline", CALIBRATION_HELP)
    calibration_samples: int = param(128, CALIBRATION_SAMPLES_HELP)
    calibration_seqlen: int = param(512, CALIBRATION_SEQLEN_HELP)
    iters: int = param(200, "autoround: signed-gradient steps per decoder block (0 = RTN on AutoRound's grid)")
    store: str = param("recipe", STORE_HELP, choices=STORE_CHOICES)
    evaluate: bool = param(True, EVALUATE_RESULT_HELP)

    @classmethod
    def pipeline_fields(cls, values: dict[str, Any]) -> set[str]:
        """The fields a pipeline-wide value may set on this step: not those only other method
        families read (``group_size: 64`` for the whole pipeline reaches rtn and gptq steps, not nf4)."""
        method = quant_methods.get(str(values.get("method", _field_default(cls, "method"))))
        others = {n for fam in quant_methods.families() if fam is not method for n in fam.params}
        return {f.name for f in dataclasses.fields(cls)} - (others - set(method.params))

    def __post_init__(self):
        EvalOptions.__post_init__(self)  # coerces every field; an unknown method lists the registered ones
        # the method's own checks: RTN's settings; another method refuses RTN's fields it would ignore
        method = quant_methods.get(self.method)
        method.validate(self)
        if "calibration" in method.params:
            from mlproject.evaluation.perplexity import check_dataset

            try:
                text = check_dataset(self.calibration)
            except UserError:
                text = None
            if text is None:
                raise UserError(f"calibration {self.calibration!r}: method={self.method} needs a text "
                                "(offline, wikitext2 or a .txt path)")


@dataclass
class PruneStepConfig(EvalOptions, ModelOptions, RunOptions):
    """`prune`: structured pruning (MLP channels / KV head groups) to a target fraction of parameters, then evaluated."""

    ratio: float = param(0.2, "fraction of all parameters to remove, in (0, 1); achieved within 0.01")
    # Default activation, not the library's magnitude: on SmolLM2 at ratio 0.2, magnitude removes
    # the small-weight channels that carry the largest activations (PPL 3.9 -> 1.3e5, worse than
    # random channels), activation keeps a usable model (PPL 5.9).
    importance: str = param("activation", "activation (Wanda-style |W|·‖X‖ over the calibration text) or "
                            "magnitude (L2 norm of a unit's weights; no calibration, but collapses small LLMs)")
    targets: str = param("mlp", "what to remove: mlp (intermediate channels), heads (whole KV groups) or both")
    calibration: str = param("offline", CALIBRATION_HELP)
    calibration_samples: int = param(8, CALIBRATION_SAMPLES_HELP)
    calibration_seqlen: int = param(256, CALIBRATION_SEQLEN_HELP)
    keep_layers: int = param(0, "leave the first and last N decoder layers unpruned (N > 0: non-uniform sizes)")
    store: str = param("recipe", STORE_HELP, choices=STORE_CHOICES)
    evaluate: bool = param(True, EVALUATE_RESULT_HELP)

    def __post_init__(self):
        EvalOptions.__post_init__(self)
        self.prune_config()  # the library's own validation (ratio, importance, targets, keep_layers)
        if self.importance == "activation":
            from mlproject.evaluation.perplexity import check_dataset

            if check_dataset(self.calibration) is None:
                raise UserError(f"calibration {self.calibration!r}: importance=activation needs a text "
                                "(offline, wikitext2 or a .txt path)")
            if self.calibration_samples < 1:
                raise UserError(f"calibration_samples {self.calibration_samples} must be at least 1")
            if self.calibration_seqlen < 2:
                raise UserError(f"calibration_seqlen {self.calibration_seqlen} must be at least 2")

    def prune_config(self):
        from mlproject.compression.prune import PruneConfig

        return PruneConfig(ratio=self.ratio, importance=self.importance, targets=self.targets,
                           keep_layers=self.keep_layers)


def _train_default(name: str) -> Any:
    # Training defaults live once, on the training library's FinetuneConfig.
    from mlproject.training.config import FinetuneConfig

    return _field_default(FinetuneConfig, name)


def _choices(name: str) -> tuple:
    from mlproject.training import config as tc

    return {"method": tc.METHODS, "finetuning": tc.FINETUNING, "chat_template": tc.CHAT_TEMPLATE_MODES}[name]


@dataclass
class FinetuneStepConfig(LaunchOptions, EvalOptions, ModelOptions, RunOptions):
    """`finetune`: SFT or DPO (trl) with LoRA, QLoRA or full fine-tuning, optionally evaluated
    before and after in the same run; the result is logged as the run's `model` artifact."""

    method: str = param(_train_default("method"), "sft (prompt/completion, messages, instruction/output or "
                        "text rows) or dpo (prompt/chosen/rejected rows)", choices=_choices("method"))
    finetuning: str = param(_train_default("finetuning"), "lora (LoRA on the base as loaded), qlora (LoRA on a "
                            "4-bit NF4 base, bitsandbytes) or full (every weight trains)",
                            choices=_choices("finetuning"))
    train_batch_size: int = param(_train_default("train_batch_size"), "training examples per device per forward "
                                  "pass (batch_size is lm-eval's)")
    dataset: str = param("auto", "training data: offline:<name> (bundled), a .jsonl/.json/.parquet/.csv file, "
                         "a directory or a Hugging Face dataset id; auto = offline:<method>_mlp_nonce")
    lora_r: int = param(_train_default("lora_r"), "LoRA rank")
    lora_alpha: int = param(_train_default("lora_alpha"), "LoRA scale numerator (update scaled by alpha/r)")
    lora_dropout: float = param(_train_default("lora_dropout"), "dropout on the LoRA input, in [0, 1)")
    target_modules: str = param(_train_default("target_modules"), "modules that get LoRA: all-linear or a "
                                "comma list such as q_proj,v_proj")
    lr: float = param(_train_default("lr"), "peak learning rate (linear decay, no warm-up)")
    epochs: float = param(_train_default("epochs"), "passes over the data (used when max_steps is -1)")
    max_steps: int = param(_train_default("max_steps"), "optimizer steps; -1 = use epochs")
    grad_accum: int = param(_train_default("grad_accum"), "forward passes per optimizer step")
    max_length: int = param(_train_default("max_length"), "tokens per example (longer ones are truncated)")
    beta: float = param(_train_default("beta"), "DPO temperature (dpo only)")
    chat_template: str = param("off", "format rows with the tokenizer's chat template: off (plain prompt + "
                               "completion, as lm-eval scores them), on, or auto (when the tokenizer has one)",
                               choices=_choices("chat_template"))
    merge: bool = param(_train_default("merge"), "log LoRA folded into the base as the `model` artifact "
                        "(full weights; the adapter goes to `adapter`)")
    resume: bool = param(_train_default("resume"), "continue from the last checkpoint in output_dir, "
                         "into the MLflow run that wrote it")
    output_dir: str = param("", "checkpoint folder; auto = outputs/finetune/<model>-<hash of the "
                            "training settings>; resume looks here", empty="auto")
    save_steps: int = param(_train_default("save_steps"), "checkpoint every N optimizer steps (0 = none)")
    keep_output: bool = param(False, "keep output_dir's checkpoints after a successful step (by default they go "
                              "once the tracking server has the model)")
    gradient_checkpointing: bool = param(_train_default("gradient_checkpointing"),
                                         "recompute activations in backward (less memory, slower)")
    eval_before: bool = param(False, "evaluate the input model first (metrics before/<name>)")
    eval_after: bool = param(True, "evaluate the fine-tuned model (plain metric names, and delta/<name> "
                             "when eval_before is on)")

    def __post_init__(self):
        coerce_fields(self)
        LaunchOptions.__post_init__(self)
        self.eval_options()  # EvalOptions' own validation (tasks are checked by the step)
        self.finetune_config(self.output_dir or "outputs/finetune")  # the training library's validation

    @property
    def dataset_spec(self) -> str:
        return f"offline:{self.method}_mlp_nonce" if self.dataset.strip() in ("", "auto") else self.dataset.strip()

    def eval_options(self) -> EvalOptions:
        return EvalOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalOptions)})

    def finetune_config(self, output_dir: str):
        from mlproject.training.config import FinetuneConfig

        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        values = {k: getattr(self, k) for k in names if hasattr(self, k) and k != "output_dir"}
        return FinetuneConfig(output_dir=output_dir, **values)


@dataclass
class CompareConfig:
    """`compare`: delta tables, rankings and plots computed from runs on the tracking server."""

    experiment: str = param("", "experiment(s) to compare, comma-separated names or ids (the compare run is "
                            "recorded in the first, else in the first listed run's experiment)", empty="none")
    runs: str = param("", "run ids to compare, comma-separated (in addition to / instead of experiments)",
                      empty="none")
    filter: str = param("", "MLflow search filter within the experiments, e.g. \"tags.`mlproject.role` != 'eval'\"",
                        empty="none")
    baseline: str = param("", "baseline: <run id>, name:<run name>, role:<role> (per model family), or a|b (best of "
                          "several); none = versus needs exactly two runs", empty="none")
    view: str = param("all", f"{', '.join(VIEWS)} or all (comma list allowed)")
    metrics: str = param("", "metrics for versus/ranking: keys, leaves (pass@1), task names or prefixes; "
                         "auto = task scores, avg_acc, ppl", empty="auto")
    directions: str = param("", "better-direction overrides, e.g. avg_time=min,novelty=max", empty="none")
    format: str = param("md,csv,json,html,png", "output formats: md, csv, json, html, png")
    status: str = param("FINISHED", "run statuses to compare: FINISHED, or a comma list of FINISHED, RUNNING, "
                        "FAILED, KILLED, or all (runs listed by id are always compared; labels show other statuses)")
    cache: str = param("on", "local run table: on (fetch only runs changed since the last compare; edits by other "
                       "clients to ended runs show after MLPROJECT_COMPARE_CACHE_TTL s), refresh (fetch all, "
                       "rewrite), off", choices=("on", "refresh", "off"))
    run_name: str = param("", "run name (default: 'compare:<experiments or runs>')", cli_only=True)
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store ./mlflow.db)", cli_only=True)

    def spec(self):
        from mlproject.compare.spec import CompareSpec

        return CompareSpec(experiments=self.experiment, runs=self.runs, filter=self.filter,
                           baseline=self.baseline, view=self.view, metrics=self.metrics,
                           directions=self.directions, formats=self.format, statuses=self.status,
                           cache=self.cache)

    def __post_init__(self):
        coerce_fields(self)
        self.spec()  # validates view, format, directions with one clear line each
