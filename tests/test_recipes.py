"""Derived models stored as recipes (models.recipes): quantize (rtn, bnb) and prune log KBs, not
weights; `runs:/<id>/model` re-makes the chain bit for bit and checks its digest, on a real
`mlflow server` and tiny models of several architectures."""

import json
import shutil

import pytest
import torch

import tiny
from conftest import mlflow_client
from mlproject import tracking
from mlproject.compression import prune as prune_lib
from mlproject.compression import rtn
from mlproject.config import FinetuneStepConfig, PruneStepConfig, QuantizeConfig
from mlproject.errors import UserError
from mlproject.models import loading, recipes
from mlproject.models.reference import resolve
from mlproject.steps import finetune, prune, quantize
from mlproject.steps.shared import compress

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXP = "test-recipes"
EVAL = dict(tasks="none", limit="4", batch_size="8", seqlen=32, evaluate="false")
IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))


def run_quantize(uri, model, ppl_file, **kw):
    return quantize.run(QuantizeConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri,
                                       experiment=EXP, dtype="float32", **{**EVAL, **kw}))


def run_prune(uri, model, ppl_file, **kw):
    return prune.run(PruneStepConfig(model=str(model), ppl_dataset=str(ppl_file), tracking_uri=uri,
                                     experiment=EXP, dtype="float32", calibration=str(ppl_file),
                                     calibration_samples=2, calibration_seqlen=16, **{**EVAL, **kw}))


def logits(model):
    with torch.no_grad():
        return model(IDS.to(next(model.parameters()).device)).logits


def load(uri, **kw):
    return loading.load_model(resolve(uri), fetch=tracking.download, **{"dtype": "float32", **kw})


def artifact_files(uri, run_id, path="model"):
    client = mlflow_client(uri)
    out, todo = {}, [path]
    while todo:
        for f in client.list_artifacts(run_id, todo.pop()):
            if f.is_dir:
                todo.append(f.path)
            else:
                out[f.path] = f.file_size
    return out


