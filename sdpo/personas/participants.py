"""The simulated user and the style judges, built from one small config resolved once from the flags.

Shared by every entry point that talks to a simulated user or a judge (``eval_online_sdpo.py``,
``auxiliary/eval_checkpoints.py``, ``auxiliary/eval_incontext_oracle.py``), so the flags mean the same
everywhere. ``ParticipantsConfig.from_args`` applies the reference's rules (the ``auto`` choices):

* user: ``--user_model_name_or_path`` set → a local model (in-process vLLM with ``--user_vllm``, else
  transformers); unset → Claude (``claude-haiku-4-5-20251001``, 256 tokens, temperature 0).
* judge: ``--judge_local`` → the user model's backend; else Claude (``--judge_model``). Without a simulated
  user (the in-context oracle), ``--judge_backend vllm``/``hf`` runs ``--judge_model`` in-process instead.

Beyond the reference: ``--user_backend``/``--judge_backend`` also accept ``openai`` (any
OpenAI-compatible server, e.g. vLLM's; ``--openai_base_url``) and ``rule`` (the deterministic rule-based
user of ``auxiliary/rule_based_user.py``: no model, no key).

Style names are canonicalised by the entry points' ``__post_init__`` checks (``resolve_style``), so an
unknown style ends the command line with one line before anything loads, and every consumer sees
canonical names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from sdpo.chat.backends import (
    DEFAULT_ANTHROPIC_MODEL,
    ChatBackend,
    HFChatBackend,
    OpenAICompatibleBackend,
    TokenBudget,
)
from sdpo.models.generation import SamplingParams
from sdpo.personas.rule_based_user import (
    RULE_BASED_STYLES,
    RuleBasedJudge,
    RuleBasedUserSimulator,
)
from sdpo.personas.style_judge import LLMStyleJudge, PairwiseJudge
from sdpo.personas.user_simulator import LLMUserSimulator, UserSimulator, resolve_style

logger = logging.getLogger(__name__)

USER_BACKENDS = ("auto", "hf", "vllm", "openai", "anthropic", "rule")
JUDGE_BACKENDS = ("auto", "user", "anthropic", "openai", "rule", "vllm", "hf")
# Judges that run --judge_model in-process without a simulated user (the in-context oracle's reference judge).
LOCAL_JUDGE_BACKENDS = ("vllm", "hf")
DEFAULT_LOCAL_JUDGE = "Qwen/Qwen3-32B"
MODEL_BACKENDS = ("hf", "vllm", "openai")  # user backends that need --user_model_name_or_path
USER_MAX_INPUT_TOKENS = 2048
JUDGE_MAX_INPUT_TOKENS = 4096


class ParticipantsError(ValueError):
    """The user/judge settings cannot work together; the message says which flags to change."""


def unique_styles(styles) -> tuple[str, ...]:
    """Canonical style names in first-seen order, duplicates dropped."""
    return tuple(dict.fromkeys(resolve_style(style) for style in styles))


@dataclass(frozen=True)
class StyleSchedule:
    """The simulated user's persona over interactions: ``segments`` of (style, number of interactions).

    The last style stays on after its segment ends; styles of segments after the run's end never appear.
    """

    segments: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, text: str | None, default_style: str) -> StyleSchedule:
        if not text:
            return cls(((default_style, 0),))
        segments = []
        for part in text.split(","):
            style, _, count = part.strip().rpartition(":")
            if not style or not count.isdigit() or int(count) < 1:
                raise ValueError(
                    f'--style_schedule: {part.strip()!r} is not "style:N" with N >= 1 (e.g. '
                    '"short:250,detailed_professional_expert:250")'
                )
            segments.append((resolve_style(style), int(count)))
        return cls(tuple(segments))

    @property
    def styles(self) -> tuple[str, ...]:
        return unique_styles(style for style, _ in self.segments)

    def style_at(self, interaction: int) -> str:
        """The persona for interaction ``interaction`` (0-based)."""
        end = 0
        for style, count in self.segments:
            end += count
            if interaction < end:
                return style
        return self.segments[-1][0]

    def switch_points(self, n_interactions: int) -> list[tuple[int, str]]:
        """(interactions done before the switch, new style) for every switch inside the run."""
        points, end = [], 0
        for (_, count), (style, _) in zip(self.segments, self.segments[1:]):
            end += count
            if end < n_interactions:
                points.append((end, style))
        return points


@dataclass
class ParticipantsArguments:
    """The simulated-user and judge settings of every entry point (the reference's names, plus backends)."""

    user_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local user-simulator model (HF id, path or alias); unset → Claude."}
    )
    user_backend: str = field(
        default="auto",
        metadata={
            "help": "Who writes the follow-ups; auto = the reference's rule (a user model → hf, or vllm with "
            "--user_vllm; none → anthropic).",
            "choices": list(USER_BACKENDS),
        },
    )
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": f"Model of the judge: Claude (default {DEFAULT_ANTHROPIC_MODEL}), the model an OpenAI-compatible "
            f"server serves, or the local model of --judge_backend vllm/hf (default {DEFAULT_LOCAL_JUDGE})."
        },
    )
    judge_local: bool = field(
        default=False, metadata={"help": "Judge with the user-simulator model instead of Claude."}
    )
    judge_backend: str = field(
        default="auto",
        metadata={
            "help": "Who judges; auto = --judge_local ? user : anthropic; vllm/hf run --judge_model in-process "
            "(only without a simulated user; with one, --judge_local lets its model judge).",
            "choices": list(JUDGE_BACKENDS),
        },
    )
    user_vllm: bool = field(
        default=False, metadata={"help": "Run the local user model (and local judge) in an in-process vLLM engine."}
    )
    # A local judge runs on the user model's engine, so the reference oracle's --judge_* names are aliases.
    user_vllm_tp: int = field(
        default=1, metadata={"help": "Tensor-parallel size of the user/judge vLLM engine.", "aliases": ["--judge_tp"]}
    )
    user_vllm_gpu_start: int = field(
        default=2,
        metadata={"help": "First visible GPU index of the user/judge vLLM engine.", "aliases": ["--judge_gpu_start"]},
    )
    user_vllm_gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "GPU memory share of the user/judge vLLM engine.",
            "aliases": ["--judge_gpu_memory_utilization"],
        },
    )
    user_dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype of a local transformers user/judge model.", "aliases": ["--judge_dtype"]},
    )
    user_device: str = field(
        default="auto",
        metadata={"help": "Device of a local transformers user/judge model.", "aliases": ["--judge_device"]},
    )
    openai_base_url: str | None = field(
        default_factory=lambda: os.environ.get("OPENAI_BASE_URL"),
        metadata={
            "help": "OpenAI-compatible server of the 'openai' backends (model = --user_model_name_or_path or "
            "--judge_model); default $OPENAI_BASE_URL. Several servers, comma-separated, are used round-robin."
        },
    )
    api_max_concurrency: int = field(default=16, metadata={"help": "Parallel requests to a remote API."})
    api_max_attempts: int = field(
        default=8, metadata={"help": "Attempts per remote request (transient errors only: 429, 5xx, timeouts)."}
    )

    def __post_init__(self):
        if self.judge_model is None:
            local = self.judge_backend in (*LOCAL_JUDGE_BACKENDS, "openai")
            self.judge_model = DEFAULT_LOCAL_JUDGE if local else DEFAULT_ANTHROPIC_MODEL
        if self.api_max_attempts < 1 or self.api_max_concurrency < 1:
            raise ValueError("api_max_attempts and api_max_concurrency must be >= 1")
        if not 0 < self.user_vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"user_vllm_gpu_memory_utilization must be in (0, 1], got {self.user_vllm_gpu_memory_utilization}"
            )
        if self.user_vllm_tp < 1 or self.user_vllm_gpu_start < 0:
            raise ValueError("user_vllm_tp must be >= 1 and user_vllm_gpu_start >= 0")


