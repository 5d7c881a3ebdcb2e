"""Simulated user and style judge on an in-process vLLM engine (the reference's ``vllm_user_simulator``).

The engine (``vllm.LLM``) is built by the caller and may be shared by the simulator and the judge.
Prompts are rendered with ``tokenizer`` through the project's one chat rendering (thinking off for
Qwen3) and sent as token ids in one batched engine call per simulator/judge call. With
``max_input_tokens`` set, over-long requests and responses are clipped in the middle to fit (vLLM
rejects the whole batch when a single prompt exceeds the engine's maximum length).
"""

from __future__ import annotations

from sdpo.chat.backends import TokenBudget, VLLMChatBackend
from sdpo.models.generation import SamplingParams
from sdpo.personas.style_judge import LLMStyleJudge
from sdpo.personas.user_simulator import LLMUserSimulator


class VLLMStyleUserSimulator(LLMUserSimulator):
    """``LLMUserSimulator`` over ``VLLMChatBackend`` (greedy by default, as in the reference)."""

    def __init__(
        self,
        llm,
        tokenizer,
        style: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        max_input_tokens: int | None = None,
    ):
        super().__init__(
            VLLMChatBackend(llm, tokenizer=tokenizer, max_input_tokens=max_input_tokens),
            style,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
            budget=TokenBudget(tokenizer, max_input_tokens) if max_input_tokens else None,
        )


class VLLMStyleJudge(LLMStyleJudge):
    """``LLMStyleJudge`` over ``VLLMChatBackend``: all AB and BA prompts in one greedy engine call."""

    def __init__(self, llm, tokenizer, style: str, *, max_new_tokens: int = 1024, max_input_tokens: int | None = None):
        super().__init__(
            VLLMChatBackend(llm, tokenizer=tokenizer, max_input_tokens=max_input_tokens),
            style,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            budget=TokenBudget(tokenizer, max_input_tokens) if max_input_tokens else None,
        )
