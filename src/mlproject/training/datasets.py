"""Training data: load a dataset reference, check its columns, shape rows for trl.

A dataset reference (``spec``) is one of

* ``offline:<name>`` — a set the project ships (``mlproject.training.data.offline_datasets()``);
* a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a directory ``datasets`` can read;
* a Hugging Face hub id (``yahma/alpaca-cleaned``), loaded with ``load_dataset(id, split="train")``.

Accepted row formats (columns beyond these are dropped):

=============  ============================================  =====================================
method         columns                                       becomes
=============  ============================================  =====================================
sft            ``prompt``, ``completion``                    prompt/completion (loss on completion)
sft            ``messages`` (list of {role, content})        conversational (loss on the whole chat)
sft            ``instruction``, ``output`` [, ``input``]     prompt/completion (alpaca layout)
sft            ``text``                                      language modelling (loss on all tokens)
dpo            ``prompt``, ``chosen``, ``rejected``          preference pairs
=============  ============================================  =====================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlproject.errors import UserError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline:"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# Row layouts, in the order they are tried. Each: (name, required columns, optional columns).
SFT_FORMATS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("prompt_completion", ("prompt", "completion"), ()),
    ("messages", ("messages",), ()),
    ("instruction", ("instruction", "output"), ("input",)),
    ("text", ("text",), ()),
)
DPO_FORMATS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("preference", ("prompt", "chosen", "rejected"), ()),
)


def _formats(method: str):
    if method == "sft":
        return SFT_FORMATS
    if method == "dpo":
        return DPO_FORMATS
    raise UserError(f"method={method!r} is not supported; choose one of sft, dpo")


def validate_columns(columns: Iterable[str], method: str) -> str:
    """Return the row format the columns match for ``method`` or raise UserError.

    Cheap (no data, no model): call it as soon as the column names are known.
    """
    found = list(columns)
    have = set(found)
    formats = _formats(method)
    for name, required, _optional in formats:
        if set(required) <= have:
            return name
    # Report against the layout the columns come closest to, so the message names what is missing.
    best = max(formats, key=lambda f: len(set(f[1]) & have))
    missing = [c for c in best[1] if c not in have]
    accepted = " | ".join("+".join(f[1]) for f in formats)
    raise UserError(
        f"{method} data is missing column(s) {', '.join(missing)}; found {', '.join(found) or 'none'} "
        f"(accepted: {accepted})"
    )


def resolve_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Turn a dataset reference into ``load_dataset`` arguments ``(path, kwargs)`` (cheap, no loading)."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("dataset reference is empty")
    if spec.startswith(OFFLINE_PREFIX):
        name = spec[len(OFFLINE_PREFIX):]
        try:
            from mlproject.training.data import offline_datasets
        except ImportError as exc:  # pragma: no cover - the data package ships with the project
            raise UserError(f"offline datasets are unavailable: {exc}") from exc
        known = offline_datasets()
        if name not in known:
            raise UserError(f"unknown offline dataset {name!r}; known: {', '.join(sorted(known)) or 'none'}")
        spec = str(known[name])
    path = Path(spec).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if not path.is_file():
            raise UserError(f"dataset file not found: {path}")
        return LOCAL_SUFFIXES[path.suffix.lower()], {"data_files": str(path), "split": "train"}
    if path.is_dir():
        return str(path), {"split": "train"}
    return spec, {"split": "train"}


def hub_id(spec: str) -> str | None:
    """The Hugging Face hub data set a reference loads from (checked before a run), or None for
    the bundled sets, local files and directories."""
    path, kwargs = resolve_spec(spec)
    if kwargs.get("data_files") or Path(path).is_dir():
        return None
    return path


def input_spec(spec: str, data: "datasets.Dataset") -> dict[str, Any]:
    """The training data as a dataset spec for the run's inputs (``tracking.Run.log_datasets``)."""
    path, kwargs = resolve_spec(spec)
    files = kwargs.get("data_files")
    source = ({"kind": "file", "path": files} if files else
              {"kind": "file", "path": path} if Path(path).is_dir() else
              {"kind": "hf", "path": path, "split": kwargs.get("split")})
    return {"name": f"{spec} ({len(data):,} rows)", "context": "training", "source": source,
            "rows": data.to_list(), "tags": {"rows": len(data), "columns": ",".join(data.column_names)}}


