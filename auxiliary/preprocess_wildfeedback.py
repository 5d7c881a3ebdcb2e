"""WildFeedback interaction tuples for offline SDPO: ``data/wildfeedback/wildfeedback_interactions.jsonl``.

    python auxiliary/preprocess_wildfeedback.py
    python auxiliary/preprocess_wildfeedback.py --dataset_path /data/WildFeedback             # Hub snapshot folder
    python auxiliary/preprocess_wildfeedback.py --dataset_path wildfeedback.json --out_dir /tmp/wf
    ./scripts/prepare_data_wildfeedback.sh                                                  # OUT_DIR / DATASET_PATH env

Source ``microsoft/WildFeedback``, config ``wildfeedback``, split train: rows with ``conversations``
(fallback ``conversation``) of ``{"from": "human" | "gpt", "value"}``; the preference columns
(``chosen``, ``rejected``) are not used. Every assistant message followed by a user message becomes
one tuple — any follow-up, not only those labelled as dissatisfied, as in the reference.

Conversation filters (after dropping empty messages and other roles), with the reason names of the
stats file: ``too_few_messages`` (< 3), ``conversation_too_long`` (over --max_total_length, 100,000,
in total), ``assistant_message_too_long`` (over --max_completion_length, 4,096); characters unless
--length_unit tokens. History rules (shared with WildChat and ShareGPT, see
``auxiliary/conversations.py``): consecutive same-role messages are merged, the last
--max_history_messages (5) are kept, leading assistant messages are dropped, and the history must
end with a user message; tuples failing them are counted as ``no_user_turn_in_history`` or
``history_not_ending_with_user``. The reference kept the first of a same-role run (losing the latest
user message) and did not require the final user turn.

Each line: ``id`` ("<row>_<turn>"), ``original_conv_id`` (row index), ``turn_id`` (index of the
completion in the source conversation), ``prompt`` (list of {from, value}), ``completion`` and
``user_response`` ({from, value}), ``prompt_len`` (messages), ``completion_len`` (characters) and
``total_conv_len`` (characters of the conversation's kept messages).
Counts: ``wildfeedback_interactions.stats.json`` beside the output.
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
    interaction_rows,
    make_parser,
    write_interactions,
)

SOURCE = HubSource("microsoft/WildFeedback", config="wildfeedback")
OUTPUT_NAME = "wildfeedback_interactions.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_out_dir_argument(parser, "wildfeedback", f"{OUTPUT_NAME} and its stats")
    add_source_arguments(parser, SOURCE.name, SOURCE.splits)
    add_history_arguments(parser)
    add_length_arguments(parser)
    return parser


def wildfeedback_rows(rows, extract: InteractionExtractor, where: str = SOURCE.name):
    for row_index, row in enumerate(rows):
        messages, interactions = extract(
            row.get("conversations") or row.get("conversation"), f"{where} row {row_index}"
        )

        def identity(interaction, row_index=row_index):
            turn = interaction.completion.index
            return {"id": f"{row_index}_{turn}", "original_conv_id": row_index, "turn_id": turn}

        yield from interaction_rows(identity, messages, interactions)


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out_dir)
    meter = LengthMeter.from_args(args)
    rows = load_splits(SOURCE, args.dataset_path, revision=args.revision, cache_dir=args.cache_dir)["train"]
    source = describe_source(SOURCE, args.dataset_path, args.revision)
    extract = InteractionExtractor(conversation_limits(args, meter), args.max_history_messages)
    write_interactions(
        "preprocess_wildfeedback.py", args, OUTPUT_NAME, source, extract, wildfeedback_rows(rows, extract, source)
    )


if __name__ == "__main__":
    sys.exit(main())
