"""Per-document results: what every evaluation keeps so two runs can be paired later.

Average accuracy hides how many individual answers a compressed model changed ("flips",
arXiv 2407.09141), and two runs scored on the same documents are paired data. So every
evaluation stores, per task, each document's value of every numeric per-document metric
lm-eval reports (``acc``, ``acc_norm``, ``exact_match.<filter>`` …; code tasks: ``pass_at_1``),
keyed by a stable document id, as one small Parquet table (artifact ``eval/documents.parquet``;
``DOCUMENTS_ARTIFACT``). Columns (``COLUMNS``):

``task``      the leaf task lm-eval scored (``mmlu_anatomy``, ``mlp_nonce``)
``group``     the task the user asked for, whose metrics the run logs (``mmlu``; = ``task``)
``doc_id``    lm-eval's document index in the task's evaluation split
``doc_hash``  the first 16 hex digits of lm-eval's hash of the document text: two runs pair a
              document only when these agree (a changed data set never pairs silently)
``metric``    the metric's leaf as in metric names (``acc``; other filters: ``<metric>.<filter>``)
``value``     0/1 for binary metrics, else the document's score

Size: dictionary-encoded strings and zstd compression keep it at a few bytes per row — MMLU's
14,042 documents × 2 metrics are ~190 KB, mostly the hashes (``tests/test_documents.py`` builds one).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DOCUMENTS_ARTIFACT = "eval/documents.parquet"
COLUMNS = ["task", "group", "doc_id", "doc_hash", "metric", "value"]
#: digits of lm-eval's doc_hash kept: 64 bits, collisions between two documents of one task at
#: 14k documents ~ 1e-11
HASH_DIGITS = 16


def leaves(task: str, group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    """The leaf tasks under ``task`` (itself when it is not a group), groups of groups included."""
    members = group_subtasks.get(task)
    if not members:
        return [task]
    out: list[str] = []
    for m in members:
        for leaf in leaves(m, group_subtasks):
            if leaf not in out:
                out.append(leaf)
    return out


def group_of(tasks: Iterable[str], group_subtasks: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """leaf task → the requested task it belongs to (the first one that lists it)."""
    out: dict[str, str] = {}
    for task in tasks:
        for leaf in leaves(task, group_subtasks):
            out.setdefault(leaf, task)
    return out


def metric_leaf(metric: str, filt: str) -> str:
    return metric if filt in ("", "none") else f"{metric}.{filt}"


def short_hash(value: Any) -> str:
    text = str(value or "")
    if len(text) >= HASH_DIGITS and all(c in "0123456789abcdef" for c in text[:HASH_DIGITS]):
        return text[:HASH_DIGITS]
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]


def rows_from_samples(samples: Mapping[str, Sequence[Mapping[str, Any]]], tasks: Sequence[str],
                      group_subtasks: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples (reduced by ``harness._numeric_sample``: ``doc_id``, ``filter``,
    ``doc_hash`` and numeric metric values) → one row per (task, document, metric)."""
    groups = group_of(tasks, group_subtasks)
    rows: list[dict[str, Any]] = []
    for task, docs in samples.items():
        group = groups.get(task, task)
        for doc in docs:
            filt = str(doc.get("filter") or "none")
            for key, value in doc.items():
                if key in ("doc_id", "filter", "doc_hash"):
                    continue
                rows.append({"task": task, "group": group, "doc_id": int(doc["doc_id"]),
                             "doc_hash": short_hash(doc.get("doc_hash") or f"{task}:{doc['doc_id']}"),
                             "metric": metric_leaf(key, filt), "value": float(value)})
    return rows


def rows_from_code(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Code tasks' per-problem records (``CodeTaskResult.problems``) → ``pass_at_1`` rows."""
    rows = []
    for task, res in results.items():
        for i, p in enumerate(getattr(res, "problems", None) or []):
            if p.get("pass_at_1") is None:
                continue
            rows.append({"task": task, "group": task, "doc_id": i, "doc_hash": short_hash(p.get("id")),
                         "metric": "pass_at_1", "value": float(p["pass_at_1"])})
    return rows


def frame(rows: list[dict[str, Any]]):
    """The rows as the stored table (categorical strings, int32 ids, float32 values)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"task": "category", "group": "category", "doc_id": "int32",
                      "doc_hash": "string", "metric": "category", "value": "float32"})


def from_harness(hr, tasks: Sequence[str]):
    """A ``harness.HarnessResult`` (run with ``log_samples``) → the documents table, or None when
    it holds no per-document values."""
    rows = rows_from_samples(hr.samples or {}, tasks, (hr.raw or {}).get("group_subtasks") or {})
    if hr.code is not None:
        rows += rows_from_code(hr.code.results)
    return frame(rows) if rows else None


def to_parquet(df) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, compression="zstd")
    return buf.getvalue()


def read_parquet(path_or_bytes):
    """The stored table back (strings as plain objects, as compare pairs them)."""
    import pandas as pd

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    df = pd.read_parquet(src)
    for col in ("task", "group", "metric", "doc_hash"):
        if col in df:
            df[col] = df[col].astype(str)
    return df
