"""Judge prompt, strict verdict parsing, AB/BA combination, and the judges over scripted, HF, Claude
(fake API) and vLLM (fake engine) backends."""

import pytest

from auxiliary.claude_style_judge import ClaudeStyleJudge
from auxiliary.vllm_user_simulator import VLLMStyleJudge
from sdpo.chat.backends import ChatBackend
from sdpo.models.generation import SamplingParams, encode_chat
from sdpo.personas.style_judge import (
    PAPER_VERDICT_MAX_TOKENS,
    LLMStyleJudge,
    StyleJudge,
    build_judge_messages,
    combine_orders,
    parse_judgement,
    parse_paper_verdict,
)
from sdpo.personas.user_simulator import STYLE_PERSONAS
from tests.fakes import FakeAnthropicServer, FakeLLM, Reply, install_fake_vllm


class RoutingBackend(ChatBackend):
    """Answers each judge conversation with ``verdict(response_a, response_b)``; records calls."""

    name = "routing"

    def __init__(self, verdict):
        self.verdict = verdict
        self.calls = []

    def generate(self, conversations, sampling):
        self.calls.append((conversations, sampling))
        texts = []
        for conversation in conversations:
            user = conversation[1]["content"]
            a = user.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
            b = user.split("Response B:\n", 1)[1].split("\n\nAs this user", 1)[0]
            texts.append(self.verdict(a, b))
        return texts


def test_judge_messages_hold_persona_prompt_and_both_responses():
    messages = build_judge_messages("no_emojis", "Write a haiku.", "Leaves fall 🍂", "Leaves fall")
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert system.startswith(STYLE_PERSONAS["no_emojis"] + "\n\n")
    assert "Judgement: A" in system and "Judgement: B" in system and "Judgement: C" in system
    assert "factually correct" in system
    assert user.index("User prompt:\nWrite a haiku.") < user.index("Response A:\nLeaves fall 🍂")
    assert user.index("Response A:") < user.index("Response B:\nLeaves fall") < user.index("Judgement: A")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Judgement: A", 0),
        ("Judgement: B", 1),
        ("Judgement: C", -1),
        ("Judgment: B", 1),
        ("judgement: a", 0),
        ("JUDGMENT: b", 1),
        ("**Judgement:** A", 0),
        ("**Judgement: B**", 1),
        ("  Judgement:   C  ", -1),
        ("Judgement: A.", 0),
        ("Reasoning: B is shorter and has no emojis.\n\nJudgement: B", 1),
        ("Judgement: A\nOn reflection, B is better.\nJudgement: B", 1),  # the last line wins
        ("Judgment: based on the profile, A wins", None),  # "b" of "based" is not a verdict
        ("Judgement: Both are fine", None),
        ("I prefer A over B.", None),  # no letter scan
        ("", None),
        ("The judgement: A is better", None),
    ],
)
def test_parse_judgement(text, expected):
    assert parse_judgement(text) == expected


@pytest.mark.parametrize(
    "ab, ba, expected",
    [
        (0, 1, 0),  # A first, and A (shown second) again: A wins
        (1, 0, 1),  # B wins in both orders
        (0, 0, -1),  # position bias: always the first slot
        (1, 1, -1),  # position bias: always the second slot
        (-1, -1, -1),
        (0, -1, -1),
        (-1, 0, -1),
        (1, -1, -1),
        (None, 1, -1),
        (0, None, -1),
        (None, None, -1),
    ],
)
def test_combine_orders(ab, ba, expected):
    assert combine_orders(ab, ba) == expected


def test_judge_runs_both_orders_in_one_call_and_counts_unparsed():
    def verdict(a, b):
        if "garbled" in a or "garbled" in b:
            return "I cannot decide."
        if a.startswith("plain") and b.startswith("plain"):
            return "Judgement: A"  # position bias → should become a tie
        return "Judgement: A" if a.startswith("plain") else "Judgement: B"

    backend = RoutingBackend(verdict)
    judge = LLMStyleJudge(backend, "no_emojis")
    decisions = judge.choose_batch_generated(
        ["p1", "p2", "p3", "p4"],
        ["plain one", "fancy 🎉", "plain x", "garbled"],
        ["fancy ✨", "plain two", "plain y", "plain z"],
    )
    assert decisions == [0, 1, -1, -1]
    assert len(backend.calls) == 1 and len(backend.calls[0][0]) == 8  # AB and BA together
    assert backend.calls[0][1] == SamplingParams(max_new_tokens=1024, temperature=0.0)
    assert judge.last_n_unparsed == 2
    assert judge.last_raw_outputs[0] == {"ab": "Judgement: A", "ba": "Judgement: B"}
    assert judge.last_raw_outputs[3]["ab"] == "I cannot decide."
    ab_user, ba_user = backend.calls[0][0][0][1]["content"], backend.calls[0][0][4][1]["content"]
    assert "Response A:\nplain one" in ab_user and "Response A:\nfancy ✨" in ba_user


def test_judge_state_refreshes_and_validates():
    judge = LLMStyleJudge(RoutingBackend(lambda a, b: "nonsense"), "short")
    judge.choose_batch_generated(["p"], ["a"], ["b"])
    assert judge.last_n_unparsed == 2
    assert judge.choose_batch_generated([], [], []) == [] and judge.last_n_unparsed == 0
    with pytest.raises(ValueError, match="lengths differ"):
        judge.choose_batch_generated(["p"], ["a"], [])
    with pytest.raises(ValueError, match="unknown style"):
        LLMStyleJudge(RoutingBackend(None), "nope")


