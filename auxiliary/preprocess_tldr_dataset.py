"""TL;DR summarisation prompts: ``<out_dir>/{train,validation}.jsonl`` with ``{"prompt": str}``, plus the
same splits as a ``datasets.DatasetDict`` saved with ``save_to_disk(<out_dir>)``.

    python auxiliary/preprocess_tldr_dataset.py --out_dir data/tldr_prompts_unique
    python auxiliary/preprocess_tldr_dataset.py --dataset_path /data/summarize_from_feedback   # Hub snapshot
    python auxiliary/preprocess_tldr_dataset.py --dataset_path train=train.parquet validation=validation.parquet
    ./scripts/prepare_data_tldr.sh                                             # same; OUT_DIR / DATASET_PATH env

Source ``openai/summarize_from_feedback``, config ``comparisons``, splits train and validation. The
text of a row is ``info.post`` (Reddit) or else ``info.article`` (news), stripped. The prompt is, by
``--prompt_format``:
  * ``post`` (default): the text alone, with no instruction and no trailing "TL;DR:" cue, for a policy whose
    system prompt asks for the summary (``eval_online_sdpo.py --system_prompt tldr``, which every TL;DR recipe
    sets): one instruction, as the paper-era code had it;
  * ``instruction``: a one-line instruction, a blank line and the text (for runs without that system prompt);
  * ``tldr_suffix``: the old layout, text + ``"\\nTL;DR:\\n"``.
``preprocess_stats.json`` records the format and where the summary instruction lives. Per split, a row is
skipped when
  * ``empty_text``: neither post nor article has text;
  * ``prompt_too_long``: the prompt is NOT shorter than --max_prompt_length (1024 characters);
  * ``duplicate_in_split``: an earlier row of the same split has the same prompt, compared after
    collapsing whitespace and lower-casing (each post appears in many comparisons).
Then validation prompts whose key also occurs in train are removed (``duplicate_of_train``). The
reference shared one "seen" set across both splits, so its validation pass already removed train
duplicates (and a second call in the same process would drop everything); here each split is
de-duplicated on its own and the cross-split removal is explicit and counted.
Counts go to ``<out_dir>/preprocess_stats.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence

from sdpo.data.data_sources import HubSource, describe_source, load_splits
from sdpo.data.preprocessing_cli import (
    FilterCounts,
    LengthMeter,
    add_length_arguments,
    add_out_dir_argument,
    add_source_arguments,
    check_output_folder,
    cli_entry,
    count_or_zero,
    make_parser,
    positive_int,
    refuse_empty,
    write_stats,
)
from sdpo.utils.file_io import write_jsonl_atomic

SOURCE = HubSource("openai/summarize_from_feedback", config="comparisons", splits=("train", "validation"))
INSTRUCTION = 'Write a brief summary of the following text. Start your summary with "TL;DR:".'
TLDR_SUFFIX = "\nTL;DR:\n"
# Where each format leaves the request for a summary (recorded in preprocess_stats.json).
SUMMARY_INSTRUCTION = {
    "post": "the policy's system prompt (eval_online_sdpo.py --system_prompt tldr); the prompt has no cue",
    "instruction": "the prompt's first line",
    "tldr_suffix": "the prompt's trailing 'TL;DR:' cue",
}
SKIP_REASONS = ("empty_text", "prompt_too_long", "duplicate_in_split", "duplicate_of_train")
EXAMPLE_CHARS = 1600


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_out_dir_argument(
        parser, "tldr_prompts_unique", "train.jsonl, validation.jsonl, the save_to_disk copy and preprocess_stats.json"
    )
    add_source_arguments(parser, SOURCE.name, SOURCE.splits)
    parser.add_argument(
        "--prompt_format",
        choices=tuple(SUMMARY_INSTRUCTION),
        default="post",
        help="post: the text alone (the policy's system prompt asks for the summary: --system_prompt tldr); "
        "instruction: one-line instruction, blank line, text (current reference); "
        "tldr_suffix: text followed by '\\nTL;DR:\\n' (old reference).",
    )
    parser.add_argument(
        "--max_prompt_length",
        type=positive_int,
        default=1024,
        help="Keep prompts strictly shorter than this (whole prompt, instruction included).",
    )
    add_length_arguments(parser)
    parser.add_argument(
        "--print_examples", type=count_or_zero, default=5, help="Print this many train prompts at the end."
    )
    return parser


def make_prompt(text: str, prompt_format: str) -> str:
    if prompt_format == "post":
        return text
    if prompt_format == "tldr_suffix":
        return text + TLDR_SUFFIX
    return f"{INSTRUCTION}\n\n{text}"


def dedup_key(prompt: str) -> str:
    """Prompts that differ only in whitespace or case count as duplicates."""
    return hashlib.sha1(" ".join(prompt.split()).lower().encode("utf-8")).hexdigest()


def unique_prompts(rows, meter: LengthMeter, args: argparse.Namespace, counts: FilterCounts) -> dict[str, str]:
    """``{dedup key: prompt}`` of one split, first occurrence kept, in dataset order."""
    kept: dict[str, str] = {}
    for row in rows:
        counts.scanned += 1
        info = row.get("info") or {}
        text = (info.get("post") or info.get("article") or "").strip()
        if not text:
            counts.skip("empty_text")
            continue
        prompt = make_prompt(text, args.prompt_format)
        if meter(prompt) >= args.max_prompt_length:
            counts.skip("prompt_too_long")
            continue
        key = dedup_key(prompt)
        if key in kept:
            counts.skip("duplicate_in_split")
            continue
        kept[key] = prompt
    return kept


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = check_output_folder(args.out_dir)
    meter = LengthMeter.from_args(args)
    splits = load_splits(SOURCE, args.dataset_path, revision=args.revision, cache_dir=args.cache_dir)

    counts = {split: FilterCounts(SKIP_REASONS) for split in splits}
    prompts = {split: unique_prompts(rows, meter, args, counts[split]) for split, rows in splits.items()}
    seen_in_train = [key for key in prompts["validation"] if key in prompts["train"]]
    for key in seen_in_train:
        del prompts["validation"][key]
    counts["validation"].skip("duplicate_of_train", len(seen_in_train))
    print(f"removed {len(seen_in_train)} validation prompts that also occur in train")

    empty = [split for split, by_key in prompts.items() if not by_key]
    if empty:
        refuse_empty(
            "prompts",
            describe_source(SOURCE, args.dataset_path, args.revision),
            "; ".join(f"{split}: {counts[split].scanned} rows read, none kept" for split in empty),
            [*(out_dir / f"{split}.jsonl" for split in prompts), out_dir / "dataset_dict.json"],
        )

    from datasets import Dataset, DatasetDict, Features, Value

    features = Features({"prompt": Value("string")})
    unique = DatasetDict(
        {
            split: Dataset.from_dict({"prompt": list(by_key.values())}, features=features)
            for split, by_key in prompts.items()
        }
    )
    unique.save_to_disk(str(out_dir))
    for split, by_key in prompts.items():
        counts[split].kept = write_jsonl_atomic(out_dir / f"{split}.jsonl", ({"prompt": p} for p in by_key.values()))
        print(counts[split].report(split))

    write_stats(
        out_dir / "preprocess_stats.json",
        "preprocess_tldr_dataset.py",
        args,
        describe_source(SOURCE, args.dataset_path, args.revision),
        outputs={**{split: str(out_dir / f"{split}.jsonl") for split in prompts}, "save_to_disk": str(out_dir)},
        splits={split: split_counts.as_dict() for split, split_counts in counts.items()},
        prompt_format=args.prompt_format,
        summary_instruction=SUMMARY_INSTRUCTION[args.prompt_format],
    )
    for number, prompt in enumerate(list(prompts["train"].values())[: args.print_examples], start=1):
        print(f"--- example {number} ---\n{prompt[:EXAMPLE_CHARS]}")
    print(f"wrote {out_dir}/{{train,validation}}.jsonl and the save_to_disk copy in {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
