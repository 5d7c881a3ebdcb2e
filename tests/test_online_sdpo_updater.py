"""OnlineSDPOUpdater on tiny models (and the bundled one where realism matters)."""

import math

import pytest
import torch

from sdpo.core import build_hindsight_messages, pad_contexts_and_completions, score_completions
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import EmptyResponseError, OnlineSDPOUpdater, latest_checkpoint
from sdpo.models.generation import Generation, SamplingParams

MESSAGES = [{"role": "user", "content": "Name a colour."}]
FOLLOW_UP = "Answer in one word, no punctuation."


def make_updater(model_path, tmp_path, **overrides):
    settings = dict(
        model_name_or_path=model_path,
        device="cpu",
        torch_dtype="float32",
        max_new_tokens=12,
        learning_rate=1e-3,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every_n_steps=0,
    )
    settings.update(overrides)
    return OnlineSDPOUpdater(OnlineSDPOConfig(**settings))


def fixed_response(updater, text=" Blue is a nice colour"):
    ids = updater.tokenizer(text, add_special_tokens=False)["input_ids"] + [updater.tokenizer.eos_token_id]
    return Generation(ids, text.strip(), finished=True)


def test_config_defaults_equal_the_reference_table():
    cfg = OnlineSDPOConfig()
    expected = {
        "model_name_or_path": "Qwen/Qwen3-8B",
        "torch_dtype": "bfloat16",
        "attn_implementation": "flash_attention_2",
        "use_lora": False,
        "lora_r": 256,
        "lora_alpha": 512,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_dropout": 0.0,
        "signal_clip": 0.0,
        "ignore_first_k": 0,
        "loss_mode": "full_distillation",
        "distillation_topk": 20,
        "distillation_add_tail": True,
        "train_steps_per_example": 1,
        "learning_rate": 5e-6,
        "optimizer": "adamw",
        "adam_epsilon": 1e-6,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "max_new_tokens": 2048,
        "max_context_length": 4096,
        "temperature": 1.0,
        "top_p": 1.0,
        "do_sample": True,
        "checkpoint_dir": "./live_checkpoints",
        "checkpoint_every_n_steps": 10,
        "max_checkpoints": 5,
    }
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert "=== HINDSIGHT CONTEXT ===" in cfg.hindsight_block_template and "{follow_up}" in cfg.hindsight_block_template


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss_mode", "ppo", "unknown loss_mode 'ppo'"),
        ("torch_dtype", "fp8", "unknown torch_dtype 'fp8'"),
        ("optimizer", "sgd", "unknown optimizer"),
        ("hindsight_block_template", "no slot", "follow_up"),
        ("distillation_topk", 0, "distillation_topk must be >= 1"),
        ("top_p", 0.0, "top_p"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(field, value, message):
    with pytest.raises(ValueError, match=message):
        OnlineSDPOConfig(**{field: value})


def test_generation_keeps_exact_ids_and_only_emitted_eos(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, max_new_tokens=6)
    torch.manual_seed(0)
    generations = updater.generate([MESSAGES, [{"role": "user", "content": "Longer prompt about something else."}]])
    eos = updater.tokenizer.eos_token_id
    for generation in generations:
        assert 0 < len(generation.token_ids) <= 6
        assert generation.finished == (generation.token_ids[-1] == eos)
        assert eos not in generation.token_ids[:-1]
        assert updater.completion_ids(generation) == generation.token_ids


def test_string_responses_get_eos_appended(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path)
    ids = updater.completion_ids("Blue.  ")
    assert ids[-1] == updater.tokenizer.eos_token_id
    assert updater.tokenizer.decode(ids[:-1]) == "Blue."


def test_bad_responses_fail_clearly(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, max_new_tokens=4)
    with pytest.raises(EmptyResponseError, match="empty"):
        updater.train_step(MESSAGES, "   ", FOLLOW_UP)
    with pytest.raises(EmptyResponseError):
        updater.train_step(MESSAGES, Generation([], "", finished=False), FOLLOW_UP)
    with pytest.raises(ValueError, match="more than the completion budget max_new_tokens=4"):
        updater.train_step(MESSAGES, "one two three four five six seven", FOLLOW_UP)
    with pytest.raises(ValueError, match="follow-up is empty"):
        updater.train_step(MESSAGES, "Blue", "  ")
    assert updater.step == 0


@pytest.mark.parametrize("loss_mode", ["full_distillation", "simple_signal"])
def test_train_step_metrics_follow_the_reference_schema(tiny_model_path, tmp_path, loss_mode):
    updater = make_updater(tiny_model_path, tmp_path, loss_mode=loss_mode, train_steps_per_example=2)
    metrics = updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    common = {
        "policy_logp_mean",
        "completion_tokens",
        "loss_mode",
        "step",
        "grad_norm",
        "loss",
        "train_steps_per_example",
        "train_time_s",
    }
    mode_keys = {"kl_mean"} if loss_mode == "full_distillation" else {"signal_mean", "signal_std", "teacher_logp_mean"}
    assert common | mode_keys <= set(metrics)
    assert metrics["step"] == 1 and updater.step == 1 and metrics["train_steps_per_example"] == 2
    assert metrics["completion_tokens"] == len(fixed_response(updater).token_ids)
    assert all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "policy_logp_mean"))


