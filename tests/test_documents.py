"""Per-document results (evaluation.documents): rows from lm-eval's samples, groups, size."""

import numpy as np
import pandas as pd

from mlproject.evaluation import documents


def test_rows_name_metrics_as_metric_names_and_map_leaves_to_their_group():
    samples = {
        "mmlu_anatomy": [{"doc_id": 0, "filter": "none", "doc_hash": "ab" * 32, "acc": 1.0},
                         {"doc_id": 1, "filter": "none", "doc_hash": "cd" * 32, "acc": 0.0}],
        "gsm8k": [{"doc_id": 0, "filter": "flexible-extract", "doc_hash": "ef" * 32, "exact_match": 1.0},
                  {"doc_id": 0, "filter": "strict-match", "doc_hash": "ef" * 32, "exact_match": 0.0}],
    }
    groups = {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy"]}  # a group of groups
    df = documents.frame(documents.rows_from_samples(samples, ["mmlu", "gsm8k"], groups))
    assert list(df.columns) == documents.COLUMNS
    anatomy = df[df["task"] == "mmlu_anatomy"]
    assert set(anatomy["group"]) == {"mmlu"} and list(anatomy["value"]) == [1.0, 0.0]
    assert list(anatomy["doc_hash"]) == ["ab" * 8, "cd" * 8]
    assert sorted(df[df["task"] == "gsm8k"]["metric"]) == ["exact_match.flexible-extract", "exact_match.strict-match"]


def test_missing_hash_gets_a_stable_one_per_task_and_document():
    rows = documents.rows_from_samples({"t": [{"doc_id": 3, "filter": "none", "acc": 1.0}]}, ["t"], {})
    again = documents.rows_from_samples({"t": [{"doc_id": 3, "filter": "none", "acc": 0.0}]}, ["t"], {})
    assert rows[0]["doc_hash"] == again[0]["doc_hash"] and len(rows[0]["doc_hash"]) == documents.HASH_DIGITS


def test_mmlu_sized_table_stays_well_under_a_megabyte_and_round_trips():
    rng = np.random.default_rng(0)
    n = 14_042  # MMLU's test documents, in 57 subtasks
    subtasks = [f"mmlu_subject_{i:02d}" for i in range(57)]
    samples: dict[str, list] = {t: [] for t in subtasks}
    for i in range(n):
        samples[subtasks[i % 57]].append({"doc_id": i // 57, "filter": "none",
                                          "doc_hash": f"{rng.integers(2**63):016x}" * 4,
                                          "acc": float(rng.integers(2)), "acc_norm": float(rng.integers(2))})
    df = documents.frame(documents.rows_from_samples(samples, ["mmlu"], {"mmlu": subtasks}))
    blob = documents.to_parquet(df)
    assert len(df) == 2 * n
    assert len(blob) < 400_000, len(blob)  # the issue: well under 1 MB
    back = documents.read_parquet(blob)
    pd.testing.assert_frame_equal(back.reset_index(drop=True),
                                  df.astype({c: str for c in ("task", "group", "metric", "doc_hash")}),
                                  check_dtype=False)
