"""The shared SDPO math checked against independent computations."""

import math

import numpy as np
import pytest
import torch

from sdpo.core import (
    HINDSIGHT_VARIANTS,
    build_hindsight_messages,
    encode_hindsight_contexts,
    encode_student_teacher_contexts,
    full_distillation_loss,
    masked_sequence_mean,
    pad_contexts_and_completions,
    score_completions,
    simple_signal_loss,
    tail_logprob,
    topk_reverse_kl,
)
from sdpo.models.generation import encode_chat

MESSAGES = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "First question"},
    {"role": "assistant", "content": "First answer"},
    {"role": "user", "content": "Explain recursion."},
]


# ------------------------------------------------------------------ hindsight


def test_online_hindsight_appends_to_last_user_message_and_leaves_input_untouched():
    original = [dict(m) for m in MESSAGES]
    teacher = build_hindsight_messages(MESSAGES, "  Shorter please.  ")
    assert MESSAGES == original
    assert len(teacher) == len(MESSAGES)
    assert teacher[:3] == MESSAGES[:3]
    assert teacher[3]["content"].startswith("Explain recursion.\n\n=== HINDSIGHT CONTEXT ===")
    assert teacher[3]["content"].endswith("\nShorter please.")


def test_online_hindsight_finds_the_last_user_turn_when_it_is_not_last():
    teacher = build_hindsight_messages(MESSAGES[:3], "ok")
    assert teacher[1]["content"].endswith("ok") and teacher[2] == MESSAGES[2]


def test_offline_variants_place_the_block_as_documented():
    v1 = build_hindsight_messages(MESSAGES[:3], "meh", variant="offline_v1")
    assert v1[2]["content"].endswith("Future User Message: meh") and v1[2]["role"] == "assistant"
    turn = build_hindsight_messages(MESSAGES, "meh", variant="offline_assistant")
    assert turn[-1]["role"] == "assistant" and turn[-1]["content"].endswith("meh") and turn[:-1] == MESSAGES


def test_custom_template_and_bad_inputs():
    teacher = build_hindsight_messages(MESSAGES, "o!", template=" [later: {follow_up}]")
    assert teacher[3]["content"] == "Explain recursion. [later: o!]"
    with pytest.raises(ValueError, match="follow_up"):
        build_hindsight_messages(MESSAGES, "o", template="no slot")
    with pytest.raises(ValueError, match="empty"):
        build_hindsight_messages(MESSAGES, "   ")
    with pytest.raises(ValueError, match="unknown hindsight variant"):
        build_hindsight_messages(MESSAGES, "o", variant="nope")
    with pytest.raises(ValueError, match="no user message"):
        build_hindsight_messages([{"role": "system", "content": "s"}], "o")
    assert set(HINDSIGHT_VARIANTS) == {"online", "online_after_reply", "offline_v1", "offline_assistant"}


def test_follow_up_with_braces_is_inserted_verbatim():
    teacher = build_hindsight_messages(MESSAGES, "use {x} and {follow_up}")
    assert teacher[3]["content"].endswith("use {x} and {follow_up}")


def test_student_teacher_contexts_share_the_rendered_prefix(chat_tokenizer):
    student, teacher = encode_student_teacher_contexts(chat_tokenizer, MESSAGES, "Too long.")
    text = chat_tokenizer.decode(teacher)
    assert "Too long." in text and "Too long." not in chat_tokenizer.decode(student)
    assert text.endswith("<|im_start|>assistant\n")
    common = next(i for i, (a, b) in enumerate(zip(student, teacher)) if a != b)
    assert common > 10


LONG_X = [{"role": "user", "content": "Tell me about the sea. " * 30 + "Explain tides."}]


def test_truncation_cuts_the_same_x_tokens_from_both_contexts(chat_tokenizer):
    full = encode_hindsight_contexts(chat_tokenizer, LONG_X, "Shorter please.")
    cut = encode_hindsight_contexts(chat_tokenizer, LONG_X, "Shorter please.", max_context_length=40)
    assert full.truncated_tokens == 0 and cut.truncated_tokens == len(full.student) - 40
    # The student is the left-truncated context the policy generates from.
    assert cut.student == encode_chat(chat_tokenizer, LONG_X, max_length=40) == full.student[-40:]
    # The teacher drops exactly the same leading tokens and keeps all of o and the rest.
    assert cut.teacher == full.teacher[cut.truncated_tokens :]
    shared = next(i for i, (a, b) in enumerate(zip(cut.student, cut.teacher)) if a != b)
    assert shared > 20 and cut.student[:shared] == cut.teacher[:shared]
    assert "Explain tides." in chat_tokenizer.decode(cut.teacher) and chat_tokenizer.decode(cut.teacher).endswith(
        "Shorter please.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode_student_teacher_contexts(chat_tokenizer, LONG_X, "Shorter please.", max_context_length=40) == (
        cut.student,
        cut.teacher,
    )