def _signal_objective(updater, response_ids, follow_up):
    """J = Σ_t A_t log π(y_t|x) with A_t the signal measured before the update (fixed)."""
    student_ctx = updater.encode_context(MESSAGES)
    teacher_ctx = updater.encode_context(build_hindsight_messages(MESSAGES, follow_up))
    pad = updater.tokenizer.pad_token_id
    with torch.no_grad():
        student = score_completions(updater.model, pad_contexts_and_completions([student_ctx], [response_ids], pad))
        teacher = score_completions(updater.model, pad_contexts_and_completions([teacher_ctx], [response_ids], pad))
    return student.logprobs[0], (teacher.logprobs - student.logprobs)[0]


def test_simple_signal_update_moves_logprobs_along_the_signal(tiny_model_path, tmp_path):
    """End-to-end sign test: one update increases Σ_t A_t·log π(y_t|x) (A_t fixed, measured before)."""
    updater = make_updater(tiny_model_path, tmp_path, loss_mode="simple_signal", learning_rate=1e-4)
    response = fixed_response(updater)
    before, signal = _signal_objective(updater, response.token_ids, FOLLOW_UP)
    assert signal.abs().sum() > 0
    updater.train_step(MESSAGES, response, FOLLOW_UP)
    after, _ = _signal_objective(updater, response.token_ids, FOLLOW_UP)
    assert float((signal * (after - before)).sum()) > 0


def test_full_distillation_update_reduces_kl_to_the_pre_update_teacher(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, learning_rate=1e-4, distillation_topk=50)
    response = fixed_response(updater)
    student_ctx = updater.encode_context(MESSAGES)
    teacher_ctx = updater.encode_context(build_hindsight_messages(MESSAGES, FOLLOW_UP))
    pad = updater.tokenizer.pad_token_id
    student_batch = pad_contexts_and_completions([student_ctx], [response.token_ids], pad)
    with torch.no_grad():
        teacher_full = torch.log_softmax(
            updater.model(
                input_ids=pad_contexts_and_completions([teacher_ctx], [response.token_ids], pad).input_ids
            ).logits.float(),
            -1,
        )[0, -len(response.token_ids) - 1 : -1]

    def kl_to_frozen_teacher():
        with torch.no_grad():
            logits = updater.model(input_ids=student_batch.input_ids).logits.float()
        student = torch.log_softmax(logits, -1)[0, -len(response.token_ids) - 1 : -1]
        return float((student.exp() * (student - teacher_full)).sum(-1).mean())

    before = kl_to_frozen_teacher()
    updater.train_step(MESSAGES, response, FOLLOW_UP)
    assert kl_to_frozen_teacher() < before