def assert_recipe(uri, result):
    files = artifact_files(uri, result.run_id)
    assert not any(f.endswith(".safetensors") and "prune_indices" not in f for f in files), files
    assert sum(files.values()) < 64 * 1024, files  # KBs: no weights
    assert mlflow_client(uri).get_run(result.run_id).data.tags["mlproject.store"] == "recipe"


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_an_rtn_recipe_reloads_to_the_same_logits(arch, mlflow_uri, tiny_dirs, ppl_text_file):
    q = run_quantize(mlflow_uri, tiny_dirs[arch], ppl_text_file, w_bits=4, group_size=32)
    assert_recipe(mlflow_uri, q)
    # the in-process result: the same input quantized by the library directly
    ref = loading.load_model(resolve(str(tiny_dirs[arch])), dtype="float32")
    rtn.quantize_model(ref.model, rtn.RTNConfig(w_bits=4, group_size=32))
    back = load(q.model_uri)
    assert torch.equal(logits(back.model), logits(ref.model))
    assert recipes.weights_digest(back.model) == recipes.weights_digest(ref.model)
    assert back.base_model == ref.base_model and back.family == arch


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_a_prune_recipe_reloads_to_the_same_logits(arch, mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    # mistral: 4 layers, the outer ones kept (non-uniform sizes)
    src = tiny.save_tiny(tmp_path / "four", arch, num_hidden_layers=4) if arch == "mistral" else tiny_dirs[arch]
    p = run_prune(mlflow_uri, src, ppl_text_file, ratio=0.2, targets="both",
                  keep_layers=1 if arch == "mistral" else 0)
    assert_recipe(mlflow_uri, p)
    # the in-process result: the same input pruned by the library, on the same calibration windows
    ref = loading.load_model(resolve(str(src)), dtype="float32")
    cfg = PruneStepConfig(ratio=0.2, targets="both", keep_layers=1 if arch == "mistral" else 0,
                          calibration=str(ppl_text_file), calibration_samples=2, calibration_seqlen=16)
    ids = compress.calibration_ids(ref.tokenizer, ppl_text_file.read_text(), 2, 16, cfg.seed)
    prune_lib.prune_model(ref.model, cfg.prune_config(), calibration_ids=ids)
    back = load(p.model_uri)
    assert prune_lib.count_params(back.model) == prune_lib.count_params(ref.model) < 0.85 * tiny_params(arch, 4 if arch == "mistral" else 2)
    assert prune_lib.layer_sizes(back.model) == prune_lib.layer_sizes(ref.model)
    assert torch.equal(logits(back.model), logits(ref.model))


def tiny_params(arch, layers):
    return prune_lib.count_params(tiny.make_model(arch, num_hidden_layers=layers))


def test_prune_indices_stay_small_at_7b():
    """Mistral-7B's kept channel indices (32 layers × 11,468 of 14,336 at ratio 0.2) as stored."""
    kept = {f"layers.{i}.mlp": torch.arange(11468, dtype=torch.int16) for i in range(32)}
    kept.update({f"layers.{i}.kv": torch.arange(7, dtype=torch.int16) for i in range(32)})
    from safetensors.torch import save

    assert len(save(kept)) < 1024**2


def test_pruned_then_quantized_chain_and_bnb(mlflow_uri, tiny_dirs, ppl_text_file):
    p = run_prune(mlflow_uri, tiny_dirs["llama"], ppl_text_file, ratio=0.2)
    q = run_quantize(mlflow_uri, p.model_uri, ppl_text_file, w_bits=4, granularity="per_channel")
    assert_recipe(mlflow_uri, q)
    pruned = load(p.model_uri)
    rtn.quantize_model(pruned.model, rtn.RTNConfig(w_bits=4, granularity="per_channel"))
    back = load(q.model_uri)
    assert torch.equal(logits(back.model), logits(pruned.model))

    nf4 = run_quantize(mlflow_uri, tiny_dirs["llama"], ppl_text_file, method="bnb-nf4")
    assert_recipe(mlflow_uri, nf4)
    a, b = load(nf4.model_uri), load(nf4.model_uri)
    assert type(a.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(a.model), logits(b.model))


def test_prune_lora_quantize_chain(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    p = run_prune(mlflow_uri, tiny_dirs["llama"], ppl_text_file, ratio=0.2)
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in tiny.SFT_ROWS * 4))
    ft = finetune.run(FinetuneStepConfig(
        model=p.model_uri, dataset=str(rows), max_steps=3, train_batch_size=2, lr=1e-2, lora_r=4, lora_alpha=8,
        lora_dropout=0.0, tasks="none", ppl_dataset=str(ppl_text_file), seqlen=32, batch_size="8", limit="4",
        output_dir=str(tmp_path / "ckpt"), tracking_uri=mlflow_uri, experiment=EXP, dtype="float32"))
    q = run_quantize(mlflow_uri, ft.model_uri, ppl_text_file, w_bits=4, granularity="per_channel")
    assert_recipe(mlflow_uri, q)
    merged = loading.load_merged(resolve(ft.model_uri), dtype="float32", device="cpu", fetch=tracking.download)
    rtn.quantize_model(merged.model, rtn.RTNConfig(w_bits=4, granularity="per_channel"))
    back = load(q.model_uri)
    assert torch.equal(logits(back.model), logits(merged.model))


