"""The simulated user on Claude through the Anthropic API (the reference's ``ClaudeStyleUserSimulator``).

The persona prompt and empty-reply handling come from ``LLMUserSimulator`` (the ``"claude"`` prompt
variant: at most two sentences, no preface); transport, concurrency and retries from
``AnthropicBackend``. Unlike the reference, the model is a parameter (it was hard-coded), requests run
concurrently, and only transient API failures are retried.
"""

from __future__ import annotations

from auxiliary.backends import DEFAULT_ANTHROPIC_MODEL, AnthropicBackend, RetryPolicy
from auxiliary.generation import SamplingParams
from auxiliary.user_simulator import LLMUserSimulator


class ClaudeStyleUserSimulator(LLMUserSimulator):
    """``LLMUserSimulator`` over ``AnthropicBackend`` with the two-sentence ``"claude"`` prompt."""

    def __init__(
        self,
        style: str,
        *,
        model: str = DEFAULT_ANTHROPIC_MODEL,
        max_tokens: int = 128,
        temperature: float = 0.7,
        api_key: str | None = None,
        base_url: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
    ):
        backend = AnthropicBackend(
            model, api_key=api_key, base_url=base_url, max_concurrency=max_concurrency, timeout=timeout, retry=retry
        )
        super().__init__(
            backend,
            style,
            sampling=SamplingParams(max_new_tokens=max_tokens, temperature=temperature),
            prompt_variant="claude",
        )
