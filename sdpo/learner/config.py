"""Settings of the online SDPO learner (``OnlineSDPOConfig``) and of the SDPO loss shared with the offline trainer.

Every setting is one dataclass field: its ``help`` (what ``--help`` prints) and the reference's flag names
(``aliases``) live in the field's metadata, its check in ``__post_init__``. Entry points parse these classes with
``sdpo.utils.command_line.ConfigParser`` (TRL's ``TrlParser``: flags and YAML ``--config`` keys are the field
names), and results files record them with ``dataclasses.asdict``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from sdpo.core import (
    ADVANTAGE_CENTERINGS,
    HINDSIGHT_ONLINE_TEMPLATE,
    LOSS_MODES,
    TOPK_SUPPORTS,
    check_hindsight_template,
)
from sdpo.models.model_loading import DTYPES, concrete_dtype
from sdpo.teachers import resolve_teacher_kind

DEFAULT_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZERS = ("adamw", "adamw_8bit")


def check_ranges(config, *, positive=(), non_negative=(), at_least_one=()) -> None:
    """One ``ValueError`` line for the first field outside its range (NaN and inf count as outside)."""
    for name in positive:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value}")
    for name in non_negative:
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(config, name)}")


@dataclass
class SDPOLossConfig:
    """The SDPO signal and loss, shared by the online learner and the offline trainer.

    A_t = log π(y_t | x⊕o, y_<t) − log π(y_t | x, y_<t): the same network scores y with and without the follow-up o.
    """

    loss_mode: str = field(
        default="full_distillation",
        metadata={
            "help": "full_distillation: top-K reverse KL to the hindsight teacher (the reference default); "
            "simple_signal: the paper's sampled-token policy gradient with advantage A_t.",
            "choices": list(LOSS_MODES),
        },
    )
    distillation_topk: int = field(
        default=20, metadata={"help": "K of the top-K support (the student's most likely tokens at each position)."}
    )
    distillation_add_tail: bool = field(
        default=True,
        metadata={"help": "Add a bucket for the probability mass outside the top K; False renormalises the top K."},
    )
    signal_clip: float = field(
        default=0.0, metadata={"help": "Clip A_t to ±signal_clip in simple_signal mode; 0 disables clipping."}
    )
    ignore_first_k: int = field(default=0, metadata={"help": "Leave the first k completion tokens out of the loss."})
    distillation_alpha: float = field(
        default=1.0,
        metadata={
            "help": "Divergence of full_distillation: 1 reverse KL(student || teacher) (the paper's Eq. 2), 0 forward "
            "KL(teacher || student), in between the generalised Jensen-Shannon divergence with mixture weight alpha "
            "(lasgroup/SDPO uses 0.5). Same values as TRL's distillation_alpha.",
            "aliases": ["--alpha"],
        },
    )
    topk_from: str = field(
        default="student",
        metadata={
            "help": "Whose K most likely tokens form the top-K support of full_distillation: student (the "
            "reference, TRL's local top-K) or teacher (TRL's teacher-server top-K).",
            "choices": list(TOPK_SUPPORTS),
        },
    )
    is_clip: float = field(
        default=0.0,
        metadata={
            "help": "Weight each token's loss by min(pi/pi_old, is_clip), pi_old = the policy that sampled y (before "
            "this interaction's first update), as TRL's distillation_is_clip and lasgroup/SDPO's is_clip (both 2). "
            "Acts only when train_steps_per_example > 1 (the first pass has pi = pi_old); offline, where the logged y "
            "came from an unknown policy, there is no pi_old and it never acts. 0 disables.",
            "aliases": ["--distillation_is_clip"],
        },
    )
    advantage_centering: str = field(
        default="none",
        metadata={
            "help": "simple_signal only: sequence subtracts from each A_t its sequence's mean over scored tokens "
            "before signal_clip (what the code behind the paper's figures did); none keeps the sign of A_t as the "
            "signal (the paper's equations).",
            "choices": list(ADVANTAGE_CENTERINGS),
        },
    )
    teacher: str = field(
        default="live",
        metadata={
            "help": "Who scores y under x+o: live (the current network, recomputed every step; the paper), ema (an "
            "exponential moving average of the student: a second LoRA adapter, or a weight copy in the compute "
            "dtype), base (the frozen initial network: LoRA off, or a copy), trust_region (logits (1-mix) z_base + "
            "mix z_current, lasgroup/SDPO; also spelled trust-region). TRL calls it teacher_model_kind.",
            "aliases": ["--teacher_model_kind", "--teacher_regularization"],
        },
    )
    teacher_ema_rate: float = field(
        default=0.05,
        metadata={
            "help": "EMA teacher: theta_T <- (1 - rate) theta_T + rate theta_S at each sync (TRL's "
            "teacher_update_rate, lasgroup/SDPO's 0.05).",
            "aliases": ["--teacher_update_rate"],
        },
    )
    teacher_sync_interval: int = field(
        default=1,
        metadata={
            "help": "EMA teacher: optimizer steps between syncs (TRL's teacher_sync_steps).",
            "aliases": ["--teacher_sync_steps"],
        },
    )
    trust_region_mix: float = field(
        default=0.05,
        metadata={
            "help": "trust_region teacher: weight of the current model's logits (0 = base, 1 = live; lasgroup/SDPO "
            "reuses its teacher_update_rate, 0.05)."
        },
    )

    def __post_init__(self):
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode {self.loss_mode!r}: use one of {list(LOSS_MODES)}")
        check_ranges(
            self,
            non_negative=("signal_clip", "ignore_first_k", "is_clip"),
            at_least_one=("distillation_topk", "teacher_sync_interval"),
        )
        self.teacher = resolve_teacher_kind(self.teacher)
        for name in ("distillation_alpha", "teacher_ema_rate", "trust_region_mix"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {value}")
        if self.teacher == "ema" and self.teacher_ema_rate == 0:
            raise ValueError("--teacher_ema_rate must be > 0 for teacher=ema (0 freezes it: use --teacher base)")
        if self.topk_from not in TOPK_SUPPORTS:
            raise ValueError(f"unknown topk_from {self.topk_from!r}: use one of {list(TOPK_SUPPORTS)}")
        if self.advantage_centering not in ADVANTAGE_CENTERINGS:
            raise ValueError(
                f"unknown advantage_centering {self.advantage_centering!r}: use one of {list(ADVANTAGE_CENTERINGS)}"
            )
        if self.advantage_centering != "none" and self.loss_mode != "simple_signal":
            raise ValueError(
                "--advantage_centering applies to --loss_mode simple_signal (full_distillation has no advantages)"
            )

    def loss_options(self) -> dict:
        """The keyword arguments of ``sdpo.core.sdpo_loss`` these settings fix."""
        names = ("loss_mode", "distillation_topk", "distillation_add_tail", "distillation_alpha", "topk_from")
        return {name: getattr(self, name) for name in (*names, "signal_clip", "advantage_centering", "is_clip")}


@dataclass
class OnlineSDPOConfig(SDPOLossConfig):
    """Everything that controls one online SDPO learner (``OnlineSDPOUpdater``).

    Defaults are the reference implementation's (``Qwen/Qwen3-8B``, top-20 reverse-KL distillation, lr 5e-6,
    T = 1.0, 2048 new tokens); each field's ``help`` says what it does. Groups: the model, LoRA, the signal and
    loss (``SDPOLossConfig`` plus the hindsight template and scoring), the optimizer, generation, checkpoints.
    """

    # ---- the model
    model_name_or_path: str = field(
        default="Qwen/Qwen3-8B",
        metadata={
            "help": "Policy: Hub id, local folder or bundled alias (smollm2-135m-instruct).",
            "aliases": ["--model"],
        },
    )
    torch_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Compute dtype: bfloat16, float16, float32, or auto (bfloat16 where the hardware computes it "
            "natively, else float32; emulated bf16 ran ~100x slower on an AVX2-only CPU). Frozen weights are "
            "stored in it; trainable weights stay fp32 under autocast (fp32_master_weights).",
            "aliases": ["--dtype"],
        },
    )
    fp32_master_weights: bool = field(
        default=True,
        metadata={
            "help": "Keep trainable weights in fp32 and run forward/backward under autocast(torch_dtype); with pure "
            "bf16 weights most AdamW updates at lr ~5e-6 round away (reference bug). LoRA adapters are fp32 either way."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "Policy device: auto (first CUDA device, else CPU), cpu, cuda:1, ..."}
    )
    attn_implementation: str = field(
        default="flash_attention_2",
        metadata={"help": "Attention kernel; falls back to sdpa without flash-attn or CUDA."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    parallelism: str = field(
        default="auto",
        metadata={
            "help": "Under a multi-process launch: ddp (every process holds the policy) or fsdp2 (torch fully_shard: "
            "weights, gradients and AdamW state sharded per decoder layer; HF generation from a full compute-dtype "
            "copy). auto: fsdp2 when the accelerate config says distributed_type FSDP with fsdp_version 2, else ddp.",
            "choices": ["auto", "ddp", "fsdp2"],
        },
    )
    chat_template_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Extra chat-template variables (YAML mapping), merged over {enable_thinking: false}."},
    )
    # ---- LoRA
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=256, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=512, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES),
        metadata={"help": "Module names that get adapters (all attention and MLP projections by default)."},
    )
    # ---- the signal and loss (with SDPOLossConfig's fields)
    hindsight_block_template: str = field(
        default=HINDSIGHT_ONLINE_TEMPLATE,
        metadata={"help": "Text appended to the last user message to form the teacher context; contains {follow_up}."},
    )
    train_steps_per_example: int = field(
        default=1,
        metadata={
            "help": "Gradient steps per batch of interactions; each recomputes teacher and student with the current "
            "weights."
        },
    )
    fp32_lm_head: bool = field(
        default=True,
        metadata={
            "help": "Run the output head in fp32 on the scored positions, so the log-probs the loss reads carry no "
            "bf16 rounding (SmolLM2-135M: bf16 logits moved A_t by up to 0.16). Free where the compute dtype is "
            "fp32; its cost under bf16 is priced by bench/online_step.py --bf16_lm_head."
        },
    )
    # ---- the optimizer
    learning_rate: float = field(
        default=5e-6, metadata={"help": "Constant learning rate (no warm-up, no schedule).", "aliases": ["--lr"]}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw (torch) or adamw_8bit (bitsandbytes, CUDA).",
            "choices": list(OPTIMIZERS),
            "aliases": ["--optim"],
        },
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW β2."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW ε."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Global gradient-norm clip over trainable parameters; 0 disables clipping."}
    )
    # ---- generation
    max_new_tokens: int = field(
        default=2048,
        metadata={"help": "Generation budget of the policy; also the longest response a training step accepts."},
    )
    max_context_length: int = field(
        default=4096,
        metadata={
            "help": "Budget of the conversation x: a longer x loses its oldest tokens, in generation and training; "
            "the teacher context loses the same tokens (never o or y), warned once and counted as truncated_contexts."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature; scoring divides the logits by it too (y scored as it was sampled)."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    do_sample: bool = field(default=True, metadata={"help": "Sample; False decodes greedily."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per batched generate call."})
    train_micro_batch_size: int = field(
        default=0,
        metadata={
            "help": "Most interactions in one forward/backward of an update (0: no cap, only length groups); the "
            "gradient is the same at any value, so lower it when a large --interactions_per_step runs out of memory."
        },
    )
    inference_copy: bool = field(
        default=True,
        metadata={
            "help": "Generate (without vLLM) from a copy whose matmul weights are stored in torch_dtype with LoRA "
            "merged, refreshed after each update, instead of re-casting fp32 weights on every decode step."
        },
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate with an in-process vLLM engine that follows the policy: with --use_lora it loads the "
            "new adapter after every update; without, the updated weights are copied into it in memory."
        },
    )
    vllm_gpu_memory_utilization: float | None = field(
        default=None,
        metadata={
            "help": "Share of GPU memory the policy's vLLM engine may take; unset: what fits beside training on the "
            "same GPU (free memory after the policy loads, less the optimizer state still to come and a 5 percent "
            "headroom)."
        },
    )
    # ---- checkpoints
    checkpoint_dir: str = field(default="./live_checkpoints", metadata={"help": "Where step_<n> checkpoints go."})
    checkpoint_every_n_steps: int = field(
        default=10, metadata={"help": "Save after every n optimizer steps; 0 disables periodic saving."}
    )
    max_checkpoints: int = field(
        default=5, metadata={"help": "Keep only the newest n step_* checkpoints; 0 keeps all."}
    )
    save_merged_model: bool = field(
        default=False, metadata={"help": "With LoRA, also write a merged full model into <checkpoint>/merged."}
    )
    print_token_table: bool = field(
        default=False,
        metadata={"help": "Print log p(y|x), log p(y|x,o) and the signal per token of the first example every step."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.torch_dtype != "auto" and self.torch_dtype not in DTYPES:
            raise ValueError(f"unknown torch_dtype {self.torch_dtype!r}: use auto or one of {sorted(DTYPES)}")
        # The one place "auto" becomes a dtype: the results and checkpoints record the dtype that ran.
        self.torch_dtype = concrete_dtype(self.torch_dtype, self.device)
        if self.parallelism not in ("auto", "ddp", "fsdp2"):
            raise ValueError(f"unknown parallelism {self.parallelism!r}: use auto, ddp or fsdp2")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of {list(OPTIMIZERS)}")
        check_hindsight_template(self.hindsight_block_template)
        check_ranges(
            self,
            positive=("learning_rate",),
            non_negative=("max_grad_norm", "temperature", "weight_decay", "lora_dropout"),
            at_least_one=(
                "lora_r",
                "lora_alpha",
                "train_steps_per_example",
                "max_new_tokens",
                "max_context_length",
                "generation_batch_size",
            ),
        )
        if min(self.checkpoint_every_n_steps, self.max_checkpoints, self.top_k, self.train_micro_batch_size) < 0:
            raise ValueError("checkpoint_every_n_steps, max_checkpoints, top_k and train_micro_batch_size must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        share = self.vllm_gpu_memory_utilization
        if share is not None and not (math.isfinite(share) and 0 < share <= 1):
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {share}")

    def to_dict(self) -> dict:
        return asdict(self)
