"""Persona table, simulator prompt, LLMUserSimulator over a scripted backend, the HF / Claude / vLLM
simulators end to end."""

import re

import pytest

from auxiliary.claude_user_simulator import ClaudeStyleUserSimulator
from auxiliary.vllm_user_simulator import VLLMStyleUserSimulator
from sdpo.chat.backends import ChatBackend
from sdpo.models.generation import SamplingParams, encode_chat
from sdpo.personas.user_simulator import (
    CORE_STYLES,
    DEFAULT_EVAL_STYLES,
    FALLBACK_FEEDBACK,
    STYLE_ALIASES,
    STYLE_PERSONAS,
    LLMUserSimulator,
    StyleUserSimulator,
    build_simulator_messages,
    get_persona,
    resolve_style,
)
from tests.fakes import FakeAnthropicServer, FakeLLM, Reply, install_fake_vllm

NEW_TABLE = {
    "concise_casual_beginner", "detailed_professional_expert", "concise_casual_expert",
    "concise_professional_beginner", "concise_professional_expert", "detailed_casual_beginner",
    "detailed_casual_expert", "detailed_professional_beginner", "poetic", "literal", "no_punctuation",
    "no_emojis", "short", "less_filler_praise_sycophancy", "answer_directly_reduce_formatting",
    "clarification_first", "single_answer", "writing_tics", "writing_tics_v2", "formatting",
    "no_sycophantic", "sycophantic_and_praise", "answer_first", "no_filler_followup", "high_initiative",
    "committing", "no_lists", "more_lists", "more_formatting", "less_formatting", "opinionated", "exclamation",
}  # fmt: skip


class ScriptedBackend(ChatBackend):
    """Returns scripted texts in order and records every conversation it was given."""

    name = "scripted"

    def __init__(self, texts):
        self.texts = list(texts)
        self.seen = []
        self.samplings = []

    def generate(self, conversations, sampling):
        self.seen.extend(conversations)
        self.samplings.append(sampling)
        out, self.texts = self.texts[: len(conversations)], self.texts[len(conversations) :]
        return out


def test_persona_table_is_the_new_32():
    assert set(STYLE_PERSONAS) == NEW_TABLE and len(STYLE_PERSONAS) == 32
    assert "no_first_person" not in STYLE_PERSONAS
    for name, text in STYLE_PERSONAS.items():
        assert text.startswith("USER PROFILE: ") and re.search(r"\byou\b", text, re.IGNORECASE), name
    assert len(set(STYLE_PERSONAS.values())) == 32


def test_groupings():
    assert len(CORE_STYLES) == 8 and set(CORE_STYLES) <= NEW_TABLE
    assert "concise_casual_beginner" in CORE_STYLES and "detailed_professional_expert" in CORE_STYLES
    assert DEFAULT_EVAL_STYLES == ["less_filler_praise_sycophancy", "no_emojis", "answer_directly_reduce_formatting"]


def test_alias_and_unknown_style():
    assert resolve_style("answer_direclty_reduce_formatting") == "answer_directly_reduce_formatting"
    assert get_persona("answer_direclty_reduce_formatting") == STYLE_PERSONAS["answer_directly_reduce_formatting"]
    assert set(STYLE_ALIASES.values()) <= set(STYLE_PERSONAS)
    with pytest.raises(ValueError) as caught:
        resolve_style("pirate_speak")
    message = str(caught.value)
    assert "pirate_speak" in message and ", ".join(sorted(STYLE_PERSONAS)) in message


@pytest.mark.parametrize("variant", ["default", "claude", "paper"])
def test_simulator_messages_hold_persona_request_and_response(variant):
    messages = build_simulator_messages(
        "no_emojis", "How do I boil an egg?", "Boil it ✅ for 9 minutes.", variant=variant
    )
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert system.startswith(STYLE_PERSONAS["no_emojis"] + "\n\n")
    assert "Original user request:\nHow do I boil an egg?" in user
    assert "Assistant response:\nBoil it ✅ for 9 minutes." in user
    assert user.index("Original user request:") < user.index("Assistant response:") < user.index("next message")
    assert ("two sentences" in system) == (variant == "claude")


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="variant"):
        build_simulator_messages("no_emojis", "p", "c", variant="fancy")
    with pytest.raises(ValueError, match="variant"):
        LLMUserSimulator(ScriptedBackend([]), "no_emojis", prompt_variant="fancy")


