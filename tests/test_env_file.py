"""``.env`` for the Python entry points: KEY=VALUE read as data, the environment wins, nothing is executed."""

import os

import pytest

from sdpo.utils.command_line import UsageError
from sdpo.utils.env_file import REPOSITORY_ROOT, load_project_env


def test_dotenv_fills_only_what_the_environment_lacks(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text(
        '# keys\nSDPO_TEST_KEY="from-file $HOME"\nSDPO_TEST_SET=from-file\nSDPO_TEST_CMD=$(touch pwned)\n'
    )
    monkeypatch.delenv("SDPO_TEST_KEY", raising=False)
    monkeypatch.setenv("SDPO_TEST_SET", "from-environment")
    monkeypatch.chdir(tmp_path)
    for name in ("SDPO_TEST_KEY", "SDPO_TEST_CMD"):
        monkeypatch.delenv(name, raising=False)
    load_project_env(env_file)
    try:
        assert os.environ["SDPO_TEST_KEY"] == "from-file $HOME"  # data, not expanded
        assert os.environ["SDPO_TEST_SET"] == "from-environment"
        assert os.environ["SDPO_TEST_CMD"] == "$(touch pwned)" and not (tmp_path / "pwned").exists()
    finally:
        for name in ("SDPO_TEST_KEY", "SDPO_TEST_CMD"):
            os.environ.pop(name, None)


def test_a_missing_env_file_is_fine(tmp_path):
    load_project_env(tmp_path / "absent.env")


def test_a_binary_env_file_is_one_usage_line(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"OPENAI_API_KEY=\xff\xfe\n")
    with pytest.raises(UsageError, match=r"\.env: not UTF-8 text \(byte 0xff at offset 15\)"):
        load_project_env(env_file)


def test_the_default_env_file_is_the_repository_root():
    assert (REPOSITORY_ROOT / "pyproject.toml").is_file() and (REPOSITORY_ROOT / "scripts" / "common.sh").is_file()
