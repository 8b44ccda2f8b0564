"""The experiment's headline view in the MLflow UI: a saved runs-table view whose columns are
the headline numbers (PPL, avg_acc, each task's preferred metric, size), kept up to date by
every step run that ends FINISHED."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Mapping

from mlproject.tracking.names import (AVG_ACC, AVG_ACC_METRICS_TAG, FAMILY_TAG, MODEL_SIZE_MB, PARAMS_B, PPL_PREFIX,
                                      ROLE_TAG, STEP_TAG, VIEW_TAG_PREFIX)

if TYPE_CHECKING:
    from mlproject.tracking.run import Run

log = logging.getLogger(__name__)

#: The experiment's saved view (MLflow UI "Views" menu; ``?viewStateShareKey=`` in a link)
#: whose runs table shows the headline numbers: MLflow's own runs table starts with none.
HEADLINE_VIEW = "mlproject-headline"


def headline_columns(metrics: Mapping[str, float], tags: Mapping[str, str]) -> list[str]:
    """Runs-table columns for a run's headline numbers (MLflow UI column keys)."""
    keys = [k for k in (AVG_ACC,) if k in metrics] + sorted(k for k in metrics if k.startswith(PPL_PREFIX))
    try:
        used = json.loads(tags.get(AVG_ACC_METRICS_TAG) or "{}")
    except ValueError:
        used = {}
    keys += [f"{t}/{m}" for t, m in used.items() if f"{t}/{m}" in metrics]
    keys += [k for k in (PARAMS_B, MODEL_SIZE_MB) if k in metrics]
    return [f"metrics.`{k}`" for k in keys]


def publish_headline_view(run: "Run") -> str | None:
    """Merge this run's headline columns into the experiment's saved view ``HEADLINE_VIEW`` (step
    runs only: pipeline parents and compare runs, which hold no scores, are filtered out), so the
    runs table opened through ``where_to_look``'s link shows PPL, avg_acc and task scores without
    picking columns by hand. Best effort: never fails a run. The view is written only when it
    changes; a write that fails (two steps ending at once on a new experiment both insert the tag,
    and the second insert is refused) is tried once more on the view as the other step left it."""
    try:
        data = run.client.get_run(run.run_id).data
        columns = headline_columns(data.metrics, data.tags)
        if not columns:
            return None
    except Exception as exc:  # noqa: BLE001 - a convenience for the UI, never a failure
        log.debug("could not read run %s for the headline view: %s", run.run_id, exc)
        return None
    for attempt in (1, 2):
        try:
            return _merge_view(run, data, columns)
        except Exception as exc:  # noqa: BLE001 - a convenience for the UI, never a failure
            log.debug("could not update the headline view of experiment %s (attempt %d): %s",
                      run.experiment_id, attempt, exc)
    return None


def _merge_view(run: "Run", data, columns: list[str]) -> str:
    """One read-merge-write of the view (raises what the server refuses)."""
    exp = run.client.get_experiment(run.experiment_id)
    key = VIEW_TAG_PREFIX + HEADLINE_VIEW
    state: dict = {}
    created = int(time.time() * 1000)
    if key in exp.tags:
        envelope = json.loads(exp.tags[key])
        state, created = json.loads(envelope["state"]), envelope.get("createdAt", created)
    old_state = json.dumps(state, sort_keys=True)
    # metrics first (what a person looks for), then what was scored and the model logged
    before = [c for c in state.get("selectedColumns", []) if c.startswith("metrics.")]
    merged = list(dict.fromkeys(before + columns))
    state["selectedColumns"] = merged + ["params.`limit`", f"tags.`{ROLE_TAG}`", "attributes.`Dataset`",
                                         "attributes.`Models`"]
    state["columnOrder"] = state["selectedColumns"]  # else the UI sorts them by name
    # A pipeline's steps are child runs, folded under a parent that has no scores, and a shared
    # view cannot unfold them (MLflow drops runsExpanded from it): grouped by model family,
    # with the groups open, the step runs are listed flat. Pipeline parents and compare runs
    # (no scores) are filtered out.
    state["searchFilter"] = (f"tags.`{STEP_TAG}` != 'pipeline' AND tags.`{STEP_TAG}` != 'compare' "
                             f"AND tags.`{STEP_TAG}` != 'search'")
    family = data.tags.get(FAMILY_TAG)
    if family:
        state["groupBy"] = {"aggregateFunction": "max",
                            "groupByKeys": [{"mode": "tag", "groupByData": FAMILY_TAG}]}
        state.setdefault("groupsExpanded", {})[f"tag.{FAMILY_TAG}.{family}"] = True
    if key in exp.tags and json.dumps(state, sort_keys=True) == old_state:
        return HEADLINE_VIEW  # nothing new: no write
    value = json.dumps({"name": "Headline numbers (mlproject)", "createdAt": created,
                        "updatedAt": int(time.time() * 1000), "state": json.dumps(state)})
    run.client.set_experiment_tag(run.experiment_id, key, value)
    return HEADLINE_VIEW
