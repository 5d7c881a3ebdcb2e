"""preprocess_wildfeedback.py on a WildFeedback-shaped fixture (conversations of {from, value},
chosen, rejected)."""

import json
import shutil
from pathlib import Path

from auxiliary import preprocess_wildfeedback
from tests.preprocess_helpers import WILDFEEDBACK_RECORD_FIELDS, read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "preprocess" / "wildfeedback" / "wildfeedback.json"
LIMITS = ["--max_completion_length", "300", "--max_total_length", "800"]


def run(tmp_path, dataset_path, *extra):
    out_dir = tmp_path / "wildfeedback"
    argv = ["--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "cache"), "--dataset_path", str(dataset_path)]
    assert preprocess_wildfeedback.main([*argv, *LIMITS, *extra]) == 0
    return out_dir / "wildfeedback_interactions.jsonl"


def test_tuples_filters_and_schema(tmp_path):
    output = run(tmp_path, FIXTURE)
    rows = read_jsonl(output)
    assert all(list(row) == WILDFEEDBACK_RECORD_FIELDS for row in rows)
    by_id = {row["id"]: row for row in rows}
    assert list(by_id) == ["0_1", "0_3", "4_2", "5_2", "7_4", "8_1", "8_3", "8_5", "8_7", "9_1"]

    first = by_id["0_3"]
    assert first["prompt"] == [
        {"from": "human", "value": "How do I boil an egg?"},
        {"from": "gpt", "value": "Put it in boiling water for 9 minutes."},
        {"from": "human", "value": "Too long, I like them soft."},
    ]
    assert first["completion"] == {"from": "gpt", "value": "Then 6 minutes."}
    assert first["user_response"] == {"from": "human", "value": "Thanks! And for poached eggs?"}
    assert (first["original_conv_id"], first["turn_id"], first["prompt_len"], first["completion_len"]) == (0, 3, 3, 15)
    assert first["total_conv_len"] == sum(
        len(m["value"]) for m in json.loads(FIXTURE.read_text(encoding="utf-8"))[0]["conversations"]
    )

    # consecutive user messages are merged, so the question the assistant answered survives
    assert by_id["5_2"]["prompt"] == [
        {"from": "human", "value": "I pasted my code below.\n\nWhy does it crash on line 3?"}
    ]
    # system and empty messages dropped before pairing
    assert by_id["7_4"]["prompt"] == [{"from": "human", "value": "Recommend a book.\n\nAnything?"}]
    # a conversation opened by the assistant: its first turn has no history, the next one starts at the user
    assert by_id["4_2"]["prompt"] == [{"from": "human", "value": "Right, how much should I save?"}]
    # the 5-message window
    assert [m["value"] for m in by_id["8_7"]["prompt"]] == ["q2", "a3", "q4", "a5", "q6"]
    assert all(row["prompt"][0]["from"] == "human" and row["prompt"][-1]["from"] == "human" for row in rows)
    assert "„Danke“" in output.read_text(encoding="utf-8")

    stats = json.loads(output.with_name("wildfeedback_interactions.stats.json").read_text())
    assert stats["conversations"] == {
        "scanned": 10,
        "kept": 7,
        "skipped": {"too_few_messages": 1, "conversation_too_long": 1, "assistant_message_too_long": 1},
    }
    assert stats["interactions"] == {
        "scanned": 12,
        "written": 10,
        "skipped": {"no_user_turn_in_history": 1, "history_not_ending_with_user": 1},
    }
    assert stats["messages_dropped_empty_or_unknown_role"] == 2
    assert stats["output"] == str(output)


def test_hub_snapshot_folder_reads_the_wildfeedback_config(tmp_path):
    snapshot = tmp_path / "WildFeedback"
    snapshot.mkdir()
    shutil.copy(FIXTURE, snapshot / "wildfeedback.json")
    (snapshot / "sat_dsat_annotation.json").write_text(json.dumps([{"conversation_id": "x", "label": "DSAT"}]))
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: wildfeedback\n  data_files: wildfeedback.json\n"
        "- config_name: sat_dsat_annotation\n  data_files: sat_dsat_annotation.json\n"
        "---\n"
    )
    assert read_jsonl(run(tmp_path / "a", snapshot)) == read_jsonl(run(tmp_path / "b", FIXTURE))


def test_conversation_column_fallback(tmp_path):
    rows = json.loads(FIXTURE.read_text(encoding="utf-8"))
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"conversation": row["conversations"]}) + "\n" for row in rows))
    assert len(read_jsonl(run(tmp_path, renamed))) == 10


def test_defaults_match_the_reference():
    args = preprocess_wildfeedback.build_parser().parse_args([])
    assert (args.max_history_messages, args.max_total_length, args.max_completion_length) == (5, 100_000, 4096)
