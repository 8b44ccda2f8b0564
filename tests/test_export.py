"""`mlproject export` and search winners registered as real weights, on tiny models and a real
`mlflow server`: the folder loads with transformers alone and gives the logits mlproject's own
loading gives; it keeps the lineage root's dtype (bf16 stays bf16 on CPU); a LoRA adapter is
merged; shards follow --max-shard-size; bad input is one line and exit 2 before any load; a
search's winner downloaded from models:/<study>@best_acc loads with from_pretrained in a
process that cannot import mlproject."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import mlflow_client, subprocess_env

torch = pytest.importorskip("torch")

from mlproject import cli, tracking  # noqa: E402
from mlproject.config import FinetuneStepConfig, QuantizeConfig  # noqa: E402
from mlproject.models import loading  # noqa: E402
from mlproject.models.reference import resolve  # noqa: E402
from mlproject.steps import finetune, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = "the quick brown fox jumps over the lazy dog"
# Steps and exports on the CPU: the logits compared below come from one device.
DEVICE = "cpu"


def logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def standalone(folder):
    """The folder as a user without mlproject loads it: transformers only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def reference(uri, dtype):
    return loading.load_model(resolve(str(uri)), dtype=dtype, device=DEVICE, fetch=tracking.download)


def export(*argv, uri=None):
    return cli.main(["export", *map(str, argv), *(["--tracking-uri", uri] if uri else [])])


def safetensors_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {str(st.get_tensor(k).dtype).removeprefix("torch.") for k in st.keys()}
    return out


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu()), k


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny Llama checkpoint stored in bfloat16 (a hub model's usual dtype)."""
    path = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    model = tiny.make_model("llama", seed=3)
    model.to(torch.bfloat16).save_pretrained(path)
    tiny.make_tokenizer().save_pretrained(path)
    assert json.loads((path / "config.json").read_text()).get("dtype") == "bfloat16"
    return path


@pytest.fixture(scope="module")
def rtn_run(mlflow_uri, bf16_dir, ppl_text_file):
    """quantize method=rtn on the bf16 checkpoint, on CPU: the step works in float32 there."""
    cfg = QuantizeConfig(model=str(bf16_dir), method="rtn", w_bits=4, granularity="per_channel", evaluate=False,
                         tasks="none", ppl_dataset=str(ppl_text_file), seqlen=32, device=DEVICE,
                         tracking_uri=mlflow_uri, experiment="test-export")
    return quantize.run(cfg)


@pytest.fixture(scope="module")
def lora_run(mlflow_uri, tiny_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.SFT_ROWS * 4))
    cfg = FinetuneStepConfig(model=str(tiny_dirs["llama"]), dataset=str(data), max_steps=3, train_batch_size=2,
                             lr=5e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, tasks="none", ppl_dataset="none",
                             seqlen=32, batch_size="8", output_dir=str(tmp_path_factory.mktemp("ckpt")),
                             dtype="float32", device=DEVICE, eval_after=False, tracking_uri=mlflow_uri,
                             experiment="test-export")
    return finetune.run(cfg)


