"""Build the simulated user and the style judges from command-line flags.

Shared by every entry point that talks to a simulated user or a judge (``eval_online_sdpo.py``,
``auxiliary/eval_checkpoints.py``, ``auxiliary/eval_incontext_oracle.py``), so the flags mean the same
everywhere. The reference's rules are the ``auto`` choices:

* user: ``--user_model_name_or_path`` set → a local model (in-process vLLM with ``--user_vllm``, else
  transformers); unset → Claude (``claude-haiku-4-5-20251001``, 256 tokens, temperature 0).
* judge: ``--judge_local`` → the user model's backend; else Claude (``--judge_model``).

Beyond the reference: ``--user_backend``/``--judge_backend`` also accept ``openai`` (any
OpenAI-compatible server, e.g. ``vllm serve``; ``--openai_base_url``) and ``rule`` (the deterministic
rule-based user of ``auxiliary/rule_based_user.py``: no model, no key).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

from auxiliary.backends import DEFAULT_ANTHROPIC_MODEL, ChatBackend, HFChatBackend, OpenAICompatibleBackend, RetryPolicy, TokenBudget
from auxiliary.generation import SamplingParams
from auxiliary.rule_based_user import RuleBasedJudge, RuleBasedUserSimulator
from auxiliary.style_judge import LLMStyleJudge, PairwiseJudge
from auxiliary.user_simulator import LLMUserSimulator, UserSimulator, resolve_style

logger = logging.getLogger(__name__)

USER_BACKENDS = ("auto", "hf", "vllm", "openai", "anthropic", "rule")
JUDGE_BACKENDS = ("auto", "user", "anthropic", "openai", "rule")


def add_participant_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulated-user and judge flags (names and defaults of the reference, plus backends)."""
    group = parser.add_argument_group("simulated user and judge")
    group.add_argument("--user_model_name_or_path", default=None, help="local user-simulator model (HF id, path or alias); unset → Claude")
    group.add_argument("--user_backend", default="auto", choices=USER_BACKENDS, help="who writes the follow-ups; auto = reference rule (see module docstring)")
    group.add_argument("--judge_model", default=DEFAULT_ANTHROPIC_MODEL, help="Claude model of the judge when not local")
    group.add_argument("--judge_local", action="store_true", help="judge with the user-simulator model instead of Claude")
    group.add_argument("--judge_backend", default="auto", choices=JUDGE_BACKENDS, help="who judges; auto = --judge_local ? user : anthropic")
    group.add_argument("--user_vllm", action="store_true", help="run the local user model (and local judge) in an in-process vLLM engine")
    group.add_argument("--user_vllm_tp", type=int, default=1, help="tensor-parallel size of the user vLLM engine")
    group.add_argument("--user_vllm_gpu_start", type=int, default=2, help="first visible GPU index for the user vLLM engine")
    group.add_argument("--user_vllm_gpu_memory_utilization", type=float, default=0.9, help="GPU memory share of the user vLLM engine")
    group.add_argument("--user_dtype", default="bfloat16", help="dtype of a local transformers user model")
    group.add_argument("--user_device", default="auto", help="device of a local transformers user model")
    group.add_argument("--openai_base_url", default=os.environ.get("OPENAI_BASE_URL"), help="OpenAI-compatible server for the 'openai' backends (model = --user_model_name_or_path or --judge_model)")
    group.add_argument("--api_max_concurrency", type=int, default=16, help="parallel requests to a remote API")
    group.add_argument("--api_max_attempts", type=int, default=8, help="attempts per remote request (transient errors only: 429, 5xx, timeouts)")


@dataclass
class Participants:
    """The simulated user, one judge per style, and labels for the results' meta."""

    simulator: UserSimulator | None
    judges: dict[str, PairwiseJudge] = field(default_factory=dict)
    user_label: str = ""
    judge_label: str = ""


def resolve_user_backend(args) -> str:
    if args.user_backend != "auto":
        return args.user_backend
    if args.user_model_name_or_path:
        return "vllm" if args.user_vllm else "hf"
    return "anthropic"


def resolve_judge_backend(args) -> str:
    if args.judge_backend != "auto":
        return args.judge_backend
    return "user" if args.judge_local else "anthropic"


def _require_user_model(args, backend: str) -> str:
    if not args.user_model_name_or_path:
        raise SystemExit(f"error: --user_backend {backend} needs --user_model_name_or_path")
    return args.user_model_name_or_path


