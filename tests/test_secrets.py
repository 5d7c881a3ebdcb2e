"""Secrets are never printed or stored: secret-looking flag values and URL credentials are masked in usage errors
and logs (by the Python parsers and by scripts/common.sh, with the same rules), and results/state files hold URLs
without their credentials."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval_online_sdpo
from offline_sdpo import main_offline_sdpo
from sdpo.online.config import OnlineArguments, build_parser
from sdpo.utils.command_line import ConfigParser, UsageError, mask_secrets, mask_words

REPO = Path(__file__).resolve().parents[1]
LONG_SECRET = "sk-test-0123456789abcdef"
ENV_SECRET = "env-secret-value-42"

# (words of a command line, what is printed of them)
WORDS = [
    (["--api_key=" + LONG_SECRET, "--seed", "1"], ["--api_key=****", "--seed", "1"]),
    (["--hf_token", "hf_abc", "--max_new_tokens", "5"], ["--hf_token", "****", "--max_new_tokens", "5"]),
    (["--openai-api-key", "short"], ["--openai-api-key", "****"]),
    (["--Password", "p", "--key=v"], ["--Password", "****", "--key=****"]),
    (["HF_TOKEN=1234", "--seed", "1234"], ["HF_TOKEN=****", "--seed", "1234"]),
    (["--note", f"x{ENV_SECRET}y"], ["--note", "x****y"]),
    (["--openai_base_url", "http://bob:pw@host:8000/v1"], ["--openai_base_url", "http://bob:****@host:8000/v1"]),
    (["--openai_base_url=https://tok@host/v1"], ["--openai_base_url=https://****@host/v1"]),
    (["--tokenizer", "gpt2", "--max_tokens", "9"], ["--tokenizer", "gpt2", "--max_tokens", "9"]),
]


@pytest.mark.parametrize(("words", "shown"), WORDS, ids=[" ".join(w) for w, _ in WORDS])
def test_python_masks_like_the_scripts(words, shown, monkeypatch):
    monkeypatch.setenv("SDPO_TEST_API_KEY", ENV_SECRET)
    assert mask_words(words) == shown
    shell = subprocess.run(
        ["bash", "-c", 'source scripts/common.sh && sdpo_mask_words "$@"', "bash", *words],
        cwd=REPO,
        env={**os.environ, "SDPO_TEST_API_KEY": ENV_SECRET},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split("\0")[:-1] == shown


MESSAGES = [
    (
        "unrecognized arguments: --api_key=sk-1 --hf_token hf_2 (see --help)",
        "unrecognized arguments: --api_key=**** --hf_token **** (see --help)",
    ),
    ("--openai_base_url 'http://bob:pw@host/v1': bad", "--openai_base_url 'http://bob:****@host/v1': bad"),
    ("['--openai_api_key', 'sk-3']", "['--openai_api_key', ****"),
    ("argument --hf_token: expected one argument", "argument --hf_token: expected one argument"),
    ("max_new_tokens 5 and a\ttab", "max_new_tokens 5 and a\ttab"),
]


@pytest.mark.parametrize(("message", "shown"), MESSAGES)
def test_messages_are_masked_and_keep_their_layout(message, shown):
    assert mask_secrets(message) == shown
    assert str(UsageError(message)) == shown


def run_main(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def online_argv(prompt_files, out_dir, *extra):
    train, val = prompt_files
    return [
        "--model", "no-such-model-anywhere", "--train_jsonl", str(train), "--val_jsonl", str(val),
        "--out_dir", str(out_dir), "--run_name", "s", "--user_backend", "rule", "--judge_backend", "rule",
        "--style", "short", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("secret_flag", [["--openai_api_key", LONG_SECRET], [f"--api_key={LONG_SECRET}"]])
def test_online_loop_usage_error_hides_a_mistyped_secret_flag(secret_flag, prompt_files, tmp_path, capsys):
    code, output = run_main(eval_online_sdpo.main, online_argv(prompt_files, tmp_path / "run", *secret_flag), capsys)
    assert code == 2 and "unrecognized arguments" in output
    assert LONG_SECRET not in output and "****" in output


def test_offline_usage_error_hides_hf_token(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = run_main(main_offline_sdpo.main, ["--hf_token", LONG_SECRET, "--dataset_name", "x.jsonl"], capsys)
    assert code == 2 and "--hf_token ****" in output and LONG_SECRET not in output


@pytest.mark.slow
def test_script_run_hides_a_mistyped_secret_flag(prompt_files, tmp_path):
    train, _ = prompt_files
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith(("KEY", "TOKEN"))},
        "PYTHON": sys.executable,
        "DATA_DIR": str(train.parent),
        "OUTPUT_DIR": str(tmp_path / "run"),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [str(REPO / "scripts" / "eval_online_sdpo.sh"), "--user_backend", "rule", "--judge_backend", "rule",
         "--style", "short", f"--api_key={LONG_SECRET}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "unrecognized arguments: --api_key=****" in output and LONG_SECRET not in output


@pytest.mark.slow
def test_a_password_in_the_server_url_is_never_printed_or_stored(prompt_files, tmp_path, capsys):
    out = tmp_path / "run"
    url = "http://bob:hunter2-password@127.0.0.1:9/v1"
    argv = online_argv(
        prompt_files, out, "--user_backend", "openai", "--user_model_name_or_path", "m", "--judge_backend", "openai",
        "--openai_base_url", url, "--api_max_attempts", "1",
    )  # fmt: skip
    code, output = run_main(eval_online_sdpo.main, argv, capsys)
    assert code == 1 and "cannot connect to http://bob:****@127.0.0.1:9/v1" in output, output[-2000:]
    assert "hunter2" not in output
    state = (out / "run_state.json").read_text()
    assert "hunter2" not in state and "bob" not in state
    assert json.loads(state)["settings"]["openai_base_url"] == "http://127.0.0.1:9/v1"


def test_resume_takes_the_credentials_back_from_the_same_url(prompt_files, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    from sdpo.online.run_state import start_or_resume

    out = tmp_path / "run"
    url = "http://bob:hunter2-password@127.0.0.1:9/v1"
    parser = build_parser()
    extra = ("--user_backend", "openai", "--user_model_name_or_path", "m", "--openai_base_url", url)
    start_or_resume(OnlineArguments(*parser.parse(online_argv(prompt_files, out, *extra))))
    resumed, _, _ = start_or_resume(
        OnlineArguments(*parser.parse(["--resume", "--out_dir", str(out), "--openai_base_url", url]))
    )
    assert resumed.participants.openai_base_url == url
    resumed, _, _ = start_or_resume(OnlineArguments(*parser.parse(["--resume", "--out_dir", str(out)])))
    assert resumed.participants.openai_base_url == "http://127.0.0.1:9/v1"  # only what was stored


def test_logs_are_masked_once_a_parser_ran(caplog):
    with pytest.raises(UsageError):
        ConfigParser().parse(["--hub_token", "hf-remembered-secret"])
    with caplog.at_level(logging.INFO):
        logging.getLogger("sdpo.test").info("calling %s with %s", "http://u:pw@h/v1", "hf-remembered-secret")
    assert caplog.records[-1].getMessage() == "calling http://u:****@h/v1 with ****"


@pytest.mark.slow
def test_wandb_run_files_hold_the_masked_command_line(tmp_path, monkeypatch):
    from sdpo.utils.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["eval_online_sdpo.py", "--openai_base_url", "http://u:hunter2-password@h/v1", f"--api_key={LONG_SECRET}"]
    monkeypatch.setattr(sys, "argv", list(argv))
    Tracker.start("wandb", project="p", name="n", config={}, directory=str(tmp_path), run_id="secrets").finish()
    assert sys.argv == argv

    def written() -> bytes:
        return b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())

    # wandb's service process may still be writing the run's metadata record when finish() returns.
    deadline = time.monotonic() + 30
    while b"u:****@h/v1" not in written() and time.monotonic() < deadline:
        time.sleep(0.2)
    content = written()
    assert b"u:****@h/v1" in content and b"hunter2" not in content and LONG_SECRET.encode() not in content


def test_preprocessing_stats_hold_no_url_password(tmp_path):
    import argparse

    from sdpo.data.preprocessing_cli import write_stats

    args = argparse.Namespace(dataset_path=["https://u:hunter2-password@data.example/x.jsonl"], seed=1)
    write_stats(tmp_path / "stats.json", "script.py", args, "local")
    stored = json.loads((tmp_path / "stats.json").read_text())["arguments"]
    assert stored == {"dataset_path": ["https://u:****@data.example/x.jsonl"], "seed": 1}
