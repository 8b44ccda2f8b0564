"""Tiny random models and an offline tokenizer for tests (built in well under a second)."""

from __future__ import annotations

import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS = ("llama", "mistral", "qwen2")

# Training rows the tiny tokenizer covers, for SFT (prompt/completion) and DPO (preferences).
SFT_ROWS = [
    {"prompt": "the quick", "completion": " fox"},
    {"prompt": "the lazy", "completion": " dog"},
    {"prompt": "capital of France is", "completion": " Paris"},
    {"prompt": "yes or", "completion": " no"},
]
DPO_ROWS = [
    {"prompt": "the quick brown", "chosen": " fox", "rejected": " dog"},
    {"prompt": "capital of France is", "chosen": " Paris", "rejected": " no"},
]


def corpus() -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "answer", "question",
             "capital", "of", "is", "yes", "no", "true", "false", "Paris", "France"]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines.append(string.ascii_letters + string.digits + string.punctuation)
    return lines * 4


def make_tokenizer():
    """A byte-level BPE tokenizer trained in-process: offline, deterministic, ~300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, vocab_size: int = 320, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(**common)


def make_model(arch: str = "llama", seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **overrides))
    model.eval()
    return model


def save_tiny(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer as a normal Hugging Face directory."""
    model = make_model(arch, seed, **overrides)
    tok = make_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 directory: an architecture the compression steps must refuse cleanly."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
