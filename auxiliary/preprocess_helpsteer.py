"""HelpSteer2 prompts for the online loop: ``<out_dir>/{train,validation}.jsonl`` with ``{"prompt": str}``.

    python auxiliary/preprocess_helpsteer.py --out_dir data/helpsteer_prompts
    python auxiliary/preprocess_helpsteer.py --dataset_path /data/HelpSteer2   # Hub snapshot / save_to_disk folder
    python auxiliary/preprocess_helpsteer.py --dataset_path train=train.jsonl.gz validation=validation.jsonl.gz
    ./scripts/prepare_data_helpsteer.sh                                        # same; OUT_DIR / DATASET_PATH env

Source ``nvidia/HelpSteer2`` (splits train, validation; columns prompt, response and the five
attribute scores, which are not used). Per split, in dataset order, a row is skipped when
  * ``empty``: the stripped prompt or response is empty;
  * ``multi_turn``: the prompt contains an ``<extra_id_N>`` turn marker (case-insensitive);
  * ``prompt_too_long`` / ``response_too_long``: longer than 2048 (characters by default);
  * ``duplicate_prompt``: the same stripped prompt was already kept in this split (HelpSteer2 rates
    two responses per prompt).
The responses are discarded. Counts per reason, plus how many validation prompts also occur in train
(reported, not removed, as in the reference), go to ``<out_dir>/preprocess_stats.json``.
"""

from __future__ import annotations

import argparse
import re
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
    make_parser,
    positive_int,
    refuse_empty,
    write_stats,
)
from sdpo.utils.file_io import write_jsonl_atomic

SOURCE = HubSource("nvidia/HelpSteer2", splits=("train", "validation"))
TURN_MARKER = re.compile(r"<extra_id_\d+>", re.IGNORECASE)
SKIP_REASONS = ("empty", "multi_turn", "prompt_too_long", "response_too_long", "duplicate_prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_out_dir_argument(parser, "helpsteer_prompts", "train.jsonl, validation.jsonl and preprocess_stats.json")
    add_source_arguments(parser, SOURCE.name, SOURCE.splits)
    parser.add_argument("--max_prompt_length", type=positive_int, default=2048, help="Skip prompts longer than this.")
    parser.add_argument(
        "--max_response_length", type=positive_int, default=2048, help="Skip rows whose response is longer."
    )
    add_length_arguments(parser)
    return parser


def select_prompts(rows, meter: LengthMeter, args: argparse.Namespace, counts: FilterCounts) -> list[str]:
    """Single-turn prompts of one split that pass the filters, first occurrence kept, in dataset order."""
    kept, seen = [], set()
    for row in rows:
        counts.scanned += 1
        prompt = (row.get("prompt") or "").strip()
        response = (row.get("response") or "").strip()
        if not prompt or not response:
            reason = "empty"
        elif TURN_MARKER.search(prompt):
            reason = "multi_turn"
        elif meter(prompt) > args.max_prompt_length:
            reason = "prompt_too_long"
        elif meter(response) > args.max_response_length:
            reason = "response_too_long"
        elif prompt in seen:
            reason = "duplicate_prompt"
        else:
            seen.add(prompt)
            kept.append(prompt)
            continue
        counts.skip(reason)
    counts.kept = len(kept)
    return kept


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = check_output_folder(args.out_dir)
    meter = LengthMeter.from_args(args)
    splits = load_splits(SOURCE, args.dataset_path, revision=args.revision, cache_dir=args.cache_dir)

    prompts_by_split, counts_by_split = {}, {}
    for split, rows in splits.items():
        counts = FilterCounts(SKIP_REASONS)
        prompts_by_split[split] = select_prompts(rows, meter, args, counts)
        counts_by_split[split] = counts
        print(counts.report(split))
    empty = [split for split, prompts in prompts_by_split.items() if not prompts]
    if empty:
        refuse_empty(
            "prompts",
            describe_source(SOURCE, args.dataset_path, args.revision),
            "; ".join(f"{split}: {counts_by_split[split].scanned} rows read, none kept" for split in empty),
            [out_dir / f"{split}.jsonl" for split in splits],
        )
    for split, prompts in prompts_by_split.items():
        write_jsonl_atomic(out_dir / f"{split}.jsonl", ({"prompt": prompt} for prompt in prompts))
    overlap = len(set(prompts_by_split["validation"]) & set(prompts_by_split["train"]))
    print(f"validation prompts also in train: {overlap} (kept)")

    write_stats(
        out_dir / "preprocess_stats.json",
        "preprocess_helpsteer.py",
        args,
        describe_source(SOURCE, args.dataset_path, args.revision),
        outputs={split: str(out_dir / f"{split}.jsonl") for split in splits},
        splits={split: counts.as_dict() for split, counts in counts_by_split.items()},
        validation_prompts_also_in_train=overlap,
    )
    print(f"wrote {', '.join(f'{out_dir / split}.jsonl' for split in splits)}")


if __name__ == "__main__":
    sys.exit(main())
