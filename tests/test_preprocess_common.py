"""Shared preprocessing pieces: history rules, role normalisation, length units, JSON streaming,
atomic writes, local source forms and the one-line Hub error."""

import json
from collections import Counter
from pathlib import Path

import pytest

from sdpo.data import data_sources
from sdpo.data.conversations import (
    ConversationLimits,
    build_history,
    conversation_skip_reason,
    extract_interactions,
    merge_consecutive,
    normalize_conversation,
)
from sdpo.data.data_sources import DataError, HubSource, load_splits
from sdpo.data.interaction_schema import ASSISTANT, USER, Message
from sdpo.data.json_stream import JsonRecordStream
from sdpo.data.preprocessing_cli import FilterCounts, InteractionExtractor, LengthMeter, stats_path_for
from sdpo.utils.file_io import write_jsonl_atomic

FIXTURES = Path(__file__).parent / "fixtures" / "preprocess"


def messages(*spec):
    """messages("u:hi", "a:hello") → normalised Message list with indices."""
    roles = {"u": USER, "a": ASSISTANT}
    return [Message(roles[item[0]], item[2:], index) for index, item in enumerate(spec)]


def texts(history):
    return [(message.role, message.text) for message in history]


# ---------------------------------------------------------------- roles


def test_normalize_maps_both_schemas_and_drops_empty_and_unknown_roles():
    raw = [
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "   "},
        {"from": "chatgpt", "value": "from chatgpt"},
        {"from": "tool", "value": "x"},
        {"role": "User", "content": "caps role"},
        {"from": "gpt", "value": None},
    ]
    kept, dropped = normalize_conversation(raw)
    assert [(m.role, m.text, m.index) for m in kept] == [
        (USER, "hi", 1),
        (ASSISTANT, "hello", 2),
        (ASSISTANT, "from chatgpt", 4),
        (USER, "caps role", 6),
    ]
    assert dropped == 4
    assert normalize_conversation(None) == ([], 0)


# ---------------------------------------------------------------- history rules


def test_merge_joins_runs_in_order_and_keeps_first_index():
    merged = merge_consecutive(messages("u:one", "u:two", "a:x", "a:y", "u:three"))
    assert texts(merged) == [(USER, "one\n\ntwo"), (ASSISTANT, "x\n\ny"), (USER, "three")]
    assert [m.index for m in merged] == [0, 2, 4]


def test_history_keeps_the_latest_user_message_of_a_run():
    # The reference kept the first of a run ("here is my code") and lost the question the assistant answered.
    history, reason = build_history(messages("u:here is my code", "u:why does it crash?"), max_messages=5)
    assert reason is None
    assert texts(history) == [(USER, "here is my code\n\nwhy does it crash?")]


def test_history_window_drops_leading_assistant_and_requires_final_user_turn():
    history, reason = build_history(messages("u:q0", "a:a1", "u:q2", "a:a3", "u:q4", "a:a5", "u:q6"), max_messages=5)
    assert reason is None and [m.text for m in history] == ["q2", "a3", "q4", "a5", "q6"]
    history, reason = build_history(messages("u:q0", "a:a1", "u:q2", "a:a3", "u:q4", "a:a5", "u:q6"), max_messages=4)
    assert reason is None and [m.text for m in history] == ["q4", "a5", "q6"]  # window started with an assistant turn
    assert build_history(messages(), 5) == (None, "no_user_turn_in_history")
    assert build_history(messages("a:hello"), 5) == (None, "no_user_turn_in_history")
    assert build_history(messages("u:q", "a:a"), 5) == (None, "history_not_ending_with_user")


def test_extract_interactions_pairs_each_assistant_turn_with_the_next_user_turn():
    skipped = Counter()
    found = list(
        extract_interactions(messages("a:welcome", "u:q1", "a:r1", "a:r1b", "u:q2", "a:r2", "u:q3"), 5, skipped)
    )
    # a:welcome has no history; a:r1b follows another assistant turn; a:r2 is a proper tuple.
    assert skipped == Counter({"no_user_turn_in_history": 1, "history_not_ending_with_user": 1})
    assert len(found) == 1
    assert texts(found[0].history) == [(USER, "q1"), (ASSISTANT, "r1\n\nr1b"), (USER, "q2")]
    assert (found[0].completion.text, found[0].completion.index) == ("r2", 5)
    assert found[0].user_response.text == "q3"


