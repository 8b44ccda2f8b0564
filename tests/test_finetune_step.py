"""The finetune step end to end on tiny models, recorded in a real `mlflow server`.

SFT (LoRA, evaluated before/after), DPO continuing that adapter with merge, QLoRA, the NaN
guard, resume into the same run, and bad input through the CLI.
"""

from __future__ import annotations

import json
import math

import pytest

import tiny
from conftest import assert_bad_input, mlflow_client, model_device

torch = pytest.importorskip("torch")

from mlproject import cli, tracking  # noqa: E402
from mlproject.config import EvaluateConfig, FinetuneStepConfig  # noqa: E402
from mlproject.models import loading  # noqa: E402
from mlproject.models.reference import resolve  # noqa: E402
from mlproject.steps import evaluate, finetune  # noqa: E402
from mlproject.training import TrainingDiverged  # noqa: E402

SFT_ROWS, DPO_ROWS = tiny.SFT_ROWS, tiny.DPO_ROWS
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-data")
    return {
        "sft": write_jsonl(root / "sft.jsonl", SFT_ROWS * 4),
        "dpo": write_jsonl(root / "dpo.jsonl", DPO_ROWS * 4),
        "bad": write_jsonl(root / "qa.jsonl", [{"question": "q", "answer": "a"}]),
    }


def ft_config(uri, model, dataset, tmp_path, **kw):
    # dtype float32 on every device: these tests compare logits and PPL computed two ways
    # (in memory vs reloaded, merged vs not) at float32 tolerances; device stays auto (CUDA
    # when present), so the GPU code paths still run.
    base = dict(model=str(model), dataset=str(dataset), max_steps=4, train_batch_size=2, lr=1e-2, lora_r=4,
                lora_alpha=8, lora_dropout=0.0, tasks="none", ppl_dataset="none", seqlen=32, batch_size="8",
                output_dir=str(tmp_path / "ckpt"), tracking_uri=uri, experiment="test-finetune", dtype="float32")
    base.update(kw)
    return FinetuneStepConfig(**base)