# --------------------------------------------------------------------------- the command
def test_a_local_checkpoint_exports_to_the_same_logits(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert export(tiny_dirs["llama"], out) == 0
    assert str(out) in capsys.readouterr().out
    model, tok = standalone(out)
    ref = reference(tiny_dirs["llama"], "float32")
    assert torch.equal(logits(model, tok), logits(ref.model, ref.tokenizer))
    assert (out / "model.safetensors").is_file() and not (out / "MLmodel").exists()
    lineage = json.loads((out / "config.json").read_text())["mlproject_lineage"]
    assert lineage["exported"] == str(tiny_dirs["llama"]) and lineage["root"] == str(tiny_dirs["llama"])
    assert lineage["dtype"] == lineage["root_dtype"] == "float32" and lineage["mlproject_version"]
    assert [n["kind"] for n in lineage["chain"]] == ["weights"]


def test_a_run_keeps_the_root_dtype_and_its_lineage(rtn_run, bf16_dir, mlflow_uri, tmp_path):
    """The quantize run worked in float32 on CPU; the export is bf16, as its root checkpoint is."""
    out = tmp_path / "rtn"
    assert export(rtn_run.model_uri, out, uri=mlflow_uri) == 0
    assert safetensors_dtypes(out) == {"bfloat16"}
    model, tok = standalone(out)
    assert model.dtype == torch.bfloat16
    ref = reference(rtn_run.model_uri, "bfloat16")  # re-made in float32, then cast
    assert ref.model.dtype == torch.bfloat16
    assert_same_weights(model, ref.model)
    # (a model cast to bf16 also casts its float32 rotary buffer: logits differ at bf16 precision)
    assert torch.allclose(logits(model, tok), logits(ref.model, ref.tokenizer), atol=2e-2)
    base = reference(bf16_dir, "bfloat16")
    assert not torch.equal(logits(model, tok), logits(base.model, base.tokenizer))  # quantized, not the base
    lineage = json.loads((out / "config.json").read_text())["mlproject_lineage"]
    assert lineage["exported"] == rtn_run.model_uri and lineage["root"] == str(bf16_dir)
    assert lineage["root_dtype"] == lineage["dtype"] == "bfloat16"
    assert lineage["upstream_runs"] == [rtn_run.run_id] and lineage["base_model"] == str(bf16_dir)
    assert lineage["chain"][0]["ref"] == rtn_run.model_uri and lineage["chain"][-1]["ref"] == str(bf16_dir)
    # asked for, float32 is written
    assert export(rtn_run.model_uri, tmp_path / "f32", "--dtype", "float32", uri=mlflow_uri) == 0
    assert safetensors_dtypes(tmp_path / "f32") == {"float32"}


def test_a_lora_adapter_is_merged_into_its_base(lora_run, tiny_dirs, mlflow_uri, tmp_path):
    out = tmp_path / "merged"
    assert export(lora_run.model_uri, out, uri=mlflow_uri) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    model, tok = standalone(out)
    assert not hasattr(model, "peft_config")  # a plain transformers model
    ref = reference(lora_run.model_uri, "float32")
    assert hasattr(ref.model, "peft_config")  # mlproject loads the adapter on its base, unmerged
    got, want = logits(model, tok), logits(ref.model, ref.tokenizer)
    assert torch.allclose(got, want, atol=1e-5)
    base = reference(tiny_dirs["llama"], "float32")
    assert (got - logits(base.model, base.tokenizer)).abs().max() > 1e-3  # the adapter's change is in the weights
    lineage = json.loads((out / "config.json").read_text())["mlproject_lineage"]
    assert lineage["merged_adapter"] is True and lineage["dtype"] == "float32"
    assert [n["kind"] for n in lineage["chain"]] == ["adapter", "weights"]
    assert lineage["upstream_runs"] == [lora_run.run_id]


def test_a_small_max_shard_size_writes_several_shards_and_an_index(bf16_dir, tmp_path):
    out = tmp_path / "shards"
    assert export(bf16_dir, out, "--max-shard-size", "60KB") == 0
    shards = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    model, tok = standalone(out)
    ref = reference(bf16_dir, "bfloat16")
    assert torch.equal(logits(model, tok), logits(ref.model, ref.tokenizer))


def test_force_replaces_a_folder(bf16_dir, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert export(bf16_dir, out, "--force") == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


@pytest.fixture
def no_loading(monkeypatch):
    def must_not_load(*a, **k):
        raise AssertionError("weights loaded despite bad input")

    monkeypatch.setattr(loading, "load_model", must_not_load)


def nonuniform_dir(tmp_path, tiny_dirs):
    import shutil

    path = tmp_path / "nonuniform"
    shutil.copytree(tiny_dirs["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["pruned_layer_sizes"] = [{"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
                                    {"intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}]
    (path / "config.json").write_text(json.dumps(config))
    return path


def crafted_dir(tmp_path, tiny_dirs, case):
    """A folder as a step would have logged it, whose export must be refused."""
    import shutil

    path = tmp_path / case
    if case == "hqq":
        shutil.copytree(tiny_dirs["llama"], path)
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
        (path / "config.json").write_text(json.dumps(config))
    else:  # a QLoRA adapter: trained on the NF4-quantized base
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_dirs["llama"]),
                                                              "peft_type": "LORA"}))
        loading.write_meta(path, kind="adapter", base=str(tiny_dirs["llama"]), quantization="nf4")
    return path


@pytest.mark.parametrize("case", ["unknown", "not-empty", "shard", "run", "nonuniform", "hqq", "qlora", "dtype"])
def test_bad_input_is_one_line_and_exit_2_before_loading(case, tiny_dirs, tmp_path, mlflow_uri, capsys, no_loading):
    out = tmp_path / "out"
    argv, needle = {
        "unknown": (["no-such-model", out], "unknown model 'no-such-model'"),
        "not-empty": ([tiny_dirs["llama"], tmp_path], "exists and is not empty; use --force"),
        "shard": ([tiny_dirs["llama"], out, "--max-shard-size", "5 parsecs"], "max shard size"),
        "run": (["runs:/0123456789abcdef0123456789abcdef/model", out, "--tracking-uri", mlflow_uri], "not found"),
        "nonuniform": ([nonuniform_dir(tmp_path, tiny_dirs), out], "non-uniformly pruned"),
        "hqq": ([crafted_dir(tmp_path, tiny_dirs, "hqq"), out], "hqq checkpoint that only its library's own loader"),
        "qlora": ([crafted_dir(tmp_path, tiny_dirs, "qlora"), out], "QLoRA adapter"),
        "dtype": ([tiny_dirs["llama"], out, "--dtype", "int4"], "invalid choice"),
    }[case]
    if case == "dtype":  # argparse's own refusal: exit 2 too
        with pytest.raises(SystemExit) as exc:
            export(*argv)
        assert exc.value.code == 2
    else:
        assert export(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1], err
    if case != "dtype":
        assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()


def test_the_command_records_nothing_on_the_server(rtn_run, mlflow_uri, tmp_path):
    client = mlflow_client(mlflow_uri)
    exp = client.get_experiment_by_name("test-export")
    before = {r.info.run_id: (r.data.tags, r.data.metrics) for r in client.search_runs([exp.experiment_id])}
    models = len(client.search_logged_models([exp.experiment_id]))
    assert export(rtn_run.model_uri, tmp_path / "o", uri=mlflow_uri) == 0
    after = {r.info.run_id: (r.data.tags, r.data.metrics) for r in client.search_runs([exp.experiment_id])}
    assert after == before and len(client.search_logged_models([exp.experiment_id])) == models


# --------------------------------------------------------------------------- search winners
def write_search(tmp_path, tiny_dirs, ppl_text_file) -> Path:
    """A 2-trial study whose target is a LoRA fine-tune (its model: an adapter on the tiny Llama)."""
    pipe = tmp_path / "tinyft.yaml"
    pipe.write_text(textwrap.dedent(f"""\
        name: tinyft
        params:
          model: {tiny_dirs['llama']}
          tasks: mlp_nonce
          ppl_dataset: {ppl_text_file}
          seqlen: 32
          batch_size: 16
          device: {DEVICE}
        steps:
          tuned:
            step: finetune
            dataset: offline:sft_mlp_nonce
            max_steps: 2
            train_batch_size: 2
            lora_r: 4
            lora_alpha: 8
            lora_dropout: 0.0
            eval_after: false
        """))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "tinyft", "pipeline": str(pipe), "target": "tuned",
                                     "params": {"tuned.lr": [0.02, 0.05]}, "objectives": ["best_acc"],
                                     "n_trials": 2, "sampler": {"type": "bruteforce", "seed": 0},
                                     "pruner": {"type": "none"}}, sort_keys=False))
    return space


