"""What a step read, as MLflow dataset inputs (the runs table's Dataset column, the run page's
Datasets): plain-data specs turned into ``mlflow.data`` datasets."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from mlproject.redaction import redact
from mlproject.tracking.names import DATASET_CONTEXT_TAG


def dataset_inputs(specs: "list[Mapping[str, Any]]") -> list:
    """MLflow ``DatasetInput`` entities for ``Run.log_datasets`` specs (see there)."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for spec in specs:
        tags = [InputTag(DATASET_CONTEXT_TAG, spec.get("context") or "evaluation")]
        tags += [InputTag(str(k), redact(v)) for k, v in (spec.get("tags") or {}).items()]
        with warnings.catch_warnings():
            # MLflow's schema hint about integer columns and its "source can be interpreted
            # in multiple ways" (two registered local-file sources) say nothing to a user here
            warnings.simplefilter("ignore", UserWarning)
            inputs.append(DatasetInput(_dataset(spec)._to_mlflow_entity(), tags))
    return inputs


def _dataset(spec: Mapping[str, Any]):
    """An ``mlflow.data`` dataset for a spec of ``Run.log_datasets``."""
    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    src = spec["source"]
    if src.get("kind") == "hf":
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        source = HuggingFaceDatasetSource(path=src["path"], config_name=src.get("config_name"),
                                          split=src.get("split"))
    else:
        source = resolve_dataset_source(str(src["path"]))
    if spec.get("rows") is not None:
        import pandas as pd

        return mlflow.data.from_pandas(pd.DataFrame(list(spec["rows"])), source=source, name=spec["name"],
                                       digest=spec.get("digest"))
    return MetaDataset(source=source, name=spec["name"], digest=spec.get("digest"))
