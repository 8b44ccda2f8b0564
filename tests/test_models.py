import pytest

from mlproject.errors import UserError
from mlproject.models import loading
from mlproject.models.reference import known_aliases, resolve


def test_alias_table_has_the_study_families():
    for alias, hf in [("mistral", "mistralai/Mistral-7B-v0.3"), ("llama-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
                      ("qwen", "Qwen/Qwen2.5-7B"), ("qwen-instruct", "Qwen/Qwen2.5-7B-Instruct")]:
        ref = resolve(alias)
        assert ref.kind == "alias" and ref.target == hf and ref.family
    assert resolve("smollm2").gguf is not None
    assert {"mistral", "mistral-instruct", "llama", "llama-instruct", "qwen", "qwen-instruct", "smollm2"} <= set(known_aliases())


def test_reference_forms(tmp_path, tiny_dirs):
    assert resolve("org/some-model").kind == "hub"
    assert resolve(str(tiny_dirs["llama"])).kind == "local"
    r = resolve("runs:/0123456789abcdef0123456789abcdef/model")
    assert r.kind == "run" and r.run_id == "0123456789abcdef0123456789abcdef"
    assert resolve("models:/mymodel@best_acc").kind == "registry"
    assert resolve("models:/mymodel/3").kind == "registry"


@pytest.mark.parametrize("bad,needle", [
    ("mistrall", "mistrall"), ("", "empty"), ("runs:/xyz", "runs:/xyz"), ("models:/nover", "models:/nover"),
    ("./no/such/dir", "./no/such/dir"),
])
def test_bad_references_name_the_value(bad, needle):
    with pytest.raises(UserError, match=needle.replace("/", ".")):
        resolve(bad)


def test_unknown_alias_lists_known(tmp_path):
    with pytest.raises(UserError, match="known aliases: .*mistral"):
        resolve("gpt5")


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        resolve(str(tmp_path))


def test_load_local_dir_and_extra_adapter(tmp_path, tiny_dirs):
    import torch
    from peft import LoraConfig, get_peft_model

    loaded = loading.load_model(resolve(str(tiny_dirs["mistral"])), dtype="float32", device="cpu")
    assert loaded.model.dtype == torch.float32 and loaded.tokenizer.pad_token is not None
    # An adapter with non-zero B changes the logits; loading it on top reproduces them.
    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    again = loading.load_model(resolve(str(tiny_dirs["mistral"])), device="cpu", adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        got = again.model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert again.adapter == str(tmp_path / "adapter")


def test_dtype_and_device_choices():
    assert str(loading.pick_dtype("auto", "cpu")) == "torch.float32"
    with pytest.raises(UserError, match="float8"):
        loading.pick_dtype("float8", "cpu")
    with pytest.raises(UserError, match="tpu"):
        loading.pick_device("tpu")
