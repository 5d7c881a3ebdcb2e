"""In-context oracle: how well does the policy do when it is simply *told* the user's preferences?

An upper-bound baseline with no learning. The policy answers the evaluation prompts twice: once as in
the online loop (the user turn alone: the baseline) and once per style with a system message that
describes that user's persona (the oracle). One judge per style then compares each oracle answer with
the baseline answer to the same prompt, in both orders (a verdict counts only when both agree). The
judge sees the prompt without the system message, exactly as it sees the online loop's answers.

GPU (the reference setup, via the script: Qwen3-8B policy on vLLM, Qwen3-32B judge on a vLLM engine):
    ./scripts/eval_incontext_oracle.sh
CPU (embedded SmolLM2-135M, rule-based judge, 16 MT-Bench prompts, 3 styles; about 80 s on 2 cores):
    PRESET=cpu ./scripts/eval_incontext_oracle.sh
Direct:
    python auxiliary/eval_incontext_oracle.py --model smollm2-135m-instruct --judge_backend rule \
        --styles short no_lists answer_directly_reduce_formatting --val_jsonl data/mtbench_prompts/validation.jsonl \
        --eval_n 16 --max_new_tokens 96 --device cpu --eval_dir runs/oracle_demo

The judge has the flags of every entry point (``ParticipantsArguments``, as in eval_online_sdpo.py). Its
default here is the reference's: ``--judge_backend vllm`` runs ``--judge_model`` (default Qwen/Qwen3-32B)
in-process on GPUs ``--judge_gpu_start`` .. ``+ --judge_tp`` (the reference's names, aliases of
``--user_vllm_gpu_start``/``--user_vllm_tp``: without a simulated user the judge takes the user model's
place); ``hf`` runs it with transformers on ``--judge_device``. Other judges: ``openai`` (an
OpenAI-compatible server at ``--openai_base_url`` serving ``--judge_model``), ``anthropic`` (Claude;
``--judge_model`` defaults to the Haiku snapshot then) and ``rule`` (programmatic checks, rule-based
styles only): the same judges, prompts and verdict parsing as the online loop. A YAML file may hold any
setting by name, and the command line wins over it:
    python auxiliary/eval_incontext_oracle.py --config oracle.yaml --eval_n 16
A bad command line or config file ends with one line and exit status 2, an unusable judge or prompt file
with one line and exit status 1, both before any model loads.

Outputs in ``--eval_dir`` (``<idx>`` = the smallest unused integer >= 1):
    <run_name>_<idx>.json
        meta: method ("incontext_oracle"), model, judge_model, judge_backend, eval_n (used),
              eval_n_requested, val_jsonl, max_prompt_tokens, seed, max_new_tokens, temperature, styles,
              use_vllm, run_name, baseline_avg_completion_len (characters), baseline_gen_time_s,
              settings (every field by name)
        results: {style: {n, wins_a, wins_b, ties, coverage, winrate_a (ties excluded, %), se,
              se_bootstrap, n_effective, winrate_inc_ties (ties as half, %), n_unparsed, judge_time_s}}
              ("a" = the oracle, "b" = the baseline; NaN written as null); one entry per judged style,
              rewritten after each
        oracle_avg_lens: {style: mean characters of the oracle answers}
        oracle_gen_time_s: {style: seconds}
    <run_name>_completions_<idx>.json
        prompts, baseline, oracle ({style: answers}), oracle_system_prompts ({style: system message})

Deliberate differences from the reference: the policy generates with transformers by default, batched
(``--use_vllm`` for the reference's engine on ``--gen_gpu``); the judge can be any backend of the
online loop; the oracle system message is this project's own wording (which moves the numbers); the
persona is introduced as the user's description of themselves, so its "you" is not read as the
assistant; every generation states its sampling parameters; a rule-based judge and missing vLLM are
checked before any work; results are written after every judged style; completions are kept.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdpo.chat.backends import BackendError, ChatBackend, VLLMChatBackend
from sdpo.chat.policies import answer, load_policy, release
from sdpo.evaluation.evaluation_helpers import (
    DataError,
    as_conversation,
    average_chars,
    check_run_name,
    format_style_line,
    judge_against_baseline,
    load_split,
    numbered_results_paths,
    seed_everything,
    write_json_atomic,
)
from sdpo.evaluation.oracle import oracle_answers, oracle_system_prompt
from sdpo.learner.config import check_ranges
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import ModelLoadError, concrete_dtype, load_tokenizer
from sdpo.models.vllm_engines import build_vllm_engine, require_vllm
from sdpo.personas.participants import (
    ParticipantsArguments,
    ParticipantsConfig,
    build_participants,
    check_remote_backends,
)
from sdpo.personas.user_simulator import CORE_STYLES, resolve_style
from sdpo.utils.command_line import ConfigParser, UsageError, settings_record
from sdpo.utils.env_file import load_project_env
from sdpo.utils.file_io import check_output_folder

logger = logging.getLogger("eval_incontext_oracle")

# The reference oracle's judge: Qwen3-32B (ParticipantsArguments' default local judge model) on a vLLM engine.
ORACLE_JUDGE_DEFAULTS = {"judge_backend": "vllm"}


@dataclass
class OracleConfig:
    """The policy, its prompts and personas, and where the results go; the judge is ``ParticipantsArguments``."""

    # ---- policy
    model_name_or_path: str = field(
        default="Qwen/Qwen3-8B",
        metadata={
            "help": "Policy: HF id, local folder or bundled alias (smollm2-135m-instruct).",
            "aliases": ["--model"],
        },
    )
    max_new_tokens: int = field(default=2048, metadata={"help": "Generation budget per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (top-p 1, no top-k; 0 = greedy)."})
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate with an in-process vLLM engine on GPU --gen_gpu (the reference) instead of transformers."
        },
    )
    gen_gpu: int = field(
        default=0,
        metadata={"help": "Visible GPU index of the policy (vLLM engine, or transformers with --device auto)."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "GPU memory share of the policy vLLM engine."}
    )
    device: str = field(
        default="auto",
        metadata={"help": "Transformers policy device; auto = cuda:<gen_gpu> when CUDA is visible, else cpu."},
    )
    dtype: str = field(
        default="bfloat16",
        metadata={"help": "Transformers policy weights dtype (auto: bfloat16 where computed natively, else float32)."},
    )
    generation_batch_size: int = field(
        default=8, metadata={"help": "Prompts per batched generate call (transformers)."}
    )
    # ---- data
    val_jsonl: str = field(
        default="data/tldr_prompts_unique/validation.jsonl",
        metadata={"help": "Evaluation prompts (JSONL with a string field 'prompt')."},
    )
    eval_n: int = field(default=100, metadata={"help": "Number of evaluation prompts."})
    seed: int = field(
        default=1234, metadata={"help": "Prompt selection and sampling seed (1234 = the online loop's subset)."}
    )
    max_prompt_tokens: int = field(
        default=2048,
        metadata={"help": "Drop prompts longer than this once chat-rendered (without the system message)."},
    )
    styles: list[str] = field(
        default_factory=lambda: list(CORE_STYLES),
        metadata={"help": "Personas: one oracle and one judge each (default: the 8 core styles)."},
    )
    # ---- outputs
    eval_dir: str = field(default="eval", metadata={"help": "Where the results and completions files go."})
    run_name: str = field(
        default="incontext_oracle", metadata={"help": "Results file prefix (letters, digits, '.', '_', '-')."}
    )

    def __post_init__(self):
        check_run_name(self.run_name, "--eval_dir")
        if not Path(self.val_jsonl).is_file():
            raise ValueError(f"--val_jsonl {self.val_jsonl}: no such file")
        self.styles = list(dict.fromkeys(resolve_style(style) for style in self.styles))
        if not self.styles:
            raise ValueError("--styles needs at least one style")
        self.dtype = concrete_dtype(self.dtype, self.device)
        check_ranges(self, at_least_one=("eval_n", "max_prompt_tokens", "max_new_tokens", "generation_batch_size"))
        check_ranges(self, non_negative=("temperature",))
        if self.gen_gpu < 0:
            raise ValueError(f"--gen_gpu must be >= 0, got {self.gen_gpu}")
        if not (math.isfinite(self.vllm_gpu_memory_utilization) and 0 < self.vllm_gpu_memory_utilization <= 1):
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        check_output_folder(self.eval_dir, "--eval_dir")


def build_parser() -> ConfigParser:
    parser = ConfigParser((OracleConfig, ParticipantsArguments), description=__doc__)
    parser.set_defaults(**ORACLE_JUDGE_DEFAULTS)
    return parser


def parse_arguments(argv=None) -> tuple[OracleConfig, ParticipantsArguments]:
    """The oracle's and the judge's settings (``--config run.yaml`` may hold any field); one ``UsageError``."""
    return build_parser().parse(argv)


def judge_config(args: OracleConfig, judges: ParticipantsArguments) -> ParticipantsConfig:
    """One judge per style and no simulated user (a vllm/hf judge runs --judge_model in the user model's place)."""
    return ParticipantsConfig.from_args(judges, user_styles=(), judge_styles=args.styles)


def build_policy(args: OracleConfig) -> ChatBackend:
    """The policy: transformers (batched) or an in-process vLLM engine on --gen_gpu."""
    if args.use_vllm:
        engine = build_vllm_engine(
            args.model_name_or_path, gpu_start=args.gen_gpu, gpu_memory_utilization=args.vllm_gpu_memory_utilization
        )
        return VLLMChatBackend(
            engine, tokenizer=load_tokenizer(args.model_name_or_path), name=f"vllm:{args.model_name_or_path}"
        )
    device = f"cuda:{args.gen_gpu}" if args.device == "auto" and torch.cuda.is_available() else args.device
    return load_policy(args.model_name_or_path, dtype=args.dtype, device=device, batch_size=args.generation_batch_size)


def run(
    args: OracleConfig,
    judges: ParticipantsArguments,
    config: ParticipantsConfig,
    results_path: Path,
    completions_path: Path,
) -> dict:
    styles = list(config.judge_styles)
    prompts = load_split(
        args.val_jsonl,
        load_tokenizer(args.model_name_or_path),
        args.eval_n,
        max_prompt_tokens=args.max_prompt_tokens,
        seed=args.seed,
        label="eval",
    )
    if not prompts:
        raise DataError(f"{args.val_jsonl}: no prompts left after filtering to {args.max_prompt_tokens} tokens")
    # A rule or API judge costs nothing to build: build it first so a missing key fails before generation.
    # A local judge model loads only after the policy is gone (the two never share memory).
    participants = None if config.judge_backend == "user" else build_participants(config)
    if participants is not None:
        check_remote_backends(participants)

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0)
    # vLLM schedules a whole list best, so it gets every prompt of a pass in one call.
    batch_size = max(1, len(prompts)) if args.use_vllm else args.generation_batch_size
    policy = build_policy(args)
    seed_everything(args.seed)
    started = time.perf_counter()
    baseline = answer(policy, [as_conversation(p) for p in prompts], sampling, batch_size=batch_size, label="baseline")
    baseline_time = time.perf_counter() - started
    oracle, oracle_times = oracle_answers(policy, prompts, styles, sampling, batch_size=batch_size, seed=args.seed)
    release(policy)
    del policy
    write_json_atomic(
        completions_path,
        {
            "prompts": prompts,
            "baseline": baseline,
            "oracle": oracle,
            "oracle_system_prompts": {s: oracle_system_prompt(s) for s in styles},
        },
    )
    logger.info(
        "baseline mean %.0f chars; oracle: %s",
        average_chars(baseline),
        {s: average_chars(a) for s, a in oracle.items()},
    )

    if participants is None:
        participants = build_participants(config)
    results = {
        "meta": {
            "method": "incontext_oracle",
            "model": args.model_name_or_path,
            "judge_model": participants.judge_label if config.judge_backend == "rule" else judges.judge_model,
            "judge_backend": judges.judge_backend,
            "eval_n": len(prompts),
            "eval_n_requested": args.eval_n,
            "val_jsonl": args.val_jsonl,
            "max_prompt_tokens": args.max_prompt_tokens,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "styles": styles,
            "use_vllm": args.use_vllm,
            "run_name": args.run_name,
            "baseline_avg_completion_len": average_chars(baseline),
            "baseline_gen_time_s": round(baseline_time, 1),
            "settings": settings_record(args, judges),
        },
        "results": {},
        "oracle_avg_lens": {s: average_chars(oracle[s]) for s in styles},
        "oracle_gen_time_s": oracle_times,
    }
    for style in styles:
        results["results"][style] = judge_against_baseline(
            participants.judges[style], prompts, oracle[style], baseline, seed=args.seed
        )
        print(format_style_line(f"oracle | {style}", results["results"][style]))
        write_json_atomic(results_path, results)
    return results


def main(argv=None) -> int:
    """Exit status 2 for a bad command line or config file, 1 for an unusable judge, prompt file or model."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    load_project_env()
    try:
        args, judges = parse_arguments(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        config = judge_config(args, judges)
        config.validate()
        require_vllm(
            [flag for flag, on in (("--use_vllm", args.use_vllm), ("--judge_backend vllm", config.uses_vllm)) if on]
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    results_path, completions_path = numbered_results_paths(args.eval_dir, args.run_name)
    try:
        results = run(args, judges, config, results_path, completions_path)
    except (DataError, ModelLoadError, BackendError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"in-context oracle ({args.model_name_or_path}) vs the same model without the persona; baseline "
        f"{results['meta']['baseline_avg_completion_len']:.0f} chars"
    )
    for style, metrics in results["results"].items():
        print(f"  {format_style_line(style, metrics)} oracle {results['oracle_avg_lens'][style]:.0f} chars")
    print(f"results: {results_path}\ncompletions: {completions_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