def test_llm_simulator_batches_strips_and_replaces_empty_feedback():
    backend = ScriptedBackend(["  Drop the emojis please. ", "", "Fine."])
    simulator = LLMUserSimulator(backend, "no_emojis")
    feedback = simulator.generate_feedback(["p1", "p2", "p3"], ["c1", "c2", "c3"], rewards=[1, 2, 3])
    assert feedback == ["Drop the emojis please.", FALLBACK_FEEDBACK, "Fine."]
    assert simulator.n_empty_feedback == 1
    assert len(backend.seen) == 3 and len(backend.samplings) == 1  # one batched call
    assert backend.seen[1] == build_simulator_messages("no_emojis", "p2", "c2")
    assert backend.samplings[0] == SamplingParams(max_new_tokens=128, temperature=0.7)
    backend.texts.append("   ")
    assert simulator.generate_feedback(["p"], ["c"]) == [FALLBACK_FEEDBACK]
    assert simulator.n_empty_feedback == 2  # counted across calls


def test_llm_simulator_checks_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        LLMUserSimulator(ScriptedBackend([]), "short").generate_feedback(["a", "b"], ["c"])


def test_style_user_simulator_on_tiny_model(tiny_model, chat_tokenizer):
    simulator = StyleUserSimulator(tiny_model, chat_tokenizer, "no_emojis", max_new_tokens=6, batch_size=2)
    feedback = simulator.generate_feedback(["What is 2+2?", "Name a colour."], ["4 ✅", "Blue 🔵"])
    assert len(feedback) == 2 and all(isinstance(f, str) and f for f in feedback)
    assert simulator.backend.tokenizer is chat_tokenizer


def test_style_user_simulator_keeps_persona_when_clipping(tiny_model, chat_tokenizer):
    simulator = StyleUserSimulator(tiny_model, chat_tokenizer, "no_emojis", max_input_tokens=300)
    messages = simulator.build_messages("short request", "very long answer " * 400)
    assert len(encode_chat(chat_tokenizer, messages)) <= 300
    assert messages[0]["content"].startswith(STYLE_PERSONAS["no_emojis"])
    assert "short request" in messages[1]["content"] and "tokens omitted" in messages[1]["content"]
    assert messages[1]["content"].endswith("Now write the user's next message to the assistant.")


def test_claude_simulator_against_fake_api():
    with FakeAnthropicServer([Reply(text="Please, no emojis."), Reply(text="")]) as server:
        simulator = ClaudeStyleUserSimulator(
            "no_emojis", api_key="k", base_url=server.base_url, temperature=0.0, max_tokens=256, max_retries=0
        )  # fmt: skip
        feedback = simulator.generate_feedback(["q"], ["a ✅"])
        assert feedback == ["Please, no emojis."]
        assert simulator.generate_feedback(["q"], ["a"]) == [FALLBACK_FEEDBACK]
    body = server.bodies[0]
    assert body["model"] == "claude-haiku-4-5-20251001" and body["max_tokens"] == 256 and body["temperature"] == 0.0
    assert body["system"].startswith(STYLE_PERSONAS["no_emojis"]) and "two sentences" in body["system"]
    assert "Assistant response:\na ✅" in body["messages"][0]["content"]
    assert simulator.n_empty_feedback == 1


def test_vllm_simulator_with_fake_engine(monkeypatch, chat_tokenizer):
    install_fake_vllm(monkeypatch)
    llm = FakeLLM(reply=lambda prompt: " No emojis, please. ", tokenizer=chat_tokenizer)
    simulator = VLLMStyleUserSimulator(llm, chat_tokenizer, "no_emojis")
    assert simulator.generate_feedback(["q1", "q2"], ["a1", "a2"]) == ["No emojis, please."] * 2
    assert len(llm.calls) == 1
    kind, prompts, params, _ = llm.calls[0]
    expected = encode_chat(chat_tokenizer, build_simulator_messages("no_emojis", "q1", "a1"))
    assert kind == "generate" and prompts[0] == {"prompt_token_ids": expected}
    assert params.temperature == 0.0 and params.max_tokens == 128


def test_paper_variant_is_brief_may_approve_and_never_solves_the_task():
    system = build_simulator_messages("no_emojis", "q", "a", variant="paper")[0]["content"]
    rules = system.split("\n\n", 1)[1]
    assert "very brief" in rules and "fits the profile, you may just say" in rules
    assert "Never do the task" in rules


def test_claude_simulator_with_the_paper_protocol_against_fake_api():
    with FakeAnthropicServer([Reply(text="Fits me.")]) as server:
        simulator = ClaudeStyleUserSimulator(
            "no_emojis", api_key="k", base_url=server.base_url, max_retries=0, protocol="paper"
        )
        assert simulator.generate_feedback(["q"], ["plain answer"]) == ["Fits me."]
    system = server.bodies[0]["system"]
    assert system == build_simulator_messages("no_emojis", "q", "plain answer", variant="paper")[0]["content"]
