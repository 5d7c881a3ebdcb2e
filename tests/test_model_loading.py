"""One loader for the project: bundled alias, local folders, Hub ids (offline here), clear errors."""

import pytest
import torch

from sdpo.models.generation import SamplingParams, encode_chat, generate
from sdpo.models.model_loading import (
    ModelLoadError,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)


@pytest.mark.slow
def test_embedded_model_loads_offline_from_the_converted_cache(bundled_model_path):
    assert resolve_model_path("smollm2-135m-instruct") == bundled_model_path
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert model.dtype == torch.bfloat16
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Say hi."}])
    out = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    assert out.text.strip()


def test_local_folder_loads_like_any_hf_model(tiny_model_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_path, dtype="float32", device="cpu")
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token_id is not None


def test_missing_local_path_fails_in_one_line():
    with pytest.raises(ModelLoadError) as error:
        load_model_and_tokenizer("./no/such/model")
    message = str(error.value)
    assert "\n" not in message and "does not exist" in message and "no/such/model" in message


def test_unreachable_hub_id_says_what_was_tried_and_what_to_do():
    with pytest.raises(ModelLoadError) as error:
        load_tokenizer("Qwen/Qwen3-8B")
    message = str(error.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message and "smollm2-135m-instruct" in message and "To fix" in message


def test_folder_without_weights_is_reported(tmp_path, chat_tokenizer):
    chat_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="exists but could not be loaded"):
        load_model_and_tokenizer(str(tmp_path), device="cpu")


def test_dtype_and_device_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_greedy_generation_is_the_same_batched_and_one_by_one(tiny_model, chat_tokenizer):
    prompts = ["Hi", "Tell me a long story about a dragon and a knight.", "Why?"]
    contexts = [encode_chat(chat_tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    batched = generate(tiny_model, chat_tokenizer, contexts, greedy, batch_size=3)
    for context, together in zip(contexts, batched):
        alone = generate(tiny_model, chat_tokenizer, [context], greedy)[0]
        assert alone.token_ids == together.token_ids


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=1, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    config = SamplingParams(max_new_tokens=3, temperature=0.7).to_generation_config([2], 2)
    assert config.do_sample and config.top_k == 0 and config.top_p == 1.0 and config.temperature == 0.7


def test_chat_template_is_required(chat_tokenizer):
    from copy import deepcopy

    plain = deepcopy(chat_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(plain, [{"role": "user", "content": "x"}])


def test_auto_dtype_is_bfloat16_only_where_computed_natively(monkeypatch):
    from sdpo.models.model_loading import concrete_dtype

    assert concrete_dtype("float32", "cpu") == "float32" and concrete_dtype("bfloat16", "cpu") == "bfloat16"
    from sdpo.models import model_loading

    monkeypatch.setattr(model_loading, "cpu_has_native_bf16", lambda: False)
    assert concrete_dtype("auto", "cpu") == "float32"  # AVX2-only: bf16 would be emulated
    monkeypatch.setattr(model_loading, "cpu_has_native_bf16", lambda: True)
    assert concrete_dtype("auto", "cpu") == "bfloat16"