def test_truncation_that_would_reach_past_x_is_refused(chat_tokenizer):
    with pytest.raises(ValueError, match="max_context_length=3 is too small"):
        encode_hindsight_contexts(chat_tokenizer, [{"role": "user", "content": "Hi"}], "Shorter.", max_context_length=3)


# ------------------------------------------------------------------ scoring


def _example_ids(tokenizer):
    contexts = [
        tokenizer("Hello there, how are you?", add_special_tokens=False)["input_ids"],
        tokenizer("Hi", add_special_tokens=False)["input_ids"],
        tokenizer("A much longer context that needs a lot more padding on the other rows.", add_special_tokens=False)[
            "input_ids"
        ],
    ]
    completions = [
        tokenizer(" I am fine, thanks!", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        tokenizer(" Yo", add_special_tokens=False)["input_ids"],
        tokenizer(" Right, I see what you mean here.", add_special_tokens=False)["input_ids"],
    ]
    return contexts, completions


@pytest.fixture(params=["tiny", "bundled"])
def scoring_model(request, chat_tokenizer, bundled_model_path):
    if request.param == "tiny":
        from tests.conftest import build_tiny_llama

        return build_tiny_llama(chat_tokenizer)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_summed_token_logprobs_equal_transformers_loss(scoring_model, chat_tokenizer):
    contexts, completions = _example_ids(chat_tokenizer)
    for context, completion in zip(contexts, completions):
        batch = pad_contexts_and_completions([context], [completion], chat_tokenizer.pad_token_id)
        with torch.no_grad():
            scores = score_completions(scoring_model, batch)
            labels = torch.tensor([[-100] * len(context) + completion])
            reference = scoring_model(input_ids=torch.tensor([context + completion]), labels=labels).loss
        assert scores.logprobs.sum().item() == pytest.approx(-(reference.item() * len(completion)), rel=1e-4, abs=1e-4)


def test_batched_scores_equal_one_by_one_scores(scoring_model, chat_tokenizer):
    contexts, completions = _example_ids(chat_tokenizer)
    pad = chat_tokenizer.pad_token_id
    with torch.no_grad():
        batched = score_completions(scoring_model, pad_contexts_and_completions(contexts, completions, pad), topk=5)
        for row, (context, completion) in enumerate(zip(contexts, completions)):
            single = score_completions(
                scoring_model, pad_contexts_and_completions([context], [completion], pad), topk=5
            )
            n = len(completion)
            torch.testing.assert_close(batched.logprobs[row, :n], single.logprobs[0], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(batched.topk_logprobs[row, :n], single.topk_logprobs[0], atol=2e-4, rtol=1e-4)
            assert torch.all(batched.logprobs[row, n:] == 0) and torch.all(batched.mask[row, n:] == 0)


def test_topk_and_gathered_logprobs_match_a_full_log_softmax(tiny_model, chat_tokenizer):
    contexts, completions = _example_ids(chat_tokenizer)
    batch = pad_contexts_and_completions(contexts[:1], completions[:1], chat_tokenizer.pad_token_id)
    with torch.no_grad():
        scores = score_completions(tiny_model, batch, topk=4)
        again = score_completions(tiny_model, batch, gather_indices=scores.topk_indices)
        full = torch.log_softmax(tiny_model(input_ids=batch.input_ids).logits.float(), -1)
    n = len(completions[0])
    predictions = full[0, -n - 1 : -1]
    expected_values, expected_indices = predictions.topk(4, dim=-1)
    torch.testing.assert_close(scores.topk_logprobs[0], expected_values, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.topk_indices[0], expected_indices)
    torch.testing.assert_close(again.gathered_logprobs, scores.topk_logprobs, atol=1e-6, rtol=1e-6)


def test_ignore_first_k_masks_leading_tokens():
    batch = pad_contexts_and_completions([[1, 2], [3]], [[5, 6, 7], [8]], 0, ignore_first_k=2)
    assert batch.completion_mask.tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch.input_ids.tolist() == [[1, 2, 5, 6, 7], [0, 3, 8, 0, 0]]
    assert batch.position_ids.tolist()[1] == [0, 0, 1, 1, 1]


def test_scoring_rejects_empty_inputs():
    with pytest.raises(ValueError, match="empty completion"):
        pad_contexts_and_completions([[1]], [[]], 0)
    with pytest.raises(ValueError, match="as many"):
        pad_contexts_and_completions([[1]], [[1], [2]], 0)


# ------------------------------------------------------------------ losses


def test_simple_signal_loss_value_and_gradient():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0, -0.5], [-1.3, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, advantages = simple_signal_loss(student, teacher, mask)
    a = [[0.5, -1.0, 0.0], [-1.0, 3.0, 0.0]]
    expected = -((0.5 * -1 + -1 * -2 + 0) / 3 + (-1 * -0.3 + 3 * -4.0) / 2) / 2
    assert loss.item() == pytest.approx(expected)
    torch.testing.assert_close(advantages, torch.tensor(a))
    loss.backward()
    expected_grad = [[-0.5 / 6, 1.0 / 6, 0.0], [1.0 / 4, -3.0 / 4, 0.0]]
    torch.testing.assert_close(student.grad, torch.tensor(expected_grad))


def test_simple_signal_clip():
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[5.0, -5.0]])
    _, advantages = simple_signal_loss(student, teacher, torch.ones(1, 2), signal_clip=2.0)
    assert advantages.tolist() == [[2.0, -2.0]]


