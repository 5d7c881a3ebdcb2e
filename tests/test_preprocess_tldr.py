"""preprocess_tldr_dataset.py on summarize_from_feedback-shaped comparison rows (info, summaries,
choice, worker, batch, split, extra)."""

import json
from pathlib import Path

import pandas as pd

from auxiliary import preprocess_tldr_dataset
from auxiliary.preprocess_tldr_dataset import INSTRUCTION, dedup_key
from tests.preprocess_helpers import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "preprocess" / "tldr"
PAIRS = [f"train={FIXTURE / 'train.jsonl'}", f"validation={FIXTURE / 'validation.jsonl'}"]


def fixture_texts(split):
    return [
        (row["info"]["post"] or row["info"]["article"] or "").strip() for row in read_jsonl(FIXTURE / f"{split}.jsonl")
    ]


def run(out_dir, dataset_path, *extra):
    argv = ["--out_dir", str(out_dir), "--cache_dir", str(out_dir.parent / "cache"), "--dataset_path", *dataset_path]
    assert preprocess_tldr_dataset.main([*argv, "--max_prompt_length", "400", "--print_examples", "1", *extra]) == 0
    return out_dir


def test_filters_dedup_and_cross_split_removal(tmp_path):
    out_dir = run(tmp_path / "tldr", PAIRS)
    train_texts, validation_texts = fixture_texts("train"), fixture_texts("validation")
    train = [row["prompt"] for row in read_jsonl(out_dir / "train.jsonl")]
    validation = [row["prompt"] for row in read_jsonl(out_dir / "validation.jsonl")]
    # post P1 (its upper-cased, re-spaced copy is a duplicate), the news article, post P2
    assert train == [train_texts[i] for i in (0, 3, 6)]
    # P2 already in train is removed; P3 once; P4
    assert validation == [validation_texts[i] for i in (1, 3)]

    stats = json.loads((out_dir / "preprocess_stats.json").read_text())
    assert stats["prompt_format"] == "post" and "--system_prompt tldr" in stats["summary_instruction"]
    assert stats["splits"]["train"] == {
        "scanned": 7,
        "written": 3,
        "skipped": {"empty_text": 1, "prompt_too_long": 1, "duplicate_in_split": 2, "duplicate_of_train": 0},
    }
    assert stats["splits"]["validation"] == {
        "scanned": 4,
        "written": 2,
        "skipped": {"empty_text": 0, "prompt_too_long": 0, "duplicate_in_split": 1, "duplicate_of_train": 1},
    }


def test_save_to_disk_copy_matches_the_jsonl(tmp_path):
    import datasets

    out_dir = run(tmp_path / "tldr", PAIRS)
    saved = datasets.load_from_disk(str(out_dir))
    assert set(saved) == {"train", "validation"}
    assert saved["train"].features == datasets.Features({"prompt": datasets.Value("string")})
    for split in ("train", "validation"):
        assert list(saved[split]["prompt"]) == [row["prompt"] for row in read_jsonl(out_dir / f"{split}.jsonl")]


def test_hub_snapshot_layout_picks_the_comparisons_config(tmp_path):
    # The Hub repository holds parquet files per config; a decoy "axis" config must not be read.
    snapshot = tmp_path / "summarize_from_feedback"
    for split in ("train", "validation"):
        rows = pd.read_json(FIXTURE / f"{split}.jsonl", lines=True)
        (snapshot / "comparisons").mkdir(parents=True, exist_ok=True)
        rows.to_parquet(snapshot / "comparisons" / f"{split}-00000-of-00001.parquet")
        (snapshot / "axis").mkdir(exist_ok=True)
        pd.DataFrame({"info": [{"id": "x", "post": "decoy axis row", "title": "t"}]}).to_parquet(
            snapshot / "axis" / f"{split}-00000-of-00001.parquet"
        )
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {config}\n  data_files:\n"
            + "".join(f"  - split: {split}\n    path: {config}/{split}-*\n" for split in ("train", "validation"))
            for config in ("axis", "comparisons")
        )
        + "---\n"
    )
    from_snapshot = run(tmp_path / "a", [str(snapshot)])
    from_files = run(tmp_path / "b", PAIRS)
    for split in ("train", "validation"):
        assert read_jsonl(from_snapshot / f"{split}.jsonl") == read_jsonl(from_files / f"{split}.jsonl")


def test_rerun_in_the_same_process_gives_the_same_output(tmp_path):
    # The reference's shared mutable "seen" set made a second pass drop everything.
    first = run(tmp_path / "first", PAIRS)
    second = run(tmp_path / "second", PAIRS)
    assert read_jsonl(first / "train.jsonl") == read_jsonl(second / "train.jsonl")


def test_old_suffix_format_and_dedup_key():
    text = fixture_texts("train")[0]
    assert preprocess_tldr_dataset.make_prompt(text, "tldr_suffix") == text + "\nTL;DR:\n"
    assert dedup_key("Hello   World\n") == dedup_key("hello world")
    assert dedup_key("hello world") != dedup_key("hello worlds")
    args = preprocess_tldr_dataset.build_parser().parse_args([])
    assert (args.max_prompt_length, args.prompt_format) == (1024, "post")


def test_one_summary_instruction_whichever_format(tmp_path):
    """post: no cue and no instruction in the prompt (the system prompt asks); instruction: one line, no cue."""
    from sdpo.online.config import SYSTEM_PROMPTS

    text = fixture_texts("train")[0]
    assert preprocess_tldr_dataset.make_prompt(text, "post") == text and "TL;DR" not in text
    assert "TL;DR" not in SYSTEM_PROMPTS["tldr"] and "summar" in SYSTEM_PROMPTS["tldr"].lower()
    out_dir = run(tmp_path / "tldr", PAIRS, "--prompt_format", "instruction")
    train = [row["prompt"] for row in read_jsonl(out_dir / "train.jsonl")]
    assert all(p.startswith(INSTRUCTION + "\n\n") and not p.rstrip().endswith("TL;DR:") for p in train)
    stats = json.loads((out_dir / "preprocess_stats.json").read_text())
    assert (stats["prompt_format"], stats["summary_instruction"]) == ("instruction", "the prompt's first line")
