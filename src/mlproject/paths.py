"""Where mlproject keeps files between runs, and folders created for sharing.

``MLPROJECT_CACHE`` (default ``~/.cache/mlproject``) holds converted models (``models/``),
downloaded run artifacts (``artifacts/``) and the tracking spool (``spool/``, or
``MLPROJECT_SPOOL`` when set). Everything is created with the user's umask, so a cache shared
by a team (``umask 002``, a group-owned folder) is readable by the others.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MLPROJECT_CACHE") or Path.home() / ".cache" / "mlproject")


def spool_root() -> Path:
    """Where a step writes what it logs before sending it (see ``tracking``)."""
    return Path(os.environ.get("MLPROJECT_SPOOL") or cache_root() / "spool")


def artifacts_root() -> Path:
    """Downloaded run / registry artifacts, one folder per URI."""
    return cache_root() / "artifacts"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_mkdtemp(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent``, but with the mode a plain ``mkdir`` would get.

    mkdtemp always makes 0700 folders; a folder that is later renamed into a shared cache
    would then be unreadable to everyone else whatever their umask says.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())
    return path
