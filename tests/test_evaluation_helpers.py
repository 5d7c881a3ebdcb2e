"""Tests for auxiliary/evaluation_helpers.py: prompt loading/selection, win-rate metrics, results files, plot."""

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sdpo.evaluation.evaluation_helpers import (
    DataError,
    as_conversation,
    compute_metrics,
    filter_by_prompt_tokens,
    format_metrics_line,
    load_prompts,
    next_run_index,
    request_text,
    select_prompts,
    to_json_safe,
    write_completions_snapshot,
    write_json_atomic,
)
from sdpo.models.generation import encode_chat

PROMPTS = Path(__file__).parent / "fixtures" / "prompts"

METRIC_KEYS = {
    "n",
    "wins_a",
    "wins_b",
    "ties",
    "coverage",
    "winrate_a",
    "se",
    "se_bootstrap",
    "n_effective",
    "winrate_inc_ties",
}


# ---------------------------------------------------------------------------------------------- load


def test_load_prompts_strips_and_skips_blank_lines():
    assert load_prompts(PROMPTS / "valid.jsonl") == [
        "What is the capital of France?",
        "Explain recursion to a beginner.",
        "Write a haiku about autumn leaves.",
        "Summarize the plot of Hamlet in two sentences.",
    ]


def test_load_prompts_reads_another_field():
    assert load_prompts(PROMPTS / "custom_field.jsonl", field="question") == ["Why is the sky blue?"]


def test_malformed_line_names_file_and_line():
    with pytest.raises(DataError) as caught:
        load_prompts(PROMPTS / "malformed.jsonl")
    message = str(caught.value)
    assert "malformed.jsonl:3:" in message
    assert "not valid JSON" in message
    assert "\n" not in message


def test_missing_field_names_file_line_and_field():
    with pytest.raises(DataError, match=r"missing_field\.jsonl:2: no 'prompt' field \(fields present: 'question'\)"):
        load_prompts(PROMPTS / "missing_field.jsonl")


def test_a_message_list_field_is_a_conversation():
    prompts = load_prompts(PROMPTS / "non_string.jsonl")
    assert prompts[1] == [{"role": "user", "content": "A conversation, not a string."}]


def test_whitespace_only_field_is_rejected():
    with pytest.raises(DataError, match=r"empty_value\.jsonl:1: field 'prompt' is empty"):
        load_prompts(PROMPTS / "empty_value.jsonl")


