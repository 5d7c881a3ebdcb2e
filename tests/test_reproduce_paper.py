"""scripts/reproduce_paper.sh: each figure's dry-run prints the paper's settings (§4.2, Table 5), and the printed
command is one eval_online_sdpo.py accepts."""

import os
import subprocess

import pytest

from sdpo.online import config as online_config
from sdpo.personas.user_simulator import STYLE_PERSONAS
from tests.test_scripts import REPO, dry_run, flag

FIGURES = ("fig4", "fig5", "fig6")
OPPOSITE_AXIS = {"concise": "detailed", "casual": "professional", "beginner": "expert"}


def recipe(figure, *args, env=None):
    argv, _ = dry_run("reproduce_paper.sh", "--dry-run", *args, env={"FIGURE": figure, **(env or {})})
    assert argv[:2] == ["python", "eval_online_sdpo.py"]
    return argv


def test_fig5_is_the_tldr_setting_of_table5():
    argv = recipe("fig5")
    assert flag(argv, "--model") == "Qwen/Qwen3-4B" and flag(argv, "--user_model_name_or_path") == "Qwen/Qwen3-8B"
    assert {"--judge_local", "--user_vllm", "--oracle"} <= set(argv)
    assert flag(argv, "--style") == "concise_casual_beginner" and "--style_schedule" not in argv
    assert (
        flag(argv, "--interactions_per_step"),
        flag(argv, "--lr"),
        flag(argv, "--optim"),
        flag(argv, "--temperature"),
    ) == ("16", "5e-6", "adamw", "1.0")
    assert (flag(argv, "--max_prompt_tokens"), flag(argv, "--max_new_tokens")) == ("1024", "258")
    assert flag(argv, "--loss_mode") == "simple_signal" and flag(argv, "--system_prompt") == "tldr"
    assert flag(argv, "--eval_n") == "256" and flag(argv, "--train_n") == "256"
    assert flag(argv, "--train_jsonl").endswith("data/tldr_prompts_unique/train.jsonl")
    assert flag(argv, "--val_jsonl").endswith("data/tldr_prompts_unique/validation.jsonl")
    assert flag(argv, "--out_dir") == "/tmp/sdpo-test/reproduce-paper/rid" and flag(argv, "--run_name") == "paper_fig5"


def test_fig4_flips_the_persona_to_its_opposite_after_250_interactions():
    argv = recipe("fig4")
    (first, first_n), (second, second_n) = (part.split(":") for part in flag(argv, "--style_schedule").split(","))
    assert (first, first_n) == ("concise_casual_beginner", "250") and second in STYLE_PERSONAS
    assert second.split("_") == [OPPOSITE_AXIS[axis] for axis in first.split("_")]
    assert flag(argv, "--train_n") == str(int(first_n) + int(second_n)) and "--style" not in argv
    assert (
        flag(argv, "--model") == "Qwen/Qwen3-4B"
        and flag(argv, "--interactions_per_step") == "16"
        and "--oracle" in argv
    )


def test_fig6_is_the_helpsteer_setting_with_claude_and_three_sequential_preferences():
    argv = recipe("fig6")
    assert flag(argv, "--model") == "Qwen/Qwen3-8B"
    assert (flag(argv, "--user_backend"), flag(argv, "--judge_backend"), flag(argv, "--judge_model")) == (
        "anthropic",
        "anthropic",
        "claude-haiku-4-5-20251001",
    )
    assert not {"--user_model_name_or_path", "--judge_local", "--user_vllm", "--oracle", "--style"} & set(argv)
    schedule = [part.split(":") for part in flag(argv, "--style_schedule").split(",")]
    assert [n for _, n in schedule] == ["500"] * 3 and len({style for style, _ in schedule}) == 3
    assert flag(argv, "--train_n") == "1500" and flag(argv, "--eval_n") == "256"
    assert (flag(argv, "--interactions_per_step"), flag(argv, "--lr"), flag(argv, "--optim")) == (
        "32",
        "5e-6",
        "adamw_8bit",
    )
    assert (flag(argv, "--max_prompt_tokens"), flag(argv, "--max_new_tokens")) == ("2048", "2048")
    assert flag(argv, "--system_prompt") == "general"
    assert flag(argv, "--train_jsonl").endswith("data/helpsteer_prompts/train.jsonl")


@pytest.mark.parametrize("figure", FIGURES)
def test_each_recipe_is_a_command_the_loop_accepts(figure, tmp_path, monkeypatch):
    real_find_spec = online_config.importlib.util.find_spec
    # Fig. 6's 8-bit AdamW needs bitsandbytes (CUDA only), which this CPU machine does not have.
    monkeypatch.setattr(online_config.importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "hi"}\n')
    arguments = online_config.parse_arguments(recipe(figure, env={"DATA_DIR": str(tmp_path)})[2:])
    learner, run = arguments.learner, arguments.run
    assert (learner.learning_rate, learner.temperature, run.eval_n, learner.loss_mode) == (5e-6, 1.0, 256, "simple_signal")
    assert run.interactions_per_step == (32 if figure == "fig6" else 16)
    assert learner.use_lora and learner.use_vllm


def test_env_overrides_and_extra_arguments_are_forwarded(tmp_path):
    env = {"INTERACTIONS_PER_STEP": "4", "ORACLE": "0", "STYLE": "no_emojis", "BASE_WORK": str(tmp_path / "work")}
    argv = recipe("fig5", "--eval_every", "50", "--run_name", "has space", env=env)
    assert (
        flag(argv, "--interactions_per_step") == "4" and flag(argv, "--style") == "no_emojis" and "--oracle" not in argv
    )
    assert argv[-4:] == ["--eval_every", "50", "--run_name", "has space"]
    assert not (tmp_path / "work").exists(), "dry-run must create nothing"


def run_recipe(*args, env):
    environment = {k: v for k, v in os.environ.items() if k not in {"FIGURE", "ANTHROPIC_API_KEY"}}
    return subprocess.run(
        [str(REPO / "scripts" / "reproduce_paper.sh"), *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_figure_is_required_and_checked():
    result = run_recipe("--dry-run", env={})
    assert result.returncode == 1 and "FIGURE is required" in result.stderr
    result = run_recipe("--dry-run", env={"FIGURE": "fig7"})
    assert result.returncode == 1 and "unknown FIGURE=fig7" in result.stderr


def test_fig6_stops_before_any_work_without_an_anthropic_key(tmp_path):
    output = tmp_path / "out"
    result = run_recipe(
        env={"FIGURE": "fig6", "REPO_ROOT": str(tmp_path), "OUTPUT_DIR": str(output), "PYTHON": "false"}
    )
    assert result.returncode == 1 and "ANTHROPIC_API_KEY is required" in result.stderr
    assert not output.exists()


def test_script_is_executable_bash():
    path = REPO / "scripts" / "reproduce_paper.sh"
    assert os.access(path, os.X_OK) and subprocess.run(["bash", "-n", str(path)]).returncode == 0
