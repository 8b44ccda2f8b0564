"""Step configurations: dataclasses whose fields are the entry points' parameters.

Each field is documented once, in its metadata ``help``; the CLI builds its flags from these
fields and a test checks that ``MLproject`` declares the same parameters with the same
defaults. Validation that needs no heavy import happens in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlproject.compression.bnb import BNB_METHODS
from mlproject.errors import UserError


def param(default: Any, help: str, choices: tuple | None = None, cli_only: bool = False,
          positional: bool = False, repeat: bool = False, empty: str | None = None):
    """A config field with its documentation (and the choices the CLI/validation accept).
    ``positional``: the CLI also takes it as a bare argument; ``repeat``: the CLI flag may be
    given several times (joined shell-quoted into the one string MLproject passes).
    ``empty``: the word that stands for an empty value (``none``, ``all``, ``auto``) — MLproject
    declares it as the default, because ``mlflow run`` logs an empty default as a literal ``''``."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli_only": cli_only,
                                            "positional": positional, "repeat": repeat, "empty": empty})


def shown_default(f: dataclasses.Field) -> Any:
    """The default as MLproject, the README and --help show it (the ``empty`` word for "")."""
    return f.metadata.get("empty") or f.default if f.default == "" else f.default


def shown_value(cfg: Any, name: str) -> Any:
    """A field's value as logged: an empty value as its ``empty`` word (what ``mlflow run`` logs)."""
    value = getattr(cfg, name)
    if value == "":
        f = next(f for f in dataclasses.fields(cfg) if f.name == name)
        return f.metadata.get("empty") or ""
    return value


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise UserError(f"{name} {value!r} is not a boolean (true/false)")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{name} {value!r} is not one of: {', '.join(map(str, choices))}")


