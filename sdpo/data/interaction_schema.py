"""The one interaction schema: messages, (x, y, o) tuples, and how they are read from and written to rows.

Written by the preprocessors (``Interaction.as_record``) and read by the offline trainer
(``interactions_from_row``); no torch import, so the preprocessors stay light.

Roles. Speakers named ``human``/``user``, ``gpt``/``assistant`` (ShareGPT also labels assistant turns
``chatgpt``, ``bing``, ``bard``, the service a conversation was shared from) and ``system`` map to the
chat-template roles user / assistant / system. Records keep the reference's ShareGPT form
``{"from": "human" | "gpt" | "system", "value": text}``; the trainer renders ``{"role", "content"}``.

Rows the trainer accepts (one row may give several tuples):
  * interaction rows (spec §11.1, what the preprocessors write): ``prompt`` = x as a list of messages,
    ``completion`` = y and ``user_response`` = o, each one message (``from/value`` or ``role/content``);
  * TRL conversational prompt-completion rows: ``prompt`` a list of messages and ``completion`` a list
    holding y (an assistant message) followed by o (a user message), or y alone with a
    ``user_response`` field;
  * TRL conversational ``messages`` rows: every assistant turn that answers a user turn and is followed
    by a user turn is one tuple: y = that assistant turn, o = the user turn after it, x = every
    message before y.
"""

from __future__ import annotations

from dataclasses import dataclass

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
SPEAKER_ROLES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bing": ASSISTANT,
    "bard": ASSISTANT,
    "system": SYSTEM,
}
SHAREGPT_SPEAKERS = {USER: "human", ASSISTANT: "gpt", SYSTEM: "system"}
ROW_FORMATS = "prompt/completion/user_response, prompt/completion message lists, or messages"


def speaker_role(speaker) -> str | None:
    """The chat role of a speaker name (case and surrounding spaces ignored); None for anything else."""
    return SPEAKER_ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None


def _present(message: dict, *keys: str):
    """The first of ``keys`` whose value is not None (a table row holds every column, unused ones as None)."""
    return next((message[key] for key in keys if message.get(key) is not None), None)


def message_speaker_and_text(message: dict) -> tuple[object, object]:
    """(speaker, text) of a ``from/value`` or ``role/content`` message, unvalidated."""
    return _present(message, "from", "role"), _present(message, "value", "content")


@dataclass(frozen=True)
class Message:
    """One message; ``index`` is its position in the source conversation (-1 when unknown)."""

    role: str  # USER, ASSISTANT or SYSTEM
    text: str
    index: int = -1

    def as_record(self) -> dict:
        return {"from": SHAREGPT_SPEAKERS[self.role], "value": self.text}

    def as_chat(self) -> dict:
        return {"role": self.role, "content": self.text}


@dataclass(frozen=True)
class Interaction:
    """One (x, y, o) tuple: the history x, the assistant reply y, the user's next message o, and where
    it came from (``file:line`` for the trainer's error messages; empty when built in memory)."""

    history: list[Message]
    completion: Message
    user_response: Message
    source: str = ""

    def as_record(self) -> dict:
        """The fields every interaction JSONL row shares (spec §11.1): prompt, completion, user_response."""
        return {
            "prompt": [message.as_record() for message in self.history],
            "completion": self.completion.as_record(),
            "user_response": self.user_response.as_record(),
        }

    def as_chat_row(self) -> dict:
        """role/content form read by the offline collator (``source`` kept for its errors)."""
        return {
            "prompt": [message.as_chat() for message in self.history],
            "completion": self.completion.as_chat(),
            "user_response": self.user_response.as_chat(),
            "source": self.source,
        }


def message_text(message, field_name: str) -> str:
    """The text of one message object (``value`` or ``content``); ValueError naming the field otherwise."""
    if not isinstance(message, dict):
        raise ValueError(f"field {field_name!r} must be a message object, got {type(message).__name__}")
    text = _present(message, "value", "content")
    if not isinstance(text, str):
        raise ValueError(
            f"field {field_name!r} needs a string 'value' (from/value) or 'content' (role/content), "
            f"got {type(text).__name__ if text is not None else 'neither'}"
        )
    return text


