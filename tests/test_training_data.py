"""FinetuneConfig validation and training-data loading (no model, no training: well under a second each)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from mlproject.errors import UserError
from mlproject.training import FinetuneConfig, load_training_data, validate_columns
from mlproject.training.datasets import normalize, to_trl_format


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- config ---------------------------------------------------------------------------------

def test_defaults_are_valid():
    cfg = FinetuneConfig()
    assert (cfg.method, cfg.finetuning, cfg.lora_r, cfg.lora_alpha, cfg.lr) == ("sft", "lora", 16, 32, 2e-4)
    assert cfg.max_steps == -1 and cfg.logging_steps == 1 and cfg.target_modules_value == "all-linear"
    assert set(cfg.to_params()) >= {"method", "finetuning", "lora_r", "lr", "beta", "merge", "resume"}


def test_target_modules_comma_list():
    assert FinetuneConfig(target_modules="q_proj, v_proj").target_modules_value == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"method": "ppo"}, "method='ppo'"),
        ({"finetuning": "ia3"}, "finetuning='ia3'"),
        ({"lora_r": 0}, "lora_r=0"),
        ({"lora_alpha": -1}, "lora_alpha=-1"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lr": 0}, "lr=0"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"train_batch_size": 0}, "train_batch_size=0"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"epochs": 0}, "epochs=0"),
        ({"beta": -0.1}, "beta=-0.1"),
        ({"target_modules": "q_proj,,v_proj"}, "target_modules="),
        ({"chat_template": "maybe"}, "chat_template='maybe'"),
    ],
)
def test_bad_config_raises_user_error(kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        FinetuneConfig(**kwargs)


def test_method_and_adapter_case_insensitive():
    cfg = FinetuneConfig(method="DPO", finetuning="QLoRA")
    assert (cfg.method, cfg.finetuning) == ("dpo", "qlora")


# --- columns --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("columns", "method", "fmt"),
    [
        (["prompt", "completion"], "sft", "prompt_completion"),
        (["messages", "id"], "sft", "messages"),
        (["instruction", "input", "output"], "sft", "instruction"),
        (["instruction", "output"], "sft", "instruction"),
        (["text"], "sft", "text"),
        (["prompt", "chosen", "rejected", "score"], "dpo", "preference"),
    ],
)
def test_validate_columns_accepts(columns, method, fmt):
    assert validate_columns(columns, method) == fmt


def test_validate_columns_names_missing_and_found():
    with pytest.raises(UserError) as err:
        validate_columns(["prompt", "chosen"], "dpo")
    msg = str(err.value)
    assert "missing column(s) rejected" in msg and "found prompt, chosen" in msg and "\n" not in msg

    with pytest.raises(UserError) as err:
        validate_columns(["question", "answer"], "sft")
    assert "found question, answer" in str(err.value) and "prompt+completion" in str(err.value)


def test_sft_columns_are_not_enough_for_dpo():
    with pytest.raises(UserError, match="missing column"):
        validate_columns(["prompt", "completion"], "dpo")


def test_validate_columns_bad_method():
    with pytest.raises(UserError, match="method='kto'"):
        validate_columns(["prompt"], "kto")


# --- loading --------------------------------------------------------------------------------

def test_load_jsonl_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b", "meta": 1}] * 3)
    ds = load_training_data(str(path), "sft")
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 3


def test_load_alpaca_layout_maps_to_prompt_completion(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    ds = load_training_data(str(write_jsonl(tmp_path / "alpaca.jsonl", rows)), "sft")
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0] == {"prompt": "Translate\n\nchat", "completion": "cat"}
    assert ds[1] == {"prompt": "Say hi", "completion": "hi"}


def test_load_parquet(tmp_path):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2).to_parquet(str(path))
    assert load_training_data(str(path), "dpo").column_names == ["prompt", "chosen", "rejected"]


def test_load_missing_columns_is_user_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(UserError, match="missing column\\(s\\) rejected; found prompt, chosen"):
        load_training_data(str(path), "dpo")


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_training_data(str(tmp_path / "nope.jsonl"), "sft")


def test_unreachable_hub_id_is_user_error():
    # Offline (conftest sets HF_DATASETS_OFFLINE=1) a hub id cannot resolve: one clear line.
    with pytest.raises(UserError, match="could not load dataset 'no-such-org/no-such-set'"):
        load_training_data("no-such-org/no-such-set", "sft")


def test_non_text_column_is_user_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": 1, "completion": 2}])
    with pytest.raises(UserError, match="column 'prompt' must hold text"):
        load_training_data(str(path), "sft")


def test_offline_prefix(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    fake = types.ModuleType("mlproject.training.data")
    fake.offline_datasets = lambda: {"tiny-pref": path}
    monkeypatch.setitem(sys.modules, "mlproject.training.data", fake)
    assert len(load_training_data("offline:tiny-pref", "dpo")) == 1
    with pytest.raises(UserError, match="unknown offline dataset 'nope'; known: tiny-pref"):
        load_training_data("offline:nope", "dpo")


# --- chat formatting ------------------------------------------------------------------------

def test_chat_template_turns_text_rows_into_turns(tiny_tokenizer):
    import datasets

    ds = normalize(datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]), "dpo")
    conv = to_trl_format(ds, tiny_tokenizer, "auto")
    assert conv[0] == {
        "prompt": [{"role": "user", "content": "p"}],
        "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "r"}],
    }
    assert to_trl_format(ds, tiny_tokenizer, "off")[0] == {"prompt": "p", "chosen": "c", "rejected": "r"}


def test_messages_need_a_chat_template(tiny_tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]}])
    assert to_trl_format(ds, tiny_tokenizer, "auto") is ds
    with pytest.raises(UserError, match="chat template"):
        to_trl_format(ds, tiny_tokenizer, "off")
