"""scripts/reproduce_paper.sh: each figure's dry-run prints the settings the paper's figures show (§4.2, Table 5,
App. D.3; spec §1.3b), and every printed command is one eval_online_sdpo.py accepts."""

import os
import shlex
import subprocess

import pytest

from sdpo.online import config as online_config
from sdpo.personas.user_simulator import STYLE_PERSONAS
from tests.test_scripts import REPO, dry_run, flag

FIGURES = ("fig4", "fig5", "fig6", "fig9")
OPPOSITE_AXIS = {"concise": "detailed", "casual": "professional", "beginner": "expert"}
FIG9_PROFILES = [
    "detailed_professional_expert",
    "concise_professional_expert",
    "detailed_casual_beginner",
    "concise_casual_expert",
    "detailed_professional_beginner",
    "detailed_casual_expert",
]


def recipe(figure, *args, env=None):
    argv, _ = dry_run("reproduce_paper.sh", "--dry-run", *args, env={"FIGURE": figure, **(env or {})})
    assert argv[:2] == ["python", "eval_online_sdpo.py"]
    return argv


def recipe_commands(figure, *args, env=None):
    """Every command a recipe prints (fig9 prints one run per profile, then the grid)."""
    environment = {k: v for k, v in os.environ.items() if not k.endswith(("KEY", "TOKEN")) and k != "TABLE"}
    environment.update(
        {"TMPDIR": "/tmp/sdpo-test", "RUN_ID": "rid", "PYTHON": "python", "FIGURE": figure, **(env or {})}
    )
    result = subprocess.run(
        [str(REPO / "scripts" / "reproduce_paper.sh"), "--dry-run", *args],
        env=environment, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[dry-run] ") and "BASE_WORK=" not in line]
    return [shlex.split(line[len("[dry-run] ") :]) for line in lines]


def test_fig5_is_the_tldr_setting_of_table5_judged_every_three_updates_from_interaction_0():
    argv = recipe("fig5")
    assert flag(argv, "--model") == "Qwen/Qwen3-4B" and flag(argv, "--user_model_name_or_path") == "Qwen/Qwen3-8B"
    assert {"--judge_local", "--user_vllm", "--oracle", "--eval_at_start"} <= set(argv)
    assert flag(argv, "--style") == "concise_casual_beginner" and "--style_schedule" not in argv
    assert (
        flag(argv, "--interactions_per_step"),
        flag(argv, "--lr"),
        flag(argv, "--optim"),
        flag(argv, "--temperature"),
    ) == ("16", "5e-6", "adamw", "1.0")
    assert (flag(argv, "--max_prompt_tokens"), flag(argv, "--max_new_tokens")) == ("1024", "258")
    assert flag(argv, "--loss_mode") == "simple_signal" and flag(argv, "--system_prompt") == "tldr"
    # Fig. 5's x axis ends at 250: 16 updates of 16; a point every 3 updates (the figure's every 50).
    assert flag(argv, "--eval_n") == "256" and flag(argv, "--train_n") == "256" and flag(argv, "--eval_every") == "48"
    assert (flag(argv, "--protocol"), flag(argv, "--style_baseline")) == ("paper", "base")
    assert flag(argv, "--train_jsonl").endswith("data/tldr_prompts_unique/train.jsonl")
    assert flag(argv, "--val_jsonl").endswith("data/tldr_prompts_unique/validation.jsonl")
    assert flag(argv, "--out_dir") == "/tmp/sdpo-test/reproduce-paper/rid" and flag(argv, "--run_name") == "paper_fig5"


def test_fig4_runs_250_interactions_then_500_of_the_opposite_persona_against_the_base_model():
    argv = recipe("fig4")
    (first, first_n), (second, second_n) = (part.split(":") for part in flag(argv, "--style_schedule").split(","))
    assert (first, first_n, second_n) == ("concise_casual_beginner", "250", "500") and second in STYLE_PERSONAS
    assert second.split("_") == [OPPOSITE_AXIS[axis] for axis in first.split("_")]
    assert flag(argv, "--train_n") == "750" and "--style" not in argv
    assert (flag(argv, "--eval_every"), flag(argv, "--style_baseline"), flag(argv, "--protocol")) == (
        "48",
        "base",
        "paper",
    )
    assert (
        flag(argv, "--model") == "Qwen/Qwen3-4B"
        and flag(argv, "--interactions_per_step") == "16"
        and "--eval_at_start" in argv
        and "--oracle" not in argv  # Fig. 4 has no oracle line
    )


def test_fig6_is_the_helpsteer_setting_in_the_figures_order_against_each_introduction():
    argv = recipe("fig6")
    assert flag(argv, "--model") == "Qwen/Qwen3-8B"
    assert (flag(argv, "--user_backend"), flag(argv, "--judge_backend"), flag(argv, "--judge_model")) == (
        "anthropic",
        "anthropic",
        "claude-haiku-4-5-20251001",
    )
    assert not {"--user_model_name_or_path", "--judge_local", "--user_vllm", "--oracle", "--style"} & set(argv)
    schedule = [part.split(":") for part in flag(argv, "--style_schedule").split(",")]
    assert schedule == [
        ["no_emojis", "500"],
        ["less_filler_praise_sycophancy", "500"],
        ["answer_directly_reduce_formatting", "500"],
    ]
    assert flag(argv, "--train_n") == "1500" and flag(argv, "--eval_n") == "256" and flag(argv, "--eval_every") == "96"
    assert (flag(argv, "--style_baseline"), flag(argv, "--protocol")) == ("introduced", "paper")
    assert "--eval_at_start" in argv
    assert (flag(argv, "--interactions_per_step"), flag(argv, "--lr"), flag(argv, "--optim")) == (
        "32",
        "5e-6",
        "adamw_8bit",
    )
    assert (flag(argv, "--max_prompt_tokens"), flag(argv, "--max_new_tokens")) == ("2048", "2048")
    assert flag(argv, "--system_prompt") == "general"
    assert flag(argv, "--train_jsonl").endswith("data/helpsteer_prompts/train.jsonl")


def test_fig9_runs_the_six_profiles_with_oracles_then_draws_one_grid():
    *runs, grid = recipe_commands("fig9")
    assert [flag(argv, "--style") for argv in runs] == FIG9_PROFILES
    for profile, argv in zip(FIG9_PROFILES, runs):
        assert argv[:2] == ["python", "eval_online_sdpo.py"] and {"--oracle", "--eval_at_start"} <= set(argv)
        assert (flag(argv, "--train_n"), flag(argv, "--eval_every"), flag(argv, "--model")) == (
            "256", "48", "Qwen/Qwen3-4B"
        )  # fmt: skip
        assert flag(argv, "--out_dir") == f"/tmp/sdpo-test/reproduce-paper/rid/{profile}"
        assert flag(argv, "--run_name") == f"paper_fig9_{profile}"
    assert grid[:2] == ["python", "auxiliary/plot_profile_grid.py"]
    assert grid[grid.index("--out") + 2 :] == [f"/tmp/sdpo-test/reproduce-paper/rid/{p}" for p in FIG9_PROFILES]


@pytest.mark.parametrize("figure", FIGURES)
def test_each_recipe_is_a_command_the_loop_accepts(figure, tmp_path, monkeypatch):
    real_find_spec = online_config.importlib.util.find_spec
    # Fig. 6's 8-bit AdamW needs bitsandbytes (CUDA only), which this CPU machine does not have.
    monkeypatch.setattr(
        online_config.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "hi"}\n')
    runs = [argv for argv in recipe_commands(figure, env={"DATA_DIR": str(tmp_path)}) if "eval_online_sdpo.py" in argv]
    for argv in runs:
        arguments = online_config.parse_arguments(argv[2:])
        learner, run = arguments.learner, arguments.run
        assert (learner.learning_rate, learner.temperature, run.eval_n, learner.loss_mode) == (
            5e-6, 1.0, 256, "simple_signal"
        )  # fmt: skip
        assert run.interactions_per_step == (32 if figure == "fig6" else 16)
        assert run.eval_every == (96 if figure == "fig6" else 48) and run.eval_at_start and run.protocol == "paper"
        # All weights where they fit one 80 GB card (the paper-era code), LoRA for the 8B policy of Fig. 6.
        assert learner.use_lora == (figure == "fig6") and learner.use_vllm
        assert learner.gradient_checkpointing == (not learner.use_lora)
        assert learner.advantage_centering == "sequence" and learner.train_micro_batch_size == 4


def test_table_hands_over_to_the_tables_script(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("reproduce_paper.sh", "common.sh"):
        (root / "scripts" / name).write_text((REPO / "scripts" / name).read_text())
    tables = root / "scripts" / "reproduce_paper_tables.sh"
    tables.write_text('#!/usr/bin/env bash\necho "tables TABLE=$TABLE args: $*"\n')
    tables.chmod(0o755)
    result = subprocess.run(
        ["bash", str(root / "scripts" / "reproduce_paper.sh"), "--dry-run", "--seed", "1"],
        env={**{k: v for k, v in os.environ.items() if k != "FIGURE"}, "TABLE": "table2"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "tables TABLE=table2 args: --dry-run --seed 1"


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
        check=False,
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
    assert os.access(path, os.X_OK) and subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


def test_the_grid_script_reads_each_run_folder_and_names_one_that_is_not_finished(tmp_path, capsys):
    import json

    from auxiliary import plot_profile_grid

    folders = []
    for index, style in enumerate(FIG9_PROFILES[:2]):
        folder = tmp_path / style
        folder.mkdir()
        state = {"settings": {"run_name": f"paper_fig9_{style}"}, "index": 1, "eval_dir": "."}
        (folder / "run_state.json").write_text(json.dumps(state))
        history = [{"interaction": 0, "step": 0, "winrate_a": 50.0, "se": 3.0, "n_effective": 100, "n": 256}]
        meta = {"judged_styles": [style], "oracle": {style: {"winrate_a": 80.0 + index, "n_effective": 90, "n": 256}}}
        (folder / f"paper_fig9_{style}_1.json").write_text(json.dumps({"meta": meta, "eval_history": history}))
        folders.append(folder)
    out = tmp_path / "grid.png"
    assert plot_profile_grid.main(["--out", str(out), *map(str, folders)]) == 0 and out.stat().st_size > 1000
    assert plot_profile_grid.run_panel(folders[1])[2]["winrate_a"] == 81.0
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run_state.json").write_text(json.dumps({"settings": {"run_name": "x"}, "index": 1, "eval_dir": "."}))
    assert plot_profile_grid.main(["--out", str(out), str(folders[0]), str(unfinished)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unfinished" in err[0] and "x_1.json" in err[0]
