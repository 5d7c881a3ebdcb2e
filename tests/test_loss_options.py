"""Loss options of sdpo.core: advantage centring, α, teacher-side top-K, importance clipping, masked batches."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdpo.core import (
    center_advantages,
    distillation_divergence,
    pad_contexts_and_completions,
    sdpo_loss,
    simple_signal_loss,
    support_distribution,
)
from sdpo.models.generation import encode_chat
from tests.test_online_sdpo_updater import FOLLOW_UP, MESSAGES, fixed_response, make_updater

# ------------------------------------------------------------------ advantage centring


def test_sequence_centring_matches_a_hand_computation():
    student = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.4, -9.0, -9.0]])
    teacher = torch.tensor([[-0.5, -2.5, -0.5, -1.0], [-0.3, -0.1, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    # A = teacher − student: row 0 = [0.5, −0.5, 0, 2] (mean 0.5), row 1 = [−0.1, 0.3] (mean 0.1) on its 2 tokens.
    expected = torch.tensor([[0.0, -1.0, -0.5, 1.5], [-0.2, 0.2, 0.0, 0.0]])
    centred = center_advantages((teacher - student) * mask, mask, "sequence")
    torch.testing.assert_close(centred, expected)
    torch.testing.assert_close(center_advantages((teacher - student) * mask, mask, "none"), (teacher - student) * mask)

    student_param = student.clone().requires_grad_(True)
    loss, advantages = simple_signal_loss(student_param * mask, teacher * mask, mask, advantage_centering="sequence")
    torch.testing.assert_close(advantages, expected)
    # L = −mean_b( Σ_t Â_t·log π_t / n_b ): row 0 → −(0 + 2 + 0.25 − 4.5)/4, row 1 → −(0.02 − 0.08)/2.
    hand = (-(0.0 * -1.0 + -1.0 * -2.0 + -0.5 * -0.5 + 1.5 * -3.0) / 4 - (-0.2 * -0.2 + 0.2 * -0.4) / 2) / 2
    assert float(loss) == pytest.approx(hand, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(student_param.grad, -expected / torch.tensor([[4.0], [2.0]]) / 2)


def test_centring_comes_before_the_signal_clip():
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[3.0, 0.0, 0.0]])  # A = [3, 0, 0], mean 1 → centred [2, −1, −1] → clipped at 1.5
    mask = torch.ones(1, 3)
    _, advantages = simple_signal_loss(student, teacher, mask, advantage_centering="sequence", signal_clip=1.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.5, -1.0, -1.0]]))


def test_centring_needs_the_sampled_token_mode():
    from sdpo.learner.config import OnlineSDPOConfig

    with pytest.raises(ValueError, match="advantage_centering applies to --loss_mode simple_signal"):
        OnlineSDPOConfig(advantage_centering="sequence", loss_mode="full_distillation")
    OnlineSDPOConfig(advantage_centering="sequence", loss_mode="simple_signal")


def test_online_updater_trains_on_centred_advantages(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, loss_mode="simple_signal", advantage_centering="sequence")
    response = fixed_response(updater)
    student_batch, teacher_batch = scoring_batches(updater, response)
    out = sdpo_loss(
        updater.model, student_batch, teacher_batch, loss_mode="simple_signal", advantage_centering="sequence"
    )
    scored = out.advantages[out.mask > 0]
    assert float(scored.mean()) == pytest.approx(0.0, abs=1e-6) and float(scored.abs().max()) > 0
    metrics = updater.train_step(MESSAGES, response, FOLLOW_UP)
    assert metrics["loss"] == pytest.approx(float(out.loss), rel=1e-5)


def scoring_batches(updater, response, messages=MESSAGES):
    from sdpo.core import encode_hindsight_contexts

    contexts = encode_hindsight_contexts(updater.tokenizer, messages, FOLLOW_UP)
    pad = updater.tokenizer.pad_token_id
    ids = list(response.token_ids)
    return (
        pad_contexts_and_completions([contexts.student], [ids], pad),
        pad_contexts_and_completions([contexts.teacher], [ids], pad),
    )


# ------------------------------------------------------------------ α and the top-K support in sdpo_loss


def batches(tokenizer):
    student = encode_chat(tokenizer, MESSAGES)
    teacher = encode_chat(tokenizer, [{"role": "user", "content": MESSAGES[0]["content"] + " " + FOLLOW_UP}])
    completion = tokenizer(" Blue, a calm colour.", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    return pad_contexts_and_completions([student], [completion], pad), pad_contexts_and_completions(
        [teacher], [completion], pad
    )


def full_logprobs(model, batch):
    keep = batch.completion_width + 1
    forward = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    return model(**forward).logits[:, -keep:-1].float().log_softmax(-1)


@pytest.mark.parametrize("topk_from", ["student", "teacher"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sdpo_loss_distils_on_the_chosen_support_with_alpha(tiny_model, chat_tokenizer, topk_from, alpha):
    student_batch, teacher_batch = batches(chat_tokenizer)
    k = 5
    out = sdpo_loss(
        tiny_model,
        student_batch,
        teacher_batch,
        loss_mode="full_distillation",
        distillation_topk=k,
        distillation_alpha=alpha,
        topk_from=topk_from,
    )
    with torch.no_grad():
        student, teacher = full_logprobs(tiny_model, student_batch), full_logprobs(tiny_model, teacher_batch)
    support = (student if topk_from == "student" else teacher).topk(k, dim=-1).indices
    per_token = distillation_divergence(
        support_distribution(student.gather(-1, support), add_tail=True),
        support_distribution(teacher.gather(-1, support), add_tail=True),
        alpha,
    )
    torch.testing.assert_close(out.kl_per_token, per_token, rtol=1e-4, atol=1e-5)
    assert float(out.loss) == pytest.approx(float(per_token.mean()), rel=1e-4)
    sampled = student_batch.completion_ids.unsqueeze(-1)
    torch.testing.assert_close(out.teacher_logprobs, teacher.gather(-1, sampled).squeeze(-1), rtol=1e-4, atol=1e-5)


def test_the_two_supports_differ_when_student_and_teacher_disagree(tiny_model, chat_tokenizer):
    student_batch, teacher_batch = batches(chat_tokenizer)
    losses = {
        side: float(
            sdpo_loss(
                tiny_model,
                student_batch,
                teacher_batch,
                loss_mode="full_distillation",
                distillation_topk=3,
                topk_from=side,
            ).loss
        )
        for side in ("student", "teacher")
    }
    assert losses["student"] != pytest.approx(losses["teacher"], rel=1e-3)


def test_importance_weights_in_the_updater_start_at_one_and_stay_below_the_clip(tiny_model_path, tmp_path):
    updater = make_updater(
        tiny_model_path,
        tmp_path,
        loss_mode="simple_signal",
        is_clip=1.05,
        train_steps_per_example=3,
        learning_rate=5e-2,
    )
    metrics = updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    # Reported for the last pass, two updates after y was sampled: weights moved off 1 and are bounded.
    assert 0 < metrics["is_weight_mean"] <= 1.05 and metrics["is_weight_mean"] != pytest.approx(1.0, abs=1e-6)
    assert 0 <= metrics["is_clipped_fraction"] <= 1
    single = make_updater(tiny_model_path, tmp_path / "one", loss_mode="simple_signal", is_clip=1.05)
    assert "is_weight_mean" not in single.train_step(MESSAGES, fixed_response(single), FOLLOW_UP)  # π = π_old


# ------------------------------------------------------------------ fully masked batches (TRL #5569)

OPTION_SETS = [
    {"loss_mode": "simple_signal"},
    {"loss_mode": "simple_signal", "advantage_centering": "sequence", "signal_clip": 1.0},
    {"loss_mode": "full_distillation", "distillation_topk": 4},
    {"loss_mode": "full_distillation", "distillation_topk": 4, "distillation_alpha": 0.5, "topk_from": "teacher"},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_a_fully_masked_batch_gives_a_zero_loss_that_still_backpropagates(tiny_model, chat_tokenizer, options):
    student_batch, teacher_batch = batches(chat_tokenizer)
    width = student_batch.completion_width
    masked = [
        pad_contexts_and_completions(
            [b.input_ids[0, : b.input_ids.shape[1] - width].tolist()],
            [b.completion_ids[0].tolist()],
            chat_tokenizer.pad_token_id,
            ignore_first_k=width,
        )
        for b in (student_batch, teacher_batch)
    ]
    assert float(masked[0].completion_mask.sum()) == 0
    old = torch.zeros_like(masked[0].completion_mask)
    out = sdpo_loss(tiny_model, *masked, is_clip=2.0, old_logprobs=old, **options)
    assert float(out.loss) == 0.0 and out.loss.requires_grad
    out.loss.backward()
    grads = [p.grad for p in tiny_model.parameters()]
    assert all(g is not None for g in grads)  # every parameter took part: DDP's all-reduce sees all of them
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, state: dict, vocab: int, results):
    """One rank of a gloo DDP run: rank 1's batch is fully masked; both ranks backward and step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    contexts, completion = [[1, 2, 3, 4]], [[5, 6, 7]]
    student = pad_contexts_and_completions(contexts, completion, 0, ignore_first_k=3 if rank == 1 else 0)
    teacher = pad_contexts_and_completions([[1, 2, 9, 3, 4]], completion, 0, ignore_first_k=3 if rank == 1 else 0)
    out = sdpo_loss(ddp, student, teacher, loss_mode="full_distillation", distillation_topk=3)
    out.loss.backward()
    results[rank] = (float(out.loss), torch.cat([p.grad.flatten() for p in model.parameters()]))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch and transformers (~20 s unloaded, more on a busy machine)
def test_two_process_ddp_with_one_fully_masked_rank_does_not_hang():
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 32
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    state = LlamaForCausalLM(config).state_dict()
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        processes = [
            context.Process(
                target=_ddp_worker, args=(rank, 2, _free_port() if rank == 0 else None, state, vocab, results)
            )
            for rank in range(2)
        ]
        port = processes[0]._args[2]
        processes[1]._args = (1, 2, port, state, vocab, results)
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        hung = [p.pid for p in processes if p.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
        assert not hung, "a DDP rank hung: a fully masked batch broke the gradient all-reduce"
        assert all(p.exitcode == 0 for p in processes)
        (loss_0, grads_0), (loss_1, grads_1) = results[0], results[1]
    assert loss_1 == 0.0 and loss_0 > 0
    torch.testing.assert_close(grads_0, grads_1)  # all-reduced: both ranks hold the averaged gradient
    assert float(grads_0.abs().max()) > 0
