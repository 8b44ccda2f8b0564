"""The trial vocabulary: what a search keeps on its Optuna trials and study, and which trials count.

The user attrs named here are written by the workers (``search.workers``) and read back by the
command (``search.study``), the storage callbacks (``search.storage``) and the study report
(``search.report``); they live here so none of those imports another for a name.

Counting: the study is done when it holds ``n_trials`` *counted* trials: finished COMPLETE or
PRUNED ones, FAIL ones that raised (a deterministic error would fail again), and the ones
running or waiting. A trial failed by heartbeat or interrupted is not counted (its retry, or a
new trial, takes its place). Optuna has no atomic "claim a slot", so two workers may both start
a trial in the same instant when one slot is left: the later one (by trial number) finds the
study full at its start, is marked ``surplus`` and FAILs at once without a run; it never counts.
"""

from __future__ import annotations

ATTR_RUN = "mlflow_run_id"  # trial and study user attr: the MLflow run
ATTR_ERROR = "error"  # set when the objective raised: the trial counts as done
ATTR_SURPLUS = "surplus"
ATTR_METRICS = "metrics"
ATTR_TARGET = "target"  # {"model_uri": the scored model, "eval_key": model key + evaluation settings}
ATTR_MODEL = "model_uri"
ATTR_EVAL_KEY = "eval_key"
ATTR_LEVEL = "level"  # inside ATTR_METRICS: the last level scored
STUDY_SPACE = "space_fingerprint"
STUDY_WINNERS = "winners"
#: The metrics a completed trial keeps in ATTR_METRICS (besides ppl/* and nll/*).
HEADLINE = ("avg_acc", "model_size_mb", "params_b", "system/search/documents", "system/search/ppl_windows", "eval_seconds")


def counted(trial) -> bool:
    """Does the trial take one of the study's n_trials slots? (see this module's docstring)"""
    from optuna.trial import TrialState

    if trial.user_attrs.get(ATTR_SURPLUS):
        return False
    return trial.state != TrialState.FAIL or ATTR_ERROR in trial.user_attrs


def tally(study) -> dict[str, int]:
    """The counted trials by state: ``done`` (finished), ``running``, ``waiting``."""
    from optuna.trial import TrialState

    out = {"done": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        if not counted(t):
            continue
        if t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        else:
            out["done"] += 1
    return out
