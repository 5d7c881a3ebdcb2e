"""The one interaction schema: the three row formats the offline trainer reads (interaction rows, TRL
conversational prompt/completion and messages rows), their tuples and field-naming errors, the records
the preprocessors write, and loading through ``datasets`` (Parquet) as well as line by line (JSONL)."""

import json

import pytest

from offline_sdpo.offline_sdpo_trainer import InteractionDataset, load_interactions
from sdpo.data.interaction_schema import ASSISTANT, SYSTEM, USER, Interaction, Message, interactions_from_row
from tests.conftest import FIXTURES

OFFLINE = FIXTURES / "offline"


def texts(messages):
    return [(message.role, message.text) for message in messages]


def test_a_messages_row_gives_one_tuple_per_assistant_turn_between_user_turns():
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "q3"},
            {"role": "assistant", "content": "a3"},
        ]
    }
    first, second = interactions_from_row(row)
    assert texts(first.history) == [(SYSTEM, "S"), (USER, "q1")]
    assert (first.completion.text, first.user_response.text) == ("a1", "q2")
    # The last user turn before y is o's predecessor; everything before y is x.
    assert texts(second.history) == [(SYSTEM, "S"), (USER, "q1"), (ASSISTANT, "a1"), (USER, "q2")]
    assert (second.completion.text, second.user_response.text) == ("a2", "q3")


def test_messages_fixture_gives_four_tuples_from_three_rows():
    rows, report = load_interactions(OFFLINE / "messages.jsonl")
    assert report.total == 0
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["1", "1", "2", "3"]
    # Row 3 opens with an assistant greeting (no user turn before it: not a tuple) and ends with y (no o).
    assert rows[3].completion.text.startswith("Bonjour ! (literally")
    assert rows[3].user_response.text == "No explanations please, only the translation."
    assert texts(rows[3].history)[0] == (ASSISTANT, "Hello! What can I do for you today?")


def test_prompt_completion_lists_with_o_in_the_completion_or_as_user_response():
    rows, _ = load_interactions(OFFLINE / "prompt_completion.jsonl")
    assert [(row.completion.text[:9], row.user_response.text) for row in rows] == [
        ("Soft rain", "Nice, but make it about summer rain."),
        ("Spiders h", "I only asked for the number."),
    ]
    assert texts(rows[1].history) == [(SYSTEM, "Answer briefly."), (USER, "How many legs does a spider have?")]


def test_all_formats_render_the_same_chat_rows_for_the_same_tuple():
    x = [{"role": "user", "content": "Name a colour."}]
    y = {"role": "assistant", "content": "Blue."}
    o = {"role": "user", "content": "Another one."}
    forms = [
        {"prompt": [{"from": "human", "value": "Name a colour."}], "completion": {"from": "gpt", "value": "Blue."},
         "user_response": {"from": "human", "value": "Another one."}},
        {"prompt": x, "completion": [y, o]},
        {"prompt": x, "completion": [y], "user_response": o},
        {"messages": [*x, y, o]},
    ]  # fmt: skip
    rendered = [[i.as_chat_row() for i in interactions_from_row(form)] for form in forms]
    assert all(rows == rendered[0] for rows in rendered)
    assert rendered[0] == [{"prompt": x, "completion": y, "user_response": o, "source": ""}]


def test_records_keep_the_reference_sharegpt_form():
    interaction = Interaction([Message(SYSTEM, "S"), Message(USER, "q")], Message(ASSISTANT, "a"), Message(USER, "o"))
    assert interaction.as_record() == {
        "prompt": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}],
        "completion": {"from": "gpt", "value": "a"},
        "user_response": {"from": "human", "value": "o"},
    }
    # A record read back is the same tuple.
    (again,) = interactions_from_row(interaction.as_record())
    assert (texts(again.history), again.completion.text, again.user_response.text) == (
        [(SYSTEM, "S"), (USER, "q")],
        "a",
        "o",
    )


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [user("hi"), assistant("yo")]}, "holds no assistant"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": [user("q"), assistant(5)]}, r"'messages\[1\]' needs a string"),
        ({"messages": [user("q"), assistant(" "), user("o")]}, r"'messages\[1\]' is empty"),
        ({"prompt": [user("q")], "completion": [assistant("a")]}, "y then o"),
        ({"prompt": [user("q")], "completion": [user("a"), user("o")]}, r"'completion\[0\]' must be an assistant"),
        ({"prompt": [user("q")]}, "'completion' is missing"),
        ({"text": "hello"}, "'prompt' or 'messages' is missing"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_bad_rows_name_the_field(row, message):
    with pytest.raises(ValueError, match=message):
        interactions_from_row(row)


def test_parquet_rows_load_through_datasets_like_the_jsonl_file(tmp_path):
    import pandas as pd

    lines = (OFFLINE / "interactions.jsonl").read_text(encoding="utf-8").splitlines()
    pd.DataFrame([json.loads(line) for line in lines]).to_parquet(tmp_path / "rows.parquet")
    from_jsonl, _ = load_interactions(OFFLINE / "interactions.jsonl")
    from_parquet, _ = load_interactions(tmp_path / "rows.parquet")
    assert [InteractionDataset([i])[0] | {"source": ""} for i in from_parquet] == [
        InteractionDataset([i])[0] | {"source": ""} for i in from_jsonl
    ]
    assert from_parquet[2].source == f"{tmp_path / 'rows.parquet'} row 2"
