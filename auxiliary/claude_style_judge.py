"""The style judge on Claude through the Anthropic API (the reference's ``ClaudeStyleJudge``).

Prompt, strict verdict parsing and the AB/BA protocol come from ``LLMStyleJudge``; transport,
concurrency (all AB and BA requests of a batch share one thread pool), the client's retries and the
pre-flight ``backend.check()`` from ``AnthropicBackend``.
"""

from __future__ import annotations

from sdpo.chat.backends import (
    DEFAULT_ANTHROPIC_MODEL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    AnthropicBackend,
)
from sdpo.models.generation import SamplingParams
from sdpo.personas.style_judge import LLMStyleJudge


class ClaudeStyleJudge(LLMStyleJudge):
    """``LLMStyleJudge`` over ``AnthropicBackend`` (greedy, 512 tokens by default)."""

    def __init__(
        self,
        style: str,
        *,
        model: str = DEFAULT_ANTHROPIC_MODEL,
        max_tokens: int = 512,
        temperature: float = 0.0,
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
            protocol=protocol,
        )