def build_vllm_engine(model: str, *, tensor_parallel_size: int = 1, gpu_start: int = 0, gpu_memory_utilization: float = 0.9):
    """In-process vLLM engine on GPUs [gpu_start, gpu_start + tensor_parallel_size) of the visible ones.

    vLLM's engine core runs in a spawned process that reads CUDA_VISIBLE_DEVICES when it starts, so
    the variable is narrowed for the construction and restored afterwards.
    """
    import vllm

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(64)]
    chosen = ids[gpu_start : gpu_start + tensor_parallel_size]
    if len(chosen) < tensor_parallel_size:
        raise SystemExit(f"error: GPU start {gpu_start} with tensor parallel size {tensor_parallel_size} exceeds the visible GPUs ({visible})")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    try:
        return vllm.LLM(model=model, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


def build_user_chat_backend(args, kind: str) -> tuple[ChatBackend | None, object | None]:
    """The chat backend of a model-based user (None for rule/anthropic users) and its tokenizer."""
    if kind == "hf":
        backend = HFChatBackend.from_pretrained(_require_user_model(args, kind), dtype=args.user_dtype, device=args.user_device)
        return backend, backend.tokenizer
    if kind == "vllm":
        from auxiliary.backends import VLLMChatBackend
        from auxiliary.model_loading import load_tokenizer

        tokenizer = load_tokenizer(_require_user_model(args, kind))
        engine = build_vllm_engine(
            args.user_model_name_or_path,
            tensor_parallel_size=args.user_vllm_tp,
            gpu_start=args.user_vllm_gpu_start,
            gpu_memory_utilization=args.user_vllm_gpu_memory_utilization,
        )
        return VLLMChatBackend(engine, tokenizer=tokenizer, name=f"vllm:{args.user_model_name_or_path}"), tokenizer
    if kind == "openai":
        return OpenAICompatibleBackend(
            _require_user_model(args, kind), base_url=args.openai_base_url, max_concurrency=args.api_max_concurrency, retry=_retry(args)
        ), None
    return None, None


def _retry(args) -> RetryPolicy:
    return RetryPolicy(max_attempts=args.api_max_attempts)


def build_participants(args, style: str, eval_styles: list[str]) -> Participants:
    """Simulator for ``style`` and judges for ``style`` + ``eval_styles`` (validated up front)."""
    styles = _unique_styles(style, eval_styles)
    user_kind = resolve_user_backend(args)
    backend, tokenizer = build_user_chat_backend(args, user_kind)
    if user_kind == "rule":
        simulator: UserSimulator = RuleBasedUserSimulator(styles[0])
        user_label = "rule-based"
    elif user_kind == "anthropic":
        from auxiliary.claude_user_simulator import ClaudeStyleUserSimulator

        simulator = ClaudeStyleUserSimulator(
            styles[0], max_tokens=256, temperature=0.0, max_concurrency=args.api_max_concurrency, retry=_retry(args)
        )
        user_label = DEFAULT_ANTHROPIC_MODEL
    else:
        greedy = user_kind != "hf"  # the reference samples its HF simulator at T=0.7, vLLM/API greedily
        simulator = LLMUserSimulator(
            backend,
            styles[0],
            sampling=SamplingParams(max_new_tokens=128, temperature=0.0 if greedy else 0.7),
            budget=TokenBudget(tokenizer, 2048) if tokenizer is not None else None,
        )
        user_label = args.user_model_name_or_path
    judges = build_judges(args, styles, user_backend=backend, user_tokenizer=tokenizer, user_kind=user_kind)
    judges.simulator, judges.user_label = simulator, user_label
    logger.info("user: %s (%s); judge: %s; styles: %s", user_label, user_kind, judges.judge_label, styles)
    return judges


def build_judges(args, styles: list[str], *, user_backend: ChatBackend | None = None, user_tokenizer=None, user_kind: str | None = None) -> Participants:
    """One judge per style, without a simulated user (checkpoint evaluation, the oracle).

    A local judge (``--judge_local`` / ``--judge_backend user``) runs on the user model's backend: the
    one passed in, or one built here from the user flags.
    """
    styles = _unique_styles(styles[0], styles[1:])
    judge_kind = resolve_judge_backend(args)
    if judge_kind == "user":
        kind = user_kind or resolve_user_backend(args)
        if kind in ("rule", "anthropic"):
            judge_kind = kind
        elif user_backend is None:
            user_backend, user_tokenizer = build_user_chat_backend(args, kind)
    judges: dict[str, PairwiseJudge] = {}
    for judge_style in styles:
        if judge_kind == "rule":
            judges[judge_style] = RuleBasedJudge(judge_style)
        elif judge_kind == "anthropic":
            from auxiliary.claude_style_judge import ClaudeStyleJudge

            judges[judge_style] = ClaudeStyleJudge(
                judge_style, model=args.judge_model, max_concurrency=args.api_max_concurrency, retry=_retry(args)
            )
        elif judge_kind == "openai":
            judge_backend = OpenAICompatibleBackend(
                args.judge_model, base_url=args.openai_base_url, max_concurrency=args.api_max_concurrency, retry=_retry(args)
            )
            judges[judge_style] = LLMStyleJudge(judge_backend, judge_style)
        else:
            if user_backend is None:
                raise SystemExit("error: --judge_local / --judge_backend user needs a model-based user (--user_model_name_or_path)")
            judges[judge_style] = LLMStyleJudge(
                user_backend, judge_style, budget=TokenBudget(user_tokenizer, 4096) if user_tokenizer is not None else None
            )
    judge_label = {"rule": "rule-based", "anthropic": args.judge_model, "openai": args.judge_model}.get(judge_kind, "local")
    return Participants(simulator=None, judges=judges, judge_label=judge_label)


def _unique_styles(style: str, others: list[str]) -> list[str]:
    """Canonical style names, primary first, duplicates dropped (unknown names fail here)."""
    styles = [resolve_style(style)]
    for other in others:
        if resolve_style(other) not in styles:
            styles.append(resolve_style(other))
    return styles
