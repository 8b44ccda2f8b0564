import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Downloads, spools and converted models of the tests stay out of the user's cache."""
    if os.environ.get("MLPROJECT_CACHE"):
        yield Path(os.environ["MLPROJECT_CACHE"])
        return
    root = tmp_path_factory.mktemp("mlproject-cache")
    os.environ["MLPROJECT_CACHE"] = str(root)
    yield root
    os.environ.pop("MLPROJECT_CACHE", None)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must import this checkout's package: ``src``
    goes first on PYTHONPATH, whatever PYTHONPATH already held is kept (a machine whose
    packages come from PYTHONPATH, as on the GPU test machine, needs it)."""
    src = str(Path(__file__).resolve().parent.parent / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, **extra}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        if var not in extra:
            env.pop(var, None)
    return env


def model_device(model):
    """Where a model's weights live (inputs must go there: the suite also runs on CUDA)."""
    return next(model.parameters()).device


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box they thrash (3x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model directory per architecture: {"llama": Path, ...}."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny.save_tiny(root / arch, arch) for arch in tiny.ARCHS}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One real `mlflow server` on a free localhost port for the whole session."""
    from mlflow_server import start_server

    with start_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture(scope="session")
def ppl_text_file(tmp_path_factory) -> Path:
    """A short text for fast perplexity runs on tiny models."""
    path = tmp_path_factory.mktemp("ppl") / "sample.txt"
    path.write_text(" ".join(tiny.corpus()[:12]))
    return path


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def assert_bad_input(argv: list[str], needle: str, uri: str, experiment: str, capsys, monkeypatch) -> None:
    """`mlproject <argv>` fails as bad input must: exit 2, one last line `error: …` naming
    `needle`, no weights loaded, and no run created in `experiment`."""
    from mlproject import cli
    from mlproject.models import loading

    def must_not_load(*a, **k):
        raise AssertionError("weights loaded despite bad input")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    rc = cli.main([*argv, "--tracking-uri", uri, "--experiment", experiment])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    found = mlflow_client(uri).get_experiment_by_name(experiment)
    assert found is None or not mlflow_client(uri).search_runs([found.experiment_id])
