"""Teacher kinds (sdpo.teachers) on tiny models, alone and inside the online updater."""

import copy
import json

import pytest
import torch

from sdpo.core import pad_contexts_and_completions, score_completions
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import OnlineSDPOUpdater
from sdpo.models.generation import encode_chat
from sdpo.teachers import TEACHER_KINDS, build_teacher, resolve_teacher_kind
from tests.test_online_sdpo_updater import FOLLOW_UP, MESSAGES, fixed_response, make_updater

LORA = {"use_lora": True, "lora_r": 4, "lora_alpha": 8}


def lora_model(tiny_model, seed=3):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    nudge_(model, seed)  # LoRA starts with B = 0; make the adapter change the outputs
    return model


def nudge_(model, seed, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def snapshot(pairs):
    return [(student.detach().clone(), teacher.detach().clone()) for _, student, teacher in pairs]


def scoring_batch(tokenizer):
    context = encode_chat(tokenizer, MESSAGES)
    completion = tokenizer(" Blue, a calm colour.", add_special_tokens=False)["input_ids"]
    return pad_contexts_and_completions([context], [completion], tokenizer.pad_token_id)


def teacher_logprobs(teacher, model, batch):
    with torch.no_grad(), teacher.scoring(model) as (network, blend):
        return score_completions(network, batch, blend=blend).logprobs


def test_kinds_and_aliases():
    assert TEACHER_KINDS == ("live", "ema", "base", "trust_region")
    assert resolve_teacher_kind("trust-region") == "trust_region" and resolve_teacher_kind("EMA") == "ema"
    with pytest.raises(ValueError, match="unknown teacher 'mean'"):
        resolve_teacher_kind("mean")


@pytest.mark.parametrize("use_lora", [False, True])
def test_ema_moves_toward_the_student_at_the_rate_every_sync_interval(tiny_model, use_lora):
    model = lora_model(tiny_model) if use_lora else copy.deepcopy(tiny_model)
    rate = 0.25
    teacher = build_teacher("ema", model, ema_rate=rate, sync_interval=2)
    assert teacher.pairs and all(torch.equal(s, t) for s, t in snapshot(teacher.pairs))  # starts at the student
    nudge_(model, 11)
    before = snapshot(teacher.pairs)
    assert not teacher.update()  # step 1 of 2: no sync
    assert all(torch.equal(t, t_now) for (_, t), (_, _, t_now) in zip(before, teacher.pairs))
    assert teacher.update()  # step 2: θ_T ← θ_T + rate·(θ_S − θ_T)
    for (student, old), (name, _, new) in zip(before, teacher.pairs):
        torch.testing.assert_close(new, old + rate * (student - old), msg=name)
        distance_before, distance_after = float((student - old).norm()), float((student - new).norm())
        if distance_before > 0:
            assert distance_after == pytest.approx((1 - rate) * distance_before, rel=1e-5)
    assert teacher.last_sync_step == 2 and teacher.state_dict()["optimizer_steps"] == 2


def test_ema_teacher_never_trains_and_the_student_adapter_stays_trainable(tiny_model, chat_tokenizer):
    model = lora_model(tiny_model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    teacher = build_teacher("ema", model, ema_rate=0.1)
    teacher_logprobs(teacher, model, scoring_batch(chat_tokenizer))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    assert model.active_adapter == "default"
    assert all(not t.requires_grad for _, _, t in teacher.pairs)


def test_ema_teacher_scores_with_its_own_weights(tiny_model, chat_tokenizer):
    model = lora_model(tiny_model)
    teacher = build_teacher("ema", model, ema_rate=0.5)
    batch = scoring_batch(chat_tokenizer)
    with torch.no_grad():
        initial = score_completions(model, batch).logprobs
    nudge_(model, 12)
    torch.testing.assert_close(teacher_logprobs(teacher, model, batch), initial)  # the student moved, not the teacher
    with torch.no_grad():
        assert not torch.allclose(score_completions(model, batch).logprobs, initial)


@pytest.mark.parametrize("use_lora", [False, True])
def test_base_teacher_is_the_initial_network(tiny_model, chat_tokenizer, use_lora):
    batch = scoring_batch(chat_tokenizer)
    with torch.no_grad():
        base_scores = score_completions(tiny_model, batch).logprobs
    model = lora_model(tiny_model) if use_lora else copy.deepcopy(tiny_model)
    teacher = build_teacher("base", model)
    nudge_(model, 13)  # training moves the student (or its adapter)
    torch.testing.assert_close(teacher_logprobs(teacher, model, batch), base_scores)


@pytest.mark.parametrize("use_lora", [False, True])
def test_trust_region_teacher_blends_base_and_current_logits(tiny_model, chat_tokenizer, use_lora):
    batch = scoring_batch(chat_tokenizer)
    model = lora_model(tiny_model) if use_lora else copy.deepcopy(tiny_model)
    mix = 0.3
    teacher = build_teacher("trust_region", model, trust_region_mix=mix)
    nudge_(model, 14)
    with torch.no_grad():
        keep = batch.completion_width + 1
        forward = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
        }
        current = model(**forward).logits[:, -keep:-1].float()
        base = tiny_model(**forward).logits[:, -keep:-1].float()
        blended = torch.lerp(base, current, mix).log_softmax(-1)
        expected = blended.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(teacher_logprobs(teacher, model, batch), expected, rtol=1e-4, atol=1e-5)
    for end, reference in ((0.0, base), (1.0, current)):
        edge = build_teacher("trust_region", model, trust_region_mix=end, initial_model=tiny_model)
        want = reference.log_softmax(-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(teacher_logprobs(edge, model, batch), want, rtol=1e-4, atol=1e-5)


def test_full_ema_copy_is_kept_in_the_compute_dtype(tiny_model):
    teacher = build_teacher("ema", tiny_model, compute_dtype=torch.bfloat16)
    assert {p.dtype for p in teacher.network.parameters()} == {torch.bfloat16}
    assert all(not p.requires_grad for p in teacher.network.parameters())
    assert teacher.extra_parameters() == sum(p.numel() for p in tiny_model.parameters())


# ------------------------------------------------------------------ inside the online updater


@pytest.mark.parametrize("kind", TEACHER_KINDS)
@pytest.mark.parametrize("loss_mode", ["simple_signal", "full_distillation"])
def test_every_teacher_trains_in_the_online_updater(tiny_model_path, tmp_path, kind, loss_mode):
    updater = make_updater(tiny_model_path, tmp_path, teacher=kind, loss_mode=loss_mode, train_steps_per_example=2)
    metrics = updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    assert metrics["teacher"] == kind and metrics["teacher_syncs"] == (2 if kind == "ema" else 0)
    assert metrics["grad_norm"] > 0 and metrics["policy_entropy_mean"] > 0


@pytest.mark.parametrize("kind", TEACHER_KINDS)
def test_a_cut_teacher_context_is_counted_and_still_trains(tiny_model_path, tmp_path, kind):
    """x is cut the same way in student and teacher contexts and counted; the loss is never dropped."""
    long_messages = [{"role": "user", "content": "Tell me about colours. " * 40 + "Name a colour."}]
    updater = make_updater(tiny_model_path, tmp_path, teacher=kind, max_context_length=40, loss_mode="simple_signal")
    metrics = updater.train_step(long_messages, fixed_response(updater), FOLLOW_UP)
    assert metrics["truncated_contexts"] == 1
    assert metrics["completion_tokens"] > 0 and metrics["loss"] != 0 and metrics["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_with_an_ema_teacher_gives_the_same_next_loss(tiny_model_path, tmp_path, use_lora):
    extra = dict(teacher="ema", teacher_ema_rate=0.5, learning_rate=1e-2, **(LORA if use_lora else {}))
    first = make_updater(tiny_model_path, tmp_path, **extra)
    response = fixed_response(first)
    for _ in range(2):  # the EMA teacher now differs from both the student and the initial model
        first.train_step(MESSAGES, response, FOLLOW_UP)
    checkpoint = first.save_checkpoint()
    assert (checkpoint / "teacher_state.pt").is_file()
    if use_lora:
        assert not (checkpoint / "sdpo_ema_teacher").exists()  # the policy adapter alone is saved as weights
    expected = first.train_step(MESSAGES, response, FOLLOW_UP)

    resumed = OnlineSDPOUpdater(
        make_updater(tiny_model_path, tmp_path / "other", **extra).config, resume_from=checkpoint
    )
    got = resumed.train_step(MESSAGES, response, FOLLOW_UP)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7)
    assert got["teacher_logp_mean"] == pytest.approx(expected["teacher_logp_mean"], rel=1e-6)

    fresh_teacher = OnlineSDPOUpdater(
        make_updater(tiny_model_path, tmp_path / "third", **extra).config, resume_from=checkpoint
    )
    (checkpoint / "teacher_state.pt").unlink()  # without the state the teacher restarts from the student: differs
    restarted = OnlineSDPOUpdater(fresh_teacher.config, resume_from=checkpoint)
    assert restarted.train_step(MESSAGES, response, FOLLOW_UP)["teacher_logp_mean"] != pytest.approx(
        expected["teacher_logp_mean"], rel=1e-6
    )


def test_resuming_with_another_teacher_kind_fails_clearly(tiny_model_path, tmp_path):
    first = make_updater(tiny_model_path, tmp_path, teacher="ema")
    first.train_step(MESSAGES, fixed_response(first), FOLLOW_UP)
    checkpoint = first.save_checkpoint()
    config = OnlineSDPOConfig(**{**first.config.to_dict(), "teacher": "live"})
    with pytest.raises(ValueError, match="teacher is 'ema' but this run asks for 'live'"):
        OnlineSDPOUpdater(config, resume_from=checkpoint)


@pytest.mark.slow
def test_full_model_base_teacher_after_resume_is_still_the_initial_model(tiny_model_path, tmp_path, chat_tokenizer):
    first = make_updater(tiny_model_path, tmp_path, teacher="base", learning_rate=1e-2)
    first.train_step(MESSAGES, fixed_response(first), FOLLOW_UP)
    checkpoint = first.save_checkpoint()
    resumed = OnlineSDPOUpdater(first.config, resume_from=checkpoint)
    batch = scoring_batch(chat_tokenizer)
    torch.testing.assert_close(
        teacher_logprobs(resumed.teacher, resumed.model, batch), teacher_logprobs(first.teacher, first.model, batch)
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("teacher", "mean", "unknown teacher"),
        ("teacher_ema_rate", 1.5, "teacher_ema_rate must be in"),
        ("trust_region_mix", -0.1, "trust_region_mix must be in"),
        ("teacher_sync_interval", 0, "teacher_sync_interval must be >= 1"),
        ("distillation_alpha", 2.0, "distillation_alpha must be in"),
        ("topk_from", "both", "unknown topk_from"),
        ("is_clip", -1.0, "is_clip must be a finite number >= 0"),
        ("advantage_centering", "batch", "unknown advantage_centering"),
    ],
)
def test_config_rejects_bad_teacher_and_loss_options(field, value, message):
    with pytest.raises(ValueError, match=message):
        OnlineSDPOConfig(**{field: value})


def test_teacher_and_loss_options_parse_from_flags_aliases_and_yaml(tmp_path):
    from sdpo.utils.command_line import ConfigParser, UsageError

    parser = ConfigParser([OnlineSDPOConfig])
    (config,) = parser.parse(
        [
            "--teacher_model_kind",
            "trust-region",
            "--alpha",
            "0.5",
            "--distillation_is_clip",
            "2",
            "--topk_from",
            "teacher",
            "--teacher_update_rate",
            "0.1",
            "--teacher_sync_steps",
            "3",
            "--trust_region_mix",
            "0.2",
        ]
    )
    assert (config.teacher, config.distillation_alpha, config.is_clip, config.topk_from) == (
        "trust_region",
        0.5,
        2.0,
        "teacher",
    )
    assert (config.teacher_ema_rate, config.teacher_sync_interval, config.trust_region_mix) == (0.1, 3, 0.2)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "teacher: ema\nteacher_ema_rate: 0.02\nloss_mode: simple_signal\nadvantage_centering: sequence\n"
    )
    (config,) = ConfigParser([OnlineSDPOConfig]).parse(["--config", str(yaml_file)])
    assert (config.teacher, config.teacher_ema_rate, config.advantage_centering) == ("ema", 0.02, "sequence")
    with pytest.raises(UsageError, match="unknown teacher 'mean'"):
        ConfigParser([OnlineSDPOConfig]).parse(["--teacher", "mean"])


