"""Every run tag, param prefix and well-known metric name the platform writes or reads.

The one place writers (the steps, pipeline, search, and this package) and readers (compare, the
UI headline view, reap, reuse) share: every tag is written and read through these constants, so a
tag renamed here changes on both sides. The metric names at the end are listed for reference (the
evaluation engine and report.md, below tracking in the layers, spell them too). Pure constants,
nothing imported. ``mlproject.*`` tags are ours; ``mlflow.*`` ones are MLflow's own, listed where
we write or read them. Each line says who writes the name and what it means.
"""

# -- prefixes and defaults -----------------------------------------------------------------
#: Our tags' namespace: every tag below that starts ``mlproject.``.
TAG_PREFIX = "mlproject."
#: The experiment a step's run goes to when nothing names one (lifecycle; pipeline parents too).
DEFAULT_EXPERIMENT = "mlproject"
#: MLflow's own prefix for metrics that describe the machinery, not the model: the UI shows them
#: under "System metrics", apart from the model metrics. Bookkeeping (compare, pipeline) goes here.
SYSTEM_PREFIX = "system/"
#: lifecycle: one tag per field of the environment snapshot (``env.python``, ``env.gpu`` …).
ENV_TAG_PREFIX = "env."
#: run.resolve_params: a param value that differs from what ``mlflow run`` logged (compare reads both).
RESOLVED_PARAM_PREFIX = "resolved."

# -- MLflow's own tags that we write or read ---------------------------------------------------
#: Run.set_description / record_refusal: the run's description (markdown at the top of its page).
NOTE_TAG = "mlflow.note.content"
#: lifecycle / record_refusal: the run's display name (``evaluate:mistral``, ``<step>:refused``).
RUN_NAME_TAG = "mlflow.runName"
#: record_reuse, MLflow for nested runs: the parent run id (compare's ``parent_run``, end_stale_run).
PARENT_RUN_TAG = "mlflow.parentRunId"
#: lifecycle: what ran (we replace MLflow's ``__main__.py`` with ``python -m mlproject`` / ``mlproject``).
SOURCE_NAME_TAG = "mlflow.source.name"
#: headline: experiment tag prefix of a saved runs-table view (``mlflow.sharedViewState.<key>``).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: datasets: the dataset input tag saying what a dataset was for (evaluation, training, calibration).
DATASET_CONTEXT_TAG = "mlflow.data.context"
#: MLflow, ``mlflow run``: the entry point it created the run for (reap: a run no step started in).
PROJECT_ENTRY_POINT_TAG = "mlflow.project.entryPoint"
#: MLflow, ``mlflow run``: the env manager (conda, virtualenv, uv …), tagged before it builds the environment.
PROJECT_ENV_TAG = "mlflow.project.env"
#: MLflow, ``mlflow run``: the backend, tagged only once the environment is built and the command started.
PROJECT_BACKEND_TAG = "mlflow.project.backend"

# -- a step run's life (lifecycle, heartbeat, repair) -------------------------------------------
#: lifecycle, record_reuse, record_refusal: the step the run stands for (evaluate, prune, pipeline …);
#: compare and the headline view filter on it; steps also put it on their LoggedModels.
STEP_TAG = f"{TAG_PREFIX}step"
#: lifecycle: the command line as a person would type it (credentials redacted).
COMMAND_TAG = f"{TAG_PREFIX}command"
#: heartbeat: unix seconds of the last heartbeat of the run's process (reap decides on it).
HEARTBEAT_TAG = f"{TAG_PREFIX}heartbeat"
#: heartbeat: the host the run's process runs on (reap: a pid is only checked on its own host).
HOST_TAG = f"{TAG_PREFIX}host"
#: heartbeat: the pid of the run's process (reap).
PID_TAG = f"{TAG_PREFIX}pid"
#: lifecycle, repair, finetune: the first line of the error a FAILED / KILLED run ended with.
ERROR_TAG = f"{TAG_PREFIX}error"
#: repair.reap_runs: why reap ended the run FAILED (sync removes it when the results arrive later).
REAPED_TAG = f"{TAG_PREFIX}reaped"
#: lifecycle: on the run ``mlflow run`` created, the run a resumed step reopened instead.
CONTINUED_IN_TAG = f"{TAG_PREFIX}continued_in"

