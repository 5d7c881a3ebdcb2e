"""preprocess_helpsteer.py on a HelpSteer2-shaped fixture (prompt, response, five attribute scores)."""

import json
from pathlib import Path

import pytest

from auxiliary import preprocess_helpsteer
from tests.preprocess_helpers import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "preprocess" / "helpsteer2"
LIMITS = ["--max_prompt_length", "120", "--max_response_length", "200"]


def run(tmp_path, *extra):
    out_dir = tmp_path / "helpsteer_prompts"
    argv = ["--out_dir", str(out_dir), "--cache_dir", str(tmp_path / "cache"), *extra]
    assert preprocess_helpsteer.main(argv) == 0
    return out_dir


def test_every_filter_and_the_output_schema(tmp_path):
    out_dir = run(tmp_path, "--dataset_path", str(FIXTURE), *LIMITS)
    assert read_jsonl(out_dir / "train.jsonl") == [
        {"prompt": "What is the capital of Australia?"},
        {"prompt": "Write a haiku about autumn rain."},
        {"prompt": "Décris un café parisien ☕ en une phrase."},
    ]
    assert read_jsonl(out_dir / "validation.jsonl") == [
        {"prompt": "Write a haiku about autumn rain."},
        {"prompt": "How many legs does a spider have?"},
    ]
    assert "café parisien ☕" in (out_dir / "train.jsonl").read_text(encoding="utf-8")  # not \u-escaped

    stats = json.loads((out_dir / "preprocess_stats.json").read_text())
    assert stats["splits"]["train"] == {
        "scanned": 8,
        "written": 3,
        "skipped": {
            "empty": 1,
            "multi_turn": 1,
            "prompt_too_long": 1,
            "response_too_long": 1,
            "duplicate_prompt": 1,
        },
    }
    # the upper-case <EXTRA_ID_1> marker counts as multi-turn too
    assert stats["splits"]["validation"]["skipped"]["multi_turn"] == 1
    assert stats["validation_prompts_also_in_train"] == 1
    assert stats["arguments"]["max_prompt_length"] == 120
    assert stats["source"].startswith("local: ")


def test_per_split_files_give_the_same_output(tmp_path):
    by_folder = run(tmp_path / "a", "--dataset_path", str(FIXTURE), *LIMITS)
    by_files = run(
        tmp_path / "b",
        "--dataset_path",
        f"train={FIXTURE / 'train.jsonl'}",
        f"validation={FIXTURE / 'validation.jsonl'}",
        *LIMITS,
    )
    for split in ("train", "validation"):
        assert read_jsonl(by_folder / f"{split}.jsonl") == read_jsonl(by_files / f"{split}.jsonl")


@pytest.mark.slow
def test_token_limits(tmp_path, bundled_model_path):
    # The 147-character prompt is about 30 tokens: a 40-token limit keeps it, a 120-character one does not.
    out_dir = run(
        tmp_path,
        "--dataset_path",
        str(FIXTURE),
        "--length_unit",
        "tokens",
        "--tokenizer",
        bundled_model_path,
        "--max_prompt_length",
        "40",
        "--max_response_length",
        "60",
    )
    prompts = [row["prompt"] for row in read_jsonl(out_dir / "train.jsonl")]
    assert any(prompt.startswith("Explain, step by step") for prompt in prompts)
    stats = json.loads((out_dir / "preprocess_stats.json").read_text())
    assert stats["splits"]["train"]["skipped"]["response_too_long"] == 1
    assert stats["arguments"]["length_unit"] == "tokens"


def test_defaults_match_the_reference():
    args = preprocess_helpsteer.build_parser().parse_args([])
    assert (args.max_prompt_length, args.max_response_length, args.length_unit) == (2048, 2048, "chars")


def test_tokens_without_tokenizer_is_a_one_line_error(tmp_path, capsys):
    argv = ["--out_dir", str(tmp_path), "--dataset_path", str(FIXTURE), "--length_unit", "tokens"]
    assert preprocess_helpsteer.main(argv) == 1
    assert capsys.readouterr().err == "error: --length_unit tokens needs --tokenizer NAME_OR_PATH\n"
