"""Model uploads go spool → link → server like every other record (issue 18).

* an upload the server never takes (its artifact endpoint keeps failing, or the server stops)
  costs the retry budget, not the step: the model folder is *moved* into the spool, the step
  finishes, and `runs sync` later makes the LoggedModel whole (the one the step created, or a
  new one), so `runs:/<run>/model` downloads and loads with the same weights;
* finetune removes its checkpoint folder once the server has the model, keeps it (and names
  it) when the upload waits in the spool, and keeps it with keep_output=true;
* a search trial's finetune writes no optimizer checkpoint unless it is asked for one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import mlflow_client

torch = pytest.importorskip("torch")

from mlproject import cli, tracking  # noqa: E402
from mlproject.config import FinetuneStepConfig  # noqa: E402
from mlproject.models import loading  # noqa: E402
from mlproject.models.reference import resolve  # noqa: E402
from mlproject.steps import finetune  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def spool_root(monkeypatch, tmp_path):
    """A private spool, a 1 s retry budget, and the process's link answering again afterwards."""
    monkeypatch.setenv("MLPROJECT_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("MLPROJECT_TRACKING_RETRY_SECONDS", "1")
    monkeypatch.setenv("MLPROJECT_SYSTEM_METRICS", "off")
    yield tmp_path / "spool"
    tracking._LINK.reset()


@pytest.fixture
def refused_uploads(monkeypatch):
    """The artifact endpoint resets every model upload (a transient error, so the link retries)."""
    import requests
    from mlflow.tracking import MlflowClient

    tries = []
    original = MlflowClient.log_model_artifacts

    def refuse(self, model_id, local_dir, artifact_path=None):
        tries.append(model_id)
        raise requests.exceptions.ConnectionError("connection reset by peer (artifact store)")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", refuse)

    def restore():
        monkeypatch.setattr(MlflowClient, "log_model_artifacts", original)
        tracking._LINK.reset()

    return tries, restore


def logged_models(uri, experiment_id, run_id, name="model"):
    client = mlflow_client(uri)
    return [m for m in client.search_logged_models([experiment_id], filter_string=f"name = '{name}'")
            if m.source_run_id == run_id]


def logits(model, tokenizer, text="the quick brown fox jumps over"):
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def state(model) -> dict:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def same_weights(a, b) -> bool:
    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


FLAVOR = {"task": "text-generation", "model_binary": ".", "instance_type": "TextGenerationPipeline"}


# --------------------------------------------------------------------------- Run.log_model_dir
def test_a_refused_upload_moves_the_folder_into_the_spool_and_sync_finishes_that_model(
        mlflow_uri, spool_root, refused_uploads, tiny_dirs, tmp_path):
    import mlflow

    tries, restore = refused_uploads
    mlflow.set_tracking_uri(mlflow_uri)
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:  # as the steps do: the folder would vanish
        folder = Path(shutil.copytree(tiny_dirs["llama"], Path(tmp) / "model"))
        weights = next(folder.glob("*.safetensors"))
        inode = weights.stat().st_ino
        with tracking.step_run("quantize", experiment="upload-refused", log_env=False) as run:
            model_id = run.log_model_dir(folder, "model", flavor=FLAVOR, tags={"mlproject.step": "quantize"},
                                         params={"w_bits": 4})
            kept = run.unsent_models["model"]
            run.log_metrics({"ppl/sample": 12.5})  # the step goes on (to the spool only now)
        assert not folder.exists()
    assert tries and set(tries) == {model_id}  # retried within the budget, then given up
    assert kept.parent.parent == spool_root / run.run_id / "files"
    assert (kept / weights.name).stat().st_ino == inode  # moved, not copied
    assert (kept / "MLmodel").is_file()
    # The server has a PENDING model of that id and no artifacts for it; nothing else.
    (pending,) = logged_models(mlflow_uri, run.experiment_id, run.run_id)
    assert pending.model_id == model_id and str(pending.status) == "PENDING"
    journal = [json.loads(line) for line in (spool_root / run.run_id / "journal.jsonl").read_text().splitlines()]
    (record,) = [r for r in journal if r["op"] == "model"]
    assert record["name"] == "model" and record["params"] == {"w_bits": "4"} and record["flavor"] == FLAVOR

    restore()
    counts = tracking.sync_spool(spool_root / run.run_id, mlflow_uri)
    assert counts["model"] == 1 and counts["status"] == 1 and "missing_models" not in counts
    assert not (spool_root / run.run_id).exists()
    (model,) = logged_models(mlflow_uri, run.experiment_id, run.run_id)  # the same one, not a second
    assert model.model_id == model_id and str(model.status) == "READY"
    assert model.params == {"w_bits": "4"} and model.tags["mlproject.step"] == "quantize"
    assert model.model_type == "transformers"
    got = mlflow_client(mlflow_uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["ppl/sample"] == 12.5
    assert model_id in {o.model_id for o in got.outputs.model_outputs}

    local = tracking.download(f"runs:/{run.run_id}/model")
    assert "transformers" in (local / "MLmodel").read_text()
    loaded = loading.load_model(resolve(f"runs:/{run.run_id}/model"), fetch=tracking.download, dtype="float32")
    assert same_weights(loaded.model, loading.load_model(resolve(str(tiny_dirs["llama"])), dtype="float32").model)


def test_a_server_that_stops_before_the_model_is_created_gets_it_from_sync(spool_root, tiny_dirs, tmp_path):
    import mlflow

    from mlflow_server import start_server

    store = tmp_path / "store"
    store.mkdir()
    backend = f"sqlite:///{store / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    server = contextlib.ExitStack()
    try:
        mlflow.set_tracking_uri(server.enter_context(start_server(store / "one", backend_store_uri=backend,
                                                                  artifacts=store / "art")))
        with tracking.step_run("prune", experiment="upload-gone", log_env=False) as run:
            server.close()  # the server is gone before the model is logged
            with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
                folder = Path(shutil.copytree(tiny_dirs["qwen2"], Path(tmp) / "model"))
                assert run.log_model_dir(folder, "model", flavor=FLAVOR, tags={"mlproject.step": "prune"}) == ""
                assert "model" not in run.model_ids and not folder.exists()
        kept = run.unsent_models["model"]
        assert (kept / "config.json").is_file()

        with start_server(store / "two", backend_store_uri=backend, artifacts=store / "art") as uri2:
            mlflow.set_tracking_uri(uri2)
            assert logged_models(uri2, run.experiment_id, run.run_id) == []
            rc = cli.main(["runs", "sync", str(spool_root / run.run_id), "--tracking-uri", uri2])
            assert rc == 0 and not (spool_root / run.run_id).exists()
            (model,) = logged_models(uri2, run.experiment_id, run.run_id)
            assert str(model.status) == "READY" and model.tags["mlproject.step"] == "prune"
            assert mlflow_client(uri2).get_run(run.run_id).info.status == "FINISHED"
            loaded = loading.load_model(resolve(f"runs:/{run.run_id}/model"), fetch=tracking.download,
                                        dtype="float32")
            base = loading.load_model(resolve(str(tiny_dirs["qwen2"])), dtype="float32")
            assert same_weights(loaded.model, base.model)
    finally:
        server.close()
        mlflow.set_tracking_uri(previous)


# --------------------------------------------------------------------------- finetune's folder
@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload-data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny.SFT_ROWS * 4))
    return path