def load_training_data(spec: str, method: str) -> "datasets.Dataset":
    """Load ``spec`` (see module doc), check it fits ``method`` and normalise it.

    Returns a ``datasets.Dataset`` with only the columns trl needs: ``prompt``/``completion``,
    ``messages`` or ``text`` for SFT; ``prompt``/``chosen``/``rejected`` for DPO. Alpaca rows
    (instruction/input/output) are mapped to prompt/completion here.
    """
    import datasets

    _formats(method)
    path, kwargs = resolve_spec(spec)
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # hub unreachable, unknown id, malformed file: one line for the user
        bad = _bad_json_line(Path(kwargs["data_files"])) if path == "json" else None
        if bad:
            raise UserError(f"dataset {kwargs['data_files']}: line {bad[0]} is not valid JSON ({bad[1]})") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load dataset {spec!r}: {first}") from exc
    if len(ds) == 0:
        raise UserError(f"dataset {spec!r} has no rows")
    return normalize(ds, method)


def _bad_json_line(path: Path) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not one JSON value: (line number, why).
    None when every line parses (or the file is one pretty-printed JSON document)."""
    import json

    try:
        with path.open(encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        return (1, str(exc)) if isinstance(exc, UnicodeDecodeError) else None
    try:
        json.loads(text)
        return None  # a single JSON document, not JSON Lines
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            return number, f"{exc.msg} at column {exc.colno}"
    return None


def normalize(ds: "datasets.Dataset", method: str) -> "datasets.Dataset":
    """Validate columns and reshape rows into one of trl's layouts; drops other columns."""
    fmt = validate_columns(ds.column_names, method)
    if fmt == "instruction":
        ds = ds.map(_alpaca_to_prompt_completion, remove_columns=ds.column_names, desc=None)
        fmt = "prompt_completion"
    keep = {
        "prompt_completion": ["prompt", "completion"],
        "messages": ["messages"],
        "text": ["text"],
        "preference": ["prompt", "chosen", "rejected"],
    }[fmt]
    extra = [c for c in ds.column_names if c not in keep]
    if extra:
        ds = ds.remove_columns(extra)
    _check_first_row(ds[0], fmt)
    return ds


def _alpaca_to_prompt_completion(row: Mapping[str, Any]) -> dict[str, str]:
    instruction = (row.get("instruction") or "").strip()
    extra = (row.get("input") or "").strip()
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return {"prompt": prompt, "completion": row.get("output") or ""}


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def _check_first_row(row: Mapping[str, Any], fmt: str) -> None:
    if fmt == "messages":
        if not _is_messages(row["messages"]):
            raise UserError("column 'messages' must hold lists of {role, content} dicts")
        return
    for col, value in row.items():
        if not (isinstance(value, str) or _is_messages(value)):
            raise UserError(f"column {col!r} must hold text or a list of {{role, content}} messages; "
                            f"got {type(value).__name__}")


def uses_chat_template(tokenizer: Any, mode: str) -> bool:
    """Whether rows go through the tokenizer's chat template (``mode`` = auto | on | off)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise UserError("chat_template=on but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


def to_trl_format(ds: "datasets.Dataset", tokenizer: Any, chat_template: str = "auto") -> "datasets.Dataset":
    """Shape normalised rows for trl.

    With a chat template (instruct models), plain-text rows become conversational: the prompt
    is a user turn and the completion / chosen / rejected texts are assistant turns, so trl
    renders them with ``apply_chat_template`` exactly as the model sees them at inference.
    Without one, trl concatenates prompt + completion as text and appends EOS. ``messages``
    rows need a template; ``text`` rows are never templated.
    """
    cols = set(ds.column_names)
    templated = uses_chat_template(tokenizer, chat_template)
    if "messages" in cols:
        if not templated:
            raise UserError("'messages' rows need a tokenizer with a chat template (and chat_template != off)")
        return ds
    if "text" in cols or not templated:
        return ds
    first = ds[0]
    if all(_is_messages(first[c]) for c in cols):
        return ds  # already conversational

    def convert(row: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for col in ds.column_names:
            value = row[col]
            if isinstance(value, str):
                role = "user" if col == "prompt" else "assistant"
                value = [{"role": role, "content": value}]
            out[col] = value
        return out

    return ds.map(convert, desc=None)


def peek_columns(spec: str) -> list[str] | None:
    """Column names of a local or offline dataset file without loading it (no ``datasets`` import).

    Reads the first JSON line, the CSV header or the Parquet schema, so a step can reject a file
    with the wrong columns before it opens a run or loads weights. Returns None where knowing the
    columns needs a real load (hub ids, directories, a ``.json`` file holding one JSON document).
    """
    import json

    kind, kwargs = resolve_spec(spec)
    if kind not in ("json", "csv", "parquet"):
        return None
    path = Path(kwargs["data_files"])
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # not a parquet file: one line for the user
            raise UserError(f"could not read dataset {spec!r}: {str(exc).splitlines()[0]}") from exc
    with path.open(encoding="utf-8", newline="") as fh:
        if kind == "csv":
            import csv

            return next(csv.reader(fh), [])
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return None  # a pretty-printed JSON document: the full load decides
                return list(row) if isinstance(row, dict) else None
    raise UserError(f"dataset {spec!r} has no rows")