@dataclass(frozen=True)
class ParticipantsConfig:
    """Who plays the simulated user and the judges.

    Attributes:
        user_styles: personas the simulated user takes (one simulator each; a schedule switches between them).
        judge_styles: personas that judge (one judge each); the first is the primary judge.
        user_backend: ``hf``, ``vllm``, ``openai``, ``anthropic`` or ``rule`` (resolved, never ``auto``).
        judge_backend: ``user`` (the user model's backend), ``anthropic``, ``openai`` or ``rule`` (resolved).
        user_model: the local or served user model (``hf``/``vllm``/``openai`` users and ``user`` judges).
        judge_model: the Claude model, or the served model of an ``openai`` judge.
        The rest: engine placement of a vLLM user, dtype/device of a transformers user, the OpenAI-compatible
        server, and API concurrency and attempts.
    """

    user_styles: tuple[str, ...] = ()
    judge_styles: tuple[str, ...] = ()
    user_backend: str = "rule"
    judge_backend: str = "rule"
    user_model: str | None = None
    judge_model: str = DEFAULT_ANTHROPIC_MODEL
    user_dtype: str = "bfloat16"
    user_device: str = "auto"
    user_vllm_tp: int = 1
    user_vllm_gpu_start: int = 2
    user_vllm_gpu_memory_utilization: float = 0.9
    openai_base_url: str | None = None
    api_max_concurrency: int = 16
    api_max_attempts: int = 8
    protocol: str = "reasoning"  # judge and user prompts (style_judge.PROTOCOLS)

    @classmethod
    def from_args(cls, args: ParticipantsArguments, *, user_styles, judge_styles) -> ParticipantsConfig:
        """``ParticipantsArguments`` with the reference's ``auto`` rules applied."""
        user_backend = args.user_backend
        if user_backend == "auto":
            user_backend = ("vllm" if args.user_vllm else "hf") if args.user_model_name_or_path else "anthropic"
        judge_backend = args.judge_backend
        if judge_backend == "auto":
            judge_backend = "user" if args.judge_local else "anthropic"
        user_model = args.user_model_name_or_path
        if judge_backend in LOCAL_JUDGE_BACKENDS and not user_styles:
            # No simulated user: the judge model takes the user model's place (validate() refuses it beside a user).
            user_backend, judge_backend, user_model = judge_backend, "user", args.judge_model
        if judge_backend == "user" and user_backend in ("rule", "anthropic"):
            judge_backend = user_backend  # the user "model" of these backends is the judge too
        return cls(
            user_styles=unique_styles(user_styles),
            judge_styles=unique_styles(judge_styles),
            user_backend=user_backend,
            judge_backend=judge_backend,
            user_model=user_model,
            judge_model=args.judge_model,
            user_dtype=args.user_dtype,
            user_device=args.user_device,
            user_vllm_tp=args.user_vllm_tp,
            user_vllm_gpu_start=args.user_vllm_gpu_start,
            user_vllm_gpu_memory_utilization=args.user_vllm_gpu_memory_utilization,
            openai_base_url=args.openai_base_url,
            api_max_concurrency=args.api_max_concurrency,
            api_max_attempts=args.api_max_attempts,
        )

    @property
    def uses_vllm(self) -> bool:
        return self.user_backend == "vllm" and (bool(self.user_styles) or self.judge_backend == "user")

    def validate(self) -> None:
        """Raise ``ParticipantsError`` (one line) for settings that cannot work; cheap, before any model loads."""
        if self.judge_backend in LOCAL_JUDGE_BACKENDS:
            raise ParticipantsError(
                f"--judge_backend {self.judge_backend} runs --judge_model only where there is no simulated user; "
                "here use --judge_local (the user model judges) or --judge_backend anthropic/openai/rule"
            )
        needs_user_model = (
            bool(self.user_styles) and self.user_backend in MODEL_BACKENDS
        ) or self.judge_backend == "user"
        if needs_user_model and not self.user_model:
            raise ParticipantsError(
                f"--user_backend {self.user_backend} / a local judge needs --user_model_name_or_path"
                " (or choose --user_backend rule/anthropic)"
            )
        if self.judge_backend == "user" and self.user_backend == "openai":
            raise ParticipantsError(
                "a local judge needs a local user model (hf or vllm); use --judge_backend openai instead"
            )
        if (self.user_backend == "openai" or self.judge_backend == "openai") and not self.openai_base_url:
            raise ParticipantsError(
                "the openai backend needs --openai_base_url (or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1"
            )
        for role, backend, styles in (
            ("user", self.user_backend, self.user_styles),
            ("judge", self.judge_backend, self.judge_styles),
        ):
            unchecked = [s for s in styles if s not in RULE_BASED_STYLES]
            if backend == "rule" and unchecked:
                raise ParticipantsError(
                    f"the rule-based {role} cannot check {', '.join(unchecked)}; rule-based styles: "
                    f"{', '.join(RULE_BASED_STYLES)}"
                )
        if self.api_max_attempts < 1 or self.api_max_concurrency < 1:
            raise ParticipantsError("--api_max_attempts and --api_max_concurrency must be >= 1")

    @property
    def user_label(self) -> str:
        return {"rule": "rule-based", "anthropic": DEFAULT_ANTHROPIC_MODEL}.get(
            self.user_backend, self.user_model or ""
        )

    @property
    def judge_label(self) -> str:
        return {"rule": "rule-based", "anthropic": self.judge_model, "openai": self.judge_model}.get(
            self.judge_backend, "local"
        )


