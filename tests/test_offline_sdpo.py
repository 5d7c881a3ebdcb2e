"""Offline SDPO: collator, loss against an independent computation, data errors, training runs
(1 process, 2 CPU processes, resume after an interruption, LoRA) and the launcher's dry run."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from offline_sdpo.main_offline_sdpo import UsageError, check_wandb_ready, parse_arguments, run
from offline_sdpo.offline_sdpo_trainer import (
    InteractionDataError,
    InteractionDataset,
    OfflineSDPOCollator,
    OfflineSDPOConfig,
    OfflineSDPOTrainer,
    drop_overlong_completions,
    load_interactions,
)
from sdpo.core import full_distillation_loss, pad_contexts_and_completions, score_completions
from tests.conftest import FIXTURES, build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "train_offline_sdpo.sh"
INTERACTIONS = FIXTURES / "offline" / "interactions.jsonl"
BAD_INTERACTIONS = FIXTURES / "offline" / "interactions_bad.jsonl"

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
COMPLETION = "Blue is a calm colour.   \n"
FOLLOW_UP = "  One word only, please. "


def sharegpt_row():
    return {
        "prompt": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."}],
        "completion": {"from": "gpt", "value": COMPLETION},
        "user_response": {"from": "human", "value": FOLLOW_UP},
    }


def chat_row():
    return {
        "prompt": PROMPT,
        "completion": {"role": "assistant", "content": COMPLETION},
        "user_response": {"role": "user", "content": FOLLOW_UP},
    }


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def test_from_value_and_role_content_rows_collate_identically(chat_tokenizer):
    collator = OfflineSDPOCollator(chat_tokenizer)
    assert collator([sharegpt_row()]) == collator([chat_row()])


def test_completion_is_rstripped_text_plus_eos(chat_tokenizer):
    batch = OfflineSDPOCollator(chat_tokenizer)([chat_row()])
    expected = chat_tokenizer(COMPLETION.rstrip() + chat_tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert batch["completion_ids"] == [expected]
    assert batch["completion_ids"][0][-1] == chat_tokenizer.eos_token_id
    assert batch["completion_has_eos"] == [True]


@pytest.mark.parametrize(
    "variant, marker",
    [
        ("online", "=== HINDSIGHT CONTEXT ==="),
        ("offline_v1", "Future User Message: One word only, please."),
        ("offline_assistant", "=== HINDSIGHT CONTEXT ==="),
    ],
)
def test_teacher_context_holds_the_follow_up_where_the_variant_puts_it(chat_tokenizer, variant, marker):
    batch = OfflineSDPOCollator(chat_tokenizer, hindsight_variant=variant)([chat_row()])
    student = decode(chat_tokenizer, batch["student_context_ids"][0])
    teacher = decode(chat_tokenizer, batch["teacher_context_ids"][0])
    generation_prompt = "<|im_start|>assistant\n"
    for text in (student, teacher):
        assert "Be brief." in text and "Name a colour." in text
        assert text.endswith(generation_prompt)
    assert "One word only" not in student and "HINDSIGHT" not in student
    assert marker in teacher and "One word only, please." in teacher
    follow_up_at = teacher.index("One word only")
    if variant == "offline_assistant":
        # An extra assistant turn holds the block, then a fresh generation prompt follows.
        assert teacher.count(generation_prompt) == 2
        assert teacher.rindex(generation_prompt, 0, follow_up_at) > teacher.index("Name a colour.")
    else:
        # Inside the (last) user turn: after the question, before that turn closes.
        user_turn = teacher.rindex("<|im_start|>user\n", 0, follow_up_at)
        assert user_turn < teacher.index("Name a colour.") < follow_up_at < teacher.index("<|im_end|>", follow_up_at)
        assert teacher.count(generation_prompt) == 1
    assert student == decode(chat_tokenizer, batch["student_context_ids"][0])


def test_contexts_are_left_truncated_by_the_same_tokens_of_x(chat_tokenizer):
    full = OfflineSDPOCollator(chat_tokenizer)([chat_row()])
    short = OfflineSDPOCollator(chat_tokenizer, max_context_length=12)([chat_row()])
    assert short["student_context_ids"][0] == full["student_context_ids"][0][-12:]
    # The teacher loses exactly the tokens of x the student lost, and keeps the whole follow-up.
    cut = len(full["student_context_ids"][0]) - 12
    assert short["teacher_context_ids"][0] == full["teacher_context_ids"][0][cut:]


def test_overlong_completion_is_skipped_or_truncated_without_eos(chat_tokenizer):
    rows, report = load_interactions(INTERACTIONS)
    lengths = [
        len(ids) for ids in OfflineSDPOCollator(chat_tokenizer).encode_completions([r.completion.text for r in rows])
    ]
    budget = sorted(lengths)[len(lengths) // 2]
    skip = OfflineSDPOCollator(chat_tokenizer, max_completion_length=budget)
    kept = drop_overlong_completions(rows, skip, report)
    assert len(kept) == sum(n <= budget for n in lengths) < len(rows)
    assert report.counts["completion_too_long"] == len(rows) - len(kept)
    too_long = InteractionDataset(rows)[lengths.index(max(lengths))]
    with pytest.raises(ValueError, match="max_completion_length"):
        skip([too_long])
    truncated = OfflineSDPOCollator(chat_tokenizer, max_completion_length=budget, overlong_completion="truncate")(
        [too_long]
    )
    assert len(truncated["completion_ids"][0]) == budget
    assert truncated["completion_ids"][0][-1] != chat_tokenizer.eos_token_id
    assert truncated["completion_has_eos"] == [False]


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def make_trainer(model, tokenizer, tmp_path, **overrides):
    settings = {"output_dir": str(tmp_path / "out"), "report_to": [], "use_cpu": True, "compute_dtype": "float32"}
    settings.update(overrides)
    rows, _ = load_interactions(INTERACTIONS)
    return OfflineSDPOTrainer(
        model=model,
        args=OfflineSDPOConfig(**settings),
        train_dataset=InteractionDataset(rows),
        processing_class=tokenizer,
    )


def independent_simple_signal_loss(model, batch, ignore_first_k):
    """Each row scored alone, unpadded, with a plain log-softmax: −mean_t A_t·log π(y_t|x) per row, averaged."""
    losses = []
    for student_ctx, teacher_ctx, completion in zip(
        batch["student_context_ids"], batch["teacher_context_ids"], batch["completion_ids"]
    ):

        def token_logprobs(context, completion=completion):
            ids = torch.tensor([context + completion])
            logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
            return logits.log_softmax(-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)

        student = token_logprobs(student_ctx)[ignore_first_k:]
        with torch.no_grad():
            teacher = token_logprobs(teacher_ctx)[ignore_first_k:]
        losses.append(-((teacher - student).detach() * student).mean())
    return torch.stack(losses).mean()


def test_offline_loss_equals_an_independent_computation(chat_tokenizer, tmp_path):
    model = build_tiny_llama(chat_tokenizer)
    trainer = make_trainer(model, chat_tokenizer, tmp_path, ignore_first_k=2)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    loss = trainer.compute_loss(model, batch)
    expected = independent_simple_signal_loss(model, batch, ignore_first_k=2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # Gradients agree as well (the teacher side carries none).
    grad = torch.autograd.grad(loss, model.model.embed_tokens.weight)[0]
    expected_grad = torch.autograd.grad(expected, model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_full_distillation_mode_uses_the_shared_loss(chat_tokenizer, tmp_path):
    model = build_tiny_llama(chat_tokenizer)
    trainer = make_trainer(model, chat_tokenizer, tmp_path, loss_mode="full_distillation", distillation_topk=5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    pad = chat_tokenizer.pad_token_id
    student_batch = pad_contexts_and_completions(
        batch["student_context_ids"], batch["completion_ids"], pad, ignore_first_k=2
    )
    teacher_batch = pad_contexts_and_completions(
        batch["teacher_context_ids"], batch["completion_ids"], pad, ignore_first_k=2
    )
    with torch.no_grad():
        student = score_completions(model, student_batch, topk=5)
        teacher = score_completions(model, teacher_batch, gather_indices=student.topk_indices)
        expected, _ = full_distillation_loss(student.topk_logprobs, teacher.gathered_logprobs, student.mask)
        loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, expected)


def test_metrics_are_window_means_and_reset(chat_tokenizer, tmp_path):
    model = build_tiny_llama(chat_tokenizer)
    trainer = make_trainer(model, chat_tokenizer, tmp_path)
    model.train()
    per_batch = []
    for rows in ([0, 1], [2, 3]):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
        per_batch.append(trainer.batch_loss(model, batch).metrics)
        trainer.compute_loss(model, batch)
    logged = trainer.reduced_metrics()
    for name in (
        "signal_mean",
        "signal_std",
        "policy_logp",
        "teacher_logp",
        "len_signal_mean",
        "base_loss",
        "eos_logp_mean",
    ):
        assert logged[f"sdpo/{name}"] == pytest.approx((per_batch[0][name] + per_batch[1][name]) / 2, rel=1e-5)
    assert "sdpo/kl_mean" not in logged  # simple_signal mode has no KL
    assert logged["sdpo/signal_mean"] == pytest.approx(
        logged["sdpo/teacher_logp"] - logged["sdpo/policy_logp"], abs=1e-5
    )
    assert trainer.reduced_metrics() == {}


def test_config_rejects_accelerate_amp_and_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="compute_dtype"):
        OfflineSDPOConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True)
    with pytest.raises(ValueError, match="hindsight_variant"):
        OfflineSDPOConfig(output_dir=str(tmp_path), hindsight_variant="nope", use_cpu=True)
    defaults = OfflineSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (defaults.learning_rate, defaults.lr_scheduler_type, defaults.warmup_steps, defaults.max_grad_norm) == (
        2e-6,
        "cosine",
        0.05,
        10.0,
    )
    assert (defaults.ignore_first_k, defaults.hindsight_variant, defaults.loss_mode) == (2, "online", "simple_signal")
    assert defaults.mixed_precision == "no" and defaults.activation_checkpointing and not defaults.remove_unused_columns
    assert defaults.ddp_find_unused_parameters is False


# --------------------------------------------------------------------------------------------------
# Data errors
# --------------------------------------------------------------------------------------------------


def test_malformed_row_error_names_file_line_and_problem():
    with pytest.raises(InteractionDataError, match=r"interactions_bad\.jsonl:2: not valid JSON"):
        load_interactions(BAD_INTERACTIONS)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": [{"from": "human", "value": "hi"}], "completion": {"from": "gpt", "value": "hello"}},
            "'user_response' is missing",
        ),
        ({**chat_row(), "prompt": "hi"}, "'prompt' must be a non-empty list"),
        ({**chat_row(), "completion": {"role": "assistant", "content": 3}}, "'completion' needs a string"),
        ({**chat_row(), "prompt": [{"role": "robot", "content": "x"}]}, r"'prompt\[0\]' has speaker 'robot'"),
        ({**chat_row(), "user_response": {"role": "user", "content": "  "}}, "'user_response' is empty"),
    ],
)
def test_each_field_problem_is_named(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(chat_row()) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(InteractionDataError, match=rf"rows\.jsonl:3: .*{message}"):
        load_interactions(path)


def test_skip_bad_rows_counts_each_reason():
    rows, report = load_interactions(BAD_INTERACTIONS, skip_bad_rows=True)
    assert [r.source.rsplit(":", 1)[1] for r in rows] == ["1", "6"]
    assert dict(report.counts) == {"invalid_json": 1, "invalid_row": 2}
    assert ":2: not valid JSON" in report.examples[0] and ":3: field 'user_response' is missing" in report.examples[1]


def test_cli_stops_on_a_bad_row_with_a_clear_message(tiny_model_path, tmp_path):
    arguments = parse_arguments(
        ["--train_jsonl", str(BAD_INTERACTIONS), "--base_model", tiny_model_path, "--output_dir", str(tmp_path)]
        + ["--report_to", "none"]
    )
    with pytest.raises(InteractionDataError, match=r"interactions_bad\.jsonl:2: not valid JSON.*--skip_bad_rows"):
        run(arguments)


def test_wandb_without_credentials_fails_before_loading(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(UsageError, match="--report_to none"):
        check_wandb_ready()


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------


def cli_args(model_path, output_dir, *extra, data=INTERACTIONS):
    return parse_arguments(
        [
            "--train_jsonl",
            str(data),
            "--base_model",
            model_path,
            "--output_dir",
            str(output_dir),
            "--report_to",
            "none",
            "--batch_size",
            "2",
            "--grad_accum",
            "1",
            "--logging_steps",
            "1",
            "--seed",
            "7",
            *extra,
        ]
    )


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_single_process_run_saves_a_loadable_final_model(tiny_model_path, tmp_path):
    summary = run(
        cli_args(tiny_model_path, tmp_path, "--max_steps", "3", "--learning_rate", "1e-3", "--save_steps", "100")
    )
    assert summary["world_size"] == 1 and summary["global_step"] == 3 and summary["examples_seen_per_rank"] == [6]
    assert summary["optimizer"] == "adamw_torch"
    assert (summary["distributed_type"], summary["parallelism"]) == ("NO", "single process")
    final = tmp_path / "final_model"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.eos_token == "<|im_end|>"
    trained, initial = weights(final), weights(tiny_model_path)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert {"sdpo/signal_mean", "sdpo/policy_logp", "sdpo/teacher_logp", "sdpo/eos_logp_mean"} <= set(
        state["log_history"][0]
    )
    assert json.loads((tmp_path / "train_summary.json").read_text())["global_step"] == 3
    assert json.loads((tmp_path / "data_report.json").read_text())["rows_used"] == 12


class InterruptAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated interruption at step {self.step}")


@pytest.mark.slow
def test_resume_after_interruption_continues_the_step_counter_and_matches_an_uninterrupted_run(
    tiny_model_path, tmp_path, capsys
):
    common = ("--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--dtype", "float32")
    run(cli_args(tiny_model_path, tmp_path / "straight", *common))
    with pytest.raises(KeyboardInterrupt):
        run(cli_args(tiny_model_path, tmp_path / "interrupted", *common), callbacks=[InterruptAtStep(3)])
    assert not (tmp_path / "interrupted" / "final_model").exists()
    # A save interrupted half-way leaves a newer, partial checkpoint: "latest" passes over it.
    partial = tmp_path / "interrupted" / "checkpoint-3"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{}")
    summary = run(cli_args(tiny_model_path, tmp_path / "interrupted", *common, "--resume_from_checkpoint", "latest"))
    assert Path(summary["resumed_from"]).name == "checkpoint-2"
    assert f"skipping a partial checkpoint: {partial} has no weights, no optimizer state" in capsys.readouterr().out
    assert summary["global_step"] == 4 and summary["steps_this_session"] == 2
    history = json.loads((tmp_path / "interrupted" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    straight, resumed = (
        weights(tmp_path / "straight" / "final_model"),
        weights(tmp_path / "interrupted" / "final_model"),
    )
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name])


@pytest.mark.slow
def test_lora_run_with_skipped_rows_saves_adapter_and_merged_model(tiny_model_path, tmp_path):
    args = cli_args(
        tiny_model_path,
        tmp_path,
        "--max_steps",
        "1",
        "--skip_bad_rows",
        "--use_lora",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--merge_lora",
        "--learning_rate",
        "1e-3",
        "--dtype",
        "float32",
        data=BAD_INTERACTIONS,
    )
    summary = run(args)
    assert summary["use_lora"] and summary["global_step"] == 1
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert (report["rows_read"], report["rows_used"], report["skipped_total"]) == (5, 2, 3)
    assert report["skipped_by_reason"] == {"invalid_json": 1, "invalid_row": 2}
    assert (tmp_path / "final_model" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model_merged")
    assert not any("lora" in name for name in merged.state_dict())


def launcher_env(**overrides):
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in ("TRAIN_JSONL", "WORLD_SIZE", "CPU", "OUTPUT_DIR", "RUN_ID", "BASE_MODEL", "WANDB_NAME", "WANDB_PROJECT")
    }
    env.update(overrides)
    return env


@pytest.mark.slow
def test_two_cpu_processes_train_together(tiny_model_path, tmp_path):
    env = launcher_env(
        TRAIN_JSONL=str(INTERACTIONS),
        BASE_MODEL=tiny_model_path,
        WORLD_SIZE="2",
        CPU="1",
        OUTPUT_DIR=str(tmp_path),
        BASE_WORK=str(tmp_path),
    )
    result = subprocess.run(
        [
            str(SCRIPT),
            "--max_steps",
            "3",
            "--batch_size",
            "2",
            "--grad_accum",
            "1",
            "--learning_rate",
            "1e-3",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
            "--dtype",
            "float32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    assert summary["distributed_type"] == "MULTI_CPU" and "running DDP over gloo" in result.stdout
    assert summary["examples_seen_per_rank"] == [6, 6]  # 3 steps x batch 2 on each rank
    first, second = summary["trainable_param_checksum_per_rank"]
    assert first == second  # DDP kept the replicas identical
    trained, initial = weights(tmp_path / "final_model"), weights(tiny_model_path)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


# --------------------------------------------------------------------------------------------------
# Launcher dry run
# --------------------------------------------------------------------------------------------------


def dry_run(*args, **env_overrides):
    env = launcher_env(BASE_WORK="/scratch/me", **env_overrides)
    result = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    command = next(
        (line for line in result.stdout.splitlines() if line.startswith("[dry-run] ") and "BASE_WORK=" not in line),
        None,
    )
    argv = shlex.split(command.removeprefix("[dry-run] ")) if command else None
    return result, argv


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_dry_run_requires_train_jsonl():
    result, argv = dry_run("--dry-run")
    assert result.returncode == 1 and argv is None
    assert "TRAIN_JSONL is required" in result.stderr and "interaction JSONL" in result.stderr


def test_dry_run_defaults_follow_the_reference(tmp_path):
    result, argv = dry_run("--dry-run", TRAIN_JSONL="data/x.jsonl", CPU="0", RUN_ID="offline-sdpo-test")
    assert result.returncode == 0, result.stderr
    assert argv[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert flag(argv, "--config_file") == str(REPO_ROOT / "multigpu_accelerate_config.yaml")
    assert flag(argv, "--num_processes") == "4"
    assert (
        flag(argv, "--model_name_or_path"),
        flag(argv, "--learning_rate"),
        flag(argv, "--per_device_train_batch_size"),
        flag(argv, "--gradient_accumulation_steps"),
        flag(argv, "--num_train_epochs"),
    ) == ("Qwen/Qwen3-4B", "2e-6", "4", "2", "2")
    assert flag(argv, "--output_dir") == "/scratch/me/offline-sdpo/offline-sdpo-test"
    assert flag(argv, "--run_name") == "sdpo-Qwen-Qwen3-4B-lr2e-6-bs4-ga2"
    assert flag(argv, "--project") == "offline-sdpo"
    assert not Path("/scratch/me/offline-sdpo").exists()


def test_dry_run_env_overrides_and_world_size_mismatch_note():
    result, argv = dry_run(
        "--dry-run",
        TRAIN_JSONL="t.jsonl",
        CPU="0",
        WORLD_SIZE="2",
        BASE_MODEL="org/model",
        LR="1e-5",
        BS="2",
        GA="16",
        NUM_EPOCHS="1",
        WANDB_PROJECT="proj",
    )
    assert flag(argv, "--num_processes") == "2"
    assert "num_processes: 4; launching WORLD_SIZE=2" in result.stderr
    assert (
        flag(argv, "--model_name_or_path"),
        flag(argv, "--learning_rate"),
        flag(argv, "--per_device_train_batch_size"),
        flag(argv, "--gradient_accumulation_steps"),
        flag(argv, "--num_train_epochs"),
        flag(argv, "--project"),
    ) == ("org/model", "1e-5", "2", "16", "1", "proj")
    assert flag(argv, "--run_name") == "sdpo-org-model-lr1e-5-bs2-ga16"


def test_dry_run_world_size_one_runs_python_directly():
    _, argv = dry_run("--dry-run", TRAIN_JSONL="t.jsonl", WORLD_SIZE="1", CPU="0")
    assert argv[1] == str(REPO_ROOT / "offline_sdpo" / "main_offline_sdpo.py")
    assert "accelerate.commands.launch" not in argv


def test_dry_run_cpu_uses_the_multi_process_launcher():
    _, argv = dry_run("--dry-run", TRAIN_JSONL="t.jsonl", WORLD_SIZE="2", CPU="1")
    assert argv[:2] == ["env", "CUDA_VISIBLE_DEVICES="]
    launch = argv[argv.index("accelerate.commands.launch") :]
    assert launch[1:10] == [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def test_dry_run_forwards_extra_arguments_with_spaces():
    _, argv = dry_run(
        "--max_steps",
        "5",
        "--dry-run",
        "--hindsight_template",
        "Later the user said: {follow_up}",
        TRAIN_JSONL="my data/t.jsonl",
        WORLD_SIZE="1",
    )
    assert flag(argv, "--dataset_name") == "my data/t.jsonl"
    assert argv[-4:] == ["--max_steps", "5", "--hindsight_template", "Later the user said: {follow_up}"]


def test_missing_accelerate_config_fails_clearly():
    result, argv = dry_run("--dry-run", TRAIN_JSONL="t.jsonl", CPU="0", WORLD_SIZE="2", ACCELERATE_CONFIG="/nope.yaml")
    assert result.returncode == 1 and argv is None
    assert "ACCELERATE_CONFIG=/nope.yaml does not exist" in result.stderr


@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_configs_are_refused_on_cpu_with_one_line(config):
    path = REPO_ROOT / "accelerate_configs" / config
    result, argv = dry_run("--dry-run", TRAIN_JSONL="t.jsonl", CPU="1", WORLD_SIZE="2", ACCELERATE_CONFIG=str(path))
    assert result.returncode == 1 and argv is None
    assert result.stderr.strip().splitlines() == [
        (
            f"error: ACCELERATE_CONFIG={path} asks for {'FSDP' if config == 'fsdp.yaml' else 'DeepSpeed'}, which "
            "accelerate runs only on GPUs (CPU processes would silently run plain DDP): unset ACCELERATE_CONFIG "
            "(CPU=1 trains with DDP over gloo) or run on GPUs"
        )
    ]


def test_sharded_config_on_gpus_goes_through_accelerate_even_for_one_process():
    path = REPO_ROOT / "accelerate_configs" / "fsdp.yaml"
    result, argv = dry_run("--dry-run", TRAIN_JSONL="t.jsonl", CPU="0", WORLD_SIZE="1", ACCELERATE_CONFIG=str(path))
    assert result.returncode == 0, result.stderr
    assert flag(argv, "--config_file") == str(path) and flag(argv, "--num_processes") == "1"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_missing_deepspeed_is_one_line_before_launch():
    path = REPO_ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"
    result, argv = dry_run(
        "--dry-run", TRAIN_JSONL="t.jsonl", CPU="0", WORLD_SIZE="2", ACCELERATE_CONFIG=str(path), PYTHON=sys.executable
    )
    assert result.returncode == 1 and argv is None
    assert result.stderr.strip().splitlines() == [
        f"error: ACCELERATE_CONFIG={path} needs DeepSpeed, which {sys.executable} cannot import: pip install deepspeed"
    ]


def test_fsdp_config_wraps_the_models_own_decoder_layer(chat_tokenizer):
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    settings = yaml.safe_load((REPO_ROOT / "accelerate_configs" / "fsdp.yaml").read_text())["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in settings  # no class name that fits only one architecture
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=settings["fsdp_version"], auto_wrap_policy=settings["fsdp_auto_wrap_policy"].lower()
    )
    plugin.set_auto_wrap_policy(build_tiny_llama(chat_tokenizer))
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
