"""Shared fixtures: the bundled SmolLM2 model, and tiny models built from a config.

Nothing here touches the network: the Hub is switched off for the whole session.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from sdpo.models.model_loading import (
    DEFAULT_CPU_MODEL,
    load_tokenizer,
    resolve_model_path,
)

FIXTURES = Path(__file__).parent / "fixtures"

# OMP_NUM_THREADS wins, so parallel jobs on the 2-core machine can take one core each.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    """Folder of the converted bundled SmolLM2-135M-Instruct (converted once per machine)."""
    return resolve_model_path(DEFAULT_CPU_MODEL)


@pytest.fixture(scope="session")
def chat_tokenizer(bundled_model_path):
    """SmolLM2's ChatML tokenizer, left padding, pad = eos."""
    return load_tokenizer(bundled_model_path)


def build_tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A 2-layer Llama with the chat tokenizer's vocabulary, random weights (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Large init so the random model's distributions depend on the context (signals not ~0).
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, chat_tokenizer) -> str:
    """A tiny Llama + the chat tokenizer saved as a normal HF folder, loadable by path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(chat_tokenizer).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def tiny_model(chat_tokenizer):
    return build_tiny_llama(chat_tokenizer)


# Prompts for the online-loop tests: six training prompts, three held out.
PROMPTS = [
    "Explain what a hash map is.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is the difference between a list and a tuple in Python?",
    "How do I boil an egg?",
]


@pytest.fixture()
def prompt_files(tmp_path):
    """train.jsonl (PROMPTS) and validation.jsonl (the first three, asked briefly) in a temporary folder."""
    train, val = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    val.write_text("".join(json.dumps({"prompt": p + " Be brief."}) + "\n" for p in PROMPTS[:3]))
    return train, val