def test_style_judge_on_tiny_model(tiny_model, chat_tokenizer):
    judge = StyleJudge(tiny_model, chat_tokenizer, "no_emojis", max_new_tokens=5, batch_size=4)
    decisions = judge.choose_batch_generated(["Say hi.", "Count to 3."], ["hi 👋", "1 2 3"], ["hi", "1, 2, 3 ✅"])
    assert len(decisions) == 2 and set(decisions) <= {-1, 0, 1}
    assert len(judge.last_raw_outputs) == 2 and 0 <= judge.last_n_unparsed <= 4


def test_style_judge_clips_responses_not_instructions(tiny_model, chat_tokenizer):
    judge = StyleJudge(tiny_model, chat_tokenizer, "no_emojis", max_input_tokens=400)
    messages = judge.build_messages("prompt", "alpha " * 500, "beta " * 500)
    assert len(encode_chat(chat_tokenizer, messages)) <= 400
    user = messages[1]["content"]
    assert messages[0]["content"].startswith(STYLE_PERSONAS["no_emojis"])
    assert "Response A:" in user and "Response B:" in user and user.count("tokens omitted") == 2
    assert user.rstrip().endswith("`Judgement: C`.")


def test_claude_judge_against_fake_api():
    def handler(body):
        user = body["messages"][0]["content"]
        first = user.split("Response A:\n", 1)[1]
        return Reply(text="Plain text suits me.\nJudgement: A" if first.startswith("plain") else "Judgement: B")

    with FakeAnthropicServer(handler=handler) as server:
        judge = ClaudeStyleJudge("no_emojis", api_key="k", base_url=server.base_url, max_retries=0)
        assert judge.choose_batch_generated(["p", "q"], ["plain", "emoji 🎉"], ["emoji 🎉", "plain"]) == [0, 1]
    assert len(server.requests) == 4
    assert {b["max_tokens"] for b in server.bodies} == {512} and {b["temperature"] for b in server.bodies} == {0.0}
    assert all(b["system"].startswith(STYLE_PERSONAS["no_emojis"]) for b in server.bodies)


def test_vllm_judge_with_fake_engine(monkeypatch, chat_tokenizer):
    install_fake_vllm(monkeypatch)
    llm = FakeLLM(reply=lambda prompt: "Judgement: A", tokenizer=chat_tokenizer)
    judge = VLLMStyleJudge(llm, chat_tokenizer, "no_emojis")
    assert judge.choose_batch_generated(["p", "q"], ["a1", "a2"], ["b1", "b2"]) == [-1, -1]  # always slot A
    assert len(llm.calls) == 1 and len(llm.calls[0][1]) == 4
    assert llm.calls[0][2].temperature == 0.0 and llm.calls[0][2].max_tokens == 1024


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", 0),
        ("B", 1),
        ("C", -1),
        (" B\n", 1),
        ("a", None),
        ("A.", None),
        ("Judgement: A", None),
        ("AB", None),
        ("A because it is shorter", None),
        ("", None),
    ],
)
def test_paper_verdict_is_one_character_or_unparsed(text, expected):
    assert parse_paper_verdict(text) == expected


def test_paper_protocol_asks_for_one_character_and_parses_strictly():
    messages = build_judge_messages("no_emojis", "q", "x", "y", protocol="paper")
    system, user = messages[0]["content"], messages[1]["content"]
    assert system.startswith(STYLE_PERSONAS["no_emojis"]) and "exactly one character" in system
    assert "Judgement:" not in system + user and "Response A:\nx" in user and "Response B:\ny" in user

    class PaperRouting(RoutingBackend):
        """Answers A when response A is the plain one, B otherwise, and an unparseable text for a garbled pair."""

        def generate(self, conversations, sampling):
            self.calls.append((conversations, sampling))
            texts = []
            for conversation in conversations:
                user = conversation[1]["content"]
                a = user.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
                texts.append("garbled verdict" if "garbled" in user else ("A" if a.startswith("plain") else "B"))
            return texts

    judge = LLMStyleJudge(PaperRouting(None), "no_emojis", protocol="paper")
    decisions = judge.choose_batch_generated(
        ["p", "q", "r"], ["plain", "fancy 🎉", "garbled"], ["fancy ✨", "plain", "x"]
    )
    assert decisions == [0, 1, -1] and judge.last_n_unparsed == 2
    assert judge.backend.calls[0][1].max_new_tokens == PAPER_VERDICT_MAX_TOKENS
    with pytest.raises(ValueError, match="protocol"):
        LLMStyleJudge(PaperRouting(None), "no_emojis", protocol="chatty")


def test_claude_judge_with_the_paper_protocol_against_fake_api():
    def handler(body):
        first = body["messages"][0]["content"].split("Response A:\n", 1)[1]
        return Reply(text="A" if first.startswith("plain") else "B")

    with FakeAnthropicServer(handler=handler) as server:
        judge = ClaudeStyleJudge("no_emojis", api_key="k", base_url=server.base_url, max_retries=0, protocol="paper")
        assert judge.choose_batch_generated(["p"], ["plain"], ["emoji 🎉"]) == [0]
    assert {b["max_tokens"] for b in server.bodies} == {PAPER_VERDICT_MAX_TOKENS}
    assert all("exactly one character" in b["system"] for b in server.bodies)
