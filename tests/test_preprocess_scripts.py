"""The preprocessors as users run them: shell wrappers (--dry-run, env vars, forwarding), --help,
and the one-line error when the Hub cannot be used."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WRAPPERS = {
    "helpsteer": ("preprocess_helpsteer.py", "data/helpsteer_prompts"),
    "tldr": ("preprocess_tldr_dataset.py", "data/tldr_prompts_unique"),
    "wildfeedback": ("preprocess_wildfeedback.py", "data/wildfeedback"),
    "wildchat": ("preprocess_wildchat.py", "data/wildchat"),
    "sharegpt": ("preprocess_sharegpt.py", "data/sharegpt"),
    "mtbench": ("preprocess_mtbench.py", "data/mtbench_prompts"),
}
HUB_SCRIPTS = [
    "preprocess_helpsteer.py",
    "preprocess_tldr_dataset.py",
    "preprocess_wildfeedback.py",
    "preprocess_wildchat.py",
]


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT_DIR", "DATASET_PATH")}
    env.update(BASE_WORK=str(tmp_path / "work"), PYTHON=sys.executable, **extra)
    return env


def run(command, env):
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_dry_run_prints_the_resolved_command_and_forwards_arguments(tmp_path, name):
    script, default_out = WRAPPERS[name]
    result = run(["bash", f"scripts/prepare_data_{name}.sh", "--flag", "a b", "--dry-run"], clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert command == f"[dry-run] {sys.executable} auxiliary/{script} --out_dir {REPO / default_out} --flag a\\ b"

    env = clean_env(tmp_path, OUT_DIR=str(tmp_path / "out dir"), DATASET_PATH="/data/copy")
    result = run(["bash", f"scripts/prepare_data_{name}.sh", "--dry-run"], env)
    assert result.stdout.splitlines()[-1].endswith(
        f"auxiliary/{script} --out_dir {tmp_path}/out\\ dir --dataset_path /data/copy"
    )
    assert not (tmp_path / "out dir").exists()


def test_bundled_data_wrappers_run_end_to_end(tmp_path):
    result = run(["bash", "scripts/prepare_data_mtbench.sh"], clean_env(tmp_path, OUT_DIR=str(tmp_path / "mt")))
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "mt" / "train.jsonl").read_text().splitlines()) == 40

    env = clean_env(tmp_path, OUT_DIR=str(tmp_path / "sg"))
    result = run(["bash", "scripts/prepare_data_sharegpt.sh", "--max_interactions", "10"], env)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "sg" / "sharegpt_interactions.stats.json").read_text())
    assert stats["interactions"]["written"] == 10


@pytest.mark.parametrize("script", [script for script, _ in WRAPPERS.values()])
def test_help_shows_the_command_and_explains_every_flag(tmp_path, script):
    import importlib

    result = run([sys.executable, f"auxiliary/{script}", "--help"], clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "python auxiliary/" in result.stdout  # the docstring with the exact command
    parser = importlib.import_module(f"auxiliary.{script.removesuffix('.py')}").build_parser()
    undocumented = [action.dest for action in parser._actions if not action.help]
    assert undocumented == []
    assert {"--out_dir", "--dataset_path"} <= set(parser._option_string_actions)


@pytest.mark.slow
@pytest.mark.parametrize("script", HUB_SCRIPTS)
def test_no_hub_access_is_one_line_and_a_nonzero_exit(tmp_path, script):
    env = clean_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    result = run([sys.executable, f"auxiliary/{script}", "--out_dir", str(tmp_path / "out")], env)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot load ") and "HF_HUB_OFFLINE=1" in lines[0]
    assert "--dataset_path" in lines[0]
    assert not (tmp_path / "out").exists()