def logits(model, tokenizer, text="the quick brown fox jumps over"):
    """Logits on the CPU (comparable across models), computed where the model lives."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model_device(model))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def reload(uri):
    return loading.load_model(resolve(uri), fetch=tracking.download, dtype="float32")


PEAK = "peak_vram_mb" if torch.cuda.is_available() else "peak_rss_mb"  # what the trainer reports


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def sft_run(mlflow_uri, tiny_dirs, data, ppl_text_file, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    calls = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), *a, **k):
        if any(m.key == "train/loss" for m in metrics or ()):
            calls.append(sorted({m.step for m in metrics}))
        return original(self, run_id, metrics, *a, **k)

    MlflowClient.log_batch = counting
    try:
        cfg = ft_config(mlflow_uri, tiny_dirs["llama"], data["sft"], tmp_path_factory.mktemp("sft"),
                        eval_before=True, tasks="mlp_nonce", limit="4", ppl_dataset=str(ppl_text_file))
        result = finetune.run(cfg)
    finally:
        MlflowClient.log_batch = original
    return result, mlflow_client(mlflow_uri).get_run(result.run_id), calls


def test_sft_run_is_recorded(sft_run, tiny_dirs, data, mlflow_uri):
    result, run, calls = sft_run
    client = mlflow_client(mlflow_uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune:llama"
    tags = run.data.tags
    assert tags["mlproject.step"] == "finetune" and tags["mlproject.role"] == "finetuned"
    assert tags["mlproject.method"] == "sft" and tags["mlproject.family"] == "llama"
    assert tags["mlproject.model"] == str(tiny_dirs["llama"]) and "mlproject.upstream_run" not in tags
    params = run.data.params
    assert params["method"] == "sft" and params["finetuning"] == "lora" and params["adapter"] == "none" and params["lora_r"] == "4"
    assert params["dataset"] == str(data["sft"]) and params["dataset_rows"] == "16"
    assert params["chat_template"] == "off" and params["max_steps"] == "4" and params["batch_size"] == "8" and params["train_batch_size"] == "2"
    assert "per_device_train_batch_size" not in params  # transformers' MLflowCallback stayed away

    loss = history(client, result.run_id, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in loss)
    assert [s for s, _ in history(client, result.run_id, "train/learning_rate")] == [1, 2, 3, 4]
    assert [s for s, _ in history(client, result.run_id, "train/grad_norm")] == [1, 2, 3, 4]
    assert calls == [[1, 2, 3, 4]]  # the whole curve in one request

    m = run.data.metrics
    assert 0 < m["trainable_params"] < m["total_params"] and m["train_steps"] == 4 and m["train_seconds"] > 0
    assert m[PEAK] >= m[f"train/{PEAK}"] > 0 and m["train/final_loss"] == pytest.approx(loss[-1][1])
    assert result.details["global_step"] == 4 and result.model_uri == f"runs:/{result.run_id}/model"


def test_sft_before_after_and_deltas(sft_run, mlflow_uri):
    result, run, _ = sft_run
    m = run.data.metrics
    for key in ("ppl/sample", "avg_acc", "mlp_nonce/acc_norm"):
        assert f"before/{key}" in m and key in m
        assert m[f"delta/{key}"] == pytest.approx(m[key] - m[f"before/{key}"])
    assert "delta/mlp_nonce/acc" not in m  # only the metric avg_acc used (acc_norm)
    assert m["ppl/sample"] < m["before/ppl/sample"]  # trained on the words of the PPL text
    # before/ at step 0, the trained model's scores at its final optimizer step
    client = mlflow_client(mlflow_uri)
    assert [s for s, _ in history(client, result.run_id, "before/ppl/sample")] == [0]
    assert [s for s, _ in history(client, result.run_id, "ppl/sample")] == [4]
    assert json.loads(run.data.tags["mlproject.before.avg_acc_metrics"]) == {"mlp_nonce": "acc_norm"}


def test_sft_adapter_reloads_with_identical_logits(sft_run, tiny_dirs, mlflow_uri, ppl_text_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, run, _ = sft_run
    meta = json.loads(open(mlflow_client(mlflow_uri).download_artifacts(
        result.run_id, "model/mlproject_model.json", str(tmp_path))).read())
    assert meta["kind"] == "adapter" and meta["base"] == str(tiny_dirs["llama"])
    assert meta["run_id"] == result.run_id and meta.get("quantization") is None

    loaded = reload(result.model_uri)
    assert isinstance(loaded.model, PeftModel)
    tok = loaded.tokenizer
    assert torch.equal(logits(loaded.model, tok), logits(result.model, tok))
    # The base stayed frozen; the adapter trained (LoRA B starts at zero).
    original = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    base = {n.replace(".base_layer.", "."): p for n, p in loaded.model.get_base_model().named_parameters()
            if "lora_" not in n}
    assert all(torch.equal(base[n].cpu(), p.to(base[n].dtype)) for n, p in original.named_parameters())
    lora_b = [p for n, p in loaded.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)

    # The evaluate step on runs:/<id>/model measures exactly what the finetune run logged as "after".
    # (the same limit: with ppl_windows=-1 it sets how many PPL windows are scored)
    ev = evaluate.run(EvaluateConfig(model=result.model_uri, tasks="none", limit="4", ppl_dataset=str(ppl_text_file),
                                     seqlen=32, tracking_uri=mlflow_uri, experiment="test-finetune", dtype="float32"))
    assert ev.ppl["sample"] == pytest.approx(run.data.metrics["ppl/sample"], rel=1e-6)
    tags = mlflow_client(mlflow_uri).get_run(ev.run_id).data.tags
    assert tags["mlproject.upstream_run"] == result.run_id and tags["mlproject.base_model"] == str(tiny_dirs["llama"])


def test_sft_adapter_is_an_mlflow_transformers_model(sft_run, tiny_dirs):
    """The adapter is logged as an MLflow model (transformers flavor, PEFT adapter on its base), so
    mlflow.transformers.load_model gives the same model as the loader every step uses."""
    import mlflow
    from peft import PeftModel

    result, run, _ = sft_run
    model = tracking.logged_model(result.run_id)
    assert model is not None and model.name == "model" and str(model.status) in ("READY", "LoggedModelStatus.READY")
    flavor = mlflow.models.get_model_info(result.model_uri).flavors["transformers"]
    assert flavor["peft_adaptor"] == "." and flavor["local_base_model_path"] == str(tiny_dirs["llama"])
    parts = mlflow.transformers.load_model(result.model_uri, return_type="components")
    assert isinstance(parts["model"], PeftModel)
    tok = parts["tokenizer"]
    assert torch.equal(logits(parts["model"].eval(), tok), logits(reload(result.model_uri).model, tok))
    assert "**finetune · " in run.data.tags["mlflow.note.content"]
    training = [d for d in run.inputs.dataset_inputs if {"mlflow.data.context": "training"}.items()
                <= {t.key: t.value for t in d.tags}.items()]
    assert [d.dataset.name for d in training] == [f"{run.data.params['dataset']} (16 rows)"]


def test_dpo_continues_the_sft_adapter_and_merges(sft_run, data, mlflow_uri, tiny_dirs, tmp_path):
    """mlflow run . -e finetune -P model=runs:/<sft_run>/model -P method=dpo -P merge=true"""
    from transformers import AutoModelForCausalLM

    sft, _, _ = sft_run
    result = finetune.run(ft_config(mlflow_uri, sft.model_uri, data["dpo"], tmp_path, method="dpo", max_steps=3,
                                    beta=0.1, merge=True, eval_after=False))
    client = mlflow_client(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlproject.upstream_run"] == sft.run_id and run.data.tags["mlproject.method"] == "dpo"
    assert run.data.params["continued_adapter"] == "True"
    for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/rewards/chosen"):
        assert [s for s, _ in history(client, result.run_id, key)] == [1, 2, 3], key
    first = history(client, result.run_id, "train/loss")[0][1]
    assert first == pytest.approx(math.log(2), abs=1e-4)  # policy == reference (the SFT model) at step 1

    # merge=true: `model` holds full weights, `adapter` the adapter (over the SFT input's base).
    model_dir = tracking.download(result.model_uri)
    assert (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").exists()
    adapter_meta = json.loads((tracking.download(f"runs:/{result.run_id}/adapter") / "mlproject_model.json").read_text())
    assert adapter_meta["kind"] == "adapter" and adapter_meta["base"] == str(tiny_dirs["llama"])
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = reload(sft.model_uri).tokenizer
    expected = logits(result.model, tok)
    assert torch.allclose(logits(merged, tok), expected, atol=1e-5)
    assert torch.allclose(logits(reload(f"runs:/{result.run_id}/adapter").model, tok), expected, atol=1e-5)
    assert not torch.allclose(logits(reload(sft.model_uri).model, tok), expected, atol=1e-4)  # DPO moved it


def test_qlora_adapter_reloads_on_a_requantized_base(mlflow_uri, tiny_dirs, data, ppl_text_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = finetune.run(ft_config(mlflow_uri, tiny_dirs["qwen2"], data["sft"], tmp_path, finetuning="qlora",
                                    max_steps=3, ppl_dataset=str(ppl_text_file)))
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlproject.finetuning"] == "qlora"
    m = run.data.metrics
    assert 0 < m["trainable_params"] < m["total_params"] and math.isfinite(m["train/final_loss"])
    meta = json.loads((tracking.download(result.model_uri) / "mlproject_model.json").read_text())
    assert meta["quantization"] == "nf4" and meta["kind"] == "adapter"

    loaded = reload(result.model_uri)
    assert loaded.model.get_base_model().is_loaded_in_4bit  # the loader honoured quantization: nf4
    assert torch.equal(logits(loaded.model, loaded.tokenizer), logits(result.model, loaded.tokenizer))
    ev = evaluate.run(EvaluateConfig(model=result.model_uri, tasks="none", ppl_dataset=str(ppl_text_file),
                                     seqlen=32, tracking_uri=mlflow_uri, experiment="test-finetune", dtype="float32"))
    assert ev.ppl["sample"] == pytest.approx(m["ppl/sample"], rel=1e-6)


def test_nan_loss_fails_the_run_with_the_message(mlflow_uri, tiny_dirs, data, tmp_path):
    with pytest.raises(TrainingDiverged):
        finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], data["sft"], tmp_path, lr=1e30, max_steps=6,
                               experiment="test-finetune-nan"))
    client = mlflow_client(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test-finetune-nan").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["mlproject.error"].startswith("TrainingDiverged: training diverged:")
    curve = history(client, run.info.run_id, "train/loss") + history(client, run.info.run_id, "train/grad_norm")
    assert any(not math.isfinite(v) for _, v in curve)  # the diverged step is in the run
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert tracking.logged_model(run.info.run_id) is None  # nor an MLflow model


def test_nan_loss_through_the_cli_is_one_line_and_exit_1(mlflow_uri, tiny_dirs, data, tmp_path, capsys):
    from mlproject import cli

    rc = cli.main(["finetune", "--model", str(tiny_dirs["llama"]), "--dataset", str(data["sft"]),
                   "--lr", "1e30", "--max-steps", "4", "--train-batch-size", "2", "--tasks", "none",
                   "--ppl-dataset", "none", "--eval-after", "false", "--output-dir", str(tmp_path / "ckpt"),
                   "--tracking-uri", mlflow_uri, "--experiment", "test-finetune-nan-cli"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: training diverged")
    assert not any(line.startswith("Traceback") for line in err)


class Crash:
    """A TrainerCallback that dies as step ``at + 1`` begins (after step ``at`` was logged)."""

    def __new__(cls, at):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == at:
                    raise RuntimeError("simulated crash")

        return _Crash()


def test_resume_continues_the_same_run_without_duplicate_steps(mlflow_uri, tiny_dirs, data, ppl_text_file,
                                                               tmp_path):
    kw = dict(max_steps=6, save_steps=2, eval_before=True, ppl_dataset=str(ppl_text_file),
              experiment="test-finetune-resume")
    # Dies after step 5: checkpoint-4 is on disk, step 5 already logged.
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], data["sft"], tmp_path, **kw), callbacks=[Crash(5)])
    client = mlflow_client(mlflow_uri)
    (crashed,) = client.search_runs([client.get_experiment_by_name("test-finetune-resume").experiment_id])
    run_id = crashed.info.run_id
    assert crashed.info.status == "FAILED" and (tmp_path / "ckpt" / "checkpoint-4").is_dir()
    assert (tmp_path / "ckpt" / finetune.RUN_ID_FILE).read_text().strip() == run_id
    assert [s for s, _ in history(client, run_id, "train/loss")] == [1, 2, 3, 4, 5]

    result = finetune.run(ft_config(mlflow_uri, tiny_dirs["llama"], data["sft"], tmp_path, resume=True, **kw))
    assert result.run_id == run_id and result.details["global_step"] == 6
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "mlproject.error" not in run.data.tags
    assert run.data.tags["mlproject.resumed_after_step"] == "5"
    assert [s for s, _ in history(client, run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert len(history(client, run_id, "before/ppl/sample")) == 1  # the input was not evaluated again
    assert run.data.metrics["delta/ppl/sample"] == pytest.approx(
        run.data.metrics["ppl/sample"] - run.data.metrics["before/ppl/sample"])
    assert len(client.search_runs([crashed.info.experiment_id])) == 1


BAD = [
    (["--dataset", "{bad}"], "missing column(s) prompt, completion; found question, answer"),
    (["--method", "dpo", "--dataset", "{sft}"], "missing column(s) chosen, rejected"),
    (["--method", "bogus"], "bogus"),
    (["--finetuning", "dora"], "dora"),
    (["--adapter", "mistral"], "mistral"),
    (["--lora-r", "0"], "lora_r"),
    (["--lr", "-1"], "lr"),
    (["--max-steps", "0"], "max_steps"),
    (["--lora-dropout", "1.5"], "lora_dropout"),
    (["--chat-template", "sometimes"], "sometimes"),
    (["--dataset", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--dataset", "offline:unknown"], "unknown"),
    (["--tasks", "mlp_nonce,boolqq"], "boolqq"),
    (["--batch-size", "0"], "batch_size"),
    (["--train-batch-size", "0"], "train_batch_size"),
    (["--model", "mistrall"], "mistrall"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_before_any_run_or_weights(argv, needle, mlflow_uri, tiny_dirs, data, capsys,
                                                     monkeypatch, tmp_path):
    exp = "bad-ft-" + "-".join(a.strip("-/") for a in argv)[:50]
    argv = [a.format(**{k: str(v) for k, v in data.items()}) for a in argv]
    assert_bad_input(["finetune", "--model", str(tiny_dirs["llama"]), "--dataset", str(data["sft"]),
                      "--max-steps", "2", "--output-dir", str(tmp_path / "ckpt"), *argv], needle, mlflow_uri, exp,
                     capsys, monkeypatch)
    assert not (tmp_path / "ckpt").exists()


def test_resume_of_a_folder_from_another_server_is_refused(mlflow_uri, tiny_dirs, data, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / finetune.RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    rc = cli.main(["finetune", "--model", str(tiny_dirs["llama"]), "--dataset", str(data["sft"]), "--resume",
                   "--output-dir", str(tmp_path / "ckpt"), "--tracking-uri", mlflow_uri])
    assert rc == 2 and "0123456789abcdef0123456789abcdef" in capsys.readouterr().err.strip().splitlines()[-1]


def test_deltas_cover_ppl_avg_acc_and_each_tasks_preferred_metric():
    before = {"ppl/wt": 20.0, "nll/wt": 3.0, "avg_acc": 0.5, "boolq/acc": 0.6, "piqa/acc_norm": 0.7, "piqa/acc": 0.1}
    after = {"ppl/wt": 18.0, "nll/wt": 2.9, "avg_acc": 0.55, "boolq/acc": 0.65, "piqa/acc_norm": 0.72, "piqa/acc": 0.2}
    got = finetune.deltas(before, after, {"boolq": "acc", "piqa": "acc_norm"})
    assert got == pytest.approx({"delta/ppl/wt": -2.0, "delta/avg_acc": 0.05, "delta/boolq/acc": 0.05,
                                 "delta/piqa/acc_norm": 0.02})


def test_default_checkpoint_folder_is_stable_and_ignores_the_length_of_training():
    ref = resolve("smollm2")
    a = finetune.checkpoint_dir(FinetuneStepConfig(max_steps=10), ref)
    assert a == finetune.checkpoint_dir(FinetuneStepConfig(max_steps=60, resume=True), ref)
    assert a != finetune.checkpoint_dir(FinetuneStepConfig(max_steps=10, lr=1e-3), ref)
    assert a.parent == finetune.DEFAULT_OUTPUT_ROOT and a.name.startswith("smollm2-")


def test_columns_are_read_without_loading_the_file(tmp_path):
    import pandas as pd

    from mlproject.errors import UserError
    from mlproject.training.datasets import peek_columns, validate_columns

    frame = pd.DataFrame({"instruction": ["a"], "output": ["b"]})
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}])
    assert peek_columns(str(tmp_path / "d.parquet")) == ["instruction", "output"]
    assert peek_columns(str(tmp_path / "d.csv")) == ["instruction", "output"]
    assert validate_columns(peek_columns(str(tmp_path / "d.csv")), "sft") == "instruction"
    with pytest.raises(UserError, match="missing column.s. rejected"):
        validate_columns(peek_columns(str(tmp_path / "d.jsonl")), "dpo")
    assert peek_columns("trl-lib/ultrafeedback_binarized") is None  # a hub id needs a real load
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        peek_columns(str(tmp_path / "empty.jsonl"))


def test_step_run_reopens_a_run_and_points_the_launcher_run_at_it(mlflow_uri, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    client = mlflow_client(mlflow_uri)
    exp_id = client.create_experiment("t-reopen")
    old = client.create_run(exp_id)
    client.set_terminated(old.info.run_id, "FAILED")
    launcher = client.create_run(exp_id)  # what `mlflow run -P resume=true` creates
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    with tracking.step_run("finetune", run_id=old.info.run_id, log_env=False) as run:
        assert run.run_id == old.info.run_id
        run.log_metric_steps([(1, {"train/loss": 2.0}, None), (2, {"train/loss": 1.0}, None)])
    assert client.get_run(old.info.run_id).info.status == "FINISHED"
    assert client.get_run(launcher.info.run_id).data.tags["mlproject.continued_in"] == old.info.run_id
    assert tracking.last_metric_step(old.info.run_id, "train/loss") == 2
    assert tracking.last_metric_step(old.info.run_id, "train/nothing") == 0