@dataclass
class Participants:
    """One simulated user per user style, one judge per judge style, and labels for the results' meta."""

    simulators: dict[str, UserSimulator] = field(default_factory=dict)
    judges: dict[str, PairwiseJudge] = field(default_factory=dict)
    user_label: str = ""
    judge_label: str = ""

    @property
    def simulator(self) -> UserSimulator:
        """The simulated user of the first (or only) user style."""
        return next(iter(self.simulators.values()))


def _api(config: ParticipantsConfig) -> dict:
    """Keywords of every remote backend: --api_max_attempts counts the first try, the SDKs' max_retries does not."""
    return {"max_concurrency": config.api_max_concurrency, "max_retries": config.api_max_attempts - 1}


def _user_chat_backend(config: ParticipantsConfig) -> tuple[ChatBackend | None, object | None]:
    """The chat backend of a model-based user (None for rule/anthropic users) and its tokenizer."""
    if config.user_backend == "hf":
        backend = HFChatBackend.from_pretrained(config.user_model, dtype=config.user_dtype, device=config.user_device)
        return backend, backend.tokenizer
    if config.user_backend == "vllm":
        from sdpo.chat.backends import VLLMChatBackend
        from sdpo.models.model_loading import load_tokenizer
        from sdpo.models.vllm_engines import build_vllm_engine

        engine = build_vllm_engine(
            config.user_model,
            tensor_parallel_size=config.user_vllm_tp,
            gpu_start=config.user_vllm_gpu_start,
            gpu_memory_utilization=config.user_vllm_gpu_memory_utilization,
        )
        tokenizer = load_tokenizer(config.user_model)
        return VLLMChatBackend(engine, tokenizer=tokenizer, name=f"vllm:{config.user_model}"), tokenizer
    if config.user_backend == "openai":
        backend = OpenAICompatibleBackend(config.user_model, base_url=config.openai_base_url, **_api(config))
        return backend, None
    return None, None