def parse_message(message, field_name: str) -> Message:
    """A strictly validated message: known speaker, string text."""
    if not isinstance(message, dict):
        raise ValueError(f"field {field_name!r} must be a message object, got {type(message).__name__}")
    speaker, _ = message_speaker_and_text(message)
    role = speaker_role(speaker)
    if role is None:
        raise ValueError(f"field {field_name!r} has speaker {speaker!r}; expected one of {sorted(SPEAKER_ROLES)}")
    return Message(role, message_text(message, field_name))


def parse_messages(messages, field_name: str) -> list[Message]:
    """A non-empty list of strictly validated messages; errors name the message (``prompt[2]``)."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise ValueError(f"field {field_name!r} must be a non-empty list of messages, got {got}")
    parsed = [parse_message(message, f"{field_name}[{index}]") for index, message in enumerate(messages)]
    return [Message(message.role, message.text, index) for index, message in enumerate(parsed)]


def _message_in_role(message, field_name: str, role: str) -> Message:
    """y or o given as one message object: its speaker may be left out (the field says who speaks), but a
    speaker it names must be known (``_checked`` then holds it to ``role``)."""
    speaker, _ = message_speaker_and_text(message) if isinstance(message, dict) else (None, None)
    return Message(role, message_text(message, field_name)) if speaker is None else parse_message(message, field_name)


def _checked(history: list[Message], completion: Message, user_response: Message, fields: tuple[str, str]):
    """The tuple, once y is a non-empty assistant message and o a non-empty user message."""
    y_field, o_field = fields
    if completion.role != ASSISTANT:
        raise ValueError(f"field {y_field!r} must be an assistant message (y), got a {completion.role} message")
    if user_response.role != USER:
        raise ValueError(f"field {o_field!r} must be a user message (o), got a {user_response.role} message")
    if not completion.text.strip():
        raise ValueError(f"field {y_field!r} is empty: there is no response to score")
    if not user_response.text.strip():
        raise ValueError(f"field {o_field!r} is empty: there is no hindsight signal")
    return Interaction(history, completion, user_response)


def _from_messages(row: dict) -> list[Interaction]:
    messages = parse_messages(row["messages"], "messages")
    found = [
        _checked(
            messages[:position],
            messages[position],
            messages[position + 1],
            (f"messages[{position}]", f"messages[{position + 1}]"),
        )
        for position in range(1, len(messages) - 1)
        if messages[position].role == ASSISTANT
        and messages[position - 1].role == USER
        and messages[position + 1].role == USER
    ]
    if not found:
        raise ValueError(
            "field 'messages' holds no assistant turn that answers a user turn and is followed by a user turn"
        )
    return found


def _from_prompt_completion(row: dict) -> list[Interaction]:
    history = parse_messages(row["prompt"], "prompt")
    if "completion" not in row:
        raise ValueError("field 'completion' is missing")
    if isinstance(row["completion"], list):
        replies = parse_messages(row["completion"], "completion")
        wanted = 1 if "user_response" in row else 2
        if len(replies) != wanted:
            raise ValueError(
                f"field 'completion' as a list must hold {'y' if wanted == 1 else 'y then o'} "
                f"({wanted} message{'s' if wanted > 1 else ''}), got {len(replies)}"
            )
        completion = replies[0]
        user_response = replies[1] if wanted == 2 else parse_message(row["user_response"], "user_response")
        fields = ("completion[0]", "completion[1]" if wanted == 2 else "user_response")
    else:
        if "user_response" not in row:
            present = ", ".join(repr(key) for key in list(row)[:10])
            raise ValueError(f"field 'user_response' is missing (fields present: {present})")
        completion = _message_in_role(row["completion"], "completion", ASSISTANT)
        user_response = _message_in_role(row["user_response"], "user_response", USER)
        fields = ("completion", "user_response")
    return [_checked(history, completion, user_response, fields)]


def interactions_from_row(row) -> list[Interaction]:
    """Every (x, y, o) tuple of one decoded row in any of the accepted formats (module docstring).

    Raises ValueError naming the field for anything malformed.
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object ({ROW_FORMATS}), got {type(row).__name__}")
    if "messages" in row:
        return _from_messages(row)
    if "prompt" in row:
        return _from_prompt_completion(row)
    present = ", ".join(repr(key) for key in list(row)[:10]) or "none"
    raise ValueError(f"field 'prompt' or 'messages' is missing (fields present: {present}); rows hold {ROW_FORMATS}")
