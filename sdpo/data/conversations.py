"""Conversations → interaction tuples, as the preprocessors cut them (WildFeedback, WildChat, ShareGPT).

Messages ``{"from", "value"}`` or ``{"role", "content"}`` are normalised to user / assistant messages
(``interaction_schema`` roles); empty messages and other roles (``system``, tools) are dropped. Every
assistant message followed by a user message is one candidate tuple (x, y, o): y = that assistant
message, o = the next user message, x = the history before y, built as
  1. merge each run of consecutive same-role messages into one message (texts joined by a blank
     line) — the reference kept the FIRST of a run, which could drop the latest user message, the one
     the assistant actually answered; merging keeps everything the assistant saw, in order;
  2. keep the last ``max_history_messages`` messages (after merging, so the window counts turns);
  3. drop leading assistant messages;
  4. require a non-empty history that ends with a user message (the reference did not check this for
     WildFeedback; an assistant turn just before y means y was not an answer to a user).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from sdpo.data.interaction_schema import ASSISTANT, USER, Interaction, Message, message_speaker_and_text, speaker_role

MERGED_MESSAGE_SEPARATOR = "\n\n"
CONVERSATION_SKIP_REASONS = (
    "too_few_messages",
    "conversation_too_long",
    "assistant_message_too_long",
    "user_message_too_long",
)
INTERACTION_SKIP_REASONS = ("no_user_turn_in_history", "history_not_ending_with_user")


def normalize_conversation(raw_messages: Iterable[dict] | None) -> tuple[list[Message], int]:
    """User and assistant ``Message``s of a conversation, and how many messages were dropped (empty
    text, or a role such as ``system``). ValueError when the conversation is not a list of objects."""
    if raw_messages is None:
        return [], 0
    if not isinstance(raw_messages, (list, tuple)):
        raise ValueError(f"the conversation must be a list of messages, got {type(raw_messages).__name__}")
    kept, dropped = [], 0
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be an object with from/value or role/content, got {message!r:.40}")
        speaker, text = message_speaker_and_text(message)
        role = speaker_role(speaker)
        if role not in (USER, ASSISTANT) or not isinstance(text, str) or not text.strip():
            dropped += 1
            continue
        kept.append(Message(role, text, index))
    return kept, dropped


@dataclass(frozen=True)
class ConversationLimits:
    """Conversation-level filters, in the unit of ``meter``; ``max_user_message_length`` None = no limit."""

    meter: Callable[[str], int]
    max_total_length: int = 100_000
    max_completion_length: int = 4096
    max_user_message_length: int | None = None
    min_messages: int = 3


def conversation_skip_reason(messages: Sequence[Message], limits: ConversationLimits) -> str | None:
    """The first conversation-level filter that rejects ``messages`` (normalised), or None."""
    if len(messages) < limits.min_messages:
        return "too_few_messages"
    lengths = [limits.meter(message.text) for message in messages]
    if sum(lengths) > limits.max_total_length:
        return "conversation_too_long"
    if any(m.role == ASSISTANT and n > limits.max_completion_length for m, n in zip(messages, lengths, strict=True)):
        return "assistant_message_too_long"
    if limits.max_user_message_length is not None and any(
        m.role == USER and n > limits.max_user_message_length for m, n in zip(messages, lengths, strict=True)
    ):
        return "user_message_too_long"
    return None


def merge_consecutive(messages: Sequence[Message]) -> list[Message]:
    """Merge each run of same-role messages into one (texts joined by a blank line, first index kept)."""
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            previous = merged[-1]
            merged[-1] = Message(previous.role, previous.text + MERGED_MESSAGE_SEPARATOR + message.text, previous.index)
        else:
            merged.append(message)
    return merged


def build_history(before: Sequence[Message], max_messages: int) -> tuple[list[Message] | None, str | None]:
    """History x for an assistant turn from the messages before it: (messages, None) or (None, skip reason)."""
    window = merge_consecutive(before)[-max_messages:]
    while window and window[0].role != USER:
        window = window[1:]
    if not window:
        return None, "no_user_turn_in_history"
    if window[-1].role != USER:
        return None, "history_not_ending_with_user"
    return window, None


def extract_interactions(
    messages: Sequence[Message], max_history_messages: int, skipped: Counter
) -> Iterator[Interaction]:
    """Yield a tuple for every assistant message directly followed by a user message (in the
    normalised conversation); candidates whose history fails are counted in ``skipped``."""
    for position in range(len(messages) - 1):
        completion, follow_up = messages[position], messages[position + 1]
        if completion.role != ASSISTANT or follow_up.role != USER:
            continue
        history, reason = build_history(messages[:position], max_history_messages)
        if reason:
            skipped[reason] += 1
            continue
        yield Interaction(history, completion, follow_up)
