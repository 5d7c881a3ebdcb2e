"""Offline SDPO: self-distillation from logged (x, y, o) interactions on the transformers Trainer stack.

Every row of the training data is one logged interaction: the conversation x up to a user turn, the
assistant reply y that some model wrote back then, and the user's next message o. The network being
trained is both student and teacher (paper Eq. 4, no importance correction): per token of y

    A_t = log π(y_t | x⊕o, y_<t) − log π(y_t | x, y_<t)       (teacher under no_grad minus student)

and the default loss is the sampled-token policy gradient −Σ_t A_t·log π(y_t | x, y_<t) / Σ_t 1 per
sequence, averaged over the batch (``sdpo.core.simple_signal_loss``). ``loss_mode="full_distillation"``
swaps in the online learner's top-K reverse-KL loss (``sdpo.core.full_distillation_loss``), an
extension the paper did not run offline. The hindsight context x⊕o, the scorer and both losses are
the shared functions of ``sdpo_core``, the same ones the online learner calls.

Why a plain ``transformers.Trainer`` subclass (as the reference) and not a TRL trainer: the TRL
self-distillation trainers (``trl.experimental.sdpo`` / ``sdft``) sample rollouts from the policy and
bring their own losses; offline SDPO scores fixed logged text and must use this project's losses.
``Trainer`` already gives what the job needs around the loss: DDP / FSDP / DeepSpeed via accelerate,
gradient accumulation, cosine schedule with warm-up, 8-bit AdamW, activation checkpointing,
checkpoints that resume exactly, and wandb logging. The configuration is a ``TrainingArguments``
subclass, documented field by field in the TRL manner.

Deliberate differences from the reference (spec §11, §18 items 13-15):
  * Default hindsight variant is ``online`` — o appended to the last user turn under the
    "=== HINDSIGHT CONTEXT ===" block, the paper's Table-1 template. Which template the paper's
    offline Table 2 used is not recoverable; the reference's two offline variants stay selectable
    (``offline_v1``: o appended to the last prompt message with "Future User Message:";
    ``offline_assistant``: o in an extra assistant turn).
  * An over-long completion never silently loses its EOS. ``overlong_completion="skip"`` (default):
    the data loader drops it and counts it. ``"truncate"``: the first ``max_completion_length`` tokens
    are trained on *without* an EOS, so the model is not taught to stop at an arbitrary cut.
  * The completion mask comes from token counts, not ``ids != pad_id`` (pad == eos for many chat
    tokenizers, which would mask the EOS out).
  * Log-softmax in fp32, one sequence at a time (shared scorer). Mixed precision is a bf16 autocast
    around the forward passes with fp32 master weights by default; accelerate's own AMP is switched off
    because it upcasts the whole (batch × length × vocab) logits tensor to fp32.
  * No mean-centring of A_t (the reference's docstring claimed some; its code did none either).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from sdpo.data.data_sources import DataError, iter_dataset_rows
from sdpo.data.interaction_schema import Interaction, Message, interactions_from_row, message_text, parse_messages
from sdpo.learner.config import SDPOLossConfig
from sdpo.models.model_loading import DTYPES, resolve_dtype
from sdpo.teachers import TeacherCallback, build_teacher, check_sharded_training
from sdpo.core import (
    HINDSIGHT_VARIANTS,
    LOSS_MODES,
    build_hindsight_messages,
    check_hindsight_template,
    encode_student_teacher_contexts,
    format_token_table,
    masked_mean,
    masked_sequence_mean,
    masked_std,
    pad_contexts_and_completions,
    sdpo_loss,
)

OVERLONG_POLICIES = ("skip", "truncate")
REPORTERS = ("wandb", "trackio", "tensorboard", "none")

# Every rank reduces the same metric vector, in this order, so a key absent on one rank (no EOS in its
# window, say) cannot desynchronise the collective.
METRIC_NAMES = (
    "signal_mean",
    "signal_std",
    "len_signal_mean",
    "policy_logp",
    "critic_logp",
    "base_loss",
    "completion_tokens",
    "eos_signal_mean",
    "eos_logp_mean",
    "eos_logratio_mean",
    "kl_mean",
)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class OfflineSDPOConfig(TrainingArguments, SDPOLossConfig):
    r"""
    Configuration of [`OfflineSDPOTrainer`]: every ``transformers.TrainingArguments`` field, with the
    reference's offline defaults (spec §11.4), plus the SDPO fields below and the teacher and loss options
    shared with the online learner (``sdpo.learner.config.SDPOLossConfig``: ``teacher``, ``teacher_ema_rate``,
    ``teacher_sync_interval``, ``trust_region_mix``, ``distillation_alpha``, ``topk_from``, ``is_clip``,
    ``advantage_centering``; see ``--help``).

    Parameters that control the teacher (hindsight) context:
        hindsight_variant (`str`, defaults to `"online"`):
            Where the follow-up o goes: ``online`` (appended to the last user message, the paper's
            Table-1 template), ``offline_v1`` (appended to the last prompt message, "Future User
            Message:" wording) or ``offline_assistant`` (an extra assistant turn holding the block).
        hindsight_template (`str` or `None`, defaults to `None`):
            Replaces the variant's wording; must contain ``{follow_up}`` once. The placement stays the
            variant's.
        chat_template_kwargs (`dict` or `str`, defaults to `{}`):
            Extra chat-template variables, merged over ``{"enable_thinking": False}``; a string (the command
            line) is read as a JSON object.

    Parameters that control tokenization:
        max_context_length (`int`, defaults to `2048`):
            Student and teacher contexts longer than this lose their oldest tokens (left truncation).
        max_completion_length (`int`, defaults to `2048`):
            Token budget of a completion, its EOS included.
        overlong_completion (`str`, defaults to `"skip"`):
            ``skip``: rows whose completion exceeds the budget are dropped (and counted) when the data is
            loaded; the collator refuses them. ``truncate``: keep the first ``max_completion_length``
            tokens and no EOS.

    Parameters that control the loss:
        loss_mode (`str`, defaults to `"simple_signal"`):
            ``simple_signal``: sampled-token policy gradient with A_t as per-token advantage (paper and
            reference offline). ``full_distillation``: top-K reverse KL to the hindsight teacher (the
            online learner's default; an extension offline).
        ignore_first_k (`int`, defaults to `2`):
            Leave the first k completion tokens out of the loss and the metrics (reference offline: 2).
        signal_clip (`float`, defaults to `0.0`):
            Clip A_t to ±signal_clip in ``simple_signal`` mode; 0 disables clipping (reference since v1).
        distillation_topk (`int`, defaults to `20`):
            K of the student's top-K support in ``full_distillation`` mode.
        distillation_add_tail (`bool`, defaults to `True`):
            Add a bucket for the probability mass outside the top K; False renormalises the top K.

    Parameters that control precision and debugging:
        compute_dtype (`str`, defaults to `"bfloat16"`):
            Dtype of the forward passes. When the trainable weights are stored in a wider dtype (fp32
            master weights) the forward passes run under ``torch.autocast(compute_dtype)``; when they
            are already stored in it, no autocast is needed. Log-probs are always taken in fp32.
        print_token_table_every (`int`, defaults to `0`):
            Every N optimizer steps print, on the main process, the per-token table (log π under x and
            x⊕o, signal) of the first example with the tail of its teacher context; 0 disables it.

    Changed ``TrainingArguments`` defaults (spec §11.4): ``learning_rate=2e-6``,
    ``per_device_train_batch_size=4``, ``gradient_accumulation_steps=8``, ``num_train_epochs=2``,
    ``lr_scheduler_type="cosine"``, ``warmup_steps=0.05`` (a ratio), ``max_grad_norm=10.0``,
    ``gradient_checkpointing=True``, ``logging_steps=10``, ``save_steps=200``, ``report_to=["wandb"]``,
    ``project`` = ``$WANDB_PROJECT`` or ``"offline-sdpo"`` (wandb and trackio), ``output_dir`` =
    ``$OUTPUT_DIR`` or ``./local_checkpoints``, ``run_name`` = ``$WANDB_NAME``,
    ``remove_unused_columns=False`` (the collator needs the raw message fields),
    ``ddp_find_unused_parameters=False``. Resolved here when left unset: ``optim="auto"`` (8-bit AdamW
    with bitsandbytes on CUDA, plain AdamW under FSDP/DeepSpeed or without CUDA; the reason is kept in
    ``optim_reason``), ``use_cpu`` (no CUDA device), ``dataloader_num_workers`` (4 on CUDA, 0 on CPU),
    ``dataloader_pin_memory`` (on CUDA). ``bf16``/``fp16`` must stay off: precision is ``compute_dtype``
    (see the module docstring). Every count and rate is checked (finite, in range) on construction.
    """

    hindsight_variant: str = field(
        default="online",
        metadata={
            "help": "Teacher context: online (paper Table 1) | offline_v1 | offline_assistant.",
            "choices": sorted(HINDSIGHT_VARIANTS),
        },
    )
    hindsight_template: str | None = field(
        default=None, metadata={"help": "Custom hindsight wording with a {follow_up} slot."}
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra chat-template variables: a dict, or JSON such as '{\"enable_thinking\": true}'."},
    )
    max_context_length: int = field(default=2048, metadata={"help": "Left-truncate contexts to this many tokens."})
    max_completion_length: int = field(default=2048, metadata={"help": "Completion token budget, EOS included."})
    overlong_completion: str = field(
        default="skip",
        metadata={"help": "skip | truncate (truncated completions get no EOS).", "choices": OVERLONG_POLICIES},
    )
    loss_mode: str = field(
        default="simple_signal", metadata={"help": "simple_signal | full_distillation.", "choices": LOSS_MODES}
    )
    ignore_first_k: int = field(default=2, metadata={"help": "Leave the first k completion tokens out of the loss."})
    signal_clip: float = field(default=0.0, metadata={"help": "Clip A_t to ±signal_clip (0: off)."})
    distillation_topk: int = field(default=20, metadata={"help": "Top-K support size for full_distillation."})
    distillation_add_tail: bool = field(default=True, metadata={"help": "Tail bucket for full_distillation."})
    compute_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Forward-pass dtype (autocast over fp32 weights).",
            "choices": sorted(DTYPES),
            "aliases": ["--dtype"],
        },
    )
    print_token_table_every: int = field(
        default=0, metadata={"help": "Print a per-token table every N steps (0: off)."}
    )

    output_dir: str | None = field(
        default_factory=lambda: os.environ.get("OUTPUT_DIR") or "./local_checkpoints",
        metadata={"help": "Checkpoints, final_model/ and reports (default: $OUTPUT_DIR, else ./local_checkpoints)."},
    )
    learning_rate: float = field(default=2e-6, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Interactions per device per micro-batch.", "aliases": ["--batch_size"]}
    )
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Micro-batches per optimizer step.", "aliases": ["--grad_accum"]}
    )
    num_train_epochs: float = field(
        default=2.0, metadata={"help": "Passes over the data.", "aliases": ["--num_epochs"]}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=0.05,
        metadata={"help": "Warm-up steps, or a ratio of all steps when < 1.", "aliases": ["--warmup_ratio"]},
    )
    max_grad_norm: float = field(default=10.0, metadata={"help": "Global gradient-norm clip."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in backward (--no_gradient_checkpointing: keep them)."}
    )
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "transformers' name for --gradient_checkpointing; wins when set."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Optimizer steps per logging window."})
    save_steps: float = field(default=200, metadata={"help": "Optimizer steps between checkpoints."})
    optim: str = field(
        default="auto",
        metadata={
            "help": "auto = adamw_bnb_8bit with bitsandbytes on CUDA (plain AdamW under FSDP/DeepSpeed or on CPU), "
            "or any transformers optimizer name."
        },
    )
    optim_reason: str = field(default="as requested", init=False, repr=False)
    # Unset: decided in __post_init__ (HfArgumentParser ignores a bool field's default_factory).
    use_cpu: bool | None = field(
        default=None, metadata={"help": "Train on CPU (default: when no CUDA device is visible)."}
    )
    dataloader_num_workers: int | None = field(default=None, metadata={"help": "Default: 4 on CUDA, 0 on CPU."})
    dataloader_pin_memory: bool | None = field(default=None, metadata={"help": "Pin host memory (default: on CUDA)."})
    report_to: list[str] = field(
        default_factory=lambda: ["wandb"],
        metadata={"help": "Where to log: wandb, trackio, tensorboard, or none.", "choices": REPORTERS},
    )
    run_name: str | None = field(
        default_factory=lambda: os.environ.get("WANDB_NAME"), metadata={"help": "Run name (default: $WANDB_NAME)."}
    )
    project: str = field(
        default_factory=lambda: os.environ.get("WANDB_PROJECT") or "offline-sdpo",
        metadata={
            "help": "wandb / trackio project (default: $WANDB_PROJECT, else offline-sdpo).",
            "aliases": ["--wandb_project"],
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint-<step> folder, or 'latest' (newest in --output_dir; fresh start if none)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads raw rows."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every trainable weight takes part in the student pass: no graph search."}
    )

    def __post_init__(self):
        self._check_numbers()
        if self.hindsight_variant not in HINDSIGHT_VARIANTS:
            raise ValueError(
                f"hindsight_variant must be one of {sorted(HINDSIGHT_VARIANTS)}, got {self.hindsight_variant!r}"
            )
        if self.hindsight_template is not None:
            check_hindsight_template(self.hindsight_template)
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        SDPOLossConfig.__post_init__(self)  # TrainingArguments' __post_init__ does not chain to it
        if self.overlong_completion not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong_completion must be one of {OVERLONG_POLICIES}, got {self.overlong_completion!r}"
            )
        if self.ignore_first_k >= self.max_completion_length:
            raise ValueError("ignore_first_k must be smaller than max_completion_length, or nothing is ever scored")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the collator needs prompt/completion/user_response")
        if self.bf16 or self.fp16:
            raise ValueError(
                "leave bf16/fp16 off and set compute_dtype: accelerate's AMP would upcast the full "
                "(batch x length x vocab) logits to fp32; the SDPO scorer upcasts one sequence at a time"
            )
        if isinstance(self.report_to, str):  # a YAML config may give one name
            self.report_to = [self.report_to]
        unknown = sorted(set(self.report_to or []) - set(REPORTERS))
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to: 'none' cannot be combined with {', '.join(self.report_to)}")
        if unknown:
            raise ValueError(f"report_to: unknown {', '.join(unknown)}; use {', '.join(REPORTERS)}")
        if isinstance(self.chat_template_kwargs, str):
            try:
                self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"chat_template_kwargs is not valid JSON ({error.msg})") from None
        self.chat_template_kwargs = {} if self.chat_template_kwargs is None else self.chat_template_kwargs
        if not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a JSON object, got {self.chat_template_kwargs!r}")
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
        if self.use_cpu is None:
            # Without a GPU, say so: otherwise accelerate joins the launcher's process group but runs each
            # process as an independent single-process job (world size 1, no gradient sync).
            self.use_cpu = not torch.cuda.is_available()
        on_cuda = torch.cuda.is_available() and not self.use_cpu
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = 4 if on_cuda else 0
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = on_cuda
        if self.optim == "auto":
            self.optim, self.optim_reason = choose_optimizer(on_cuda)
        resolve_dtype(self.compute_dtype)
        super().__post_init__()
        # A launcher config may say bf16 (ACCELERATE_MIXED_PRECISION); the autocast lives in the loss
        # instead. DeepSpeed keeps its own setting: its bf16 mode manages fp32 master weights itself.
        if self.deepspeed_plugin is None:
            self.mixed_precision = "no"

    def _check_numbers(self) -> None:
        """Every count and rate the run depends on, checked before anything is loaded."""
        at_least_one = {
            "per_device_train_batch_size (--batch_size)": self.per_device_train_batch_size,
            "gradient_accumulation_steps (--grad_accum)": self.gradient_accumulation_steps,
            "max_context_length": self.max_context_length,
            "max_completion_length": self.max_completion_length,
            "distillation_topk": self.distillation_topk,
        }
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value}")
        positive = {
            "learning_rate": self.learning_rate,
            "num_train_epochs (--num_epochs)": self.num_train_epochs,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
        }
        non_negative = {
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": self.weight_decay,
            "warmup_steps (--warmup_ratio)": self.warmup_steps,
            "signal_clip": self.signal_clip,
            "ignore_first_k": self.ignore_first_k,
        }
        for name, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, value in non_negative.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be >= 1 (or -1: use num_train_epochs), got {self.max_steps}")


def sharded_launch() -> str | None:
    """``FSDP`` / ``DeepSpeed`` when accelerate launched this process with one of them, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed"
    return None


def choose_optimizer(on_cuda: bool) -> tuple[str, str]:
    """``optim="auto"``: (transformers optimizer name, why)."""
    if sharded_launch():
        return "adamw_torch", f"plain AdamW: 8-bit AdamW state does not shard under {sharded_launch()}"
    if on_cuda and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit", "8-bit AdamW (bitsandbytes), as the reference"
    reason = "no CUDA device" if not on_cuda else "bitsandbytes not installed"
    return "adamw_torch", f"plain AdamW: 8-bit AdamW needs bitsandbytes on CUDA ({reason})"


# --------------------------------------------------------------------------------------------------
# Data: validation, loading, collation
# --------------------------------------------------------------------------------------------------


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
        closed = [text.rstrip() + self.tokenizer.eos_token for text in texts]
        return self.tokenizer(closed, add_special_tokens=False)["input_ids"]

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


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class BatchLoss:
    """The loss of one micro-batch and its statistics (plain floats; EOS/KL entries only when defined)."""

    loss: torch.Tensor
    metrics: dict
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    mask: torch.Tensor


class OfflineSDPOTrainer(Trainer):
    """``transformers.Trainer`` whose loss is offline SDPO on logged interactions.

        trainer = OfflineSDPOTrainer(model=model, args=OfflineSDPOConfig(output_dir="out"),
                                     train_dataset=InteractionDataset(rows), processing_class=tokenizer)
        trainer.train()

    Without ``data_collator`` an ``OfflineSDPOCollator`` is built from the config. Metrics are logged
    under ``sdpo/``: the mean over the logging window of per-micro-batch values, across all ranks.
    """

    # compute_loss returns a per-micro-batch mean: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self, model, args: OfflineSDPOConfig, train_dataset=None, processing_class=None, data_collator=None, **kwargs
    ):
        if not isinstance(args, OfflineSDPOConfig):
            raise TypeError(f"args must be an OfflineSDPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("pass the tokenizer as processing_class: it renders the contexts and closes completions")
        if data_collator is None:
            data_collator = OfflineSDPOCollator.from_config(processing_class, args)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self.compute_dtype = resolve_dtype(args.compute_dtype)
        # Built once the model sits on its device, before accelerate wraps it; the EMA teacher follows each step.
        check_sharded_training(args.teacher, self.model, zero3=is_deepspeed_zero3_enabled(), fsdp=self.is_fsdp_enabled)
        self.teacher = build_teacher(
            args.teacher,
            self.model,
            ema_rate=args.teacher_ema_rate,
            sync_interval=args.teacher_sync_interval,
            trust_region_mix=args.trust_region_mix,
            compute_dtype=self.compute_dtype,
        )
        self.add_callback(TeacherCallback(self.teacher))
        self._metric_sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
        self._metric_counts = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
        self.examples_seen = 0
        self._last_table_step = -1
        self._window_start: tuple[float, int] | None = None  # (time, global step) of the logging window

    def autocast_dtype(self, model) -> torch.dtype | None:
        """``compute_dtype`` when trainable weights are stored wider than it (fp32 master weights)."""
        trainable = next((p for p in model.parameters() if p.requires_grad), None)
        if trainable is None or trainable.dtype == self.compute_dtype:
            return None
        return self.compute_dtype

    def batch_loss(self, model, inputs: dict) -> BatchLoss:
        """Score y under x (with grad) and x⊕o (no grad) with the shared scorer; apply the shared loss."""
        args = self.args
        pad = self.processing_class.pad_token_id
        student_batch = pad_contexts_and_completions(
            inputs["student_context_ids"], inputs["completion_ids"], pad, ignore_first_k=args.ignore_first_k
        ).to(args.device)
        teacher_batch = pad_contexts_and_completions(
            inputs["teacher_context_ids"], inputs["completion_ids"], pad, ignore_first_k=args.ignore_first_k
        ).to(args.device)
        # No is_clip here: a logged y has no known sampling policy π_old (paper Eq. 4).
        out = sdpo_loss(
            model,
            student_batch,
            teacher_batch,
            **args.loss_options(),
            teacher=self.teacher,
            autocast_dtype=self.autocast_dtype(model),
        )
        loss, mask, advantages = out.loss, out.mask, out.advantages
        student_logprobs, teacher_logprobs, signal = out.student_logprobs, out.teacher_logprobs, out.signal
        metrics = {} if out.kl_per_token is None else {"kl_mean": masked_mean(out.kl_per_token, mask)}
        metrics.update(
            signal_mean=masked_mean(signal, mask),
            signal_std=masked_std(signal, mask),
            len_signal_mean=float(masked_sequence_mean(signal, mask).mean()),
            policy_logp=masked_mean(student_logprobs, mask),
            critic_logp=masked_mean(teacher_logprobs, mask),
            base_loss=float(loss.detach()),
            completion_tokens=sum(map(len, inputs["completion_ids"])) / len(inputs["completion_ids"]),
        )
        metrics.update(self._eos_metrics(inputs, student_logprobs, signal, advantages, mask))
        return BatchLoss(loss, metrics, student_logprobs, teacher_logprobs, mask)

    @staticmethod
    def _eos_metrics(inputs, student_logprobs, signal, advantages, mask) -> dict:
        """Statistics at the closing EOS of completions that end with one (and where it is scored)."""
        rows, columns = [], []
        for row, (ids, has_eos) in enumerate(zip(inputs["completion_ids"], inputs["completion_has_eos"])):
            if has_eos and mask[row, len(ids) - 1] > 0:
                rows.append(row)
                columns.append(len(ids) - 1)
        if not rows:
            return {}
        return {
            "eos_signal_mean": float(advantages[rows, columns].mean()),
            "eos_logp_mean": float(student_logprobs[rows, columns].mean()),
            "eos_logratio_mean": float(signal[rows, columns].mean()),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self._window_start is None:
            self._window_start = (time.perf_counter(), self.state.global_step)
        output = self.batch_loss(model, inputs)
        if model.training:
            self._record(output.metrics)
            self.examples_seen += len(inputs["completion_ids"])
            self._maybe_print_token_table(inputs, output)
        return (output.loss, output) if return_outputs else output.loss

    def _record(self, metrics: dict) -> None:
        for index, name in enumerate(METRIC_NAMES):
            if name in metrics:
                self._metric_sums[index] += metrics[name]
                self._metric_counts[index] += 1

    def reduced_metrics(self) -> dict:
        """Window means across ranks (collective: every rank must call it), then reset the window."""
        stacked = torch.stack([self._metric_sums, self._metric_counts]).to(self.args.device)
        totals = self.accelerator.reduce(stacked, reduction="sum").cpu()
        self._metric_sums.zero_()
        self._metric_counts.zero_()
        return {
            f"sdpo/{name}": float(totals[0, i] / totals[1, i])
            for i, name in enumerate(METRIC_NAMES)
            if totals[1, i] > 0
        }

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # Trainer calls log() on every rank at the same step for the training window ("loss" present).
        if "loss" in logs:
            logs = {**logs, **self.reduced_metrics(), **self._window_speed()}
        super().log(logs, start_time)

    def _window_speed(self) -> dict:
        """Wall seconds per optimizer step since the previous log (the first window includes start-up)."""
        if self._window_start is None or self.state.global_step <= self._window_start[1]:
            return {}
        started, first_step = self._window_start
        now = time.perf_counter()
        self._window_start = (now, self.state.global_step)
        return {"sdpo/seconds_per_step": (now - started) / (self.state.global_step - first_step)}

    def _maybe_print_token_table(self, inputs, output: BatchLoss) -> None:
        every = self.args.print_token_table_every
        step = self.state.global_step
        if not every or step % every or step == self._last_table_step or not self.is_world_process_zero():
            return
        self._last_table_step = step
        length = len(inputs["completion_ids"][0])
        teacher_text = self.processing_class.decode(inputs["teacher_context_ids"][0])
        print(f"[sdpo] step {step}: teacher context (last 2000 chars):\n{teacher_text[-2000:]}")
        print(
            format_token_table(
                self.processing_class,
                inputs["completion_ids"][0],
                output.student_logprobs[0, :length],
                output.teacher_logprobs[0, :length],
            )
        )
