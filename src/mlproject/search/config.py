"""`search` / `mlproject search`: the search command's options, and the Optuna names a search
accepts (objectives, samplers, pruners), shared by the command line and the space files
(``search.space``). Imports nothing of the pipeline, so checking a flag loads no step."""

from __future__ import annotations

from dataclasses import dataclass

from mlproject.config import RunOptions
from mlproject.errors import UserError
from mlproject.params import coerce_fields, param

#: Objective name → Optuna direction.
OBJECTIVES = {"best_acc": "maximize", "best_ppl": "minimize"}
#: Sampler / pruner names of a space file (and --pruner) → the class in optuna.samplers / optuna.pruners.
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "nsgaii": "NSGAIISampler",
            "nsgaiii": "NSGAIIISampler", "gp": "GPSampler", "qmc": "QMCSampler", "bruteforce": "BruteForceSampler"}
PRUNERS = {"none": "NopPruner", "wilcoxon": "WilcoxonPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner", "median": "MedianPruner", "percentile": "PercentilePruner",
           "threshold": "ThresholdPruner"}


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
                         "postgresql+psycopg2://user@host/db for many machines) or journal:<file> (Optuna's journal file)")
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
    register_weights: bool = param(True, "register each winner as real weights: its model (a recipe re-made, a LoRA "
                                   "adapter merged; what mlproject export writes) is logged once as the model "
                                   "named weights on its trial's target run and registered as models:/<study>@best_acc / "
                                   "@best_ppl, loadable with from_pretrained; a winner that already holds weights (full "
                                   "fine-tune, packed quantization) is registered as it is. At 7B that writes and uploads "
                                   "~14.5 GB per winner (at most 2 per study). false: register the models as logged")
    dry_run: bool = param(False, "check the space, print it and the study's state; run nothing")
    experiment: str = param("", "MLflow experiment of the study run and its trials (default: $MLFLOW_EXPERIMENT_NAME, "
                            "else the study name)", cli_only=True)

    def __post_init__(self):
        coerce_fields(self)
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