def ft_config(uri, model, dataset, **kw):
    base = dict(model=str(model), dataset=str(dataset), max_steps=4, save_steps=2, train_batch_size=2, lr=1e-2,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, tasks="none", ppl_dataset="none", eval_after=False,
                tracking_uri=uri, experiment="upload-finetune", dtype="float32")
    base.update(kw)
    return FinetuneStepConfig(**base)


def test_finetune_removes_its_checkpoints_once_the_model_is_logged(mlflow_uri, spool_root, tiny_dirs, sft_file,
                                                                  tmp_path, monkeypatch):
    named = tmp_path / "ckpt"
    named.mkdir()
    (named / "notes.txt").write_text("mine")
    result = finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], sft_file, output_dir=str(named)))
    exp_id = mlflow_client(mlflow_uri).get_run(result.run_id).info.experiment_id
    assert [str(m.status) for m in logged_models(mlflow_uri, exp_id, result.run_id)] == ["READY"]
    # a folder the user named: what training wrote goes, the user's own file stays
    assert sorted(p.name for p in named.iterdir()) == ["notes.txt"]

    kept = tmp_path / "kept"
    finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], sft_file, output_dir=str(kept), keep_output=True))
    assert (kept / "checkpoint-4").is_dir() and (kept / finetune.RUN_ID_FILE).is_file()

    monkeypatch.chdir(tmp_path)  # the default folder, outputs/finetune/<model>-<hash>, goes whole
    result = finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], sft_file))
    default = tmp_path / result.details["output_dir"]
    assert default.parent == tmp_path / "outputs" / "finetune" and not default.exists()