@pytest.mark.slow
def test_batched_train_step_loss_is_the_mean_of_single_losses(tiny_model_path, tmp_path):
    conversations = [MESSAGES, [{"role": "user", "content": "Tell me something about the sea, briefly."}]]
    follow_ups = [FOLLOW_UP, "Make it funnier."]
    texts = [" Blue is a nice colour", " The sea is big and salty and full of fish"]
    singles = []
    for conversation, text, follow_up in zip(conversations, texts, follow_ups):
        updater = make_updater(tiny_model_path, tmp_path, learning_rate=1e-12)
        singles.append(updater.train_step(conversation, fixed_response(updater, text), follow_up)["loss"])
    assert min(singles) > 1e-3
    updater = make_updater(tiny_model_path, tmp_path, learning_rate=1e-12)
    responses = [fixed_response(updater, text) for text in texts]
    batched = updater.train_step_batch(conversations, responses, follow_ups)["loss"]
    assert batched == pytest.approx(sum(singles) / 2, rel=1e-4)


@pytest.mark.slow
def test_micro_batch_cap_splits_the_update_without_changing_its_gradient(tiny_model_path, tmp_path):
    conversations = [MESSAGES, MESSAGES, MESSAGES]
    texts = [" Blue is a nice colour", " Red is a nice colour", " Green is a fine colour"]
    follow_ups = [FOLLOW_UP, "Make it funnier.", FOLLOW_UP]
    figures = {}
    for cap in (0, 2):
        updater = make_updater(tiny_model_path, tmp_path / str(cap), train_micro_batch_size=cap)
        responses = [fixed_response(updater, text) for text in texts]
        figures[cap] = updater.train_step_batch(conversations, responses, follow_ups)
    assert (figures[0]["micro_batches"], figures[2]["micro_batches"]) == (1, 2)
    assert figures[2]["loss"] == pytest.approx(figures[0]["loss"], rel=1e-5)
    assert figures[2]["grad_norm"] == pytest.approx(figures[0]["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_skipping_peft_input_casts_under_autocast_changes_no_number(tiny_model_path, tmp_path, monkeypatch):
    import contextlib

    from sdpo.learner import updater as updater_module

    figures = {}
    for skip in (True, False):
        if not skip:
            keep_casts = lambda *_, **__: contextlib.nullcontext()  # noqa: E731
            monkeypatch.setattr(updater_module, "disable_input_dtype_casting", keep_casts)
        torch.manual_seed(0)
        updater = make_updater(
            tiny_model_path, tmp_path / str(skip), torch_dtype="bfloat16", use_lora=True, lora_r=4, lora_alpha=8
        )
        assert updater.autocast_dtype == torch.bfloat16
        for name, parameter in updater.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(1))
        metrics = updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
        weights = {n: p.detach().clone() for n, p in updater.model.named_parameters() if p.requires_grad}
        figures[skip] = (metrics["loss"], metrics["grad_norm"], weights)
    assert figures[True][:2] == figures[False][:2]
    assert all(torch.equal(figures[True][2][n], figures[False][2][n]) for n in figures[True][2])


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True])
def test_gradient_checkpointing_recomputes_the_same_gradient(tiny_model_path, tmp_path, use_lora):
    extra = dict(use_lora=use_lora, lora_r=4, lora_alpha=8) if use_lora else {}
    figures = {}
    for recompute in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        updater = make_updater(tiny_model_path, tmp_path / str(recompute), gradient_checkpointing=recompute, **extra)
        figures[recompute] = updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    assert figures[True]["loss"] == pytest.approx(figures[False]["loss"], rel=1e-6)
    assert figures[True]["grad_norm"] == pytest.approx(figures[False]["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True])
def test_checkpoint_then_resume_gives_the_identical_next_step(tiny_model_path, tmp_path, use_lora):
    extra = dict(use_lora=use_lora, lora_r=4, lora_alpha=8) if use_lora else {}
    first = make_updater(tiny_model_path, tmp_path, **extra)
    response = fixed_response(first)
    first.train_step(MESSAGES, response, FOLLOW_UP)
    checkpoint = first.save_checkpoint()
    expected = first.train_step(MESSAGES, response, FOLLOW_UP)

    resumed = make_updater(tiny_model_path, tmp_path / "other", **extra)
    resumed = OnlineSDPOUpdater(resumed.config, resume_from=checkpoint)
    assert resumed.step == 1
    got = resumed.train_step(MESSAGES, response, FOLLOW_UP)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert got["step"] == 2


def test_periodic_checkpoints_are_pruned_and_found(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, checkpoint_every_n_steps=1, max_checkpoints=2)
    response = fixed_response(updater)
    for _ in range(3):
        updater.train_step(MESSAGES, response, FOLLOW_UP)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_2", "step_3"]
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_3"
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        OnlineSDPOUpdater(updater.config, resume_from=tmp_path)


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapter_and_optionally_a_merged_model(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    updater = make_updater(tiny_model_path, tmp_path, use_lora=True, lora_r=4, lora_alpha=8, save_merged_model=True)
    updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    path = updater.save_checkpoint()
    assert (path / "adapter_config.json").is_file() and (path / "training_state.pt").is_file()
    merged = AutoModelForCausalLM.from_pretrained(path / "merged")
    ids = torch.tensor([updater.encode_context(MESSAGES)])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, updater.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_lora_only_trains_adapters(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, use_lora=True, lora_r=4, lora_alpha=8)
    base = {n: p.detach().clone() for n, p in updater.model.named_parameters() if not p.requires_grad}
    updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    assert all(torch.equal(p, base[n]) for n, p in updater.model.named_parameters() if n in base)
    assert all(p.dtype == torch.float32 for p in updater.trainable_parameters)


def test_fp32_master_weights_with_bf16_autocast_by_default(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, torch_dtype="bfloat16")
    assert next(updater.model.parameters()).dtype == torch.float32
    assert updater.autocast_dtype == torch.bfloat16
    before = next(updater.model.parameters()).detach().clone()
    metrics = updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    assert math.isfinite(metrics["loss"]) and not torch.equal(before, next(updater.model.parameters()))
    pure = make_updater(tiny_model_path, tmp_path, torch_dtype="bfloat16", fp32_master_weights=False)
    assert next(pure.model.parameters()).dtype == torch.bfloat16 and pure.autocast_dtype is None


@pytest.mark.slow
def test_sampling_parameters_are_not_inherited_from_the_model(tiny_model_path, tmp_path):
    """A generation_config with top_k=1 (≈ greedy) must not leak into T=1 sampling."""
    updater = make_updater(tiny_model_path, tmp_path, max_new_tokens=5)
    updater.model.generation_config.top_k = 1
    updater.model.generation_config.temperature = 0.01
    updater.model.generation_config.min_p = 0.99
    outputs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        outputs.add(tuple(updater.generate_response(MESSAGES).token_ids))
    assert len(outputs) > 1
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    assert len({tuple(updater.generate_response(MESSAGES, greedy).token_ids) for _ in range(3)}) == 1


@pytest.mark.slow
def test_bundled_model_one_online_step(tmp_path):
    """The embedded default end to end: generate, train one step in each mode, loss finite."""
    updater = make_updater(
        "smollm2-135m-instruct", tmp_path, max_new_tokens=16, learning_rate=5e-6, torch_dtype="bfloat16"
    )
    torch.manual_seed(0)
    response = updater.generate_response(MESSAGES)
    metrics = updater.train_step(MESSAGES, response, FOLLOW_UP)
    assert math.isfinite(metrics["loss"]) and metrics["completion_tokens"] == len(response.token_ids)