def _simulator(config: ParticipantsConfig, style: str, backend: ChatBackend | None, tokenizer) -> UserSimulator:
    if config.user_backend == "rule":
        return RuleBasedUserSimulator(style)
    if config.user_backend == "anthropic":
        from auxiliary.claude_user_simulator import ClaudeStyleUserSimulator

        return ClaudeStyleUserSimulator(
            style, max_tokens=256, temperature=0.0, protocol=config.protocol, **_api(config)
        )
    greedy = config.user_backend != "hf"  # the reference samples its HF simulator at T=0.7, vLLM/API greedily
    return LLMUserSimulator(
        backend,
        style,
        sampling=SamplingParams(max_new_tokens=128, temperature=0.0 if greedy else 0.7),
        prompt_variant="paper" if config.protocol == "paper" else "default",
        budget=TokenBudget(tokenizer, USER_MAX_INPUT_TOKENS) if tokenizer is not None else None,
    )


def _judge(config: ParticipantsConfig, style: str, user_backend: ChatBackend | None, user_tokenizer) -> PairwiseJudge:
    if config.judge_backend == "rule":
        return RuleBasedJudge(style)
    if config.judge_backend == "anthropic":
        from auxiliary.claude_style_judge import ClaudeStyleJudge

        return ClaudeStyleJudge(style, model=config.judge_model, protocol=config.protocol, **_api(config))
    if config.judge_backend == "openai":
        backend = OpenAICompatibleBackend(config.judge_model, base_url=config.openai_base_url, **_api(config))
        return LLMStyleJudge(backend, style, protocol=config.protocol)
    budget = TokenBudget(user_tokenizer, JUDGE_MAX_INPUT_TOKENS) if user_tokenizer is not None else None
    return LLMStyleJudge(user_backend, style, budget=budget, protocol=config.protocol)


def build_participants(config: ParticipantsConfig) -> Participants:
    """Simulators for ``config.user_styles`` and judges for ``config.judge_styles``; one user model serves all."""
    config.validate()
    needs_user_model = bool(config.user_styles) or config.judge_backend == "user"
    backend, tokenizer = _user_chat_backend(config) if needs_user_model else (None, None)
    participants = Participants(
        simulators={style: _simulator(config, style, backend, tokenizer) for style in config.user_styles},
        judges={style: _judge(config, style, backend, tokenizer) for style in config.judge_styles},
        user_label=config.user_label if config.user_styles else "",
        judge_label=config.judge_label,
    )
    logger.info(
        "user: %s (%s); judge: %s; styles: user %s, judged %s",
        participants.user_label,
        config.user_backend,
        participants.judge_label,
        list(config.user_styles),
        list(config.judge_styles),
    )
    return participants


def check_remote_backends(participants: Participants) -> None:
    """One cheap request per distinct remote backend (key, endpoint, model), before any model loads."""
    backends = {
        id(b): b
        for p in (*participants.simulators.values(), *participants.judges.values())
        if (b := getattr(p, "backend", None))
    }
    for backend in backends.values():
        backend.check()
