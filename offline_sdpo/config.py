"""Configuration of the offline trainers: ``OfflineSDPOConfig`` (every ``TrainingArguments`` field, the shared
``SDPOLossConfig`` loss fields, the offline SDPO fields) and the launch facts it resolves (optimizer, sharding)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from sdpo.core import HINDSIGHT_VARIANTS, check_hindsight_template
from sdpo.learner.config import SDPOLossConfig
from sdpo.models.model_loading import DTYPES, resolve_dtype

OVERLONG_POLICIES = ("skip", "truncate")
REPORTERS = ("wandb", "trackio", "tensorboard", "none")

_LOSS_FIELDS = SDPOLossConfig.__dataclass_fields__


@dataclass
class OfflineSDPOConfig(SDPOLossConfig, TrainingArguments):
    r"""
    Configuration of [`OfflineSDPOTrainer`]: every ``transformers.TrainingArguments`` field, with the
    reference's offline defaults (spec §11.4), the shared loss fields of ``SDPOLossConfig`` (offline defaults:
    ``simple_signal``, ``ignore_first_k=2``) and the offline fields below.

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

    Parameters that control the loss (``SDPOLossConfig``'s, shared with the online learner):
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
    ``per_device_train_batch_size=4``, ``gradient_accumulation_steps=2`` (4 x 2 x 4 processes = Table 5's
    global batch of 32; the reference had 8, i.e. 128), ``num_train_epochs=2``,
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
    # The paper's and the reference's offline loss: the sampled-token policy gradient, first 2 tokens left out.
    loss_mode: str = field(default="simple_signal", metadata=_LOSS_FIELDS["loss_mode"].metadata)
    ignore_first_k: int = field(default=2, metadata=_LOSS_FIELDS["ignore_first_k"].metadata)
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
    # Table 5's global batch of 32 on the default launch (scripts/train_offline_sdpo.sh: 4 processes x 4 x 2).
    gradient_accumulation_steps: int = field(
        default=2, metadata={"help": "Micro-batches per optimizer step.", "aliases": ["--grad_accum"]}
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
        SDPOLossConfig.__post_init__(self)
        self._check_numbers()
        if self.hindsight_variant not in HINDSIGHT_VARIANTS:
            raise ValueError(
                f"hindsight_variant must be one of {sorted(HINDSIGHT_VARIANTS)}, got {self.hindsight_variant!r}"
            )
        if self.hindsight_template is not None:
            check_hindsight_template(self.hindsight_template)
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
            raise TypeError(f"chat_template_kwargs must be a JSON object, got {self.chat_template_kwargs!r}")
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
        TrainingArguments.__post_init__(self)
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
