"""The offline training data: logged (x, y, o) rows validated into interactions (with a report of the rows left
out), the dataset the Trainer iterates, and the collator that turns rows into student / teacher contexts and
completions as token ids (spec §11.2)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch.utils.data import Dataset

from offline_sdpo.config import OVERLONG_POLICIES, OfflineSDPOConfig
from sdpo.core import build_hindsight_messages, encode_student_teacher_contexts
from sdpo.data.data_sources import DataError, iter_dataset_rows
from sdpo.data.interaction_schema import Interaction, Message, interactions_from_row, message_text, parse_messages
from sdpo.models.generation import encode_completions


class InteractionDataError(DataError):
    """A row of the training data cannot be used; the message names file, line (or row) and field."""


def chat_messages(messages: list[Message]) -> list[dict]:
    return [message.as_chat() for message in messages]


def checked_interactions(row, hindsight_variant: str) -> list[Interaction]:
    """The (x, y, o) tuples of one decoded row (``interaction_schema`` formats), each checked to give a
    teacher context under ``hindsight_variant``; ValueError messages name the field."""
    interactions = interactions_from_row(row)
    for interaction in interactions:
        build_hindsight_messages(
            chat_messages(interaction.history), interaction.user_response.text, variant=hindsight_variant
        )
    return interactions


@dataclass
class BadRowReport:
    """Rows that were left out, by reason, with the first few locations for the user to inspect."""

    counts: dict = field(default_factory=lambda: defaultdict(int))
    examples: list = field(default_factory=list)
    max_examples: int = 20

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"skipped_total": self.total, "skipped_by_reason": dict(self.counts), "examples": self.examples}


def load_interactions(
    dataset_name: str | Path,
    *,
    hindsight_variant: str = "online",
    skip_bad_rows: bool = False,
    dataset_config: str | None = None,
    split: str = "train",
) -> tuple[list[Interaction], BadRowReport]:
    """Read and validate the training tuples of a dataset: a local ``.jsonl`` file (read line by line),
    a Parquet/JSON file or dataset folder, or a Hub id (``data_sources.iter_dataset_rows``).

    A malformed line or a row with a missing or mistyped field raises ``InteractionDataError`` naming
    the file, the 1-based line (or the row) and the field — or, with ``skip_bad_rows``, is counted in
    the report. A row in the ``messages`` format may give several tuples.
    """
    rows, report = [], BadRowReport()
    for where, decoded, decode_error in iter_dataset_rows(str(dataset_name), config=dataset_config, split=split):
        if decode_error:
            reason, detail = "invalid_json", decode_error
        else:
            try:
                found = checked_interactions(decoded, hindsight_variant)
            except ValueError as error:
                reason, detail = "invalid_row", str(error)
            else:
                rows += [replace(interaction, source=where) for interaction in found]
                continue
        if not skip_bad_rows:
            raise InteractionDataError(f"{where}: {detail}. Fix or delete that row, or pass --skip_bad_rows")
        report.add(reason, where, detail)
    if not rows:
        raise InteractionDataError(f"{dataset_name}: no usable interaction rows ({report.total} skipped)")
    return rows, report


class InteractionDataset(Dataset):
    """Validated interactions as rows the collator reads (role/content messages, ``source`` kept)."""

    def __init__(self, interactions: list[Interaction]):
        self.interactions = list(interactions)

    def __len__(self) -> int:
        return len(self.interactions)

    def __getitem__(self, index: int) -> dict:
        return self.interactions[index].as_chat_row()


@dataclass
class OfflineSDPOCollator:
    """Rows → student contexts x, teacher contexts x⊕o and completions y, as token-id lists (spec §11.2).

    Messages may be from/value or role/content. y = logged assistant text, right-stripped, plus the EOS
    string, tokenized without special tokens. Contexts are rendered with the generation prompt (thinking
    off) and left-truncated to ``max_context_length``. Padding happens in the trainer
    (``sdpo.core.pad_contexts_and_completions``), where ``ignore_first_k`` is applied.

    Returns ``student_context_ids``, ``teacher_context_ids``, ``completion_ids`` (lists of id lists) and
    ``completion_has_eos`` (False only for a completion cut by ``overlong_completion="truncate"``).
    """

    tokenizer: object
    hindsight_variant: str = "online"
    hindsight_template: str | None = None
    max_context_length: int = 2048
    max_completion_length: int = 2048
    overlong_completion: str = "skip"
    chat_template_kwargs: dict | None = None

    def __post_init__(self):
        if self.tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no EOS token; the completion cannot be closed")
        if self.overlong_completion not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong_completion must be one of {OVERLONG_POLICIES}, got {self.overlong_completion!r}"
            )

    @classmethod
    def from_config(cls, tokenizer, config: OfflineSDPOConfig) -> OfflineSDPOCollator:
        return cls(
            tokenizer,
            hindsight_variant=config.hindsight_variant,
            hindsight_template=config.hindsight_template,
            max_context_length=config.max_context_length,
            max_completion_length=config.max_completion_length,
            overlong_completion=config.overlong_completion,
            chat_template_kwargs=config.chat_template_kwargs,
        )

    def encode_completions(self, texts: list[str]) -> list[list[int]]:
        """Full token ids of each completion (text.rstrip() + EOS), before any budget is applied."""
        return encode_completions(self.tokenizer, texts)

    def fit_completion(self, ids: list[int], source: str = "") -> tuple[list[int], bool]:
        """Apply the completion budget: (ids, ends_with_eos)."""
        if len(ids) <= self.max_completion_length:
            return ids, ids[-1] == self.tokenizer.eos_token_id
        if self.overlong_completion == "skip":
            raise ValueError(
                f"{source or 'a row'}: completion has {len(ids)} tokens > max_completion_length="
                f"{self.max_completion_length}; filter such rows when loading (drop_overlong_completions) "
                "or use overlong_completion='truncate'"
            )
        return ids[: self.max_completion_length], False

    def __call__(self, examples: list[dict]) -> dict:
        student, teacher = [], []
        for example in examples:
            messages = chat_messages(parse_messages(example["prompt"], "prompt"))
            student_ids, teacher_ids = encode_student_teacher_contexts(
                self.tokenizer,
                messages,
                message_text(example["user_response"], "user_response"),
                variant=self.hindsight_variant,
                template=self.hindsight_template,
                max_context_length=self.max_context_length,
                chat_template_kwargs=self.chat_template_kwargs,
            )
            student.append(student_ids)
            teacher.append(teacher_ids)
        encoded = self.encode_completions([message_text(e["completion"], "completion") for e in examples])
        fitted = [self.fit_completion(ids, e.get("source", "")) for ids, e in zip(encoded, examples)]
        return {
            "student_context_ids": student,
            "teacher_context_ids": teacher,
            "completion_ids": [ids for ids, _ in fitted],
            "completion_has_eos": [has_eos for _, has_eos in fitted],
        }


def drop_overlong_completions(
    interactions: list[Interaction], collator: OfflineSDPOCollator, report: BadRowReport
) -> list[Interaction]:
    """Keep rows whose completion fits ``max_completion_length`` (EOS included); count the others."""
    lengths = [len(ids) for ids in collator.encode_completions([i.completion.text for i in interactions])]
    kept = []
    for interaction, length in zip(interactions, lengths):
        if length <= collator.max_completion_length:
            kept.append(interaction)
        else:
            report.add(
                "completion_too_long",
                interaction.source,
                f"{length} completion tokens > max_completion_length={collator.max_completion_length}",
            )
    return kept
