"""The tracking spool: what a step logs, written to local disk before it is sent.

One folder per run under ``paths.spool_root()`` (``~/.cache/mlproject/spool/<run_id>``):

* ``meta.json`` — run id, experiment id, tracking URI (credentials stripped), host, pid, step;
* ``journal.jsonl`` — one line per logging call, in order: ``params``, ``tags``, ``metrics``
  (``[key, value, timestamp_ms, step]`` rows, timestamps fixed when logged, so sending twice
  gives the server identical points, which MLflow's SQL store ignores), ``delete_tag``,
  ``artifact`` / ``artifacts`` (a file / a folder's content: the copy under
  ``files/<seq>/``, else the original path), ``model`` (an MLflow LoggedModel: its name, tags,
  params, model type, MLmodel flavor and folder) and ``status`` (the final status);
* ``sent`` — the sequence numbers the server acknowledged;
* ``files/<seq>/`` — text artifacts always; file / folder artifacts only when they could not
  be sent (a model folder is *moved* here then, never copied while the server takes it);
* ``files/<seq>.json`` — what sending a record learned (a LoggedModel's id, so sync finishes
  that model instead of creating a second one);
* ``.lock`` — held by the writing process for its lifetime, so ``mlproject runs sync`` never
  sends a spool that is still growing (the OS drops the lock when the process dies, even by
  SIGKILL).

A run whose records were all acknowledged has its folder removed when it ends; otherwise the
folder stays for ``mlproject runs sync`` (``tracking.repair.sync_spool``). The write-ahead side
of "every write goes spool → link → server" (``tracking.link`` is the sending side). Pure file
code: nothing here talks to MLflow.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from mlproject.paths import spool_root

JOURNAL = "journal.jsonl"
SENT = "sent"
META = "meta.json"
LOCK = ".lock"


class Spool:
    """One run's spool folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None
        self._seq = max((r["seq"] for r in self.records()), default=0) if (self.path / JOURNAL).is_file() else 0

    # -- writing (the step's process) ------------------------------------------------------
    @classmethod
    def open(cls, run_id: str, **meta: Any) -> "Spool":
        """The spool of ``run_id`` (created, or reopened when a resumed run left one), locked
        by this process until :meth:`close`."""
        from filelock import FileLock

        path = spool_root() / run_id
        (path / "files").mkdir(parents=True, exist_ok=True)
        spool = cls(path)
        spool._lock = FileLock(str(path / LOCK))
        spool._lock.acquire(timeout=5)
        info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "created": time.time(), **meta}
        (path / META).write_text(json.dumps(info, indent=2, sort_keys=True))
        return spool

    def append(self, op: str, **fields: Any) -> int:
        """Write one record (flushed before returning); its sequence number."""
        self._seq += 1
        line = json.dumps({"seq": self._seq, "op": op, **fields}, sort_keys=True, default=str)
        with open(self.path / JOURNAL, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        return self._seq

    def slot(self, seq: int) -> Path:
        """The folder where record ``seq`` keeps its artifact copy."""
        return self.path / "files" / str(seq)

    def keep_copy(self, seq: int, source: str | os.PathLike) -> Path:
        """Copy an artifact file or folder into the spool (it could not be sent)."""
        source = Path(source)
        dest = self.slot(seq) / source.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(source, dest)
        return dest

    def keep_moved(self, seq: int, source: str | os.PathLike) -> Path:
        """Move an artifact folder or file into the spool (a model folder that could not be sent,
        in the caller's temporary folder): a rename on the same filesystem, else copied and removed."""
        source = Path(source)
        dest = self.slot(seq) / source.name
        if dest == source:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        try:
            os.replace(source, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(str(source), str(dest))
        return dest

    def note(self, seq: int, **fields: Any) -> None:
        """Remember what sending record ``seq`` learned (``model_id=…``), for sync."""
        path = self.path / "files" / f"{seq}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.notes(seq), **fields}, sort_keys=True))
        os.replace(tmp, path)

    def notes(self, seq: int) -> dict:
        path = self.path / "files" / f"{seq}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def mark_sent(self, seq: int) -> None:
        with open(self.path / SENT, "a", encoding="utf-8") as fh:
            fh.write(f"{seq}\n")

    def close(self, remove: bool) -> None:
        """Release the lock; remove the folder when everything was sent."""
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- reading (sync) --------------------------------------------------------------------
    def meta(self) -> dict:
        f = self.path / META
        return json.loads(f.read_text()) if f.is_file() else {}

    def records(self) -> list[dict]:
        out = []
        f = self.path / JOURNAL
        if not f.is_file():
            return out
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: everything before it is whole
        return out

    def sent(self) -> set[int]:
        f = self.path / SENT
        if not f.is_file():
            return set()
        return {int(x) for x in f.read_text().split() if x.strip().isdigit()}

    def pending(self) -> list[dict]:
        done = self.sent()
        return [r for r in self.records() if r["seq"] not in done]

    def artifact_source(self, record: dict) -> Path | None:
        """Where an ``artifact`` / ``model`` record's content is now: the spool copy, else the
        original (a model record names its folder ``dir``)."""
        kept = self.slot(record["seq"]) / (record.get("dir") or record["name"])
        if kept.exists():
            return kept
        original = record.get("original_path")
        return Path(original) if original and Path(original).exists() else None

    def try_lock(self):
        """The folder's lock if no live process holds it (else None)."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock


def all_spools(root: Path | None = None) -> Iterator[Spool]:
    root = root or spool_root()
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path / JOURNAL).is_file():
            yield Spool(path)
