"""Start vLLM's OpenAI-compatible server as a test fixture's subprocess on 127.0.0.1, and stop it with its engine."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sdpo.utils.network import free_port


@contextlib.contextmanager
def running_vllm_server(
    model: str,
    served_name: str,
    log: Path,
    *,
    max_model_len: int,
    kv_cache_bytes: int,
    timeout_s: int,
    extra_args: tuple[str, ...] = (),
    env: dict | None = None,
):
    """Serve ``model`` (fp32) as ``served_name`` on a free 127.0.0.1 port (output in ``log``) until its model list
    answers 200, yield ``http://127.0.0.1:PORT``, then stop the server and its engine process (one process group);
    the test fails with the log's tail when the server exits or is late. ``extra_args`` go to the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    models_url = f"{url}/v1/models"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_cache_bytes), *extra_args,
    ]  # fmt: skip
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
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
