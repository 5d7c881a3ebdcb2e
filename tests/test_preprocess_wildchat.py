"""preprocess_wildchat.py on WildChat-shaped rows (conversation_hash, model, timestamp, conversation of
{role, content, language, redacted, toxic}, turn, language, moderation columns)."""

import json
from pathlib import Path

import pandas as pd

from auxiliary import preprocess_wildchat
from auxiliary.preprocess_wildchat import shuffled_order
from tests.preprocess_helpers import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "preprocess" / "wildchat" / "train.jsonl"
LIMITS = ["--max_completion_length", "300", "--max_user_message_length", "300", "--max_total_length", "800"]
RECORD_FIELDS = [
    "id",
    "conversation_id",
    "row_idx",
    "turn_id",
    "model",
    "timestamp",
    "prompt",
    "completion",
    "user_response",
    "prompt_len",
    "completion_len",
    "user_response_len",
    "total_conv_len",
]


def as_parquet(tmp_path) -> Path:
    """The fixture as the Hub ships it: parquet with a real timestamp column."""
    rows = pd.read_json(FIXTURE, lines=True, dtype={"timestamp": False})
    rows["timestamp"] = pd.to_datetime(rows["timestamp"], utc=True)
    path = tmp_path / "train-00000-of-00001.parquet"
    rows.to_parquet(path)
    return path


def run(tmp_path, dataset_path, *extra):
    out_dir = tmp_path / "wildchat"
    argv = ["--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "cache"), "--dataset_path", str(dataset_path)]
    assert preprocess_wildchat.main([*argv, *LIMITS, *extra]) == 0
    return out_dir / "wildchat_interactions_v1.jsonl"


def test_tuples_filters_and_schema(tmp_path):
    output = run(tmp_path, as_parquet(tmp_path))
    rows = read_jsonl(output)
    assert all(list(row) == RECORD_FIELDS for row in rows)
    assert sorted(row["id"] for row in rows) == ["9_1", "h_lower_1", "h_merge_2", "h_ok_1", "h_ok_3"]
    # rows are visited in the order of Dataset.shuffle(seed=42)
    order = shuffled_order(10, 42)
    assert [row["row_idx"] for row in rows] == sorted((row["row_idx"] for row in rows), key=order.index)

    by_id = {row["id"]: row for row in rows}
    ok = by_id["h_ok_3"]
    assert ok["prompt"] == [
        {"from": "human", "value": "Explain recursion."},
        {"from": "gpt", "value": "A function that calls itself."},
        {"from": "human", "value": "Simpler please."},
    ]
    assert ok["completion"] == {"from": "gpt", "value": "It solves a problem by solving smaller copies of it."}
    assert ok["user_response"] == {"from": "human", "value": "Now with an example."}
    assert (ok["conversation_id"], ok["row_idx"], ok["turn_id"], ok["model"]) == ("h_ok", 0, 3, "gpt-3.5-turbo")
    assert ok["timestamp"].startswith("2023-05-01 10:00:00")
    assert (ok["prompt_len"], ok["completion_len"], ok["user_response_len"]) == (3, 52, 20)
    assert by_id["h_lower_1"]["model"] == "gpt-4"  # language "english" in lower case is kept
    assert by_id["h_merge_2"]["prompt"] == [
        {"from": "human", "value": "Here is my SQL: SELECT * FROM t\n\nWhy is it slow?"}
    ]
    assert by_id["9_1"]["conversation_id"] is None  # no hash: the id falls back to the row index

    stats = json.loads(output.with_name("wildchat_interactions_v1.stats.json").read_text())
    assert stats["conversations"] == {
        "scanned": 10,
        "kept": 5,
        "skipped": {
            "other_language": 1,
            "too_few_messages": 1,
            "conversation_too_long": 1,
            "assistant_message_too_long": 1,
            "user_message_too_long": 1,
        },
    }
    assert stats["interactions"] == {
        "scanned": 6,
        "written": 5,
        "skipped": {"no_user_turn_in_history": 0, "history_not_ending_with_user": 1},
    }
    assert stats["stopped"] == "end of dataset"


def test_jsonl_copy_gives_the_same_tuples(tmp_path):
    from_parquet = read_jsonl(run(tmp_path / "a", as_parquet(tmp_path)))
    from_jsonl = read_jsonl(run(tmp_path / "b", FIXTURE))
    assert [row["prompt"] for row in from_parquet] == [row["prompt"] for row in from_jsonl]


def test_stop_rules(tmp_path):
    output = run(tmp_path / "a", FIXTURE, "--max_conversations", "2")
    stats = json.loads(output.with_name("wildchat_interactions_v1.stats.json").read_text())
    assert stats["conversations"]["kept"] == 2
    assert stats["stopped"] == "kept 2 conversations (--max_conversations)"

    output = run(tmp_path / "b", FIXTURE, "--stop_after_conversations", "1", "--stop_after_interactions", "2")
    stats = json.loads(output.with_name("wildchat_interactions_v1.stats.json").read_text())
    assert stats["interactions"]["written"] >= 2
    assert stats["stopped"].endswith(f"wrote {stats['interactions']['written']} interactions")


def test_shuffled_order_is_the_datasets_shuffle_order():
    import datasets

    rows = datasets.Dataset.from_dict({"i": list(range(50))})
    assert shuffled_order(50, 42) == list(rows.shuffle(seed=42)["i"])


def test_defaults_match_the_reference():
    args = preprocess_wildchat.build_parser().parse_args([])
    assert (args.seed, args.max_conversations, args.stop_after_conversations, args.stop_after_interactions) == (
        42,
        15_000,
        14_000,
        50_000,
    )
    assert (args.max_user_message_length, args.max_completion_length, args.max_total_length) == (4096, 4096, 100_000)
