"""The generation-only inference copy (sdpo.models.generation.InferenceCopy) against the training model it mirrors."""

import pytest
import torch

from sdpo.models.generation import InferenceCopy, SamplingParams, encode_chat, generate
from tests.conftest import build_tiny_llama

PROMPTS = ["Name a colour.", "Write one line about the sea.", "Count to five."]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


def _contexts(tokenizer):
    return [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


def _token_ids(model, tokenizer, autocast_dtype):
    return [
        g.token_ids for g in generate(model, tokenizer, _contexts(tokenizer), GREEDY, autocast_dtype=autocast_dtype)
    ]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def test_bf16_copy_of_fp32_master_weights_generates_the_same_greedy_tokens(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer)
    twin = InferenceCopy(model, torch.bfloat16)
    assert twin.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (
        twin.model.lm_head.weight.dtype == torch.bfloat16
        and twin.model.get_input_embeddings().weight is model.get_input_embeddings().weight
    )
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.get_input_embeddings().weight
    assert _token_ids(twin.model, chat_tokenizer, torch.bfloat16) == _token_ids(model, chat_tokenizer, torch.bfloat16)


def test_refresh_follows_an_update_of_the_training_weights(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer)
    twin = InferenceCopy(model, torch.bfloat16)
    before = _token_ids(twin.model, chat_tokenizer, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert _token_ids(twin.model, chat_tokenizer, torch.bfloat16) != _token_ids(model, chat_tokenizer, torch.bfloat16)
    twin.refresh()
    after = _token_ids(twin.model, chat_tokenizer, torch.bfloat16)
    assert after == _token_ids(model, chat_tokenizer, torch.bfloat16) and after != before


def test_lora_copy_is_the_merged_model(chat_tokenizer):
    model = _lora(build_tiny_llama(chat_tokenizer))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    twin = InferenceCopy(model, torch.float32)
    assert not any("lora" in name for name, _ in twin.model.named_parameters())
    assert any("lora" in name for name, _ in model.named_parameters())  # the training model keeps its adapters
    ids = torch.tensor(_contexts(chat_tokenizer)[:1])
    with torch.no_grad():
        torch.testing.assert_close(twin.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert _token_ids(twin.model, chat_tokenizer, None) == _token_ids(model, chat_tokenizer, None)


def test_bf16_lora_base_generates_the_same_greedy_tokens_before_training(chat_tokenizer):
    model = _lora(build_tiny_llama(chat_tokenizer).to(torch.bfloat16))
    twin = InferenceCopy(model, torch.bfloat16)
    assert _token_ids(twin.model, chat_tokenizer, torch.bfloat16) == _token_ids(model, chat_tokenizer, torch.bfloat16)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_leaves_the_training_model_in_training_mode(chat_tokenizer, temperature):
    model = build_tiny_llama(chat_tokenizer).train()
    twin = InferenceCopy(model, torch.bfloat16)
    sampling = SamplingParams(max_new_tokens=4, temperature=temperature)
    generate(twin.model, chat_tokenizer, _contexts(chat_tokenizer), sampling, autocast_dtype=torch.bfloat16)
    assert model.training and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ in the online updater


def _updater(model_path, tmp_path, **overrides):
    from sdpo.learner.updater import OnlineSDPOUpdater
    from sdpo.learner.config import OnlineSDPOConfig

    settings = dict(
        model_name_or_path=model_path,
        device="cpu",
        torch_dtype="bfloat16",
        attn_implementation="sdpa",
        max_new_tokens=GREEDY.max_new_tokens,
        learning_rate=1e-2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every_n_steps=0,
    )
    return OnlineSDPOUpdater(OnlineSDPOConfig(**{**settings, **overrides}))


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True])
def test_updater_generates_from_a_copy_that_follows_every_update(tiny_model_path, chat_tokenizer, tmp_path, use_lora):
    updater = _updater(tiny_model_path, tmp_path, use_lora=use_lora, lora_r=4, lora_alpha=8)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]

    def from_training_model():
        return _token_ids(updater.model, chat_tokenizer, updater.autocast_dtype)

    fast = [g.token_ids for g in updater.generate(conversations, GREEDY)]
    assert updater.generation_model() is not updater.model
    assert fast == from_training_model()
    for _ in range(2):
        updater.train_step(conversations[0], updater.generate_response(conversations[0], GREEDY), "Shorter, please.")
    after = [g.token_ids for g in updater.generate(conversations, GREEDY)]
    assert after != fast  # lr 1e-2 moves the tiny model
    if not use_lora:  # merged LoRA may differ by rounding; the cast copy is exact
        assert after == from_training_model()


@pytest.mark.parametrize("overrides", [{"torch_dtype": "float32"}, {"inference_copy": False}])
def test_updater_generates_from_the_training_model_when_the_copy_is_off_or_useless(
    tiny_model_path, tmp_path, overrides
):
    updater = _updater(tiny_model_path, tmp_path, **overrides)
    assert updater.generation_model() is updater.model