def test_finetune_whose_upload_fails_finishes_keeps_its_checkpoints_and_sync_delivers_the_adapter(
        mlflow_uri, spool_root, refused_uploads, tiny_dirs, sft_file, tmp_path, caplog):
    tries, restore = refused_uploads
    out = tmp_path / "ckpt"
    with caplog.at_level(logging.WARNING):
        result = finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], sft_file, output_dir=str(out)))
    assert tries  # the upload was tried and refused; the step still returned its result
    spool = spool_root / result.run_id
    (waiting,) = (spool / "files").glob("*/adapter")
    assert (waiting / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-4").is_dir() and (out / finetune.RUN_ID_FILE).is_file()
    (warning,) = [r.getMessage() for r in caplog.records if "fine-tuned model did not reach" in r.getMessage()]
    assert str(waiting) in warning and str(out) in warning and "mlproject runs sync" in warning

    restore()
    assert tracking.sync_spool(spool, mlflow_uri)["model"] == 1
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    reloaded = loading.load_model(resolve(f"runs:/{result.run_id}/model"), fetch=tracking.download,
                                  dtype="float32")
    tok = reloaded.tokenizer
    assert torch.allclose(logits(reloaded.model, tok), logits(result.model, tok), atol=1e-5)
    base = loading.load_model(resolve(str(tiny_dirs["llama"])), dtype="float32").model
    assert not torch.allclose(logits(base, tok), logits(result.model, tok), atol=1e-3)  # it did train


def test_the_cli_says_where_an_unsent_model_waits_and_exits_75(mlflow_uri, spool_root, refused_uploads, tiny_dirs,
                                                              sft_file, tmp_path, capsys):
    rc = cli.main(["finetune", "--model", str(tiny_dirs["llama"]), "--dataset", str(sft_file), "--max-steps", "2",
                   "--train-batch-size", "2", "--tasks", "none", "--ppl-dataset", "none", "--eval-after", "false",
                   "--output-dir", str(tmp_path / "ckpt"), "--tracking-uri", mlflow_uri,
                   "--experiment", "upload-cli", "--dtype", "float32"])
    captured = capsys.readouterr()
    run_id = dict(line.split(": ", 1) for line in captured.out.splitlines() if ": " in line)["run_id"]
    last = captured.err.strip().splitlines()[-1]
    assert rc == 75
    assert last.startswith("error: results not delivered") and str(spool_root / run_id) in last
    assert "mlproject runs sync" in last


# --------------------------------------------------------------------------- search trials
def write_pipeline(tmp_path, tiny_dir, sft, ppl_text_file, **step) -> Path:
    path = tmp_path / "tune.yaml"
    body = {"name": "tune", "params": {"model": str(tiny_dir), "tasks": "none", "ppl_dataset": str(ppl_text_file),
                                       "seqlen": 32},
            "steps": {"tuned": {"step": "finetune", "dataset": str(sft), "max_steps": 2, "train_batch_size": 2,
                                "lora_r": 4, "lora_alpha": 8, "dtype": "float32", **step}}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def write_space(tmp_path, pipeline, params, sets=()) -> Path:
    path = tmp_path / f"space-{len(list(tmp_path.glob('space-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"name": "tune", "pipeline": str(pipeline), "target": "tuned", "params": params,
                                    "set": list(sets), "objectives": ["best_ppl"], "n_trials": 1,
                                    "sampler": {"type": "random", "seed": 0}}, sort_keys=False))
    return path


