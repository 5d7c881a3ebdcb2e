"""WildChat interaction tuples for offline SDPO: ``data/wildchat/wildchat_interactions_v1.jsonl``.

    HF_TOKEN=... python auxiliary/preprocess_wildchat.py    # gated: accept the terms on the Hub first
    python auxiliary/preprocess_wildchat.py --dataset_path /data/WildChat    # Hub snapshot (data/train-*.parquet)
    python auxiliary/preprocess_wildchat.py --dataset_path wildchat.parquet --out_dir /tmp/wc
    ./scripts/prepare_data_wildchat.sh                                       # same; OUT_DIR / DATASET_PATH env

Source ``allenai/WildChat`` (gated), split train, visited in the order of
``Dataset.shuffle(seed=--seed)`` (42). Rows: ``conversation_hash`` (older revisions:
``conversation_id``), ``model``, ``timestamp``, ``conversation`` of ``{role, content, ...}``,
``language`` and moderation columns (not used).

Conversation filters, in order, with the reason names of the stats file: ``other_language``
(conversation ``language`` not in --languages: english, en; case-insensitive); then, after dropping
empty messages and other roles, ``too_few_messages`` (< 3), ``conversation_too_long`` (over
--max_total_length, 100,000, in total), ``assistant_message_too_long`` (over
--max_completion_length, 4,096), ``user_message_too_long`` (over --max_user_message_length, 4,096);
characters unless --length_unit tokens. Every assistant message followed by a user message is a tuple; the history
rules are shared with WildFeedback and ShareGPT (see ``auxiliary/conversations.py``: same-role runs
merged, last 5 messages, must start and end with a user message).

Stops once --max_conversations (15,000) conversations were kept, or once at least
--stop_after_conversations (14,000) were kept AND at least --stop_after_interactions (50,000)
tuples were written.

Each line: ``id`` ("<conversation id>_<turn>", row index when the id is missing),
``conversation_id``, ``row_idx`` (row in the source split), ``turn_id`` (index of the completion in
the conversation), ``model``, ``timestamp`` (string), ``prompt`` (list of {from, value} with roles
human/gpt), ``completion``, ``user_response`` ({from, value}), ``prompt_len`` (messages),
``completion_len``, ``user_response_len``, ``total_conv_len`` (characters). Counts:
``wildchat_interactions_v1.stats.json`` beside the output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sdpo.data.data_sources import HubSource, describe_source, load_splits
from sdpo.data.preprocessing_cli import (
    InteractionExtractor,
    LengthMeter,
    add_history_arguments,
    add_length_arguments,
    add_out_dir_argument,
    add_source_arguments,
    check_output_folder,
    cli_entry,
    conversation_limits,
    count_or_zero,
    interaction_rows,
    make_parser,
    positive_int,
    write_interactions,
)

SOURCE = HubSource("allenai/WildChat", gated=True)
OUTPUT_NAME = "wildchat_interactions_v1.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_out_dir_argument(parser, "wildchat", f"{OUTPUT_NAME} and its stats")
    add_source_arguments(parser, SOURCE.name, SOURCE.splits)
    parser.add_argument("--seed", type=int, default=42, help="Seed of the shuffle that orders the conversations.")
    parser.add_argument(
        "--languages",
        default="english,en",
        help="Comma-separated conversation languages to keep (case-insensitive).",
    )
    add_history_arguments(parser)
    parser.add_argument(
        "--max_user_message_length",
        type=positive_int,
        default=4096,
        help="Skip conversations containing a user message longer than this (--length_unit).",
    )
    parser.add_argument(
        "--max_conversations", type=positive_int, default=15_000, help="Stop after keeping this many conversations."
    )
    parser.add_argument(
        "--stop_after_conversations",
        type=count_or_zero,
        default=14_000,
        help="Also stop once this many conversations are kept and --stop_after_interactions tuples written.",
    )
    parser.add_argument(
        "--stop_after_interactions",
        type=count_or_zero,
        default=50_000,
        help="See --stop_after_conversations.",
    )
    add_length_arguments(parser)
    return parser


def shuffled_order(num_rows: int, seed: int) -> list[int]:
    """Row indices in the order of ``datasets.Dataset.shuffle(seed=seed)`` (numpy's default_rng
    permutation), kept explicit so every output row can name its source row."""
    import numpy as np

    return np.random.default_rng(seed).permutation(num_rows).tolist()


def wildchat_rows(rows, args: argparse.Namespace, extract: InteractionExtractor, stop: dict, where: str = ""):
    languages = {language.strip().lower() for language in args.languages.split(",") if language.strip()}
    written = 0
    for row_index in shuffled_order(len(rows), args.seed):
        row = rows[row_index]
        if str(row.get("language") or "").strip().lower() not in languages:
            extract.reject("other_language")
            continue
        messages, interactions = extract(row.get("conversation"), f"{where} row {row_index}".lstrip())
        conversation_id = row.get("conversation_hash") or row.get("conversation_id")

        def identity(interaction, row=row, row_index=row_index, conversation_id=conversation_id):
            turn = interaction.completion.index
            return {
                "id": f"{conversation_id if conversation_id else row_index}_{turn}",
                "conversation_id": conversation_id,
                "row_idx": row_index,
                "turn_id": turn,
                "model": row.get("model"),
                "timestamp": str(row.get("timestamp")),
            }

        for output_row in interaction_rows(identity, messages, interactions, with_user_response_len=True):
            written += 1
            yield output_row
        kept = extract.conversations.kept
        if kept >= args.max_conversations:
            stop["reason"] = f"kept {kept} conversations (--max_conversations)"
            return
        if kept >= args.stop_after_conversations and written >= args.stop_after_interactions:
            stop["reason"] = f"kept {kept} conversations and wrote {written} interactions"
            return


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out_dir)
    meter = LengthMeter.from_args(args)
    rows = load_splits(SOURCE, args.dataset_path, revision=args.revision, cache_dir=args.cache_dir)["train"]
    source = describe_source(SOURCE, args.dataset_path, args.revision)

    limits = conversation_limits(args, meter, max_user_message_length=args.max_user_message_length)
    extract = InteractionExtractor(limits, args.max_history_messages, extra_reasons=("other_language",))
    stop = {"reason": "end of dataset"}
    write_interactions(
        "preprocess_wildchat.py",
        args,
        OUTPUT_NAME,
        source,
        extract,
        wildchat_rows(rows, args, extract, stop, source),
        lambda: {"stopped": stop["reason"]},
    )


if __name__ == "__main__":
    sys.exit(main())
