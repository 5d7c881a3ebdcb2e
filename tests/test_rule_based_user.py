"""Rule-based user: the checks on crafted responses for every supported style, the simulator's
approvals and complaints, and the judge's preferences in both orders."""

import pytest

from sdpo.personas.rule_based_user import (
    RULE_BASED_STYLES,
    SHORT_MAX_WORDS,
    RuleBasedJudge,
    RuleBasedUserSimulator,
    find_violations,
)
from sdpo.personas.style_judge import parse_judgement
from sdpo.personas.user_simulator import STYLE_PERSONAS

LIST_ANSWER = "Options:\n\n- apples\n- pears\n- plums\n- figs\n- dates\n"
NESTED_LIST = "- fruit\n  - apples\n  - pears\n- vegetables\n"
HEADED = "## Overview\n\nWater boils at 100 C at sea level.\n"

# style → (a response that violates it, a response that does not)
CASES = {
    "no_emojis": ("Done ✅ and pinned 📌.", "Done and pinned."),
    "writing_tics": ("Great idea 🧠", "Good idea."),
    "writing_tics_v2": ("▶ Step one", "- Step one"),
    "less_filler_praise_sycophancy": (
        "Great question! Paris is the capital of France. Hope this helps!",
        "Paris is the capital of France.",
    ),
    "sycophantic_and_praise": ("You're absolutely right, it is Paris.", "It is Paris."),
    "no_filler_followup": (
        "Use a hash map. Would you like me to show an example?",
        "Use a hash map. It gives constant-time lookups.",
    ),
    "answer_directly_reduce_formatting": ("## Answer\n\n**Paris** is the capital.", "Paris is the capital."),
    "no_lists": (LIST_ANSWER, "Apples, pears and plums all work well."),
    "more_lists": ("Apples and pears both work well in pies.", "## Fruit\n\n- apples\n- pears\n"),
    "formatting": (NESTED_LIST, "Fruit such as apples and pears, and vegetables."),
    "less_formatting": (HEADED, "Water boils at 100 C at sea level."),
    "short": ("word " * (SHORT_MAX_WORDS + 1), "Yes, use a hash map."),
    "no_punctuation": ("First, boil water; then — carefully — add pasta.", "Boil the water and add the pasta."),
    "exclamation": ("That works!", "That works."),
    "committing": ("It usually takes ten minutes.", "It takes ten minutes."),
}


def test_every_rule_based_style_is_a_known_persona_and_has_a_case():
    assert set(RULE_BASED_STYLES) == set(CASES)
    assert set(RULE_BASED_STYLES) <= set(STYLE_PERSONAS)
    for required in ["no_emojis", "less_filler_praise_sycophancy", "answer_directly_reduce_formatting", "no_lists",
                     "more_lists", "short", "no_punctuation", "exclamation"]:  # fmt: skip
        assert required in RULE_BASED_STYLES


@pytest.mark.parametrize("style", sorted(CASES))
def test_checks_flag_the_bad_response_and_pass_the_good_one(style):
    bad, good = CASES[style]
    assert find_violations(style, bad), f"{style}: expected a violation in {bad!r}"
    assert find_violations(style, good) == [], f"{style}: unexpected {find_violations(style, good)}"


def test_violation_reasons_are_specific():
    assert find_violations("no_emojis", "ok ✅ ✅ 📌") == ["uses emojis (✅, 📌)"]
    reasons = find_violations(
        "less_filler_praise_sycophancy", "What a great question! It is 4. Let me know if you need more."
    )
    assert reasons[0].startswith("opens with praise") and '"What a great question' in reasons[0]
    assert reasons[1].startswith("ends with filler") and "Let me know if" in reasons[1]
    assert find_violations("no_punctuation", "a, b, c; d") == ["uses commas (2), semicolons (1)"]
    assert find_violations("answer_directly_reduce_formatting", "word " * 200)[0] == "is too long (200 words)"


def test_code_is_not_held_against_a_response():
    code_answer = "Use this:\n\n```python\n# not a header\nif a != b:\n    print('hi!')\n```\n"
    assert find_violations("exclamation", code_answer) == []
    assert find_violations("no_lists", code_answer) == []
    assert find_violations("exclamation", "Compare with `a != b` here.") == []


def test_times_and_urls_are_not_colons():
    assert find_violations("no_punctuation", "Meet at 10:30 and see https://example.org") == []


def test_alias_and_unsupported_style():
    assert RuleBasedUserSimulator("answer_direclty_reduce_formatting").style == "answer_directly_reduce_formatting"
    with pytest.raises(ValueError) as caught:
        RuleBasedUserSimulator("poetic")
    assert "poetic" in str(caught.value) and ", ".join(RULE_BASED_STYLES) in str(caught.value)
    with pytest.raises(ValueError, match="unknown style"):
        RuleBasedJudge("made_up")


def test_simulator_approves_or_names_the_problem():
    simulator = RuleBasedUserSimulator("no_emojis")
    good, bad = simulator.generate_feedback(["q1", "q2"], ["All done.", "All done ✅"])
    assert "emoji" not in good.lower() and len(good.split()) < 12
    assert "emojis (✅)" in bad and "leave out the emojis" in bad


def test_simulator_is_deterministic_but_varied():
    simulator = RuleBasedUserSimulator("exclamation")
    prompts = [f"question {i}" for i in range(12)]
    first = simulator.generate_feedback(prompts, ["Sure thing!"] * 12)
    assert first == simulator.generate_feedback(prompts, ["Sure thing!"] * 12)
    assert len({text.split(".")[0] for text in first}) > 1  # openers differ across inputs
    assert all("exclamation marks (1)" in text for text in first)


def test_simulator_names_several_problems_in_one_message():
    simulator = RuleBasedUserSimulator("answer_directly_reduce_formatting")
    (text,) = simulator.generate_feedback(["q"], ["## Title\n\n**Bold** claim."])
    assert "markdown headers" in text and "bold text" in text and " and " in text


def test_judge_prefers_fewer_violations_in_both_orders():
    judge = RuleBasedJudge("less_filler_praise_sycophancy")
    clean = "Paris."
    one = "Great question! Paris."
    two = "Great question! Paris. Hope this helps!"
    decisions = judge.choose_batch_generated(["p"] * 4, [clean, two, one, clean], [one, one, two, "Lyon."])
    assert decisions == [0, 1, 0, -1]
    assert judge.last_n_unparsed == 0 and len(judge.last_raw_outputs) == 4
    raw = judge.last_raw_outputs[0]
    assert parse_judgement(raw["ab"]) == 0 and parse_judgement(raw["ba"]) == 1
    assert "Response B: 1 violation(s), severity 1.00: opens with praise" in raw["ab"]


def test_judge_weighs_how_far_each_response_breaks_the_rule():
    """Both too long for "short": the clearly shorter one wins; lengths within 10% of each other tie."""
    judge = RuleBasedJudge("short")
    words = lambda n: " ".join(["word"] * n) + "."  # noqa: E731
    decisions = judge.choose_batch_generated(
        ["p"] * 3, [words(80), words(200), words(100)], [words(150), words(90), words(101)]
    )
    assert decisions == [0, 1, -1]
    assert "severity 0.33" in judge.last_raw_outputs[0]["ab"]  # (80 - 60) / 60


def test_judge_validates_lengths():
    with pytest.raises(ValueError, match="lengths differ"):
        RuleBasedJudge("short").choose_batch_generated(["p"], [], ["b"])
