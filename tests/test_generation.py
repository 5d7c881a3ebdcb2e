"""Batched generation (sdpo.models.generation.generate: prefill in length groups, one decode per batch) against
plain Hugging Face generation, and the generation-only inference copy (InferenceCopy) against the model it mirrors."""

import pytest
import torch

from sdpo.models.generation import (
    InferenceCopy,
    SamplingParams,
    encode_chat,
    generate,
    left_pad,
    length_groups,
    prefill,
    stop_token_ids,
)
from tests.conftest import build_tiny_llama

PROMPTS = ["Name a colour.", "Write one line about the sea.", "Count to five."]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


def _contexts(tokenizer):
    return [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


def _token_ids(model, tokenizer, autocast_dtype):
    return [
        g.token_ids for g in generate(model, tokenizer, _contexts(tokenizer), GREEDY, autocast_dtype=autocast_dtype)
    ]


# Chat prompts from 1 to ~4.5 times the shortest one's length: one batch of them needs several prefill groups.
MIXED_PROMPTS = [
    "Hi.",
    "Describe, in order, every step of brewing coffee with a French press, from heating the water to cleaning "
    "the press afterwards, and say what goes wrong when each step is skipped or rushed. " * 3,
    "Count to five.",
    "List three rivers in Europe and the countries they flow through, then say which one is the longest.",
    "Name a colour.",
    "Write a limerick about a cat who learns to play the piano and annoys the neighbours. " * 2,
]


def _mixed_contexts(tokenizer):
    return [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in MIXED_PROMPTS]


def _hf_generate(model, tokenizer, contexts, sampling):
    """Plain transformers generation of one left-padded batch: the ungrouped reference."""
    ids, mask = left_pad(contexts, tokenizer.pad_token_id)
    stops = stop_token_ids(model, tokenizer)
    config = sampling.to_generation_config(stops, tokenizer.pad_token_id, model.generation_config)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = []
    for tokens in out[:, ids.shape[1] :].tolist():
        ends = [i for i, t in enumerate(tokens) if t in stops]
        rows.append(tokens[: ends[0] + 1] if ends else tokens)
    return rows


def test_mixed_lengths_need_several_prefill_groups(chat_tokenizer):
    lengths = [len(c) - 1 for c in _mixed_contexts(chat_tokenizer)]
    assert max(lengths) > 4 * min(lengths) and len(length_groups(lengths)) >= 3


@pytest.mark.slow
def test_grouped_generation_gives_the_greedy_tokens_of_one_padded_batch_in_the_callers_order(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer).eval()
    contexts = _mixed_contexts(chat_tokenizer)
    grouped = [g.token_ids for g in generate(model, chat_tokenizer, contexts, GREEDY, batch_size=8)]
    assert grouped == _hf_generate(model, chat_tokenizer, contexts, GREEDY)
    alone = [g.token_ids for g in generate(model, chat_tokenizer, contexts, GREEDY, batch_size=1)]
    assert grouped == alone
    assert len({tuple(t) for t in grouped}) > 1  # distinct answers, so a mixed-up order would show


@pytest.mark.slow
def test_grouped_generation_samples_what_one_padded_batch_samples_with_the_same_seed(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer).eval()
    contexts = _mixed_contexts(chat_tokenizer)
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50)
    torch.manual_seed(3)
    grouped = [g.token_ids for g in generate(model, chat_tokenizer, contexts, sampling, batch_size=8)]
    # Each row draws its own random numbers in batch order, and generate() orders a batch by length.
    by_length = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    torch.manual_seed(3)
    reference = _hf_generate(model, chat_tokenizer, [contexts[i] for i in by_length], sampling)
    assert [grouped[i] for i in by_length] == reference  # the prefill draws no random numbers


def test_prefill_joins_the_groups_into_the_cache_of_one_padded_forward(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer).eval()
    contexts = _mixed_contexts(chat_tokenizer)
    prefixes = [c[:-1] for c in contexts]
    with torch.no_grad():
        (grouped,) = prefill(model, contexts, chat_tokenizer.pad_token_id).values()
        (whole,) = prefill(model, contexts, chat_tokenizer.pad_token_id, max_padding_ratio=float("inf")).values()
    _, mask = left_pad(prefixes, chat_tokenizer.pad_token_id)
    real = mask.bool()[:, None, :, None]  # padding positions differ (zeros here, pad-token states there), masked
    assert len(grouped.layers) == len(whole.layers) == 2
    for joined, single in zip(grouped.layers, whole.layers):
        assert joined.keys.shape == single.keys.shape == (len(contexts), 2, mask.shape[1], 8)
        torch.testing.assert_close(joined.keys * real, single.keys * real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined.values * real, single.values * real, atol=1e-5, rtol=1e-5)


def test_prefill_pads_each_group_within_the_bound(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer).eval()
    contexts = _mixed_contexts(chat_tokenizer)
    widths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        generate(model, chat_tokenizer, contexts, GREEDY, batch_size=8)
    finally:
        hook.remove()
    prefill_calls = [shape for shape in widths if shape[1] > 1]  # the decode steps feed one token per row
    real = sum(len(c) - 1 for c in contexts)
    assert len(prefill_calls) >= 3 and sum(rows for rows, _ in prefill_calls) == len(contexts)
    assert sum(rows * width for rows, width in prefill_calls) <= 1.25 * real
    assert max(rows for rows, _ in widths[len(prefill_calls) :]) == len(contexts)  # then one decode for all


@pytest.mark.slow
def test_one_token_contexts_generate_beside_long_ones(chat_tokenizer):
    model = build_tiny_llama(chat_tokenizer).eval()
    contexts = [[chat_tokenizer.eos_token_id], *_mixed_contexts(chat_tokenizer)[:2]]
    grouped = [g.token_ids for g in generate(model, chat_tokenizer, contexts, GREEDY, batch_size=8)]
    assert grouped == _hf_generate(model, chat_tokenizer, contexts, GREEDY)
    only_short = [g.token_ids for g in generate(model, chat_tokenizer, contexts[:1], GREEDY)]
    assert only_short == grouped[:1]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.mark.slow
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


@pytest.mark.slow
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
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    settings = {
        "model_name_or_path": model_path,
        "device": "cpu",
        "torch_dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "max_new_tokens": GREEDY.max_new_tokens,
        "learning_rate": 1e-2,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "checkpoint_every_n_steps": 0,
    }
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
