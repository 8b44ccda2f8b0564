"""Hub failures are fast and helpful, and a model too big for the memory is announced before it loads.
No test touches the network: an unreachable hub is HF_ENDPOINT pointing at a closed localhost port."""

import logging

import pytest

from conftest import assert_bad_input, mlflow_client
from mlproject.errors import UserError
from mlproject.models import hub


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Offline mode off, an empty hub cache, and the hub at a closed localhost port."""
    from mlflow_server import free_port

    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    return endpoint


def fake_cached_model(cache: str, repo_id: str) -> None:
    """The layout huggingface_hub leaves in its cache after a download."""
    from pathlib import Path

    root = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")


def test_unreachable_hub_fails_with_advice_and_no_run(online, mlflow_uri, capsys, monkeypatch):
    assert_bad_input(["evaluate", "--model", "some-org/some-model"], "cannot reach the Hugging Face hub",
                     mlflow_uri, "hub-unreachable", capsys, monkeypatch)
    with pytest.raises(UserError) as info:
        hub.check_model("some-org/some-model", "some-org/some-model")
    for advice in (online, "HF_TOKEN", "model=smollm2", "local model directory"):
        assert advice in str(info.value), info.value


def test_alias_of_a_hub_model_is_checked_too(online, mlflow_uri, capsys, monkeypatch):
    assert_bad_input(["quantize", "--model", "mistral"], "mistralai/Mistral-7B-v0.3", mlflow_uri, "hub-alias",
                     capsys, monkeypatch)


def test_offline_mode_and_no_cached_copy_fails_at_once(monkeypatch, tmp_path, mlflow_uri, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    # the endpoint is never probed in offline mode: a non-routable one would hang if it were
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1:9")
    monkeypatch.setattr(hub, "unreachable", lambda *a, **k: pytest.fail("probed the hub in offline mode"))
    assert_bad_input(["prune", "--model", "llama"], "HF_HUB_OFFLINE=1", mlflow_uri, "hub-offline", capsys, monkeypatch)


def test_an_adapter_from_the_hub_is_checked(online, tiny_dirs, mlflow_uri, capsys, monkeypatch):
    assert_bad_input(["evaluate", "--model", str(tiny_dirs["llama"]), "--adapter", "some-org/lora"],
                     "adapter 'some-org/lora'", mlflow_uri, "hub-adapter", capsys, monkeypatch)


def test_cached_model_with_an_unreachable_hub_goes_offline(online, monkeypatch, caplog):
    import os

    import huggingface_hub.constants as hub_constants

    fake_cached_model(os.environ["HF_HUB_CACHE"], "some-org/cached-model")
    caplog.set_level(logging.WARNING, logger="mlproject.models.hub")
    hub.check_model("some-org/cached-model", "some-org/cached-model")  # no error
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    assert "unreachable" in caplog.text and "cached models offline" in caplog.text


def test_pipeline_checks_the_hub_before_any_run(online, mlflow_uri, tmp_path, capsys, monkeypatch):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: p\nsteps:\n  base: {step: evaluate, model: some-org/some-model}\n")
    assert_bad_input(["run", str(pipe)], "cannot reach the Hugging Face hub", mlflow_uri, "hub-pipeline",
                     capsys, monkeypatch)


def test_memory_warning_before_loading(tiny_dirs, mlflow_uri, monkeypatch, caplog):
    import psutil

    from mlproject.config import EvaluateConfig
    from mlproject.steps import evaluate

    class Mem:
        available = 100 * 2**10  # 100 KiB: the tiny model's 115,008 fp32 parameters do not fit

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    caplog.set_level(logging.WARNING, logger="mlproject.steps.shared.checks")
    cfg = EvaluateConfig(model=str(tiny_dirs["llama"]), tasks="none", ppl_dataset="none", device="cpu",
                         dtype="float32", tracking_uri=mlflow_uri)
    evaluate.check(cfg)
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "mlproject.steps.shared.checks"]
    assert "(0.00 B parameters, float32) needs ~0.5 MB" in msg and "RAM has 0.1 MB free" in msg
    assert "dtype=bfloat16" in msg and "model=smollm2" in msg


def test_alias_table_sizes_a_model_that_is_not_downloaded():
    from mlproject.models import loading
    from mlproject.models.reference import resolve

    # offline and not cached: no config to read, so the alias table's params_b answers
    assert loading.estimate_params(resolve("mistral")) == 7_250_000_000


def fake_cached_dataset(cache, name: str, config: str) -> None:
    """The layout `datasets` leaves in its cache once a data set was loaded (what offline loads find)."""
    from pathlib import Path

    (Path(cache) / name.replace("/", "___") / config / "0.0.0" / "0123abcd").mkdir(parents=True)


def test_a_hub_dataset_offline_and_not_cached_fails_at_once(monkeypatch, tmp_path):
    cache = tmp_path / "datasets-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(hub, "unreachable", lambda *a, **k: pytest.fail("probed the hub in offline mode"))
    with pytest.raises(UserError) as info:
        hub.check_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", what="calibration",
                          instead="calibration=offline")
    msg = str(info.value)
    assert msg.startswith("calibration 'wikitext2' (wikitext, wikitext-2-raw-v1) is not in the local datasets cache")
    assert "HF_HUB_OFFLINE=1" in msg and str(cache) in msg and "calibration=offline" in msg
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # every switch that is on is named
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 forbid downloading"):
        hub.check_dataset("yahma/alpaca-cleaned", "yahma/alpaca-cleaned")
    # Cached (another config of the same set does not count): no error.
    fake_cached_dataset(cache, "wikitext", "wikitext-103-raw-v1")
    with pytest.raises(UserError):
        hub.check_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1")
    fake_cached_dataset(cache, "wikitext", "wikitext-2-raw-v1")
    fake_cached_dataset(cache, "yahma/alpaca-cleaned", "default")
    hub.check_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1")
    hub.check_dataset("yahma/alpaca-cleaned", "yahma/alpaca-cleaned")


def test_a_hub_dataset_with_an_unreachable_hub(online, monkeypatch, tmp_path):
    import os
    import sys

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    with pytest.raises(UserError) as info:
        hub.check_dataset("yahma/alpaca-cleaned", "yahma/alpaca-cleaned", instead="dataset=offline:sft_mlp_nonce")
    assert f"cannot reach the Hugging Face hub at {online}" in str(info.value)
    assert "dataset 'yahma/alpaca-cleaned'" in str(info.value) and "offline:sft_mlp_nonce" in str(info.value)
    # Cached: used offline from now on, by datasets too (it read its switch at import).
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    fake_cached_dataset(tmp_path / "datasets-cache", "yahma/alpaca-cleaned", "default")
    hub.check_dataset("yahma/alpaca-cleaned", "yahma/alpaca-cleaned")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and sys.modules["datasets.config"].HF_HUB_OFFLINE is True
