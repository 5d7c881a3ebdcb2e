"""Flag → simulated user and judges, with the reference's auto rules; vLLM policy engine on a fake engine."""

import argparse
import pytest

from auxiliary.claude_style_judge import ClaudeStyleJudge
from auxiliary.claude_user_simulator import ClaudeStyleUserSimulator
from auxiliary.generation import SamplingParams
from auxiliary.participants import add_participant_arguments, build_participants, resolve_judge_backend, resolve_user_backend
from auxiliary.rule_based_user import RuleBasedJudge, RuleBasedUserSimulator
from auxiliary.style_judge import LLMStyleJudge
from auxiliary.user_simulator import LLMUserSimulator
from tests.fakes import FakeOpenAIServer, Reply


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_participant_arguments(parser)
    return parser.parse_args(list(argv))


def test_auto_rules_follow_the_reference():
    assert resolve_user_backend(parse()) == "anthropic"
    assert resolve_user_backend(parse("--user_model_name_or_path", "m")) == "hf"
    assert resolve_user_backend(parse("--user_model_name_or_path", "m", "--user_vllm")) == "vllm"
    assert resolve_judge_backend(parse()) == "anthropic"
    assert resolve_judge_backend(parse("--judge_local")) == "user"


def test_claude_user_and_judges_for_every_style(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    participants = build_participants(parse("--judge_model", "claude-x"), "no_emojis", ["no_lists", "no_emojis", "answer_direclty_reduce_formatting"])
    assert isinstance(participants.simulator, ClaudeStyleUserSimulator)
    assert participants.simulator.sampling == SamplingParams(max_new_tokens=256, temperature=0.0)
    assert list(participants.judges) == ["no_emojis", "no_lists", "answer_directly_reduce_formatting"]
    assert all(isinstance(j, ClaudeStyleJudge) for j in participants.judges.values())
    assert participants.judge_label == "claude-x"


def test_rule_based_user_and_judge_need_no_model_or_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    participants = build_participants(parse("--user_backend", "rule", "--judge_backend", "rule"), "no_lists", [])
    assert isinstance(participants.simulator, RuleBasedUserSimulator)
    assert isinstance(participants.judges["no_lists"], RuleBasedJudge)


def test_local_user_model_shared_by_the_local_judge(tiny_model_path):
    participants = build_participants(
        parse("--user_model_name_or_path", tiny_model_path, "--judge_local", "--user_device", "cpu", "--user_dtype", "float32"),
        "short",
        ["no_emojis"],
    )
    assert isinstance(participants.simulator, LLMUserSimulator)
    assert participants.simulator.sampling.temperature == 0.7
    assert {type(j) for j in participants.judges.values()} == {LLMStyleJudge}
    assert participants.judges["short"].backend is participants.simulator.backend
    assert participants.judge_label == "local"
    feedback = participants.simulator.generate_feedback(["Hi"], ["Hello there!"])
    assert len(feedback) == 1 and feedback[0]


def test_openai_compatible_server_as_user_and_judge():
    with FakeOpenAIServer(handler=lambda body: Reply("Judgement: A" if "Response A" in str(body) else "Too long.")) as server:
        args = parse("--user_backend", "openai", "--judge_backend", "openai", "--user_model_name_or_path", "served-user",
                     "--judge_model", "served-judge", "--openai_base_url", server.base_url)
        participants = build_participants(args, "no_emojis", [])
        assert participants.simulator.generate_feedback(["p"], ["r"]) == ["Too long."]
        assert participants.judges["no_emojis"].choose_batch_generated(["p"], ["a"], ["b"]) == [-1]  # A in both orders
        assert {b["model"] for b in server.bodies} == {"served-user", "served-judge"}


def test_bad_combinations_fail_clearly():
    with pytest.raises(SystemExit, match="needs --user_model_name_or_path"):
        build_participants(parse("--user_backend", "hf"), "no_emojis", [])
    with pytest.raises(ValueError, match="unknown style 'pirate'"):
        build_participants(parse("--user_backend", "rule", "--judge_backend", "rule"), "pirate", [])
