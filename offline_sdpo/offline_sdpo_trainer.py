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

import time
from dataclasses import dataclass

import torch
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

# The configuration and the data live in their own modules; they stay importable from here, the
# reference-named face of the offline trainer.
from offline_sdpo.config import OVERLONG_POLICIES, REPORTERS, OfflineSDPOConfig, choose_optimizer, sharded_launch
from offline_sdpo.data import (
    BadRowReport,
    InteractionDataError,
    InteractionDataset,
    OfflineSDPOCollator,
    chat_messages,
    checked_interactions,
    drop_overlong_completions,
    load_interactions,
)
from sdpo.core import (
    format_token_table,
    masked_mean,
    masked_sequence_mean,
    masked_std,
    pad_contexts_and_completions,
    sdpo_loss,
)
from sdpo.models.model_loading import resolve_dtype
from sdpo.teachers import TeacherCallback, build_teacher, check_sharded_training

__all__ = [
    "OVERLONG_POLICIES",
    "REPORTERS",
    "BadRowReport",
    "BatchLoss",
    "InteractionDataError",
    "InteractionDataset",
    "OfflineSDPOCollator",
    "OfflineSDPOConfig",
    "OfflineSDPOTrainer",
    "chat_messages",
    "checked_interactions",
    "choose_optimizer",
    "drop_overlong_completions",
    "load_interactions",
    "sharded_launch",
]

# Every rank reduces the same metric vector, in this order, so a key absent on one rank (no EOS in its
# window, say) cannot desynchronise the collective.
METRIC_NAMES = (
    "signal_mean",
    "signal_std",
    "len_signal_mean",
    "policy_logp",
    "teacher_logp",
    "base_loss",
    "completion_tokens",
    "eos_signal_mean",
    "eos_logp_mean",
    "eos_logratio_mean",
    "kl_mean",
)


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
            teacher_logp=masked_mean(teacher_logprobs, mask),
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