# -- lineage: what a run's model is and where it comes from (steps write, compare reads) --------
#: steps.shared.runs.lineage_tags: the model reference as given (alias, hub id, runs:/…, models:/…).
MODEL_TAG = f"{TAG_PREFIX}model"
#: steps.shared.runs.lineage_tags, LoggedModel tags: the root alias / hub id of the lineage.
BASE_MODEL_TAG = f"{TAG_PREFIX}base_model"
#: steps.shared.runs.lineage_tags, LoggedModel tags: the model family (compare groups by it, as does
#: the headline view).
FAMILY_TAG = f"{TAG_PREFIX}family"
#: steps.shared.runs.lineage_tags: the run whose model this run took (compare pairs before / after).
UPSTREAM_TAG = f"{TAG_PREFIX}upstream_run"
#: steps (LoggedModel tags, steps.shared.model_output.model_tags): the reference the model was made from.
MODEL_UPSTREAM_TAG = f"{TAG_PREFIX}upstream"
#: finetune (tag of an adapter LoggedModel logged as "model"): the base model it applies to.
MODEL_BASE_TAG = f"{TAG_PREFIX}base"
#: quantize, prune, finetune (run and LoggedModel tag, steps.shared.model_output): what the run's
#: ``model`` holds: ``recipe`` (re-made when loaded, models.recipes), ``weights`` or ``adapter``.
STORE_TAG = f"{TAG_PREFIX}store"
#: steps.shared.runs.lineage_tags, search.report: base, eval, pruned, quantized, finetuned, study,
#: trial, best_acc, best_ppl (comma-joined when a trial wins both); compare's baselines use it.
ROLE_TAG = f"{TAG_PREFIX}role"
#: steps.shared.runs.lineage_tags: the PEFT adapter the loaded model carries.
ADAPTER_TAG = f"{TAG_PREFIX}adapter"

# -- scores and how they were computed --------------------------------------------------------
#: steps.shared.evaluation, search.workers: JSON ``{task: metric}``, the metric avg_acc took per task;
#: headline and compare read it. Evaluations logged under a metric prefix write
#: ``mlproject.<prefix>.avg_acc_metrics`` (``mlproject.before.avg_acc_metrics`` in finetune).
AVG_ACC_METRICS_TAG = f"{TAG_PREFIX}avg_acc_metrics"
#: steps.shared.evaluation: the lm-eval gates for code tasks that were opened on purpose.
UNSAFE_CODE_TAG = f"{TAG_PREFIX}unsafe_code"

#: steps.shared.evaluation: on a run that stored a model's next-token top-k distributions over its
#: PPL windows (artifact ``kl/reference_topk.safetensors``), the key candidates find them by:
#: a hash of the reference model, the scored windows (text, count, length, their token ids) and k.
TOPK_KEY_TAG = f"{TAG_PREFIX}kl.topk_key"
#: steps.shared.evaluation: on a run that logged ``kl/…`` metrics, the reference model they are
#: measured against and the run that holds its distributions (``<model> (run <id>)``).
KL_REFERENCE_TAG = f"{TAG_PREFIX}kl.reference"

#: tracking.repair (set_run_tags, sync_spool): experiment tag changed whenever mlproject re-tags an
#: ended run or replays a spool after the fact; compare's run table (compare.cache) refetches then.
RUNS_CHANGED_TAG = f"{TAG_PREFIX}runs_changed"

# -- reuse (mlproject.reuse computes the key; lookups find and record reuse) -------------------
#: steps: the run's exact reuse key; lookups.find_reusable / upstream_key read it.
CACHE_KEY_TAG = f"{TAG_PREFIX}cache_key"
#: lookups.record_reuse: on a run standing for a reused step, the original run (compare skips it).
REUSED_FROM_TAG = f"{TAG_PREFIX}reused_from"
#: lookups.record_reuse: the key the original run was found by.
REUSED_KEY_TAG = f"{TAG_PREFIX}reused_key"

# -- pipelines -----------------------------------------------------------------------------
#: pipeline.runner: on the pipeline's parent run, the pipeline's name.
PIPELINE_TAG = f"{TAG_PREFIX}pipeline"
#: pipeline.runner (through lifecycle.extra_tags): on a child run, the pipeline step it stands for.
PIPELINE_STEP_TAG = f"{TAG_PREFIX}pipeline_step"

# -- fine-tuning and compression -----------------------------------------------------------
#: finetune: the training method (sft, dpo).
METHOD_TAG = f"{TAG_PREFIX}method"
#: finetune: which weights trained (lora, qlora or full).
FINETUNING_TAG = f"{TAG_PREFIX}finetuning"
#: finetune: a resumed run's last optimizer step before it resumed.
RESUMED_AFTER_STEP_TAG = f"{TAG_PREFIX}resumed_after_step"
#: quantize: the quantization method.
QUANT_METHOD_TAG = f"{TAG_PREFIX}quant.method"
#: quantize: "true" for rtn (weights rounded to the grid, stored dequantized), "false" for bitsandbytes.
QUANT_SIMULATED_TAG = f"{TAG_PREFIX}quant.simulated"
#: which runtimes serve the stored format (a quantize run of a packed method: compressed-tensors, auto-round, hqq …)
QUANT_SERVING_TAG = f"{TAG_PREFIX}quant.serving"