def _random_logprobs(shape, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 2, -1)


def test_topk_kl_with_k_equal_vocab_is_the_full_reverse_kl():
    student, teacher = _random_logprobs((2, 5), 11, 0), _random_logprobs((2, 5), 11, 1)
    full = (student.exp() * (student - teacher)).sum(-1)
    values, indices = student.topk(11, dim=-1)
    for add_tail in (True, False):
        got = topk_reverse_kl(values, teacher.gather(-1, indices), add_tail=add_tail)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_topk_kl_with_tail_matches_an_independent_bucket_computation():
    student, teacher = _random_logprobs((3, 4), 20, 2), _random_logprobs((3, 4), 20, 3)
    k = 5
    values, indices = student.topk(k, dim=-1)
    got = topk_reverse_kl(values, teacher.gather(-1, indices), add_tail=True)
    p, q, idx = student.exp().numpy(), teacher.exp().numpy(), indices.numpy()
    for b in range(3):
        for t in range(4):
            chosen = idx[b, t]
            ps, qs = p[b, t, chosen], q[b, t, chosen]
            p_tail, q_tail = 1 - ps.sum(), 1 - qs.sum()
            expected = float(np.sum(ps * np.log(ps / qs)) + p_tail * math.log(p_tail / q_tail))
            assert got[b, t].item() == pytest.approx(expected, rel=1e-6)
    renormalised = topk_reverse_kl(values, teacher.gather(-1, indices), add_tail=False)
    ps = p[0, 0, idx[0, 0]] / p[0, 0, idx[0, 0]].sum()
    qs = q[0, 0, idx[0, 0]] / q[0, 0, idx[0, 0]].sum()
    assert renormalised[0, 0].item() == pytest.approx(float(np.sum(ps * np.log(ps / qs))), rel=1e-6)


def test_tail_stays_finite_when_topk_holds_all_mass():
    logprobs = torch.log(torch.tensor([[0.5, 0.5]]))
    assert tail_logprob(logprobs).item() == pytest.approx(math.log(1e-7), abs=0.05)


