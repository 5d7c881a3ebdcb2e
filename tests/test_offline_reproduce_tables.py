"""scripts/reproduce_paper_tables.sh --dry-run: every table's pipeline (prepare → train → evaluate) with the
paper's settings, parsed from the printed commands; scripts/eval_benchmarks.sh --dry-run."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = REPO_ROOT / "scripts" / "reproduce_paper_tables.sh"
EVAL = REPO_ROOT / "scripts" / "eval_benchmarks.sh"


def dry_run(script: Path, **env_overrides) -> tuple[subprocess.CompletedProcess, list[tuple[str, list[str]]]]:
    """(result, [(step name, argv of the command it prints)])."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "MODEL", "DATA_DIR")}
    env.update(BASE_WORK="/scratch/me", PYTHON="python3", RUN_ID="run", **env_overrides)
    result = subprocess.run(
        [str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    steps, name = [], None
    for line in result.stdout.splitlines():
        if match := re.match(r"\[reproduce_paper_tables\] \S+ step \d+: (.*)", line):
            name = match.group(1)
        elif line.startswith("[dry-run] ") and "BASE_WORK=" not in line:
            steps.append((name, shlex.split(line.removeprefix("[dry-run] "))))
    return result, steps


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def flag_values(argv: list[str], name: str) -> list[str]:
    start = argv.index(name) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


def test_table_is_required_and_checked():
    result, _ = dry_run(TABLES)
    assert result.returncode == 1 and "TABLE is required" in result.stderr
    result, _ = dry_run(TABLES, TABLE="table9")
    assert result.returncode == 1 and "unknown TABLE=table9" in result.stderr


def test_table2_prepares_wildfeedback_trains_sdpo_with_table5s_settings_and_evaluates():
    result, steps = dry_run(TABLES, TABLE="table2", CPU="0")
    assert result.returncode == 0, result.stderr
    assert [name for name, _ in steps] == ["prepare wildfeedback", "train sdpo lr 2e-6", "evaluate and write the table"]
    (_, prepare), (_, train), (_, evaluate) = steps
    assert prepare[1:] == ["auxiliary/preprocess_wildfeedback.py", "--out_dir", str(REPO_ROOT / "data/wildfeedback")]
    assert flag(train, "--method") == "sdpo" and flag(train, "--model_name_or_path") == "Qwen/Qwen3-4B"
    assert flag(train, "--dataset_name") == str(REPO_ROOT / "data/wildfeedback/wildfeedback_interactions.jsonl")
    assert (flag(train, "--learning_rate"), flag(train, "--num_train_epochs"), flag(train, "--global_batch_size")) == (
        "2e-6", "2", "32",
    )  # fmt: skip
    per_device, accumulation = (
        flag(train, "--per_device_train_batch_size"),
        flag(train, "--gradient_accumulation_steps"),
    )
    assert int(per_device) * int(accumulation) * int(flag(train, "--num_processes")) == 32
    assert (flag(train, "--max_context_length"), flag(train, "--max_completion_length")) == ("2048", "2048")
    output = flag(train, "--output_dir")
    assert output == "/scratch/me/reproduce-paper/run/train-sdpo-lr2e-6"
    assert evaluate[1] == "auxiliary/eval_benchmarks.py"
    assert flag_values(evaluate, "--model_name_or_path") == [output + "/final_model"]
    assert flag(evaluate, "--base_model") == "Qwen/Qwen3-4B" and flag(evaluate, "--tasks") == "table2"
    assert flag(evaluate, "--output_dir") == "/scratch/me/reproduce-paper/run/benchmarks"
    assert "--apply_chat_template" in evaluate and flag(evaluate, "--judge_backend") == "anthropic"


@pytest.mark.parametrize(
    ("table", "model", "data", "methods", "lrs", "tasks"),
    [
        ("table3", "Qwen/Qwen3-8B", "wildchat", ["sdpo"], ["2e-6"], "table2"),
        ("table4", "Qwen/Qwen3-4B", "wildfeedback", ["sft", "sdpo"], ["2e-6"], "table2"),
        ("table6", "Qwen/Qwen3-8B", "wildfeedback", ["sdpo"], ["2e-6"], "table6"),
        ("lr_sweep", "Qwen/Qwen3-4B", "wildfeedback", ["sdpo"], ["1e-6", "2e-6", "3e-6", "5e-6"], "table2"),
    ],
)
def test_each_table_runs_its_methods_and_learning_rates_into_one_table(table, model, data, methods, lrs, tasks):
    result, steps = dry_run(TABLES, TABLE=table, CPU="0")
    assert result.returncode == 0, result.stderr
    names = [name for name, _ in steps]
    assert names[0] == f"prepare {data}" and names[-1] == "evaluate and write the table"
    trains = [argv for name, argv in steps if name.startswith("train ")]
    assert [(flag(a, "--method"), flag(a, "--learning_rate")) for a in trains] == [
        (m, lr) for m in methods for lr in lrs
    ]
    assert all(flag(a, "--model_name_or_path") == model and flag(a, "--global_batch_size") == "32" for a in trains)
    evaluate = steps[-1][1]
    assert flag_values(evaluate, "--model_name_or_path") == [flag(a, "--output_dir") + "/final_model" for a in trains]
    assert flag_values(evaluate, "--model_label") == [f"{m}-lr{lr}" for m in methods for lr in lrs]
    assert flag(evaluate, "--tasks") == tasks and flag(evaluate, "--base_model") == model
    if table == "table3":
        assert flag(steps[0][1], "--max_conversations") == "14000"
    if table == "table6":
        assert "--apply_chat_template" not in evaluate and "--judge_backend" not in evaluate


def test_steps_and_skip_prepare_select_part_of_the_pipeline():
    _, steps = dry_run(TABLES, TABLE="table2", CPU="0", SKIP_PREPARE="1")
    assert [name for name, _ in steps] == ["train sdpo lr 2e-6", "evaluate and write the table"]
    _, steps = dry_run(TABLES, TABLE="table4", CPU="0", STEPS="eval")
    assert [name for name, _ in steps] == ["evaluate and write the table"]


def test_eval_benchmarks_cpu_preset_runs_offline_on_the_fixtures():
    result = subprocess.run(
        [str(EVAL), "--dry-run"], env={**os.environ, "PRESET": "cpu", "PYTHON": "python3", "RUN_ID": "r"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("[dry-run] python3"))
    argv = shlex.split(line.removeprefix("[dry-run] "))
    assert flag(argv, "--model_name_or_path") == "smollm2-135m-instruct" and flag(argv, "--base_model") == "none"
    assert flag(argv, "--data_dir") == str(REPO_ROOT / "tests/fixtures/benchmarks/lm_eval")
    assert flag(argv, "--limit") == "2" and flag(argv, "--model") == "hf"
    assert "alpaca_eval" not in flag(argv, "--tasks")
