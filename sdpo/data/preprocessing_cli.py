"""What the ``preprocess_*.py`` scripts share around their own filters: flags, the error path, length
units, skip counts, the stats file, and the one ``main`` of the three interaction preprocessors.

Lengths (``LengthMeter``)
    Limits are in characters by default, as in the reference (whose names suggested tokens);
    ``--length_unit tokens --tokenizer NAME_OR_PATH`` measures the same limits in tokens instead.

Outputs (``file_io.write_jsonl_atomic`` / ``write_json_atomic``, ``FilterCounts``, ``write_stats``)
    JSONL with ``ensure_ascii=False``, written to a temporary file in the target folder and renamed, so a
    crash never leaves a half-written file. Every script records scanned / written / skipped-per-reason
    counts and its arguments beside its output: ``<name>.stats.json`` next to an interaction file,
    ``preprocess_stats.json`` in a folder of splits.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sdpo.data.conversations import (
    CONVERSATION_SKIP_REASONS,
    INTERACTION_SKIP_REASONS,
    ConversationLimits,
    conversation_skip_reason,
    extract_interactions,
    normalize_conversation,
)
from sdpo.data.data_sources import DataError
from sdpo.data.interaction_schema import Interaction, Message
from sdpo.utils import file_io
from sdpo.utils.command_line import ConfigParser, UsageError, mask_secrets
from sdpo.utils.env_file import load_project_env
from sdpo.utils.file_io import write_json_atomic, write_jsonl_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


class PreprocessError(DataError):
    """Stops a preprocessing script; the message is one line saying what failed and what to do."""


def cli_entry(main: Callable[[Sequence[str] | None], None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main(argv)``: bad input data (``DataError``, text that is not UTF-8), or a file
    that cannot be read or written (missing folder, permissions, disk full), becomes one ``error:`` line
    on stderr and exit status 1, without a traceback; a bad command line is one ``error:`` line and exit status 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            load_project_env()  # HF_TOKEN for gated datasets, as the scripts read it
            main(argv)
        except UsageError as error:  # a bad command line, or a .env that is not text
            print(f"error: {error}", file=sys.stderr)
            return 2
        except (DataError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except UnicodeDecodeError as error:  # a compressed or remote file that is not UTF-8
            print(f"error: the input is not UTF-8 text ({error.reason} at byte {error.start})", file=sys.stderr)
            return 1
        return 0

    return wrapped


# --------------------------------------------------------------------------------------------------
# Command-line pieces
# --------------------------------------------------------------------------------------------------


def make_parser(description: str | None) -> ConfigParser:
    """A plain-mode ``ConfigParser``: a bad flag raises one ``UsageError`` line, which ``cli_entry`` prints (exit 2)."""
    return ConfigParser(description=description)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def count_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (0: no cap), got {text}")
    return value


def add_out_dir_argument(parser: argparse.ArgumentParser, default_folder: str, contents: str) -> None:
    parser.add_argument("--out_dir", default=str(DATA_DIR / default_folder), help=f"Output folder for {contents}.")


def add_source_arguments(parser: argparse.ArgumentParser, hub_name: str, splits: Sequence[str]) -> None:
    if len(splits) == 1:
        forms = "a .parquet / .json / .jsonl(.gz) file, a save_to_disk folder, or a folder of data files"
    else:
        forms = (
            f"a folder (save_to_disk DatasetDict, Hub snapshot, or per-split files named "
            f"{'.* / '.join(splits)}.*) or one SPLIT=FILE per split ({' '.join(s + '=FILE' for s in splits)})"
        )
    parser.add_argument(
        "--dataset_path",
        nargs="+",
        metavar="PATH",
        help=f"Local copy of {hub_name} instead of the Hub: {forms}.",
    )
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to load; unset: the main branch.")
    parser.add_argument("--cache_dir", help="datasets cache folder; unset: $HF_DATASETS_CACHE.")


def add_length_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--length_unit",
        choices=("chars", "tokens"),
        default="chars",
        help="Unit of every length limit: characters (the reference's behaviour) or tokens of --tokenizer.",
    )
    parser.add_argument(
        "--tokenizer",
        help="Tokenizer (Hub id, local folder or bundled alias such as smollm2-135m-instruct) that counts "
        "tokens; required with --length_unit tokens.",
    )


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max_history_messages",
        type=positive_int,
        default=5,
        help="Keep at most this many (merged) messages of history before the assistant turn.",
    )
    parser.add_argument(
        "--max_total_length",
        type=positive_int,
        default=100_000,
        help="Skip conversations whose messages together are longer than this (--length_unit).",
    )
    parser.add_argument(
        "--max_completion_length",
        type=positive_int,
        default=4096,
        help="Skip conversations containing an assistant message longer than this (--length_unit).",
    )


def check_output_folder(out_dir: str) -> Path:
    """``--out_dir`` checked by the shared ``file_io.check_output_folder`` (nothing created), as a "
    "``PreprocessError``."""
    try:
        return file_io.check_output_folder(out_dir)
    except file_io.OutputFolderError as error:
        raise PreprocessError(str(error)) from None


