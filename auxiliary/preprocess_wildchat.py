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
rules are shared with WildFeedback and ShareGPT (see ``auxiliary/preprocessing.py``: same-role runs
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
from pathlib import Path

if __package__ in (None, ""):  # run as `python auxiliary/<script>.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auxiliary.preprocessing import (
    ConversationLimits,
    HubSource,
    InteractionExtractor,
    LengthMeter,
    add_history_arguments,
    add_length_arguments,
    add_out_dir_argument,
    add_source_arguments,
    cli_entry,
    describe_source,
    interaction_record,
    load_splits,
    make_parser,
    stats_path_for,
    write_jsonl_atomic,
    write_stats,
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
        type=int,
        default=4096,
        help="Skip conversations containing a user message longer than this (--length_unit).",
    )
    parser.add_argument(
        "--max_conversations", type=int, default=15_000, help="Stop after keeping this many conversations."
    )
    parser.add_argument(
        "--stop_after_conversations",
        type=int,
        default=14_000,
        help="Also stop once this many conversations are kept and --stop_after_interactions tuples written.",
    )
    parser.add_argument(
        "--stop_after_interactions",
        type=int,
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


def interaction_rows(rows, args: argparse.Namespace, extract: InteractionExtractor, stop: dict):
    languages = {language.strip().lower() for language in args.languages.split(",") if language.strip()}
    written = 0
    for row_index in shuffled_order(len(rows), args.seed):
        row = rows[row_index]
        if str(row.get("language") or "").strip().lower() not in languages:
            extract.reject("other_language")
            continue
        messages, interactions = extract(row.get("conversation"))
        conversation_id = row.get("conversation_hash") or row.get("conversation_id")
        total_chars = sum(len(message.text) for message in messages)
        for interaction in interactions:
            turn = interaction.completion.index
            written += 1
            yield {
                "id": f"{conversation_id if conversation_id else row_index}_{turn}",
                "conversation_id": conversation_id,
                "row_idx": row_index,
                "turn_id": turn,
                "model": row.get("model"),
                "timestamp": str(row.get("timestamp")),
                **interaction_record(interaction),
                "prompt_len": len(interaction.history),
                "completion_len": len(interaction.completion.text),
                "user_response_len": len(interaction.user_response.text),
                "total_conv_len": total_chars,
            }
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
    output = Path(args.out_dir) / OUTPUT_NAME
    meter = LengthMeter.from_args(args)
    rows = load_splits(SOURCE, args.dataset_path, revision=args.revision, cache_dir=args.cache_dir)["train"]

    limits = ConversationLimits.from_args(args, meter, max_user_message_length=args.max_user_message_length)
    extract = InteractionExtractor(limits, args.max_history_messages, extra_reasons=("other_language",))
    stop = {"reason": "end of dataset"}
    extract.interactions.kept = write_jsonl_atomic(output, interaction_rows(rows, args, extract, stop))
    print(extract.report())
    print(f"stopped: {stop['reason']}")
    write_stats(
        stats_path_for(output),
        "preprocess_wildchat.py",
        args,
        describe_source(SOURCE, args.dataset_path, args.revision),
        output=str(output),
        stopped=stop["reason"],
        **extract.as_dict(),
    )
    print(f"wrote {extract.interactions.kept} interactions to {output}")


if __name__ == "__main__":
    sys.exit(main())
