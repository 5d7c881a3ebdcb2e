"""Our loss functions and EMA teacher against TRL's ``trl.experimental.sdpo`` on the same inputs.

For every option both have (top-K support with or without the tail bucket, full vocabulary, α ∈ {0, ½, 1} and
in between, the sampled-token loss, importance-weight clipping, the EMA teacher sync for a full copy and for a
LoRA adapter), loss values and gradients must agree to float64 rounding.
"""

import copy

import pytest
import torch

pytest.importorskip("trl.experimental.sdpo")
from trl.experimental.sdpo import loss_utils as trl_loss
from trl.experimental.sdpo.teacher_sync import PEFTAdapterEMACallback
from trl.trainer.callbacks import SyncRefModelCallback

from sdpo.core import (
    clipped_importance_weights,
    distillation_divergence,
    full_distillation_loss,
    masked_sequence_mean,
    simple_signal_loss,
    support_distribution,
    topk_divergence,
)
from sdpo.teachers import build_teacher

B, T, V, K = 3, 5, 40, 7
ALPHAS = [0.0, 0.25, 0.5, 0.9, 1.0]


def logits_pair(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=generator, dtype=torch.float64)).requires_grad_(True)
    teacher = 2 * torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    return student, teacher


def sequence_mean(per_token, mask):
    """TRL's aggregation: per-sequence token mean, then batch mean."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)


def assert_same_value_and_gradient(ours_fn, theirs_fn, student):
    ours = ours_fn(student)
    (ours_grad,) = torch.autograd.grad(ours, student)
    theirs = theirs_fn(student)
    (theirs_grad,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_on_the_student_support_equals_trl(alpha, add_tail):
    student_logits, teacher_logits = logits_pair()

    def ours(logits):
        student_logprobs = logits.log_softmax(-1)
        top, indices = student_logprobs.topk(K, dim=-1)
        teacher_top = teacher_logits.log_softmax(-1).gather(-1, indices)
        loss, _ = full_distillation_loss(top, teacher_top, MASK, add_tail=add_tail, alpha=alpha)
        return loss

    def theirs(logits):
        per_token = trl_loss.compute_topk_self_distillation_loss(
            logits, teacher_logits, distillation_topk=K, distillation_alpha=alpha, distillation_add_tail=add_tail
        )
        return sequence_mean(per_token, MASK)

    assert_same_value_and_gradient(ours, theirs, student_logits)


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_on_the_teacher_support_equals_trl_building_blocks(alpha, add_tail):
    """TRL distils on the teacher's top-K only in its server path (inside the trainer); its pieces are public:
    project the student on the teacher's K tokens, tail bucket or renormalise, ``compute_divergence``."""
    student_logits, teacher_logits = logits_pair(1)
    teacher_top, indices = teacher_logits.log_softmax(-1).topk(K, dim=-1)

    def ours(logits):
        student_on_teacher = logits.log_softmax(-1).gather(-1, indices)
        return sequence_mean(topk_divergence(student_on_teacher, teacher_top, add_tail=add_tail, alpha=alpha), MASK)

    def theirs(logits):
        student_on_teacher = logits.log_softmax(-1).gather(-1, indices)
        if add_tail:
            s, t = trl_loss.add_tail_bucket(student_on_teacher), trl_loss.add_tail_bucket(teacher_top)
        else:
            s = student_on_teacher - student_on_teacher.logsumexp(-1, keepdim=True)
            t = teacher_top - teacher_top.logsumexp(-1, keepdim=True)
        return sequence_mean(trl_loss.compute_divergence(s, t, alpha), MASK)

    assert_same_value_and_gradient(ours, theirs, student_logits)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_full_vocabulary_divergence_equals_trl(alpha):
    student_logits, teacher_logits = logits_pair(2)

    def ours(logits):
        per_token = distillation_divergence(logits.log_softmax(-1), teacher_logits.log_softmax(-1), alpha)
        return masked_sequence_mean(per_token, MASK).mean()

    def theirs(logits):
        per_token = trl_loss.compute_full_logit_self_distillation_loss(logits, teacher_logits, distillation_alpha=alpha)
        return sequence_mean(per_token, MASK)

    assert_same_value_and_gradient(ours, theirs, student_logits)


def test_tail_bucket_equals_trl():
    _, teacher_logits = logits_pair(3)
    top, _ = teacher_logits.log_softmax(-1).topk(K, dim=-1)
    torch.testing.assert_close(support_distribution(top, add_tail=True), trl_loss.add_tail_bucket(top))


def sampled_token_inputs(seed=4):
    student_logits, teacher_logits = logits_pair(seed)
    completion = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return student_logits, teacher_logits, completion


def rollout_logprobs(student_logits, completion, seed=7):
    """log π_old: a perturbed student, so the importance ratios straddle the clip."""
    noise = torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return gather(student_logits.detach() + 0.7 * noise, completion)