# --------------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------------


class LengthMeter:
    """Length of a text in characters, or in tokens of a tokenizer (no special tokens added)."""

    def __init__(self, unit: str = "chars", tokenizer=None):
        if unit not in ("chars", "tokens"):
            raise ValueError(f"unknown length unit {unit!r}: use chars or tokens")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("length unit 'tokens' needs a tokenizer")
        self.unit = unit
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        if self.unit == "chars":
            return len(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LengthMeter:
        if args.length_unit == "chars":
            return cls("chars")
        if not args.tokenizer:
            raise PreprocessError("--length_unit tokens needs --tokenizer NAME_OR_PATH")
        from sdpo.models.model_loading import ModelLoadError, load_tokenizer

        try:
            return cls("tokens", load_tokenizer(args.tokenizer))
        except ModelLoadError as error:
            raise PreprocessError(str(error)) from None


# --------------------------------------------------------------------------------------------------
# Counts and the stats file
# --------------------------------------------------------------------------------------------------


class FilterCounts:
    """Scanned / kept counts and skips per reason; every known reason is listed, zeros included.
    ``kept_name`` names the kept count in reports ("written" for output rows, "kept" for conversations)."""

    def __init__(self, reasons: Iterable[str], kept_name: str = "written"):
        self.kept_name = kept_name
        self.scanned = 0
        self.kept = 0
        self.skipped = Counter({reason: 0 for reason in reasons})

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] += count

    def as_dict(self) -> dict:
        return {"scanned": self.scanned, self.kept_name: self.kept, "skipped": dict(self.skipped)}

    def report(self, label: str) -> str:
        lines = [f"[{label}] scanned {self.scanned}, {self.kept_name} {self.kept}"]
        lines += [f"  skipped {reason}: {count}" for reason, count in self.skipped.items()]
        return "\n".join(lines)


def refuse_empty(what: str, source: str, counts: str, outputs: Sequence[Path]) -> None:
    """Stop a run that found nothing to write, before it replaces any output (a good earlier output stays)."""
    kept = [str(path) for path in outputs if path.exists()]
    raise PreprocessError(
        f"no usable {what} in {source} ({counts}); "
        + (f"kept the existing {', '.join(kept)}; " if kept else "nothing written; ")
        + "check --dataset_path and the filters"
    )


def stats_path_for(output: Path) -> Path:
    """``data/x/name.jsonl`` → ``data/x/name.stats.json``."""
    return output.with_name(output.name.removesuffix(".jsonl") + ".stats.json")


