"""The experiment's saved headline view: merged from each step's scores, written only when it
changes, and a refused write (two steps ending at once on a new experiment) tried once more."""

from __future__ import annotations

import json
import types

import mlflow

from conftest import mlflow_client
from mlproject.tracking import HEADLINE_VIEW, publish_headline_view
from mlproject.tracking.names import VIEW_TAG_PREFIX


class Counting:
    """An MlflowClient whose set_experiment_tag is counted and can be made to fail first."""

    def __init__(self, client, fail_first: int = 0):
        self.client, self.fail_first, self.writes = client, fail_first, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def set_experiment_tag(self, *args):
        self.writes += 1
        if self.writes <= self.fail_first:
            raise mlflow.exceptions.MlflowException("UNIQUE constraint failed (the other step inserted it)")
        return self.client.set_experiment_tag(*args)


def _run(client, exp_id: str, metrics: dict):
    run = client.create_run(exp_id)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    return run.info.run_id


def test_view_is_written_only_when_it_changes_and_a_refused_write_is_retried(mlflow_uri):
    client = mlflow_client(mlflow_uri)
    exp_id = client.create_experiment("headline-view")
    key = VIEW_TAG_PREFIX + HEADLINE_VIEW

    counting = Counting(client, fail_first=1)
    first = types.SimpleNamespace(client=counting, run_id=_run(client, exp_id, {"avg_acc": 0.5}), experiment_id=exp_id)
    assert publish_headline_view(first) == HEADLINE_VIEW
    assert counting.writes == 2  # refused once, then written
    state = json.loads(json.loads(client.get_experiment(exp_id).tags[key])["state"])
    assert "metrics.`avg_acc`" in state["selectedColumns"]

    counting = Counting(client)
    same = types.SimpleNamespace(client=counting, run_id=_run(client, exp_id, {"avg_acc": 0.6}), experiment_id=exp_id)
    assert publish_headline_view(same) == HEADLINE_VIEW and counting.writes == 0  # nothing new

    more = types.SimpleNamespace(client=counting, run_id=_run(client, exp_id, {"avg_acc": 0.7, "ppl/wikitext2": 9.0}),
                                 experiment_id=exp_id)
    assert publish_headline_view(more) == HEADLINE_VIEW and counting.writes == 1
    state = json.loads(json.loads(client.get_experiment(exp_id).tags[key])["state"])
    assert {"metrics.`avg_acc`", "metrics.`ppl/wikitext2`"} <= set(state["selectedColumns"])

    broken = Counting(client, fail_first=5)
    again = types.SimpleNamespace(client=broken, run_id=_run(client, exp_id, {"ppl/other": 1.0}), experiment_id=exp_id)
    assert publish_headline_view(again) is None and broken.writes == 2  # best effort: two tries, no raise