def test_a_tampered_base_or_recipe_fails_with_one_line(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    base = shutil.copytree(tiny_dirs["qwen2"], tmp_path / "base")
    q = run_quantize(mlflow_uri, base, ppl_text_file, w_bits=4, group_size=32)
    folder = shutil.copytree(tracking.download(q.model_uri), tmp_path / "recipe")

    meta = json.loads((folder / "mlproject_model.json").read_text())
    meta["recipe"]["params"]["settings"]["w_bits"] = 3  # a recipe edited by hand
    (folder / "mlproject_model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        loading.load_model(resolve(str(folder)), dtype="float32")
    assert "differ from the recorded ones" in str(err.value) and "\n" not in str(err.value)

    from safetensors.torch import load_file, save_file

    weights = next(base.glob("*.safetensors"))
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("up_proj.weight"))
    state[name] = state[name] * 1.5  # the base changed after the run
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        load(q.model_uri)
    msg = str(err.value)
    assert "\n" not in msg and "differ from the recorded ones" in msg and str(base) in msg, msg


def test_store_weights_still_stores_weights(mlflow_uri, tiny_dirs, ppl_text_file):
    q = run_quantize(mlflow_uri, tiny_dirs["mistral"], ppl_text_file, w_bits=4, group_size=32, store="weights")
    files = artifact_files(mlflow_uri, q.run_id)
    assert any(f.endswith(".safetensors") for f in files)
    assert mlflow_client(mlflow_uri).get_run(q.run_id).data.tags["mlproject.store"] == "weights"
    r = run_quantize(mlflow_uri, tiny_dirs["mistral"], ppl_text_file, w_bits=4, group_size=32)
    assert r.run_id != q.run_id  # store is part of the reuse key: the weights run is not the recipe run
    assert torch.equal(logits(load(q.model_uri).model), logits(load(r.model_uri).model))
    with pytest.raises(UserError, match="store"):
        QuantizeConfig(store="pickle")


def test_a_search_scores_in_memory_one_load_per_trial(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path, monkeypatch):
    """Three trials of prune → RTN: the scorer takes the target's model from memory (no download,
    no load), each trial reads one checkpoint, and when it does no model of an earlier trial is alive."""
    import gc
    import weakref

    from test_search import make_pipeline, search, trial_runs, write_space

    space = write_space(tmp_path, make_pipeline(tmp_path, tiny_dirs, ppl_text_file),
                        {"pruned.ratio": [0.2], "quant.w_bits": [2, 3, 4]}, objectives=["best_ppl"], n_trials=3,
                        sampler={"type": "bruteforce", "seed": 0}, pruner={"type": "none"})
    handed, downloads = [], []

    class Reads(list):
        def append(self, ref):
            gc.collect()
            alive = [w for w in handed if w() is not None]
            assert not alive, f"{len(alive)} model(s) of an earlier step still alive when {ref} is read"
            super().append(ref)

    original_hand_off, original_download = loading.hand_off, tracking.download

    def hand_off(uri, loaded, device):
        handed.append(weakref.ref(loaded.model))
        original_hand_off(uri, loaded, device)

    def download(uri):
        downloads.append(uri)
        return original_download(uri)

    monkeypatch.setattr(loading, "LOADS", Reads())
    monkeypatch.setattr(loading, "hand_off", hand_off)
    monkeypatch.setattr(tracking, "download", download)
    assert search(mlflow_uri, "recipes-search", space, f"sqlite:///{tmp_path}/optuna.db",
                  "--register-weights", "false") == 0
    trials = trial_runs(mlflow_uri, "recipes-search")
    assert sorted(trials) == [0, 1, 2] and all(t.data.tags["mlproject.trial_state"] == "COMPLETE"
                                                 for t in trials.values())
    assert list(loading.LOADS) == [str(tiny_dirs["llama"])] * 3  # one checkpoint read per trial
    quant_runs = {t.data.tags["mlproject.target_run"] for t in trials.values()}
    assert not [u for u in downloads if any(r in u for r in quant_runs)]  # targets scored without a download
    gc.collect()
    assert all(w() is None for w in handed)  # nothing outlives the search


def test_a_hand_off_nobody_takes_is_freed_before_the_next_load(tiny_dirs):
    import gc
    import weakref

    first = loading.load_model(resolve(str(tiny_dirs["llama"])), dtype="float32")
    loading.hand_off("runs:/0123456789abcdef0123456789abcdef/model", first, "cpu")
    gone = weakref.ref(first.model)
    del first
    gc.collect()
    assert gone() is not None  # held by the hand-off
    other = loading.load_model(resolve(str(tiny_dirs["qwen2"])), dtype="float32")
    gc.collect()
    assert gone() is None and other.family == "qwen2"  # let go before the qwen2 weights were read
    # taken once, then gone: a second load of the same URI cannot get the model its first taker changed
    loading.hand_off("runs:/0123456789abcdef0123456789abcdef/model", other, "cpu")
    assert loading.take_handoff("runs:/0123456789abcdef0123456789abcdef/model", "cpu") is other
    assert loading.take_handoff("runs:/0123456789abcdef0123456789abcdef/model", "cpu") is None