# -- search ------------------------------------------------------------------------------------
#: search.study (study run), search.workers (trial runs), search.report (registered versions): the study's name.
STUDY_TAG = f"{TAG_PREFIX}study"
#: search.study: on the study run, the search space file.
SPACE_TAG = f"{TAG_PREFIX}space"
#: search.workers (trial runs), search.report (registered versions): the trial number.
TRIAL_TAG = f"{TAG_PREFIX}trial"
#: search.workers, search.storage: RUNNING, COMPLETE, PRUNED or FAIL, the trial's Optuna state as the run saw it.
TRIAL_STATE_TAG = f"{TAG_PREFIX}trial_state"
#: search.workers: Optuna's internal trial id (unique across studies of one storage).
OPTUNA_TRIAL_ID_TAG = f"{TAG_PREFIX}optuna_trial_id"
#: search.workers: on a retried trial's run, the number of the failed trial it retries.
RETRY_OF_TAG = f"{TAG_PREFIX}retry_of"
#: search.workers: on a trial run whose worker was cut off from the storage longer than the heartbeat's
#: grace period: its trial was failed (and retried) meanwhile, so its late result is not counted.
LATE_RESULT_TAG = f"{TAG_PREFIX}late_result"
#: search.workers: the reuse key of the trial's target evaluation.
EVAL_KEY_TAG = f"{TAG_PREFIX}eval_key"
#: search.workers: the run of the trial's target step (the model that was evaluated).
TARGET_RUN_TAG = f"{TAG_PREFIX}target_run"
#: search.workers: the pipeline step whose model the trial evaluates.
TARGET_STEP_TAG = f"{TAG_PREFIX}target_step"
#: search.workers: the fidelity level at which a PRUNED trial was stopped.
PRUNED_AT_TAG = f"{TAG_PREFIX}pruned_at"
#: search.workers: a trial whose evaluation an earlier trial already made: that trial's run …
EVAL_REUSED_FROM_TAG = f"{TAG_PREFIX}eval_reused_from"
#: … and its number.
EVAL_REUSED_TRIAL_TAG = f"{TAG_PREFIX}eval_reused_trial"
#: search.report: "true" / "false", whether the trial won best accuracy (exact filter beside role).
BEST_ACC_TAG = f"{TAG_PREFIX}best_acc"
#: search.report: "true" / "false", whether the trial won best perplexity.
BEST_PPL_TAG = f"{TAG_PREFIX}best_ppl"
#: search.report (registered version tag): the trial run the registered winner comes from.
TRIAL_RUN_TAG = f"{TAG_PREFIX}trial_run"

# -- well-known metric names and prefixes (evaluation, steps write; compare, headline read) ----
#: evaluation.engine: the mean accuracy, each task counted once with its preferred metric.
AVG_ACC = "avg_acc"
#: evaluation.engine: ``ppl/<dataset>``, perplexity on a text dataset.
PPL_PREFIX = "ppl/"
#: evaluation.engine: ``nll/<dataset>``, mean negative log-likelihood per token.
NLL_PREFIX = "nll/"
#: evaluation.engine: parameters in billions.
PARAMS_B = "params_b"
#: evaluation.engine, compression steps: the model's size in MB.
MODEL_SIZE_MB = "model_size_mb"
#: evaluation.engine, steps: seconds the evaluation took.
EVAL_SECONDS = "eval_seconds"
#: steps.shared.runs.PeakMemory, training: peak CUDA memory in MB …
PEAK_VRAM_MB = "peak_vram_mb"
#: … or, on CPU, peak resident memory in MB.
PEAK_RSS_MB = "peak_rss_mb"
#: finetune: training curves (``train/loss``, with steps) and training summaries.
TRAIN_PREFIX = "train/"
#: finetune: the input model's scores on the fine-tune run (plain names are the trained model's).
BEFORE_PREFIX = "before/"
#: finetune: after − before for ppl/*, avg_acc and each task's preferred metric.
DELTA_PREFIX = "delta/"
#: evaluation.engine: ``kl/<dataset>``, mean KL(reference ‖ model) per token over the PPL windows …
KL_PREFIX = "kl/"
#: … its median and 99th percentile (``kl_median/<dataset>``, ``kl_p99/<dataset>``) …
KL_MEDIAN_PREFIX = "kl_median/"
KL_P99_PREFIX = "kl_p99/"
#: … and the share of tokens whose most likely next token is the reference's (``top1_agree/<dataset>``).
TOP1_AGREE_PREFIX = "top1_agree/"