def test_conversation_filters_in_order():
    meter = LengthMeter("chars")
    limits = ConversationLimits(meter, max_total_length=30, max_completion_length=10, max_user_message_length=12)
    assert conversation_skip_reason(messages("u:a", "a:b"), limits) == "too_few_messages"
    assert conversation_skip_reason(messages("u:" + "x" * 12, "a:" + "y" * 10, "u:" + "z" * 9), limits) == (
        "conversation_too_long"
    )
    assert conversation_skip_reason(messages("u:a", "a:" + "y" * 11, "u:c"), limits) == "assistant_message_too_long"
    assert conversation_skip_reason(messages("u:" + "x" * 13, "a:b", "u:c"), limits) == "user_message_too_long"
    assert conversation_skip_reason(messages("u:" + "x" * 12, "a:" + "y" * 10, "u:c"), limits) is None
    no_user_limit = ConversationLimits(meter, max_total_length=30, max_completion_length=10)
    assert conversation_skip_reason(messages("u:" + "x" * 13, "a:b", "u:c"), no_user_limit) is None


def test_extractor_counts_every_reason_and_lists_zeros():
    extract = InteractionExtractor(ConversationLimits(LengthMeter("chars")), 5, extra_reasons=("other_language",))
    extract.reject("other_language")
    extract([{"from": "human", "value": "hi"}])
    _, found = extract(
        [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "system", "value": "ignored"},
            {"from": "human", "value": "o"},
        ]
    )
    stats = extract.as_dict()
    assert len(found) == 1 and found[0].completion.index == 1 and found[0].user_response.index == 3
    assert stats["conversations"] == {
        "scanned": 3,
        "kept": 1,
        "skipped": {
            "other_language": 1,
            "too_few_messages": 1,
            "conversation_too_long": 0,
            "assistant_message_too_long": 0,
        },
    }
    assert stats["interactions"]["scanned"] == 1
    assert stats["messages_dropped_empty_or_unknown_role"] == 1


# ---------------------------------------------------------------- lengths