def test_non_object_row_is_rejected(tmp_path):
    path = tmp_path / "list_row.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match=r"list_row\.jsonl:1: expected a JSON object"):
        load_prompts(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: no prompts"):
        load_prompts(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="prompt file not found"):
        load_prompts(tmp_path / "absent.jsonl")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# -------------------------------------------------------------------------------------------- filter


def test_filter_by_prompt_tokens_counts_the_rendered_chat(chat_tokenizer):
    prompts = ["Hi.", "word " * 40, "Tell me a short story about a cat."]
    lengths = [len(encode_chat(chat_tokenizer, [{"role": "user", "content": p}])) for p in prompts]
    # The rendering adds template tokens on top of the prompt's own.
    assert lengths[0] > len(chat_tokenizer("Hi.", add_special_tokens=False)["input_ids"])
    assert lengths[0] < lengths[2] < lengths[1]

    kept, n_dropped = filter_by_prompt_tokens(prompts, chat_tokenizer, max_prompt_tokens=lengths[2])
    assert kept == [prompts[0], prompts[2]]  # the limit is inclusive, order is kept
    assert n_dropped == 1

    kept, n_dropped = filter_by_prompt_tokens(prompts, chat_tokenizer, max_prompt_tokens=lengths[0] - 1)
    assert (kept, n_dropped) == ([], 3)


def test_filter_rejects_a_non_positive_budget(chat_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        filter_by_prompt_tokens(["Hi."], chat_tokenizer, 0)


# -------------------------------------------------------------------------------------------- select

POOL = [f"prompt {i}" for i in range(50)]


def test_select_is_deterministic_for_a_seed_and_differs_across_seeds():
    first = select_prompts(POOL, 10, seed=1234, label="eval")
    assert first == select_prompts(POOL, 10, seed=1234, label="eval")
    assert len(first) == len(set(first)) == 10
    assert set(first) <= set(POOL)
    assert first != select_prompts(POOL, 10, seed=424242, label="eval")


def test_select_matches_the_datasets_shuffle_of_the_reference():
    datasets = pytest.importorskip("datasets")
    reference = datasets.Dataset.from_dict({"prompt": POOL}).shuffle(seed=42).select(range(15))["prompt"]
    assert select_prompts(POOL, 15, seed=42, label="train") == list(reference)


def test_select_fewer_than_requested_warns_and_returns_what_exists(caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo.evaluation.evaluation_helpers"):
        chosen = select_prompts(POOL[:7], 20, seed=0, label="eval")
    assert sorted(chosen) == sorted(POOL[:7])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "eval" in warnings[0] and "requested 20" in warnings[0] and "only 7" in warnings[0]


def test_select_enough_prompts_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo.evaluation.evaluation_helpers"):
        select_prompts(POOL, 50, seed=0, label="train")
    assert not caplog.records


def test_select_rejects_a_negative_count():
    with pytest.raises(ValueError, match="train"):
        select_prompts(POOL, -1, seed=0, label="train")


# ------------------------------------------------------------------------------------------- metrics


def test_all_ties_give_nan_winrate_and_half_inc_ties():
    metrics = compute_metrics([-1, -1, -1, -1], seed=0)
    assert set(metrics) == METRIC_KEYS
    assert (metrics["n"], metrics["wins_a"], metrics["wins_b"], metrics["ties"]) == (4, 0, 0, 4)
    assert metrics["n_effective"] == 0
    assert metrics["coverage"] == 0.0
    assert math.isnan(metrics["winrate_a"])
    assert math.isnan(metrics["se"])
    assert math.isnan(metrics["se_bootstrap"])
    assert metrics["winrate_inc_ties"] == 50.0


def test_one_decisive_outcome_has_zero_se():
    metrics = compute_metrics([0, -1, -1], seed=0)
    assert metrics["n_effective"] == 1
    assert metrics["winrate_a"] == 100.0
    assert metrics["se"] == 0.0
    assert metrics["se_bootstrap"] == 0.0
    assert metrics["coverage"] == pytest.approx(1 / 3)
    assert metrics["winrate_inc_ties"] == 66.67  # 100 * (1 + 0.5 * 2) / 3, rounded


def test_mixed_case_by_hand():
    # 6 current wins, 2 baseline wins, 2 ties.
    decisions = [0, 1, 0, -1, 0, 0, 1, 0, -1, 0]
    metrics = compute_metrics(decisions, seed=7)
    assert (metrics["n"], metrics["wins_a"], metrics["wins_b"], metrics["ties"]) == (10, 6, 2, 2)
    assert metrics["n_effective"] == 8
    assert metrics["coverage"] == pytest.approx(0.8, abs=1e-12)
    assert metrics["winrate_a"] == pytest.approx(75.0, abs=1e-12)
    # 100 * sqrt(0.75 * 0.25 / 8) = 100 * sqrt(3 / 128)
    assert metrics["se"] == pytest.approx(100 * math.sqrt(3 / 128), abs=1e-9)
    assert metrics["se"] == pytest.approx(15.309310892394862, abs=1e-9)
    assert metrics["winrate_inc_ties"] == 70.0  # 100 * (6 + 1) / 10
    assert metrics["se_bootstrap"] > 0


def test_values_are_plain_python_numbers():
    metrics = compute_metrics(np.array([0, 1, -1, 0]), seed=0)
    for key, value in metrics.items():
        assert type(value) in (int, float), key
    json.dumps(metrics, allow_nan=False)


def test_bootstrap_se_is_close_to_analytic_for_a_large_sample():
    decisions = [0] * 240 + [1] * 160 + [-1] * 50  # p = 0.6 over 400 decisive outcomes
    metrics = compute_metrics(decisions, seed=3)
    assert metrics["se"] == pytest.approx(100 * math.sqrt(0.6 * 0.4 / 400), abs=1e-9)
    # The bootstrap SE of a proportion estimates the same plug-in quantity; 10k replicates put
    # its own noise at about se / sqrt(2 * 10_000) ≈ 0.7 %.
    assert metrics["se_bootstrap"] == pytest.approx(metrics["se"], rel=0.03)


def test_bootstrap_is_reproducible_for_a_seed():
    decisions = [0, 1, 0, 0, -1, 1, 0, 1, 0, 0, 0, 1]
    first = compute_metrics(decisions, seed=1234)["se_bootstrap"]
    assert compute_metrics(decisions, seed=1234)["se_bootstrap"] == first
    assert compute_metrics(decisions, seed=1235)["se_bootstrap"] != first


def test_bootstrap_resamples_the_decisive_outcomes():
    decisions = [0, 1, 0, 0, -1, 1, 0]
    outcomes = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    means = np.random.default_rng(5).choice(outcomes, size=(200, 6), replace=True).mean(axis=1)
    expected = 100 * np.std(means, ddof=1)
    assert compute_metrics(decisions, seed=5, n_bootstrap=200)["se_bootstrap"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("decisions", [[0, 2], [0, None], ["A"]])
def test_invalid_decisions_are_rejected(decisions):
    with pytest.raises(ValueError, match="decisions must be"):
        compute_metrics(decisions, seed=0)


def test_empty_decisions_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], seed=0)


# ------------------------------------------------------------------------------------- console line


def test_format_metrics_line():
    metrics = {**compute_metrics([0, 1, 0, -1, 0, 0, 1, 0, -1, 0], seed=0), "step": 3, "n_unparsed": 1}
    line = format_metrics_line(metrics, "concise_casual_beginner")
    assert line.startswith("[concise_casual_beginner] step 3: winrate 75.0% ± 15.3")
    assert "inc_ties 70.0%" in line
    assert "coverage 0.80" in line
    assert "n_eff 8/10" in line
    assert "unparsed 1" in line
    assert "\n" not in line


def test_format_metrics_line_handles_nan_and_null():
    line = format_metrics_line(compute_metrics([-1, -1], seed=0), "style")
    assert "winrate n/a% ± n/a" in line
    assert "unparsed" not in line
    reloaded = json.loads(json.dumps(to_json_safe(compute_metrics([-1], seed=0))))
    assert "winrate n/a%" in format_metrics_line(reloaded, "style")


# ---------------------------------------------------------------------------------------- JSON files


def test_to_json_safe_replaces_non_finite_and_numpy_values():
    obj = {
        "nan": math.nan,
        "inf": -math.inf,
        "nested": [np.float32(0.5), np.int64(3), (np.nan, 1.0)],
        "array": np.array([1.0, np.inf]),
        "flag": np.bool_(True),
        "text": "kept",
    }
    assert to_json_safe(obj) == {
        "nan": None,
        "inf": None,
        "nested": [0.5, 3, [None, 1.0]],
        "array": [1.0, None],
        "flag": True,
        "text": "kept",
    }


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


def test_write_json_atomic_writes_null_for_nan_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "eval" / "run_1.json"
    history = [{"step": 1, **compute_metrics([-1, -1], seed=0)}]
    write_json_atomic(path, {"meta": {"run_name": "run", "note": "ünïcode"}, "eval_history": history})
    data = _strict_json(path)
    assert data["eval_history"][0]["winrate_a"] is None
    assert data["eval_history"][0]["se_bootstrap"] is None
    assert data["meta"]["note"] == "ünïcode"
    assert path.read_text(encoding="utf-8").startswith('{\n  "meta"')  # indent 2

    write_json_atomic(path, {"eval_history": history * 2})  # rewritten in place
    assert len(_strict_json(path)["eval_history"]) == 2
    assert [p.name for p in path.parent.iterdir()] == ["run_1.json"]


def test_write_json_atomic_keeps_the_old_file_when_serialization_fails(tmp_path):
    path = tmp_path / "run_1.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert _strict_json(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run_1.json"]


def test_next_run_index(tmp_path):
    assert next_run_index(tmp_path / "not_yet_created", "run") == 1
    assert next_run_index(tmp_path, "run") == 1
    for name in ["run_1.json", "run_2.json", "run_4.json", "run_completions_3.json", "other_3.json"]:
        (tmp_path / name).write_text("{}")
    assert next_run_index(tmp_path, "run") == 3
    assert next_run_index(tmp_path, "other") == 1


def test_completions_snapshot_is_rewritten_with_truncated_rows(tmp_path):
    path = tmp_path / "run" / "run_1_completions.jsonl"
    prompts = [f"prompt {i} " + "x" * 500 for i in range(12)]
    current = [f"current {i}" for i in range(12)]
    baseline = [f"baseline {i}" for i in range(12)]
    first = {"step": 3, "current": current, "baseline": baseline}
    write_completions_snapshot(path, [first], prompts)
    write_completions_snapshot(
        path, [first, {"step": 6, "current": current, "baseline": baseline}], prompts, max_chars=5
    )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20  # rewritten, not appended: a redone evaluation never appears twice
    assert rows[0] == {"step": 3, "prompt": "promp", "current": "curre", "baseline": "basel"}
    assert rows[10] == {"step": 6, "prompt": "promp", "current": "curre", "baseline": "basel"}


def test_completions_snapshot_rejects_unequal_lengths(tmp_path):
    with pytest.raises(ValueError, match="equal lengths"):
        write_completions_snapshot(tmp_path / "s.jsonl", [{"step": 1, "current": ["c", "d"], "baseline": ["b"]}], ["p"])


def test_prompts_may_be_conversations(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a colour."},
            ]
        },
        {"prompt": [{"role": "user", "content": "Yo"}]},
        {"prompt": "  plain  "},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = load_prompts(path)
    assert prompts[0] == rows[0]["messages"] and prompts[1] == rows[1]["prompt"] and prompts[2] == "plain"
    assert [request_text(p) for p in prompts] == ["Name a colour.", "Yo", "plain"]
    assert (
        as_conversation("plain") == [{"role": "user", "content": "plain"}]
        and as_conversation(prompts[0]) == rows[0]["messages"]
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            "field 'messages' must end with a non-empty user message",
        ),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "field 'messages[0]' has speaker 'robot'"),
        ({"messages": []}, "field 'messages' must be a non-empty list of messages"),
        ({"prompt": 7}, "field 'prompt' must be a string or a list of messages, got int"),
    ],
)
def test_bad_conversations_name_the_line_and_field(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"chat.jsonl:2: {re.escape(message)}"):
        load_prompts(path)
