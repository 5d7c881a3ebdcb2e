"""scripts/eval_online_sdpo.sh and scripts/common.sh: env defaults, --dry-run anywhere, .env as data,
masked secrets, extra arguments forwarded intact."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(script, *args, env=None, root=None):
    environment = {k: v for k, v in os.environ.items() if k not in {"MODEL", "STYLE", "PRESET", "OUTPUT_DIR", "BASE_WORK", "SCRATCH"}}
    environment.update(TMPDIR="/tmp/sdpo-test", RUN_ID="rid", PYTHON="python", **(env or {}))
    if root is not None:
        environment["REPO_ROOT"] = str(root)
    result = subprocess.run([str(REPO / "scripts" / script), *args], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    command = [line for line in result.stdout.splitlines() if line.startswith("[dry-run] ") and "BASE_WORK=" not in line]
    assert len(command) == 1, result.stdout
    return shlex.split(command[0][len("[dry-run] "):]), result


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_default_command_is_the_reference_gpu_setup():
    argv, _ = dry_run("eval_online_sdpo.sh", "--dry-run")
    assert argv[:2] == ["python", "eval_online_sdpo.py"]
    assert flag(argv, "--model") == "Qwen/Qwen3-8B" and flag(argv, "--user_model_name_or_path") == "Qwen/Qwen3-32B"
    assert flag(argv, "--style") == "no_emojis" and flag(argv, "--lr") == "5e-6" and flag(argv, "--loss_mode") == "full_distillation"
    assert (flag(argv, "--train_n"), flag(argv, "--eval_n"), flag(argv, "--eval_every"), flag(argv, "--seed")) == ("15", "100", "3", "1234")
    assert {"--judge_local", "--user_vllm", "--use_lora", "--use_vllm", "--save_checkpoints"} <= set(argv)
    assert flag(argv, "--train_jsonl").endswith("data/helpsteer_prompts/train.jsonl")
    assert flag(argv, "--out_dir") == "/tmp/sdpo-test/eval-online-sdpo/rid"
    assert "--baseline_model" not in argv


def test_env_overrides_extra_args_and_dry_run_anywhere(tmp_path):
    env = {"MODEL": "Qwen/Qwen3-4B", "STYLE": "concise_casual_beginner", "EVAL_STYLES": "no_lists short", "BASELINE_MODEL": "base",
           "BASE_WORK": str(tmp_path / "work")}
    argv, _ = dry_run("eval_online_sdpo.sh", "--eval_every", "5", "--dry-run", "--run_name", "has space", env=env)
    assert flag(argv, "--model") == "Qwen/Qwen3-4B" and flag(argv, "--style") == "concise_casual_beginner"
    assert argv[argv.index("--eval_styles") + 1 : argv.index("--eval_styles") + 3] == ["no_lists", "short"]
    assert flag(argv, "--baseline_model") == "base"
    assert argv[-4:] == ["--eval_every", "5", "--run_name", "has space"]
    assert not (tmp_path / "work").exists(), "dry-run must create nothing"


def test_cpu_preset_and_quickstart():
    argv, _ = dry_run("quickstart_cpu.sh", "--dry-run")
    assert flag(argv, "--model") == "smollm2-135m-instruct"
    assert flag(argv, "--user_backend") == "rule" and flag(argv, "--judge_backend") == "rule" and flag(argv, "--device") == "cpu"
    assert flag(argv, "--train_jsonl").endswith("data/mtbench_prompts/train.jsonl")
    assert "--use_vllm" not in argv
    argv, _ = dry_run("eval_online_sdpo.sh", "--dry-run", env={"PRESET": "cpu", "TRAIN_N": "3"})
    assert flag(argv, "--train_n") == "3"


def test_unknown_preset_fails():
    result = subprocess.run([str(REPO / "scripts" / "eval_online_sdpo.sh"), "--dry-run"], env={**os.environ, "PRESET": "tpu"}, capture_output=True, text=True)
    assert result.returncode == 1 and "unknown PRESET=tpu" in result.stderr


def test_dotenv_is_read_as_data_and_secrets_are_masked(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / ".env").write_text(
        "# comment\n"
        "ANTHROPIC_API_KEY='sk-ant-very-secret'\n"
        "export MODEL=from-dotenv\n"
        f"STYLE=$(touch {marker})\n"
        "not a line\n"
    )
    argv, result = dry_run("eval_online_sdpo.sh", "--dry-run", "--api_key", "sk-ant-very-secret", root=tmp_path)
    assert flag(argv, "--model") == "from-dotenv"
    assert flag(argv, "--style") == f"$(touch {marker})"
    assert not marker.exists(), ".env must never be executed"
    assert "sk-ant-very-secret" not in result.stdout + result.stderr and flag(argv, "--api_key") == "****"
    assert ".env:5 is not KEY=VALUE" in result.stderr


def test_environment_wins_over_dotenv(tmp_path):
    (tmp_path / ".env").write_text("MODEL=from-dotenv\n")
    argv, _ = dry_run("eval_online_sdpo.sh", "--dry-run", env={"MODEL": "from-env"}, root=tmp_path)
    assert flag(argv, "--model") == "from-env"


@pytest.mark.parametrize("script", ["setup_env.sh", "test.sh", "quickstart_cpu.sh", "eval_online_sdpo.sh"])
def test_scripts_are_executable_bash(script):
    path = REPO / "scripts" / script
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