def coerce_fields(cfg) -> None:
    """Coerce strings from MLproject/CLI into each field's declared type, naming bad values."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        try:
            if kind == "bool":
                value = parse_bool(f.name, value)
            elif kind == "int" and not isinstance(value, int):
                value = int(str(value).strip())
            elif kind == "float" and not isinstance(value, float):
                value = float(str(value).strip())
        except ValueError:
            raise UserError(f"{f.name} {value!r} is not a valid {kind}") from None
        empty = f.metadata.get("empty")
        if empty and isinstance(value, str) and value.strip().lower() == empty:
            value = ""
        setattr(cfg, f.name, value)
        choices = f.metadata.get("choices")
        if choices:
            check_choice(f.name, value, choices)


@dataclass
class RunOptions:
    """Where a run is recorded (CLI only; under `mlflow run`, MLflow decides)."""

    experiment: str = param("", "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'mlproject')", cli_only=True)
    run_name: str = param("", "run name (default: '<step>:<model>')", cli_only=True)
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store ./mlflow.db)", cli_only=True)


@dataclass
class EvalOptions:
    """How a model is evaluated; shared by every step that evaluates its result."""

    tasks: str = param("offline", "comma list of lm-eval tasks/groups and suites (zeroshot7, quant7, offline); 'none' to skip")
    limit: str = param("", "documents per task: a count (50), a fraction (0.2) or all", empty="all")
    num_fewshot: int = param(-1, "few-shot examples per task; -1 = each task's default")
    batch_size: str = param("16", "lm-eval batch size (an integer or 'auto')")
    ppl_dataset: str = param("offline", "perplexity text: offline, wikitext2, a .txt path, or none")
    seqlen: int = param(2048, "perplexity window length in tokens (capped by the model's context)")
    ppl_batch_size: int = param(1, "windows per forward pass when computing perplexity")
    ppl_windows: int = param(-1, "perplexity windows scored: N = the first N (a quick, still deterministic PPL), "
                             "0 = every window of the text, -1 = auto: every window, or with limit set as many "
                             "as limit takes documents (limit=N: N windows, limit=f: that fraction of them)")
    seed: int = param(42, "random seed of the run: lm-eval sampling and few-shot order, torch, calibration "
                      "windows, and for finetune the LoRA init, data order and dropout")

    def __post_init__(self):
        coerce_fields(self)
        from mlproject.evaluation.harness import parse_batch_size, parse_limit

        parse_limit(self.limit)
        parse_batch_size(self.batch_size)
        if self.seqlen < 2:
            raise UserError(f"seqlen {self.seqlen} must be at least 2")
        if self.ppl_batch_size < 1:
            raise UserError(f"ppl_batch_size {self.ppl_batch_size} must be at least 1")
        if self.ppl_windows < -1:
            raise UserError(f"ppl_windows {self.ppl_windows} must be -1 (auto), 0 (all windows) or a positive count")
        if self.num_fewshot < -1:
            raise UserError(f"num_fewshot {self.num_fewshot} must be -1 (task default) or >= 0")


@dataclass
class CodeEvalOptions:
    """How code tasks (humaneval, mbpp, their _plus variants, code_offline) are scored."""

    code_samples: int = param(1, "code tasks: completions per problem; 1 = greedy pass@1, n > 1 samples "
                              "(temperature 0.8, top_p 0.95) and adds pass@10/pass@100 where k <= n "
                              "(unbiased estimator)")
    code_timeout: float = param(10.0, "code tasks: wall-clock seconds per program run (the process group is "
                                "killed after it); CPU time, 1 GiB of memory, processes and file size are "
                                "limited too")
    code_timing_repeats: int = param(7, "code tasks: timed batches of each passing solution and of the "
                                     "reference (interleaved, medians -> time_ratio); 0 = no timing")

    def __post_init__(self):
        coerce_fields(self)
        if self.code_samples < 1:
            raise UserError(f"code_samples {self.code_samples} must be at least 1")
        if not 0 < self.code_timeout <= 3600:
            raise UserError(f"code_timeout {self.code_timeout} must be in (0, 3600] seconds")
        if self.code_timing_repeats < 0:
            raise UserError(f"code_timing_repeats {self.code_timing_repeats} must be >= 0")

    def code_settings(self):
        from mlproject.evaluation.code.sandbox import Limits
        from mlproject.evaluation.code.scoring import CodeSettings

        return CodeSettings(samples=self.code_samples, limits=Limits(timeout_s=self.code_timeout),
                            timing_repeats=self.code_timing_repeats)


@dataclass
class ModelOptions:
    """Which model, and how it is placed."""

    model: str = param("smollm2", "model: alias, Hugging Face id, local dir, runs:/<id>/<path> or models:/<name>@<alias>")
    adapter: str = param("", "optional PEFT adapter on top of the model (dir, hub id or runs:/ URI); none = no adapter",
                         empty="none")
    dtype: str = param("auto", "weights dtype (auto = bfloat16 on CUDA, float32 on CPU)",
                       choices=("auto", "float32", "bfloat16", "float16"))
    device: str = param("auto", "auto, cpu, cuda or cuda:N")


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


def _field_default(cls, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class QuantizeConfig(EvalOptions, ModelOptions, RunOptions):
    """`quantize`: weight quantization (simulated RTN or bitsandbytes), logged as a model, then evaluated."""

    method: str = param("rtn", "rtn (simulated: weights rounded to the grid, stored dequantized), "
                        "bnb-nf4, bnb-fp4 or bnb-int8 (real bitsandbytes layers via BitsAndBytesConfig)",
                        choices=("rtn", *BNB_METHODS))
    w_bits: int = param(4, "rtn: integer bits per weight, 2..8 (bnb methods fix their own: 4 or 8)")
    group_size: int = param(128, "rtn: input columns sharing one scale; must divide every quantized layer's "
                            "in_features (SmolLM2's 576: use 64 or 32); -1 = whole row")
    scheme: str = param("symmetric", "rtn: symmetric (grid around 0) or asymmetric (min/max, integer zero point)")
    granularity: str = param("per_group", "rtn: per_group (one scale per group_size columns) or per_channel (per row)")
    modules: str = param("all-linear", "rtn: all-linear (every nn.Linear but the LM head) or a comma list of "
                         "layer-name substrings, e.g. q_proj,k_proj")
    evaluate: bool = param(True, EVALUATE_RESULT_HELP)

    RTN_ONLY = ("w_bits", "group_size", "scheme", "granularity", "modules")

    def __post_init__(self):
        EvalOptions.__post_init__(self)
        if self.method == "rtn":
            self.rtn_config()  # the library's own validation (bits, scheme, granularity, group size)
            return
        bits = 8 if self.method == "bnb-int8" else 4
        for name in self.RTN_ONLY:
            value = getattr(self, name)
            if value != _field_default(type(self), name) and not (name == "w_bits" and value == bits):
                raise UserError(f"{name}={value!r} applies to method=rtn only; {self.method} stores "
                                f"{bits}-bit weights in bitsandbytes' own layout (leave {name} at its default)")

    def rtn_config(self):
        from mlproject.compression.rtn import RTNConfig

        return RTNConfig(w_bits=self.w_bits, group_size=self.group_size, scheme=self.scheme,
                         granularity=self.granularity, modules=self.modules)


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
    calibration: str = param("offline", "importance=activation: calibration text: offline (the bundled PPL text), "
                             "wikitext2 or a .txt path")
    calibration_samples: int = param(8, "importance=activation: calibration sequences (random windows of the text)")
    calibration_seqlen: int = param(256, "importance=activation: tokens per calibration sequence")
    keep_layers: int = param(0, "leave the first and last N decoder layers unpruned (N > 0: non-uniform sizes)")
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
    view: str = param("all", "summary, versus, ranking or all (comma list allowed)")
    metrics: str = param("", "metrics for versus/ranking: keys, leaves (pass@1), task names or prefixes; "
                         "auto = task scores, avg_acc, ppl", empty="auto")
    directions: str = param("", "better-direction overrides, e.g. avg_time=min,novelty=max", empty="none")
    format: str = param("md,csv,json,html,png", "output formats: md, csv, json, html, png")
    status: str = param("FINISHED", "run statuses to compare: FINISHED, or a comma list of FINISHED, RUNNING, "
                        "FAILED, KILLED, or all (runs listed by id are always compared; labels show other statuses)")
    run_name: str = param("", "run name (default: 'compare:<experiments or runs>')", cli_only=True)
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store ./mlflow.db)", cli_only=True)

    def spec(self):
        from mlproject.compare.spec import CompareSpec

        return CompareSpec(experiments=self.experiment, runs=self.runs, filter=self.filter,
                           baseline=self.baseline, view=self.view, metrics=self.metrics,
                           directions=self.directions, formats=self.format, statuses=self.status)

    def __post_init__(self):
        coerce_fields(self)
        self.spec()  # validates view, format, directions with one clear line each


@dataclass
class PipelineConfig(RunOptions):
    """`main` / `mlproject run`: a pipeline of steps from a YAML file, recorded as a parent run
    with one child run per step; steps whose result already exists are reused."""

    pipeline: str = param("pipelines/demo.yaml", "pipeline YAML file (or a name in pipelines/, e.g. demo)",
                          positional=True)
    set: str = param("", "overrides: key=value (every step that has the parameter) or <step>.key=value "
                     "(one step); several separated by spaces (quote values with spaces), or --set repeated",
                     repeat=True, empty="none")
    dry_run: bool = param(False, "print the resolved steps, their keys and what would be reused; run nothing")
    no_reuse: bool = param(False, "recompute every step, even those whose result exists")
    rerun: str = param("", "comma list of steps to recompute, with every step that depends on them", empty="none")

    def __post_init__(self):
        coerce_fields(self)


@dataclass
class SearchConfig(RunOptions):
    """`search`: an Optuna study whose trials are pipeline runs (children of the study run), scored
    on nested random document subsets so a pruner can stop poor trials early; the best completed
    trial per objective is tagged mlproject.role=best_acc / best_ppl and its model registered as
    models:/<study>@best_acc / @best_ppl."""

    space: str = param("pipelines/spaces/demo.yaml", "search space YAML file (or a name in pipelines/spaces/, "
                       "e.g. demo)", positional=True)
    model: str = param("", "model of the trial pipeline (its pipeline-wide model=…); auto = the pipeline's", empty="auto")
    set: str = param("", "pipeline overrides for every trial: key=value or <step>.key=value; several separated "
                     "by spaces, or --set repeated", repeat=True, empty="none")
    n_trials: int = param(0, "trials the study holds when done (an earlier run's finished trials count; more "
                          "extends the study); 0 = the space's n_trials")
    study: str = param("", "Optuna study name, also the registered model's name; the same name resumes the study "
                       "(auto: <space name>-<model>)", empty="auto")
    storage: str = param("sqlite:///optuna.db", "Optuna storage: an SQLAlchemy URL (sqlite:///optuna.db, "
                         "postgresql://user@host/db for many machines) or journal:<file> (Optuna's journal file)")
    workers: int = param(1, "local worker processes sharing the study; each runs trials until it holds n_trials")
    seed: int = param(-1, "sampler seed; -1 = the space's")
    objectives: str = param("", "objectives instead of the space's: best_acc, best_ppl, or best_acc,best_ppl "
                            "(a Pareto study, no pruner); the default study name then ends in them; auto = the space's", empty="auto")
    pruner: str = param("", "pruner: none, wilcoxon, successive_halving, hyperband, median, percentile, threshold "
                        "(its defaults); auto = the space's", empty="auto")
    heartbeat: int = param(30, "RDB storage: seconds between a running trial's heartbeats; a trial silent for twice "
                           "that (its worker was killed) is failed and retried; 0 = off")
    max_retry: int = param(2, "times a trial whose worker died is retried with the same parameters")
    timeout: float = param(0.0, "seconds after which this worker starts no new trial (0 = no limit)")
    dry_run: bool = param(False, "check the space, print it and the study's state; run nothing")
    experiment: str = param("", "MLflow experiment of the study run and its trials (default: $MLFLOW_EXPERIMENT_NAME, "
                            "else the study name)", cli_only=True)

    def __post_init__(self):
        coerce_fields(self)
        from mlproject.search.space import PRUNERS

        if self.pruner and self.pruner not in PRUNERS:
            raise UserError(f"pruner {self.pruner!r} is not one of: {', '.join(PRUNERS)}")
        for name in ("workers",):
            if getattr(self, name) < 1:
                raise UserError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("n_trials", "heartbeat", "max_retry", "timeout"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} {getattr(self, name)} must not be negative")
        if self.seed < -1:
            raise UserError(f"seed {self.seed} must be -1 (the space's) or a non-negative integer")