def test_full_distillation_loss_is_a_masked_sequence_mean():
    student = _random_logprobs((2, 3), 8, 4).float()
    teacher = _random_logprobs((2, 3), 8, 5).float()
    values, indices = student.topk(3, dim=-1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, per_token = full_distillation_loss(values, teacher.gather(-1, indices), mask)
    assert loss.item() == pytest.approx(masked_sequence_mean(per_token, mask).mean().item())
    assert loss.item() == pytest.approx(((per_token[0, :2].mean() + per_token[1].mean()) / 2).item())


def test_one_distillation_step_raises_the_teacher_preferred_token():
    """Sign test on the pure loss: the teacher (x⊕o) prefers token 3, one step raises the student's log p(3)."""
    logits = torch.zeros(1, 1, 6, requires_grad=True)
    teacher = torch.log_softmax(torch.tensor([[[0.0, 0.0, 0.0, 4.0, 0.0, 0.0]]]), -1)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    student = torch.log_softmax(logits, -1)
    values, indices = student.topk(6, dim=-1)
    loss, _ = full_distillation_loss(values, teacher.gather(-1, indices), torch.ones(1, 1))
    loss.backward()
    optimizer.step()
    after = torch.log_softmax(logits.detach(), -1)
    assert after[0, 0, 3] > math.log(1 / 6) + 0.1


def test_one_signal_step_moves_tokens_in_the_direction_of_the_signal():
    """Sampled-token PG: a token with positive A_t gains probability, one with negative A_t loses it."""
    logits = torch.zeros(2, 5, requires_grad=True)  # two positions, sampled tokens 1 and 4
    sampled = torch.tensor([[1, 4]])
    optimizer = torch.optim.SGD([logits], lr=1.0)
    student = torch.log_softmax(logits, -1).gather(-1, sampled.T).T
    teacher = torch.tensor([[math.log(0.6), math.log(0.05)]])  # hindsight likes token 1, dislikes token 4
    loss, _ = simple_signal_loss(student, teacher, torch.ones(1, 2))
    loss.backward()
    optimizer.step()
    after = torch.log_softmax(logits.detach(), -1)
    assert after[0, 1] > math.log(0.2) and after[1, 4] < math.log(0.2)


def test_chunked_fp32_scoring_equals_one_chunk(tiny_model, chat_tokenizer, monkeypatch):
    """Several sequences per fp32 chunk or one per chunk: same values, same gradients."""
    from sdpo import core as sdpo_core

    contexts, completions = _example_ids(chat_tokenizer)
    batch = pad_contexts_and_completions(contexts, completions, chat_tokenizer.pad_token_id)
    results = []
    for budget in (2**28, 1):
        monkeypatch.setattr(sdpo_core, "FP32_LOGIT_ELEMENTS", budget)
        tiny_model.zero_grad()
        scores = score_completions(tiny_model, batch, topk=3)
        gathered = score_completions(tiny_model, batch, gather_indices=scores.topk_indices.detach()).gathered_logprobs
        (scores.logprobs.sum() + scores.topk_logprobs.sum()).backward()
        grad = tiny_model.get_input_embeddings().weight.grad.clone()
        results.append((scores.logprobs.detach(), scores.topk_logprobs.detach(), gathered.detach(), grad))
    for one, many in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    # The tied embedding's gradient sums over every position; its fp32 summation order follows the chunking
    # and the thread count, so it agrees to 1e-4 (2 threads measured 2.8e-5 apart).
    torch.testing.assert_close(results[0][3], results[1][3], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ precision and temperature


def _forward_inputs(batch) -> dict:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)


def _completion_logprobs_from_logits(logits: torch.Tensor, batch, temperature: float = 1.0) -> torch.Tensor:
    """Independent reference: log-softmax in float64 over full-sequence logits, read at the completion tokens."""
    width = batch.completion_width
    logprobs = torch.log_softmax(logits.double() / temperature, -1)[:, -width - 1 : -1]
    return logprobs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask


def test_fp32_head_under_bf16_autocast_matches_a_float64_head_on_the_same_hidden_states(tiny_model, chat_tokenizer):
    contexts, completions = _example_ids(chat_tokenizer)
    batch = pad_contexts_and_completions(contexts, completions, chat_tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = tiny_model.get_decoder()(**_forward_inputs(batch)).last_hidden_state
        fp32_head = score_completions(tiny_model, batch).logprobs
        bf16_head = score_completions(tiny_model, batch, fp32_head=False).logprobs
    reference = _completion_logprobs_from_logits(hidden.double() @ tiny_model.lm_head.weight.double().T, batch)
    assert (fp32_head.double() - reference).abs().max() < 1e-4
    assert (bf16_head.double() - reference).abs().max() > 1e-3  # what the fp32 head removes


def test_fp32_head_without_autocast_matches_the_full_fp32_forward(tiny_model, chat_tokenizer):
    contexts, completions = _example_ids(chat_tokenizer)
    batch = pad_contexts_and_completions(contexts, completions, chat_tokenizer.pad_token_id)
    with torch.no_grad():
        scores = score_completions(tiny_model, batch, topk=3)
        logits = tiny_model(**_forward_inputs(batch)).logits
    assert (scores.logprobs.double() - _completion_logprobs_from_logits(logits, batch)).abs().max() < 1e-4


@pytest.mark.parametrize("fp32_head", [True, False])
def test_scoring_at_temperature_uses_the_sampling_distribution(tiny_model, chat_tokenizer, fp32_head):
    contexts, completions = _example_ids(chat_tokenizer)
    batch = pad_contexts_and_completions(contexts, completions, chat_tokenizer.pad_token_id)
    with torch.no_grad():
        at_07 = score_completions(tiny_model, batch, temperature=0.7, fp32_head=fp32_head)
        at_1 = score_completions(tiny_model, batch, fp32_head=fp32_head)
        logits = tiny_model(**_forward_inputs(batch)).logits
    expected = _completion_logprobs_from_logits(logits, batch, temperature=0.7)
    assert (at_07.logprobs.double() - expected).abs().max() < 1e-4
    assert (at_1.logprobs.double() - expected).abs().max() > 1e-2
    with pytest.raises(ValueError, match="temperature"):
        score_completions(tiny_model, batch, temperature=0.0)


def test_online_updater_counts_truncated_contexts_and_warns_once(tiny_model_path, tmp_path, caplog):
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    config = OnlineSDPOConfig(
        model_name_or_path=tiny_model_path,
        device="cpu",
        torch_dtype="float32",
        max_new_tokens=8,
        max_context_length=40,
        checkpoint_dir=str(tmp_path),
        checkpoint_every_n_steps=0,
    )
    updater = OnlineSDPOUpdater(config)
    short = [{"role": "user", "content": "Hi"}]
    with caplog.at_level("WARNING", logger="sdpo.learner.updater"):
        batch = ([LONG_X, short], ["Sure.", "Hello."], ["Shorter.", "Shorter."])
        metrics = [updater.train_step_batch(*batch) for _ in range(2)]
    assert [m["truncated_contexts"] for m in metrics] == [1, 1]
    assert sum("max_context_length=40" in r.message for r in caplog.records) == 1
    assert updater.train_step(short, "Hello.", "Shorter.")["truncated_contexts"] == 0


def test_length_groups_bound_the_padding():
    from sdpo.core import length_groups

    lengths = [49, 65, 48, 53, 68, 233, 42, 59]  # MT-Bench-like: one long prompt among short ones
    groups = length_groups(lengths, max_padding_ratio=1.25)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 1.25 * sum(lengths[i] for i in group) or len(group) == 1
    assert [5] in groups, "the long prompt gets its own micro-batch"
    assert length_groups([10, 10, 10], max_padding_ratio=1.25) == [[0, 1, 2]]
    assert length_groups([]) == []


def test_micro_batches_give_the_update_of_one_padded_batch(tiny_model, chat_tokenizer, monkeypatch):
    """Splitting a step into length groups (each backward scaled by its share) leaves loss and weights unchanged."""
    import copy

    from sdpo import core as sdpo_core
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    conversations = [[{"role": "user", "content": "Hi " * n}] for n in (2, 3, 60, 4)]
    responses = ["Hello there.", "Sure, here it is.", "A long answer follows now.", "Okay."]
    follow_ups = ["Shorter.", "No lists.", "Too long.", "Fine."]
    results = []
    for ratio in (1.25, 1e9):  # several micro-batches, then one padded batch
        monkeypatch.setattr(
            "sdpo.learner.updater.length_groups", lambda lengths, r=ratio: sdpo_core.length_groups(lengths, r)
        )
        config = OnlineSDPOConfig(
            model_name_or_path="tiny",
            device="cpu",
            torch_dtype="float32",
            learning_rate=1e-3,
            loss_mode="simple_signal",
            max_new_tokens=32,
        )
        updater = OnlineSDPOUpdater(config, model=copy.deepcopy(tiny_model), tokenizer=chat_tokenizer)
        metrics = updater.train_step_batch(conversations, responses, follow_ups)
        weights = torch.cat([p.detach().flatten() for p in updater.model.parameters()])
        results.append((metrics, weights))
    (split, split_weights), (single, single_weights) = results
    assert split["micro_batches"] > 1 and single["micro_batches"] == 1
    for key in ("loss", "signal_mean", "signal_std", "policy_logp_mean", "grad_norm"):
        assert split[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
    torch.testing.assert_close(split_weights, single_weights, atol=1e-6, rtol=1e-5)
