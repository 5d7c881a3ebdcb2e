"""The simulated user on Claude through the Anthropic API (the reference's ``ClaudeStyleUserSimulator``).

The persona prompt and empty-reply handling come from ``LLMUserSimulator`` (the ``"claude"`` prompt
variant: at most two sentences, no preface); transport, concurrency, the client's retries and the
pre-flight ``backend.check()`` from ``AnthropicBackend``. Unlike the reference, the model is a parameter
(it was hard-coded), requests run concurrently, and only transient API failures are retried.
"""

from __future__ import annotations

from sdpo.chat.backends import (
    DEFAULT_ANTHROPIC_MODEL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    AnthropicBackend,
)
from sdpo.models.generation import SamplingParams
from sdpo.personas.user_simulator import LLMUserSimulator


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
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        protocol: str = "reasoning",
    ):
        backend = AnthropicBackend(
            model, max_concurrency=max_concurrency, max_retries=max_retries, timeout=timeout,
            api_key=api_key, base_url=base_url,
        )  # fmt: skip
        super().__init__(
            backend,
            style,
            sampling=SamplingParams(max_new_tokens=max_tokens, temperature=temperature),
            # The paper's protocol served Qwen3-8B and Claude alike (App. D.3).
            prompt_variant="paper" if protocol == "paper" else "claude",
        )