def gather(logits, completion):
    return logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_sampled_token_loss_equals_trl():
    student_logits, teacher_logits, completion = sampled_token_inputs()
    teacher_logprobs = gather(teacher_logits, completion)

    def ours(logits):
        loss, _ = simple_signal_loss(gather(logits, completion) * MASK, teacher_logprobs * MASK, MASK)
        return loss

    def theirs(logits):
        per_token = trl_loss.compute_sampled_token_self_distillation_loss(
            logits, teacher_logits, completion, distillation_alpha=1.0
        )
        return sequence_mean(per_token, MASK)

    assert_same_value_and_gradient(ours, theirs, student_logits)


@pytest.mark.parametrize("is_clip", [1.0, 2.0])
def test_importance_clipped_sampled_token_loss_equals_trl(is_clip):
    student_logits, teacher_logits, completion = sampled_token_inputs(5)
    teacher_logprobs = gather(teacher_logits, completion)
    old_logprobs = rollout_logprobs(student_logits, completion)

    def ours(logits):
        student_logprobs = gather(logits, completion)
        weights = clipped_importance_weights(student_logprobs, old_logprobs, is_clip)
        loss, _ = simple_signal_loss(student_logprobs * MASK, teacher_logprobs * MASK, MASK, importance_weights=weights)
        return loss

    def theirs(logits):
        per_token = trl_loss.compute_sampled_token_self_distillation_loss(
            logits, teacher_logits, completion, distillation_alpha=1.0
        )
        per_token = trl_loss.apply_importance_sampling_clipping(
            per_token, gather(logits, completion), old_logprobs, is_clip
        )
        return sequence_mean(per_token, MASK)

    assert_same_value_and_gradient(ours, theirs, student_logits)
    weights = clipped_importance_weights(gather(student_logits, completion), old_logprobs, is_clip)
    assert (weights == is_clip).any() and (weights < is_clip).any()


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_importance_clipped_topk_loss_equals_trl(alpha):
    student_logits, teacher_logits, completion = sampled_token_inputs(6)
    old_logprobs = rollout_logprobs(student_logits, completion)

    def ours(logits):
        student_logprobs = logits.log_softmax(-1)
        top, indices = student_logprobs.topk(K, dim=-1)
        weights = clipped_importance_weights(gather(logits, completion), old_logprobs, 2.0)
        loss, _ = full_distillation_loss(
            top, teacher_logits.log_softmax(-1).gather(-1, indices), MASK, alpha=alpha, importance_weights=weights
        )
        return loss

    def theirs(logits):
        per_token = trl_loss.compute_topk_self_distillation_loss(
            logits, teacher_logits, distillation_topk=K, distillation_alpha=alpha, distillation_add_tail=True
        )
        per_token = trl_loss.apply_importance_sampling_clipping(
            per_token, gather(logits, completion), old_logprobs, 2.0
        )
        return sequence_mean(per_token, MASK)

    assert_same_value_and_gradient(ours, theirs, student_logits)


# ------------------------------------------------------------------ EMA teacher vs TRL's teacher sync


def perturb_(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_full_copy_ema_equals_trl_sync_ref_model(tiny_model):
    rate = 0.1
    student = tiny_model
    teacher = build_teacher("ema", student, ema_rate=rate, compute_dtype=torch.float32)
    trl_teacher = copy.deepcopy(student)
    for step in range(3):
        perturb_(student, step)
        teacher.update()
        SyncRefModelCallback._sync_target_model(student, trl_teacher, rate)
    for (name, ours), (_, theirs) in zip(teacher.network.named_parameters(), trl_teacher.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)


def test_lora_adapter_ema_equals_trl_peft_adapter_callback(tiny_model):
    """Both average the adapter tensors with the same rule. TRL starts its shadow from zeros, we start from the
    student adapter (θ_T,0 = θ_S,0); TRL's callback is started from the same point through its shadow weights."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import TrainerControl, TrainerState, TrainingArguments

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours_model = get_peft_model(copy.deepcopy(tiny_model), lora)
    perturb_(ours_model, 10)  # a non-zero B, so the adapter matters
    theirs_model = copy.deepcopy(ours_model)
    rate = 0.2
    teacher = build_teacher("ema", ours_model, ema_rate=rate, sync_interval=2)
    callback = PEFTAdapterEMACallback(theirs_model, update_rate=rate, sync_steps=2)
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    state = TrainerState()
    callback.on_train_begin(args, state, control)
    callback.shadow_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(theirs_model).items()}
    for step in range(1, 5):
        perturb_(ours_model, step)
        perturb_(theirs_model, step)
        teacher.update()
        state.global_step = step
        callback.on_step_end(args, state, control)
    ours_teacher = get_peft_model_state_dict(ours_model, adapter_name="sdpo_ema_teacher")
    theirs_teacher = get_peft_model_state_dict(theirs_model, adapter_name="teacher")
    assert ours_teacher.keys() == theirs_teacher.keys() and ours_teacher
    for key in ours_teacher:
        torch.testing.assert_close(ours_teacher[key], theirs_teacher[key], rtol=1e-6, atol=1e-7, msg=key)
