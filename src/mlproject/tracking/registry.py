"""The MLflow model registry: a run's model registered as a version, and aliases pointed at it
(``models:/<name>@best_acc``)."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

from mlproject import distributed
from mlproject.redaction import clean_mapping
from mlproject.tracking.lookups import logged_model
from mlproject.tracking.run import _MAX_TAG_LEN


@distributed.main_only
def register_model(run_id: str, name: str, alias: str | None = None, path: str = "model") -> str:
    """Register a run's model (its LoggedModel ``path``, else the artifact folder of that name) as a
    version of `name`, optionally under an alias."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    model = logged_model(run_id, path)
    if model is not None:
        mv = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id,
                                         model_id=model.model_id)
    else:
        mv = client.create_model_version(name, source=f"runs:/{run_id}/{path}", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return mv.version


def register_alias(name: str, run_id: str, alias: str, tags: Mapping[str, Any] | None = None,
                   path: str = "model") -> str:
    """Point ``models:/<name>@<alias>`` at the run's model folder: the version already
    registered from that run and path if there is one, else a new version. ``tags`` go on the
    version. Returns the version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    source = f"runs:/{run_id}/{path}"
    model = logged_model(run_id, path)  # registered versions of a LoggedModel have source models:/<id>
    version = None
    with contextlib.suppress(Exception):  # no such model yet
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if mv.source == source or (model is not None and mv.source == f"models:/{model.model_id}"):
                version = mv.version
                break
    if version is None:
        version = register_model(run_id, name, path=path)
    client.set_registered_model_alias(name, alias, version)
    for key, value in clean_mapping(tags or {}, _MAX_TAG_LEN).items():
        client.set_model_version_tag(name, version, key, value)
    return str(version)