# ------------------------------------------------------------------ inside the offline trainer


@pytest.mark.slow  # four short CLI training runs (~20 s)
@pytest.mark.parametrize(
    "extra", [("--teacher", "ema", "--teacher_ema_rate", "0.5"), ("--teacher", "ema", "--use_lora")]
)
def test_offline_resume_with_an_ema_teacher_matches_an_uninterrupted_run(tiny_model_path, tmp_path, extra):
    from offline_sdpo.main_offline_sdpo import run
    from tests.test_offline_sdpo import InterruptAtStep, cli_args

    common = ("--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-2", "--dtype", "float32", *extra)
    if "--use_lora" in extra:
        common = (*common, "--lora_r", "4", "--lora_alpha", "8")
    # main_offline_sdpo seeds only inside the Trainer, after get_peft_model drew the adapter's A: seed here.
    torch.manual_seed(0)
    run(cli_args(tiny_model_path, tmp_path / "straight", *common))
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run(cli_args(tiny_model_path, tmp_path / "interrupted", *common), callbacks=[InterruptAtStep(3)])
    teacher_state = torch.load(tmp_path / "interrupted" / "checkpoint-2" / "teacher_state.pt", weights_only=True)
    assert teacher_state["kind"] == "ema" and teacher_state["optimizer_steps"] == 2 and teacher_state["weights"]
    run(cli_args(tiny_model_path, tmp_path / "interrupted", *common, "--resume_from_checkpoint", "latest"))
    straight = torch.load(tmp_path / "straight" / "checkpoint-4" / "teacher_state.pt", weights_only=True)
    resumed = torch.load(tmp_path / "interrupted" / "checkpoint-4" / "teacher_state.pt", weights_only=True)
    assert resumed["optimizer_steps"] == straight["optimizer_steps"] == 4
    for name, tensor in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, msg=name)
    history = json.loads((tmp_path / "interrupted" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    straight_history = json.loads((tmp_path / "straight" / "checkpoint-4" / "trainer_state.json").read_text())[
        "log_history"
    ]
    assert [e["loss"] for e in history if "loss" in e] == pytest.approx(
        [e["loss"] for e in straight_history if "loss" in e]
    )


def test_offline_trainer_refuses_a_teacher_copy_of_sharded_weights(tiny_model):
    from sdpo.teachers import check_sharded_training

    with pytest.raises(ValueError, match="teacher=ema is not supported under DeepSpeed ZeRO-3"):
        check_sharded_training("ema", tiny_model, zero3=True, fsdp=False)
    with pytest.raises(ValueError, match="teacher=base is not supported under FSDP"):
        check_sharded_training("base", tiny_model, zero3=False, fsdp=True)
    check_sharded_training("live", tiny_model, zero3=True, fsdp=False)
    check_sharded_training("trust_region", lora_model(tiny_model), zero3=True, fsdp=False)