def test_trials_run_finetune_without_checkpoints_unless_asked(tmp_path, tiny_dirs, sft_file, ppl_text_file):
    from mlproject.search import space as space_mod

    pipe = write_pipeline(tmp_path, tiny_dirs["llama"], sft_file, ppl_text_file)
    plain = space_mod.load(str(write_space(tmp_path, pipe, {"tuned.lr": [0.01, 0.001]})))
    assert plain.trial_pipeline({"tuned.lr": 0.01}).values("tuned")["save_steps"] == "0"
    # given by the space's set:, by the search's --set, by the pipeline, or searched: left alone
    given = space_mod.load(str(write_space(tmp_path, pipe, {"tuned.lr": [0.01]}, ["tuned.save_steps=1"])))
    assert given.trial_pipeline({"tuned.lr": 0.01}).values("tuned")["save_steps"] == "1"
    flag = space_mod.load(str(write_space(tmp_path, pipe, {"tuned.lr": [0.01]})), "save_steps=3")
    assert str(flag.trial_pipeline({"tuned.lr": 0.01}).values("tuned")["save_steps"]) == "3"
    searched = space_mod.load(str(write_space(tmp_path, pipe, {"tuned.save_steps": [1, 2]})))
    assert searched.trial_pipeline({"tuned.save_steps": 2}).values("tuned")["save_steps"] == "2"
    own = write_pipeline(tmp_path, tiny_dirs["llama"], sft_file, ppl_text_file, save_steps=1)
    assert str(space_mod.load(str(write_space(tmp_path, own, {"tuned.lr": [0.01]}))).trial_pipeline(
        {"tuned.lr": 0.01}).values("tuned")["save_steps"]) == "1"


def test_a_search_trials_finetune_writes_no_checkpoint(mlflow_uri, tmp_path, tiny_dirs, sft_file, ppl_text_file,
                                                       monkeypatch):
    from mlproject.training import trainer

    seen = []
    original = trainer.train

    def watch(model, tokenizer, data, cfg, *a, output_dir=None, **k):
        result = original(model, tokenizer, data, cfg, *a, output_dir=output_dir, **k)
        seen.append((cfg.save_steps, sorted(p.name for p in Path(output_dir).glob("checkpoint-*"))))
        return result

    monkeypatch.setattr(trainer, "train", watch)
    # 50 optimizer steps: the default save_steps (50) would write checkpoint-50
    pipe = write_pipeline(tmp_path, tiny_dirs["llama"], sft_file, ppl_text_file, keep_output=True,
                          output_dir=str(tmp_path / "trial-ckpt"), max_steps=50)
    space = write_space(tmp_path, pipe, {"tuned.lr": [0.01]})
    rc = cli.main(["search", str(space), "--tracking-uri", mlflow_uri, "--experiment", "upload-search",
                   "--storage", f"sqlite:///{tmp_path}/optuna.db", "--study", "upload-search"])
    assert rc == 0
    assert seen == [(0, [])]
    kept = tmp_path / "trial-ckpt"  # keep_output: the folder stays, and holds no checkpoint
    assert kept.is_dir() and not list(kept.glob("checkpoint-*"))
