"""Before a model or a data set comes from the Hugging Face hub: is it cached, is the hub reachable, is it gated?

Without these checks an unreachable hub costs minutes of retries (~85 s and ~40 duplicated
warnings for ``model=mistral``) before transformers gives up with "We couldn't connect", and
the step's run is left FAILED. Here it takes a TCP/HTTP probe of a few seconds, before any run
exists, and the error says what to do. Nothing here loads weights or touches MLflow.

* ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) and the model not in the local cache:
  fail at once (nothing is probed).
* The hub (``$HF_ENDPOINT``, default https://huggingface.co) does not answer within
  ``MLPROJECT_HUB_TIMEOUT`` seconds (default 5): a cached model is used offline (the process
  switches to offline mode, so no retries follow); an uncached one fails.
* The hub answers but refuses the model's ``config.json`` (gated / private / missing): fail
  with the reason (a gated model needs its license accepted and ``HF_TOKEN``).

Data sets (a PPL or calibration text such as ``wikitext2``, a training set such as
``yahma/alpaca-cleaned``) follow the same rules through :func:`check_dataset`, with the
``datasets`` library's cache and offline switch (``HF_DATASETS_OFFLINE``, else ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import glob
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from mlproject.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
_GATED = "a gated model (Llama, Mistral) also needs its license accepted on huggingface.co and HF_TOKEN set"
_LOCAL = "or pass a local model directory, or use model=smollm2, which runs offline"
ADVICE = f"what to do: check the network or proxy (or set HF_ENDPOINT to a mirror); {_GATED}; {_LOCAL}"


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """The user asked for offline mode (read now, not at import time)."""
    return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def timeout() -> float:
    try:
        return float(os.environ.get("MLPROJECT_HUB_TIMEOUT", "5"))
    except ValueError:
        return 5.0


def cache_dir() -> str | None:
    """The hub cache as the environment says now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def cached_file(repo_id: str, filename: str = "config.json") -> Path | None:
    """The cached copy of ``filename`` of a hub model, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir())
    return Path(found) if isinstance(found, str) else None


def unreachable(url: str | None = None, seconds: float | None = None) -> str | None:
    """Why ``url`` (default: the hub endpoint) cannot be reached, or None when it answers.
    Any HTTP answer counts as reachable (proxies from the environment apply)."""
    url = url or endpoint()
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "mlproject-preflight"})
    try:
        with urllib.request.urlopen(req, timeout=seconds or timeout()):  # noqa: S310 - the user's endpoint
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(getattr(exc, "reason", exc))
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def go_offline(reason: str) -> None:
    """Use only the local cache from now on in this process (no more hub retries)."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "datasets.config" in sys.modules:  # it read the switch when it was imported
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency
        pass
    log.warning("the Hugging Face hub at %s is unreachable (%s): using cached models offline", endpoint(), reason)


def check_model(raw: str, repo_id: str, what: str = "model", filename: str = "config.json") -> None:
    """Fail fast, with advice, when ``repo_id`` cannot come from the hub (see the module docstring)."""
    label = f"{what} {raw!r}" + (f" ({repo_id})" if raw != repo_id else "")
    cached = cached_file(repo_id, filename)
    if offline():
        if cached is None:
            raise UserError(f"{label} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                            f"downloading it; what to do: unset HF_HUB_OFFLINE where there is network (or run "
                            f"`hf download {repo_id}` there and copy the cache here); {_GATED}; {_LOCAL}")
        return
    reason = unreachable()
    if reason is not None:
        if cached is not None:
            go_offline(reason)
            return
        raise UserError(f"cannot reach the Hugging Face hub at {endpoint()} ({reason}) to download {label}; {ADVICE}")
    if cached is None:
        _check_access(label, repo_id, filename)


def datasets_offline() -> bool:
    """The ``datasets`` library will not download (its own switch wins over the hub's)."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    return _true(value) if value is not None else offline()


def datasets_cache_dir() -> Path:
    """The ``datasets`` cache as the environment says now."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(home).expanduser() / "datasets"


def dataset_cached(repo_id: str, config: str | None = None) -> bool:
    """``load_dataset(repo_id, config)`` can be answered from the local cache: offline, ``datasets``
    looks only for a prepared copy in its cache, ``<namespace>___<name>/<config>/<version>/<hash>/``."""
    from datasets.naming import camelcase_to_snakecase  # the loader's own spelling of the folder

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = datasets_cache_dir() / "___".join(parts)
    pattern = os.path.join(glob.escape(str(root)), glob.escape(config) if config else "*", "*", "*")
    return any(os.path.isdir(p) for p in glob.glob(pattern))


def check_dataset(raw: str, repo_id: str, config: str | None = None, what: str = "dataset",
                  instead: str = "") -> None:
    """Fail fast, with advice, when a data set that ``datasets.load_dataset`` would fetch from the hub
    cannot come from it: the rules of :func:`check_model`. ``instead``: the offline alternative."""
    source = ", ".join(x for x in (repo_id, config) if x)
    label = f"{what} {raw!r}" + (f" ({source})" if source != raw else "")
    alternative = f"; or use the bundled data: {instead}" if instead else ""
    cached = dataset_cached(repo_id, config)
    if datasets_offline():
        if not cached:
            flags = [n for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
                     if _true(os.environ.get(n))]
            raise UserError(f"{label} is not in the local datasets cache ({datasets_cache_dir()}) and "
                            f"{' '.join(f + '=1' for f in flags)} forbid{'s' if len(flags) == 1 else ''} downloading "
                            f"it; what to do: unset {', '.join(flags)} where there is network and load it once "
                            f"there (then copy that cache here){alternative}")
        return
    reason = unreachable()
    if reason is not None:
        if cached:
            go_offline(reason)
            return
        raise UserError(f"cannot reach the Hugging Face hub at {endpoint()} ({reason}) to download {label}; what to "
                        f"do: check the network or proxy (or set HF_ENDPOINT to a mirror){alternative}")
    if not cached:
        _check_access(label, repo_id, "README.md", repo_type="dataset")


def _check_access(label: str, repo_id: str, filename: str, repo_type: str | None = None) -> None:
    """A gated, private or missing repository fails here, not after minutes of loading."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a dependency
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type, endpoint=endpoint()),
                             timeout=timeout())
    except GatedRepoError:
        page = f"{endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        raise UserError(f"{label} is gated: accept its license at {page} and set HF_TOKEN "
                        "(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{label}: no such repository on {endpoint()}, or it is private (then set HF_TOKEN); "
                        "check the id") from None
    except Exception as exc:  # noqa: BLE001 - anything else is left to the real download
        log.debug("hub access check of %s inconclusive: %s", repo_id, exc)