def search(uri, study, space, storage, *argv):
    return cli.main(["search", str(space), "--tracking-uri", uri, "--experiment", study, "--storage", storage,
                     "--study", study, *map(str, argv)])


FRESH = textwrap.dedent("""\
    import json, sys
    sys.modules["mlproject"] = None  # this process cannot import mlproject
    import mlflow, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path=sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(sys.argv[3], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    print(json.dumps({"dtype": str(model.dtype), "type": type(model).__name__, "logits": out.tolist()}))
    """)


def test_search_winners_are_registered_as_weights(tmp_path, tiny_dirs, ppl_text_file, mlflow_uri):
    space = write_search(tmp_path, tiny_dirs, ppl_text_file)
    assert search(mlflow_uri, "export-winners", space, f"sqlite:///{tmp_path}/optuna.db") == 0
    client = mlflow_client(mlflow_uri)
    mv = client.get_model_version_by_alias("export-winners", "best_acc")
    winner = client.get_run(mv.tags["mlproject.trial_run"])
    model_run = winner.data.tags["mlproject.target_run"]
    weights = tracking.logged_model(model_run, "weights")
    assert weights is not None and mv.source == f"models:/{weights.model_id}"
    assert weights.tags["mlproject.upstream"] == f"runs:/{model_run}/model"

    proc = subprocess.run([sys.executable, "-c", FRESH, "models:/export-winners@best_acc", str(tmp_path / "dl"), TEXT],
                          env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["type"] == "LlamaForCausalLM" and fresh["dtype"] == "torch.float32"
    trial = reference(f"runs:/{model_run}/model", "float32")  # the adapter on its base, as mlproject loads it
    assert hasattr(trial.model, "peft_config")
    want = logits(trial.model, trial.tokenizer)
    assert torch.allclose(torch.tensor(fresh["logits"]), want, atol=1e-5)

    # the same trials, registered as logged: the adapter itself
    assert search(mlflow_uri, "export-as-logged", space, f"sqlite:///{tmp_path}/optuna2.db",
                  "--register-weights", "false") == 0
    mv2 = client.get_model_version_by_alias("export-as-logged", "best_acc")
    run2 = client.get_run(client.get_run(mv2.tags["mlproject.trial_run"]).data.tags["mlproject.target_run"])
    assert mv2.source == f"models:/{tracking.logged_model(run2.info.run_id, 'model').model_id}"


def test_which_winners_get_weights(mlflow_uri, bf16_dir, ppl_text_file, lora_run, rtn_run, tmp_path):
    """A recipe or an adapter is exported once and logged as `weights`; real weights are registered as they are."""
    from mlproject.search import report

    assert report.winner_path(rtn_run.model_uri, "s") == "weights"  # a recipe, re-made
    got = Path(mlflow_client(mlflow_uri).download_artifacts(rtn_run.run_id, "weights", str(tmp_path)))
    model, _ = standalone(got)
    assert model.dtype == torch.bfloat16 and safetensors_dtypes(got) == {"bfloat16"}
    assert_same_weights(model, reference(rtn_run.model_uri, "bfloat16").model)

    cfg = QuantizeConfig(model=str(bf16_dir), method="rtn", w_bits=8, granularity="per_channel", evaluate=False,
                         tasks="none", ppl_dataset=str(ppl_text_file), seqlen=32, device=DEVICE, store="weights",
                         tracking_uri=mlflow_uri, experiment="test-export")
    full = quantize.run(cfg)
    assert report.winner_path(full.model_uri, "s") == "model"
    assert tracking.logged_model(full.run_id, "weights") is None
    # an adapter is exported once: a second winner role on the same run finds its weights
    assert report.winner_path(lora_run.model_uri, "s") == "weights"
    first = tracking.logged_model(lora_run.run_id, "weights")
    assert report.winner_path(lora_run.model_uri, "s") == "weights"
    assert tracking.logged_model(lora_run.run_id, "weights").model_id == first.model_id
    assert report.winner_path(lora_run.model_uri, "s", register_weights=False) == "model"


@pytest.mark.parametrize("store", ["recipe", "weights"])
def test_a_bitsandbytes_model_exports_as_a_bitsandbytes_checkpoint(store, mlflow_uri, tiny_dirs, ppl_text_file,
                                                                   tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = QuantizeConfig(model=str(tiny_dirs["llama"]), method="bnb-nf4", evaluate=False, tasks="none",
                         ppl_dataset=str(ppl_text_file), seqlen=32, device=DEVICE, store=store,
                         tracking_uri=mlflow_uri, experiment="test-export")
    run = quantize.run(cfg)
    out = tmp_path / "nf4"
    assert export(run.model_uri, out, uri=mlflow_uri) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    model, tok = standalone(out)
    from mlproject.compression.bnb import disable_cpu_repacking

    disable_cpu_repacking(model)  # the generic kernel path mlproject's loading takes on CPU: bit-equal
    ref = reference(run.model_uri, "float32")
    assert torch.equal(logits(model, tok), logits(ref.model, ref.tokenizer))
    lineage = config["mlproject_lineage"]
    assert lineage["chain"][0]["kind"] == store and ("copied" in lineage) == (store == "weights")
