"""Configuration of the online SDPO updater (``OnlineSDPOUpdater``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from sdpo.models.model_loading import DTYPES
from sdpo.core import (
    ADVANTAGE_CENTERINGS,
    HINDSIGHT_ONLINE_TEMPLATE,
    LOSS_MODES,
    TOPK_SUPPORTS,
    check_hindsight_template,
)
from sdpo.teachers import resolve_teacher_kind

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZERS = ("adamw", "adamw_8bit")


@dataclass
class OnlineSDPOConfig:
    r"""
    Everything that controls one online SDPO learner. Defaults are the reference implementation's
    (``Qwen/Qwen3-8B``, top-20 reverse-KL distillation, lr 5e-6, T = 1.0, 2048 new tokens).

    Parameters that control the model:
        model_name_or_path (`str`, defaults to `"Qwen/Qwen3-8B"`):
            Hub id, local folder, or bundled alias (``smollm2-135m-instruct``) of the policy.
        torch_dtype (`str`, defaults to `"bfloat16"`):
            Compute dtype, one of ``bfloat16``, ``float16``, ``float32``. Frozen weights are stored in it.
        fp32_master_weights (`bool`, defaults to `True`):
            Keep trainable weights in fp32 and run forward/backward under autocast(``torch_dtype``).
            With pure bf16 weights most AdamW updates at lr ~5e-6 round away (reference bug); set False
            to reproduce the reference's pure-bf16 full fine-tuning. LoRA adapters are fp32 either way.
        device (`str`, defaults to `"auto"`):
            ``auto`` (first CUDA device, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
        attn_implementation (`str`, defaults to `"flash_attention_2"`):
            Attention kernel; falls back to ``sdpa`` when flash-attn or CUDA is missing.
        gradient_checkpointing (`bool`, defaults to `False`):
            Recompute activations in the backward pass to save memory.
        chat_template_kwargs (`dict`, defaults to `{}`):
            Extra variables for the chat template, merged over ``{"enable_thinking": False}``.

    Parameters that control LoRA:
        use_lora (`bool`, defaults to `False`):
            Train LoRA adapters (peft) instead of all weights.
        lora_r (`int`, defaults to `256`), lora_alpha (`int`, defaults to `512`), lora_dropout (`float`, defaults to `0.0`):
            Adapter rank, scale numerator (scale = alpha / r) and dropout.
        lora_target_modules (`list[str]`, defaults to all attention and MLP projections):
            Module names that get adapters.

    Parameters that control the SDPO signal and loss:
        loss_mode (`str`, defaults to `"full_distillation"`):
            ``full_distillation`` (top-K reverse KL to the hindsight teacher, the reference default) or
            ``simple_signal`` (the paper's sampled-token policy gradient with A_t = log π(y_t|x,o) − log π(y_t|x)).
        distillation_topk (`int`, defaults to `20`):
            K of the top-K support (the student's most likely tokens at each position).
        distillation_add_tail (`bool`, defaults to `True`):
            Add a bucket for the mass outside the top K; False renormalises the top K instead.
        signal_clip (`float`, defaults to `0.0`):
            Clip A_t to ±signal_clip in ``simple_signal`` mode; 0 disables clipping.
        ignore_first_k (`int`, defaults to `0`):
            Leave the first k completion tokens out of the loss.
        hindsight_block_template (`str`, defaults to the H-online template):
            Text appended to the last user message to form the teacher context; must contain ``{follow_up}``.
        train_steps_per_example (`int`, defaults to `1`):
            Gradient steps per interaction; each recomputes teacher and student with the current weights.
        fp32_lm_head (`bool`, defaults to `True`):
            Run the output head in fp32 (autocast off) on the scored positions, so the log-probs the loss reads
            carry no bf16 rounding (hidden states stay in the compute dtype). With bf16 logits, SmolLM2-135M's
            log-probs were off by up to 0.08 nats per token and the signal A_t by up to 0.16.
            Cost: nothing where the compute dtype is fp32 (e.g. CPUs without native bf16, where fp32 is also
            the fast dtype). Under bf16 autocast the head's matmuls (vocab x hidden per completion token, about
            17% of SmolLM2-135M's training FLOPs at 40-token contexts and 128-token answers) run at fp32 speed:
            on a CPU with native bf16 (fp32 peak about 1/4 of bf16) an estimated +30-50% on the student pass,
            not yet measured (``bench/online_step.py`` with and without ``--bf16_lm_head`` prices it); on GPUs
            the fp32 share is smaller for large models. Set False to trade the precision for that time.
            Scoring always divides the logits by the sampling temperature (``temperature`` when ``do_sample``,
            else 1), so y is scored under the distribution that sampled it; top_p / top_k are not applied.

    Parameters that control the optimizer:
        learning_rate (`float`, defaults to `5e-6`):
            Constant learning rate (no warm-up, no schedule).
        optimizer (`str`, defaults to `"adamw"`):
            ``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes; fails with a clear message when not installed).
        adam_beta1 (`float`, defaults to `0.9`), adam_beta2 (`float`, defaults to `0.999`), adam_epsilon (`float`, defaults to `1e-6`):
            AdamW moments and epsilon.
        weight_decay (`float`, defaults to `0.0`):
            Decoupled weight decay.
        max_grad_norm (`float`, defaults to `1.0`):
            Global gradient-norm clip over trainable parameters; 0 disables clipping.

    Parameters that control generation:
        max_new_tokens (`int`, defaults to `2048`):
            Generation budget of the policy; also the longest response ``train_step`` accepts.
        max_context_length (`int`, defaults to `4096`):
            Budget of the conversation x: a longer x loses its oldest tokens (left truncation), for generation
            and for training alike. Training cuts the very same tokens from the teacher context x⊕o, which keeps
            all of the hindsight block and may therefore exceed the budget by the block's length; never o or y
            is cut. Truncation is warned about once per run and counted per step as ``truncated_contexts``.
        temperature (`float`, defaults to `1.0`), top_p (`float`, defaults to `1.0`), top_k (`int`, defaults to `0`):
            Sampling parameters, passed explicitly on every call (the model's generation_config is never
            consulted). top_k 0 disables top-k.
        do_sample (`bool`, defaults to `True`):
            False → greedy decoding.
        generation_batch_size (`int`, defaults to `8`):
            Prompts per batched ``generate`` call.
        inference_copy (`bool`, defaults to `True`):
            Generate (without vLLM) from a copy of the policy whose matmul weights are stored in ``torch_dtype``
            with LoRA merged in, rewritten after each update, instead of re-casting fp32 master weights (and
            running the adapters) on every decode step. Embeddings and norms are shared with the trained model.
            Costs one ``torch_dtype`` copy of the linear weights; greedy decoding gives the same tokens as
            without the copy (merged LoRA can differ by rounding). Unused when there is nothing to save: with
            neither autocast nor LoRA.
        use_vllm (`bool`, defaults to `False`):
            Generate with an in-process vLLM engine that loads the trained LoRA adapter after every
            update (forces ``use_lora``; GPU only). Training stays on ``device``.
        vllm_gpu_memory_utilization (`float`, defaults to `0.9`):
            Share of GPU memory the vLLM engine may take (lower it when training shares the GPU).

    Parameters that control checkpointing and logging:
        checkpoint_dir (`str`, defaults to `"./live_checkpoints"`):
            Where ``step_<n>`` checkpoints go.
        checkpoint_every_n_steps (`int`, defaults to `10`):
            Save after every n interactions; 0 disables periodic saving.
        max_checkpoints (`int`, defaults to `5`):
            Keep only the newest n ``step_*`` checkpoints; 0 keeps all.
        save_merged_model (`bool`, defaults to `False`):
            With LoRA, also write a merged full model into ``<checkpoint>/merged`` (large; the reference
            did this on every save).
        print_token_table (`bool`, defaults to `False`):
            Print a per-token table (log p(y|x), log p(y|x⊕o), signal) of the first example at every step.
        log_to_wandb (`bool`, defaults to `False`), wandb_project (`str`, defaults to `"live-sdpo"`),
        wandb_run_name (`str` or `None`, defaults to `None`):
            Log every step's metrics to Weights & Biases (``WANDB_MODE=offline`` works without network).
            Local files go to ``$WANDB_DIR``, else ``checkpoint_dir``.
    """

    # model
    model_name_or_path: str = "Qwen/Qwen3-8B"
    torch_dtype: str = "bfloat16"
    fp32_master_weights: bool = True
    device: str = "auto"
    attn_implementation: str = "flash_attention_2"
    gradient_checkpointing: bool = False
    chat_template_kwargs: dict = field(default_factory=dict)
    # LoRA
    use_lora: bool = False
    lora_r: int = 256
    lora_alpha: int = 512
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES))
    lora_dropout: float = 0.0
    # signal and loss
    loss_mode: str = "full_distillation"
    distillation_topk: int = 20
    distillation_add_tail: bool = True
    signal_clip: float = 0.0
    ignore_first_k: int = 0
    hindsight_block_template: str = HINDSIGHT_ONLINE_TEMPLATE
    train_steps_per_example: int = 1
    fp32_lm_head: bool = True
    teacher: str = "live"
    teacher_ema_rate: float = 0.05
    teacher_sync_interval: int = 1
    trust_region_mix: float = 0.05
    distillation_alpha: float = 1.0
    topk_from: str = "student"
    is_clip: float = 0.0
    advantage_centering: str = "none"
    # optimizer
    learning_rate: float = 5e-6
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # generation
    max_new_tokens: int = 2048
    max_context_length: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    generation_batch_size: int = 8
    inference_copy: bool = True
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = 0.9
    # checkpointing and logging
    checkpoint_dir: str = "./live_checkpoints"
    checkpoint_every_n_steps: int = 10
    max_checkpoints: int = 5
    save_merged_model: bool = False
    print_token_table: bool = False
    log_to_wandb: bool = False
    wandb_project: str = "live-sdpo"
    wandb_run_name: str | None = None

    def __post_init__(self):
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode {self.loss_mode!r}: use one of {list(LOSS_MODES)}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"unknown torch_dtype {self.torch_dtype!r}: use one of {sorted(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of {list(OPTIMIZERS)}")
        check_hindsight_template(self.hindsight_block_template)
        self.teacher = resolve_teacher_kind(self.teacher)
        for name, value, low, high in (
            ("teacher_ema_rate", self.teacher_ema_rate, 0.0, 1.0),
            ("trust_region_mix", self.trust_region_mix, 0.0, 1.0),
            ("distillation_alpha", self.distillation_alpha, 0.0, 1.0),
        ):
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        if self.teacher == "ema" and self.teacher_ema_rate == 0:
            raise ValueError("teacher_ema_rate must be > 0 for the ema teacher (0 would freeze it: use teacher=base)")
        if self.teacher_sync_interval < 1:
            raise ValueError(f"teacher_sync_interval must be >= 1, got {self.teacher_sync_interval}")
        if self.topk_from not in TOPK_SUPPORTS:
            raise ValueError(f"unknown topk_from {self.topk_from!r}: use one of {list(TOPK_SUPPORTS)}")
        if self.advantage_centering not in ADVANTAGE_CENTERINGS:
            raise ValueError(
                f"unknown advantage_centering {self.advantage_centering!r}: use one of {list(ADVANTAGE_CENTERINGS)}"
            )
        if self.advantage_centering != "none" and self.loss_mode != "simple_signal":
            raise ValueError("advantage_centering applies to loss_mode=simple_signal (full_distillation has no advantages)")
        if self.is_clip < 0:
            raise ValueError(f"is_clip must be >= 0 (0 disables importance weighting), got {self.is_clip}")
        positive = {
            "distillation_topk": self.distillation_topk,
            "train_steps_per_example": self.train_steps_per_example,
            "max_new_tokens": self.max_new_tokens,
            "max_context_length": self.max_context_length,
            "generation_batch_size": self.generation_batch_size,
            "learning_rate": self.learning_rate,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        non_negative = {
            "signal_clip": self.signal_clip,
            "ignore_first_k": self.ignore_first_k,
            "max_grad_norm": self.max_grad_norm,
            "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
            "max_checkpoints": self.max_checkpoints,
            "temperature": self.temperature,
            "top_k": self.top_k,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.use_vllm and not self.use_lora:
            logger.info("use_vllm: training LoRA adapters (vLLM follows the policy by hot-swapping the adapter)")
            self.use_lora = True

    def to_dict(self) -> dict:
        return asdict(self)
