"""Start vLLM's OpenAI-compatible server as a test fixture's subprocess on 127.0.0.1, and stop it with its engine."""

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


@contextlib.contextmanager
def running_vllm_server(command: list[str], log: Path, models_url: str, *, timeout_s: int, env: dict | None = None):
    """Run ``command`` (output in ``log``) until ``models_url`` answers 200, yield, then stop the server and its
    engine process (one process group); the test fails with the log's tail when the server exits or is late."""
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(models_url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, (
            f"the vLLM server did not start in {timeout_s} s:\n{log.read_text()[-3000:]}"
        )
        time.sleep(2)
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
