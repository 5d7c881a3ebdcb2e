"""The in-context oracle: the policy simply *told* the user's preferences, a reference line for learning.

The policy answers each prompt with a system message that describes one persona (``oracle_system_prompt``);
its answers are judged against the same policy's answers without it, exactly as a trained policy is.
Used by ``auxiliary/eval_incontext_oracle.py`` (the standalone evaluation) and by ``eval_online_sdpo.py
--oracle`` (the dashed reference line of the paper's Fig. 4/5). SDPO distills what the model does in context,
so the oracle is the natural ceiling of what it can learn from the follow-ups.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sdpo.chat.backends import ChatBackend
from sdpo.chat.policies import answer
from sdpo.evaluation.evaluation_helpers import Prompt, as_conversation, seed_everything
from sdpo.models.generation import SamplingParams
from sdpo.personas.user_simulator import get_persona


def oracle_system_prompt(style: str) -> str:
    """The oracle's system message: the assistant role, then the user's persona, then what to do with it."""
    return (
        "You are a helpful assistant. Before this conversation started, the person you are talking to "
        'described how they like replies to be written. Their own description follows; in it, "you" '
        "means them, not you.\n\n"
        f"{get_persona(style)}\n\n"
        "Answer their request, and shape the reply to these preferences: its length, tone, wording, "
        "formatting and level of detail."
    )


def oracle_messages(style: str, prompt: Prompt, system_prompt: str | None = None) -> list[dict]:
    """The oracle's context: the persona system message (after the run's own system text, if any), then the prompt."""
    conversation = as_conversation(prompt)
    own_system = [m["content"] for m in conversation if m["role"] == "system"]
    system = "\n\n".join([*([system_prompt] if system_prompt else []), *own_system, oracle_system_prompt(style)])
    return [{"role": "system", "content": system}, *(m for m in conversation if m["role"] != "system")]


def oracle_answers(
    policy: ChatBackend,
    prompts: Sequence[Prompt],
    styles: Sequence[str],
    sampling: SamplingParams,
    *,
    batch_size: int,
    seed: int,
    system_prompt: str | None = None,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """({style: persona-prompted answers}, {style: generation seconds}); each style re-seeded, so its answers
    do not depend on the styles before it."""
    answers, seconds = {}, {}
    for style in styles:
        seed_everything(seed)
        started = time.perf_counter()
        conversations = [oracle_messages(style, prompt, system_prompt) for prompt in prompts]
        answers[style] = answer(policy, conversations, sampling, batch_size=batch_size, label=f"oracle {style}")
        seconds[style] = round(time.perf_counter() - started, 1)
    return answers, seconds