def test_length_meter_chars_and_tokens(chat_tokenizer):
    assert LengthMeter("chars")("héllo") == 5
    tokens = LengthMeter("tokens", chat_tokenizer)
    text = "The quick brown fox jumps over the lazy dog."
    assert tokens(text) == len(chat_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokens(text) < len(text)
    with pytest.raises(ValueError):
        LengthMeter("tokens")
    with pytest.raises(ValueError):
        LengthMeter("words")


# ---------------------------------------------------------------- JSON streaming


@pytest.mark.parametrize("chunk_chars", [7, 64, 1 << 20])
def test_json_stream_recovers_complete_elements_of_a_truncated_array(chunk_chars):
    stream = JsonRecordStream(FIXTURES / "sharegpt" / "truncated.json", chunk_chars=chunk_chars)
    ids = [record["id"] for record in stream]
    assert ids == ["sgA_0", "sgB_0", "sgC_1", "sgD_0"]
    assert stream.truncated


def test_json_stream_reads_complete_arrays_json_lines_and_empty_files(tmp_path):
    records = [{"id": i, "text": "x" * i + "ü"} for i in range(5)]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for path in (array, lines):
        stream = JsonRecordStream(path, chunk_chars=5)
        assert list(stream) == records and not stream.truncated
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    assert list(JsonRecordStream(empty)) == []


# ---------------------------------------------------------------- outputs


def test_write_jsonl_atomic_keeps_unicode_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl_atomic(target, [{"prompt": "café ☕"}, {"prompt": "b"}]) == 2
    assert target.read_text(encoding="utf-8") == '{"prompt": "café ☕"}\n{"prompt": "b"}\n'

    def failing_rows():
        yield {"prompt": "new"}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(target, failing_rows())
    assert target.read_text(encoding="utf-8").startswith('{"prompt": "café')  # old file intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.jsonl"]  # temp file removed


def test_stats_path_and_filter_counts():
    assert stats_path_for(Path("data/x/y_interactions.jsonl")) == Path("data/x/y_interactions.stats.json")
    counts = FilterCounts(["a", "b"])
    counts.scanned, counts.kept = 3, 1
    counts.skip("a", 2)
    assert counts.as_dict() == {"scanned": 3, "written": 1, "skipped": {"a": 2, "b": 0}}
    assert "skipped b: 0" in counts.report("train")


# ---------------------------------------------------------------- sources


SPLITS = HubSource("org/two-splits", config="main", splits=("train", "validation"))
SINGLE = HubSource("org/one-split")


def test_local_sources_in_every_documented_form(tmp_path):
    import datasets
    import pandas as pd

    cache = str(tmp_path / "cache")
    train_rows = pd.DataFrame({"prompt": ["a", "b"]})
    validation_rows = pd.DataFrame({"prompt": ["c"]})

    # SPLIT=FILE pairs, mixed formats
    train_rows.to_parquet(tmp_path / "t.parquet")
    validation_rows.to_json(tmp_path / "v.jsonl", orient="records", lines=True)
    pairs = load_splits(
        SPLITS, [f"train={tmp_path / 't.parquet'}", f"validation={tmp_path / 'v.jsonl'}"], cache_dir=cache
    )
    assert {split: list(ds["prompt"]) for split, ds in pairs.items()} == {"train": ["a", "b"], "validation": ["c"]}

    # a Hub snapshot folder whose README lists configs: the script's config is picked
    snapshot = tmp_path / "snapshot"
    for config, rows in (("main", train_rows), ("other", validation_rows)):
        (snapshot / config).mkdir(parents=True)
        rows.to_parquet(snapshot / config / "train-00000-of-00001.parquet")
        rows.to_parquet(snapshot / config / "validation-00000-of-00001.parquet")
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
            f"  - split: validation\n    path: {c}/validation-*\n"
            for c in ("other", "main")
        )
        + "---\n"
    )
    assert list(load_splits(SPLITS, [str(snapshot)], cache_dir=cache)["validation"]["prompt"]) == ["a", "b"]

    # a plain folder of per-split files, and a save_to_disk DatasetDict
    plain = tmp_path / "plain"
    plain.mkdir()
    train_rows.to_json(plain / "train.jsonl", orient="records", lines=True)
    validation_rows.to_json(plain / "validation.jsonl", orient="records", lines=True)
    assert load_splits(SPLITS, [str(plain)], cache_dir=cache)["train"].num_rows == 2
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_pandas(train_rows), "validation": datasets.Dataset.from_pandas(validation_rows)}
    ).save_to_disk(str(saved))
    assert load_splits(SPLITS, [str(saved)])["validation"].num_rows == 1

    # single-split sources: one file (JSON array), or a saved Dataset
    (tmp_path / "rows.json").write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert load_splits(SINGLE, [str(tmp_path / "rows.json")], cache_dir=cache)["train"].num_rows == 2
    datasets.Dataset.from_pandas(train_rows).save_to_disk(str(tmp_path / "one"))
    assert load_splits(SINGLE, [str(tmp_path / "one")])["train"].num_rows == 2


@pytest.mark.parametrize(
    "items, message",
    [
        (["{tmp}/missing.jsonl"], "does not exist"),
        (["{tmp}/t.parquet"], "needs the splits train, validation"),
        (["train={tmp}/t.parquet"], "no split(s) validation"),
        (["train={tmp}/t.parquet", "{tmp}/t.parquet"], "not a mix"),
        (["{tmp}/a.txt"], "needs the splits"),
    ],
)
def test_local_source_errors_are_one_line(tmp_path, items, message):
    import pandas as pd

    pd.DataFrame({"prompt": ["a"]}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        load_splits(SPLITS, [item.format(tmp=tmp_path) for item in items], cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(raised.value)


def test_unsupported_single_file_type(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_splits(SINGLE, [str(tmp_path / "a.txt")])


def test_unreachable_hub_fails_fast_in_cache_only_mode(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    # Pretend the user did not set HF_HUB_OFFLINE and the probe finds no network: the load must run
    # cache-only (no retries) and end in one line, and the library flags must be restored afterwards.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data_sources, "hub_reachable", lambda timeout_s=5.0: False)
    with pytest.raises(DataError) as raised:
        load_splits(HubSource("org/not-cached-anywhere"), cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "is unreachable" in message and "--dataset_path" in message and "\n" not in message
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False


def test_a_single_saved_dataset_cannot_stand_for_two_splits(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match="is one saved Dataset"):
        load_splits(SPLITS, [str(tmp_path / "one")])
    # ...but one saved Dataset per split works
    found = load_splits(SPLITS, [f"train={tmp_path / 'one'}", f"validation={tmp_path / 'one'}"])
    assert found["validation"].num_rows == 1