def stored_argument(value):
    """An argument as a stats file may hold it: secrets in strings (URL passwords, known keys) masked."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, list):
        return [stored_argument(item) for item in value]
    return value


def write_stats(path: Path, script: str, args: argparse.Namespace, source: str, **sections) -> None:
    """Record what a run did: the script, its arguments, the source and the count sections."""
    write_json_atomic(
        path,
        {
            "script": script,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source,
            "arguments": {name: stored_argument(value) for name, value in vars(args).items()},
            **sections,
        },
    )


# --------------------------------------------------------------------------------------------------
# Interaction preprocessors (WildFeedback, WildChat, ShareGPT)
# --------------------------------------------------------------------------------------------------


def conversation_limits(args: argparse.Namespace, meter: LengthMeter, **overrides) -> ConversationLimits:
    return ConversationLimits(meter, args.max_total_length, args.max_completion_length, **overrides)


class InteractionExtractor:
    """Conversation filters + tuple extraction, counting every skip.

    ``conversations.scanned`` counts source conversations, ``conversations.kept`` those passing the
    filters; ``interactions.scanned`` counts candidate tuples (assistant → user pairs) in kept
    conversations, ``interactions.skipped`` the history failures; the script sets ``interactions.kept``
    to the number of rows it wrote (fewer than the tuples found when it stops at a cap).
    """

    def __init__(self, limits: ConversationLimits, max_history_messages: int, extra_reasons: Sequence[str] = ()):
        self.limits = limits
        self.max_history_messages = max_history_messages
        reasons = [*extra_reasons, *CONVERSATION_SKIP_REASONS]
        if limits.max_user_message_length is None:
            reasons.remove("user_message_too_long")
        self.conversations = FilterCounts(reasons, kept_name="kept")
        self.interactions = FilterCounts(INTERACTION_SKIP_REASONS)
        self.dropped_messages = 0

    def reject(self, reason: str) -> None:
        """Count a conversation the script rejected before extraction (e.g. its language)."""
        self.conversations.scanned += 1
        self.conversations.skip(reason)

    def __call__(self, raw_messages, where: str = "a conversation") -> tuple[list[Message], list[Interaction]]:
        """Normalised messages and tuples of one conversation (no tuples if a filter rejects it).
        A conversation of the wrong shape is a ``PreprocessError`` naming ``where``."""
        self.conversations.scanned += 1
        try:
            messages, dropped = normalize_conversation(raw_messages)
        except ValueError as error:
            raise PreprocessError(f"{where}: {error}; fix or remove that record") from None
        self.dropped_messages += dropped
        reason = conversation_skip_reason(messages, self.limits)
        if reason:
            self.conversations.skip(reason)
            return messages, []
        self.conversations.kept += 1
        skipped: Counter = Counter()
        found = list(extract_interactions(messages, self.max_history_messages, skipped))
        for history_reason, count in skipped.items():
            self.interactions.skip(history_reason, count)
        self.interactions.scanned += len(found) + sum(skipped.values())
        return messages, found

    def as_dict(self) -> dict:
        return {
            "conversations": self.conversations.as_dict(),
            "interactions": self.interactions.as_dict(),
            "messages_dropped_empty_or_unknown_role": self.dropped_messages,
        }

    def report(self) -> str:
        return "\n".join(
            (
                self.conversations.report("conversations"),
                self.interactions.report("interactions"),
                f"messages dropped (empty or unknown role): {self.dropped_messages}",
            )
        )


def interaction_rows(
    identity: Callable[[Interaction], dict],
    messages: Sequence[Message],
    interactions: Iterable[Interaction],
    with_user_response_len: bool = False,
) -> Iterable[dict]:
    """Output rows of one conversation's tuples: ``identity(interaction)`` (ids), the record fields, then
    the lengths (``prompt_len`` in messages, the others in characters)."""
    total_chars = sum(len(message.text) for message in messages)
    for interaction in interactions:
        lengths = {"prompt_len": len(interaction.history), "completion_len": len(interaction.completion.text)}
        if with_user_response_len:
            lengths["user_response_len"] = len(interaction.user_response.text)
        yield {**identity(interaction), **interaction.as_record(), **lengths, "total_conv_len": total_chars}


def write_interactions(
    script: str,
    args: argparse.Namespace,
    output_name: str,
    source: str,
    extract: InteractionExtractor,
    rows: Iterable[dict],
    outcome: Callable[[], dict] = dict,
) -> None:
    """The shared end of the interaction preprocessors, once ``check_output_folder`` passed: write
    ``rows`` atomically to ``<out_dir>/<output_name>``, print the counts and ``outcome()`` (how the run
    ended, known once the rows are consumed), and record both beside the output."""
    output = Path(args.out_dir) / output_name
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        conversations = extract.conversations
        reasons = ", ".join(f"{reason} {n}" for reason, n in conversations.skipped.most_common() if n)
        refuse_empty(
            "interactions",
            source,
            f"{conversations.scanned or 'no'} records read, {conversations.kept} usable conversations"
            + (f"; skipped: {reasons}" if reasons else ""),
            [output],
        )
    extract.interactions.kept = write_jsonl_atomic(output, itertools.chain([first], rows))
    print(extract.report())
    ended = outcome()
    for key, value in ended.items():
        print(f"{key}: {value}")
    write_stats(stats_path_for(output), script, args, source, output=str(output), **ended, **extract.as_dict())
    print(f"wrote {extract.interactions.kept} interactions to {output}")
