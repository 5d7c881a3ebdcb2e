"""Flag → simulated user and judges, with the reference's auto rules; vLLM policy engine on a fake engine."""

import pytest

from auxiliary.claude_style_judge import ClaudeStyleJudge
from auxiliary.claude_user_simulator import ClaudeStyleUserSimulator
from sdpo.models.generation import SamplingParams
from sdpo.personas.participants import (
    ParticipantsArguments,
    ParticipantsConfig,
    ParticipantsError,
    build_participants,
)
from sdpo.personas.rule_based_user import RuleBasedJudge, RuleBasedUserSimulator
from sdpo.personas.style_judge import LLMStyleJudge
from sdpo.personas.user_simulator import LLMUserSimulator
from sdpo.utils.command_line import ConfigParser
from tests.fakes import FakeOpenAIServer, Reply


def parse(*argv) -> ParticipantsArguments:
    (arguments,) = ConfigParser(ParticipantsArguments).parse(list(argv))
    return arguments


def config(*argv, user_styles=("no_emojis",), judge_styles=("no_emojis",)) -> ParticipantsConfig:
    return ParticipantsConfig.from_args(parse(*argv), user_styles=user_styles, judge_styles=judge_styles)


def test_auto_rules_follow_the_reference():
    assert config().user_backend == "anthropic"
    assert config("--user_model_name_or_path", "m").user_backend == "hf"
    assert config("--user_model_name_or_path", "m", "--user_vllm").user_backend == "vllm"
    assert config().judge_backend == "anthropic"
    assert config("--judge_local", "--user_model_name_or_path", "m").judge_backend == "user"
    assert config("--judge_local", "--user_backend", "rule").judge_backend == "rule"  # the rule user judges by rule


def test_style_names_are_canonical_once_parsed():
    assert config(judge_styles=("short", "no_lists", "short")).judge_styles == ("short", "no_lists")


def test_claude_user_and_judges_for_every_style(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    participants = build_participants(
        config(
            "--judge_model",
            "claude-x",
            judge_styles=["no_emojis", "no_lists", "no_emojis", "answer_direclty_reduce_formatting"],
        )
    )
    assert isinstance(participants.simulator, ClaudeStyleUserSimulator)
    assert participants.simulator.sampling == SamplingParams(max_new_tokens=256, temperature=0.0)
    assert list(participants.judges) == ["no_emojis", "no_lists", "answer_directly_reduce_formatting"]
    assert all(isinstance(j, ClaudeStyleJudge) for j in participants.judges.values())
    assert participants.judge_label == "claude-x"


def test_rule_based_user_and_judge_need_no_model_or_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    participants = build_participants(
        config("--user_backend", "rule", "--judge_backend", "rule", user_styles=["no_lists"], judge_styles=["no_lists"])
    )
    assert isinstance(participants.simulator, RuleBasedUserSimulator)
    assert isinstance(participants.judges["no_lists"], RuleBasedJudge)


@pytest.mark.slow
def test_local_user_model_shared_by_the_local_judge(tiny_model_path):
    participants = build_participants(
        config(
            "--user_model_name_or_path",
            tiny_model_path,
            "--judge_local",
            "--user_device",
            "cpu",
            "--user_dtype",
            "float32",
            user_styles=["short", "no_emojis"],
            judge_styles=["short", "no_emojis"],
        )
    )
    assert participants.simulators["no_emojis"].backend is participants.simulator.backend  # one model for every persona
    assert isinstance(participants.simulator, LLMUserSimulator)
    assert participants.simulator.sampling.temperature == 0.7
    assert {type(j) for j in participants.judges.values()} == {LLMStyleJudge}
    assert participants.judges["short"].backend is participants.simulator.backend
    assert participants.judge_label == "local"
    feedback = participants.simulator.generate_feedback(["Hi"], ["Hello there!"])
    assert len(feedback) == 1 and feedback[0]


def test_openai_compatible_server_as_user_and_judge():
    with FakeOpenAIServer(
        handler=lambda body: Reply("Judgement: A" if "Response A" in str(body) else "Too long.")
    ) as server:
        participants = build_participants(
            config(
                "--user_backend",
                "openai",
                "--judge_backend",
                "openai",
                "--user_model_name_or_path",
                "served-user",
                "--judge_model",
                "served-judge",
                "--openai_base_url",
                server.base_url,
            )
        )
        assert participants.simulator.generate_feedback(["p"], ["r"]) == ["Too long."]
        assert participants.judges["no_emojis"].choose_batch_generated(["p"], ["a"], ["b"]) == [-1]  # A in both orders
        assert {b["model"] for b in server.bodies} == {"served-user", "served-judge"}


def test_bad_combinations_fail_clearly():
    with pytest.raises(ParticipantsError, match="needs --user_model_name_or_path"):
        build_participants(config("--user_backend", "hf"))
    with pytest.raises(ParticipantsError, match="needs --openai_base_url"):
        config("--user_backend", "openai", "--user_model_name_or_path", "m", "--openai_base_url", "").validate()
    with pytest.raises(ParticipantsError, match="rule-based user cannot check poetic"):
        config("--user_backend", "rule", "--judge_backend", "rule", user_styles=["poetic"]).validate()


def test_style_schedule_switches_after_each_segment():
    from sdpo.personas.participants import StyleSchedule

    schedule = StyleSchedule.parse("concise_casual_beginner:3,detailed_professional_expert:2", default_style="short")
    assert [schedule.style_at(i) for i in range(7)] == ["concise_casual_beginner"] * 3 + [
        "detailed_professional_expert"
    ] * 4
    assert schedule.switch_points(7) == [(3, "detailed_professional_expert")] and schedule.switch_points(3) == []
    assert StyleSchedule.parse(None, default_style="short").style_at(100) == "short"
    with pytest.raises(ValueError, match="unknown style 'pirate'"):
        StyleSchedule.parse("short:2,pirate:1", default_style="short")
