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

The judge: ``--judge_model`` (default Qwen/Qwen3-32B, as the reference) is a *local* model, run by
``--judge_backend vllm`` (default, the reference: an in-process engine on GPUs ``--judge_gpu_start`` ..
``+ --judge_tp``) or ``hf`` (transformers on ``--judge_device``). Other judges: ``openai`` (an
OpenAI-compatible server at ``--openai_base_url`` serving ``--judge_model``), ``anthropic`` (Claude;
``--judge_model`` defaults to the Haiku snapshot then) and ``rule`` (programmatic checks, rule-based
styles only). These map onto the judge of ``auxiliary/participants.py`` — the same judges, prompts and
verdict parsing as the online loop (a local judge is the "user model" judge, ``--judge_local``).

Outputs in ``--eval_dir`` (``<idx>`` = the smallest unused integer >= 1):
    <run_name>_<idx>.json
        meta: method ("incontext_oracle"), model, judge_model, judge_backend, eval_n (used),
              eval_n_requested, val_jsonl, max_prompt_tokens, seed, max_new_tokens, temperature, styles,
              use_vllm, run_name, baseline_avg_completion_len (characters), baseline_gen_time_s
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

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from sdpo.chat.backends import (
    DEFAULT_ANTHROPIC_MODEL,
    BackendError,
    ChatBackend,
    VLLMChatBackend,
)
from sdpo.utils.command_line import ArgumentParser
from sdpo.utils.env_file import load_project_env
from sdpo.evaluation.evaluation_helpers import (
    DataError,
    as_conversation,
    average_chars,
    format_style_line,
    judge_against_baseline,
    load_split,
    next_run_index,
    seed_everything,
    write_json_atomic,
)
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import ModelLoadError, concrete_dtype, load_tokenizer
from sdpo.evaluation.oracle import oracle_answers, oracle_system_prompt
from sdpo.personas.participants import ParticipantsConfig, build_participants, check_remote_backends, style_name
from sdpo.chat.policies import answer, load_policy, release
from sdpo.personas.user_simulator import CORE_STYLES
from sdpo.models.vllm_engines import build_vllm_engine, require_vllm

logger = logging.getLogger("eval_incontext_oracle")

DEFAULT_LOCAL_JUDGE = "Qwen/Qwen3-32B"
JUDGE_BACKENDS = ("vllm", "hf", "openai", "anthropic", "rule")
LOCAL_JUDGE_BACKENDS = ("vllm", "hf")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    # ---- policy
    policy = parser.add_argument_group("policy")
    policy.add_argument("--model", default="Qwen/Qwen3-8B", help="policy: HF id, local folder or bundled alias (smollm2-135m-instruct)")
    policy.add_argument("--max_new_tokens", type=int, default=2048, help="generation budget per answer")
    policy.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (top-p 1, no top-k; 0 = greedy)")
    policy.add_argument("--use_vllm", action="store_true", help="generate with an in-process vLLM engine on GPU --gen_gpu (the reference) instead of transformers")
    policy.add_argument("--gen_gpu", type=int, default=0, help="visible GPU index of the policy (vLLM engine, or transformers with --device auto)")
    policy.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.9, help="GPU memory share of the policy vLLM engine")
    policy.add_argument("--device", default="auto", help="transformers policy device; auto = cuda:<gen_gpu> when CUDA is visible, else cpu")
    policy.add_argument("--dtype", default="bfloat16", help="transformers policy weights dtype (auto: bfloat16 where computed natively, else float32)")
    policy.add_argument("--generation_batch_size", type=int, default=8, help="prompts per batched generate call (transformers)")
    # ---- data
    data = parser.add_argument_group("data")
    data.add_argument("--val_jsonl", default="data/tldr_prompts_unique/validation.jsonl", help="evaluation prompts (JSONL with a string field 'prompt')")
    data.add_argument("--eval_n", type=int, default=100, help="number of evaluation prompts")
    data.add_argument("--seed", type=int, default=1234, help="prompt selection and sampling seed (1234 = the online loop's subset)")
    data.add_argument("--max_prompt_tokens", type=int, default=2048, help="drop prompts longer than this once chat-rendered (without the system message)")
    data.add_argument("--styles", nargs="+", type=style_name, default=list(CORE_STYLES), help="personas: one oracle and one judge each (default: the 8 core styles)")
    # ---- judge
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge_backend", default="vllm", choices=JUDGE_BACKENDS, help="who judges: a local --judge_model on vllm or hf, an openai-compatible server, anthropic, or rule")
    judge.add_argument("--judge_model", default=None, help=f"judge model (default {DEFAULT_LOCAL_JUDGE}; {DEFAULT_ANTHROPIC_MODEL} with --judge_backend anthropic)")
    judge.add_argument("--judge_gpu_start", type=int, default=2, help="first visible GPU index of the vLLM judge engine")
    judge.add_argument("--judge_tp", type=int, default=1, help="tensor-parallel size of the vLLM judge engine")
    judge.add_argument("--judge_gpu_memory_utilization", type=float, default=0.9, help="GPU memory share of the vLLM judge engine")
    judge.add_argument("--judge_device", default="auto", help="device of a transformers judge")
    judge.add_argument("--judge_dtype", default="bfloat16", help="dtype of a transformers judge")
    judge.add_argument("--openai_base_url", default=os.environ.get("OPENAI_BASE_URL"), help="server of the openai judge backend")
    judge.add_argument("--api_max_concurrency", type=int, default=16, help="parallel requests to a remote judge API")
    judge.add_argument("--api_max_attempts", type=int, default=8, help="attempts per remote request (transient errors only)")
    # ---- outputs
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--eval_dir", default="eval", help="where the results and completions files go")
    outputs.add_argument("--run_name", default="incontext_oracle", help="results file prefix")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.judge_model is None:
        args.judge_model = DEFAULT_ANTHROPIC_MODEL if args.judge_backend == "anthropic" else DEFAULT_LOCAL_JUDGE
    return args


def judge_config(args) -> ParticipantsConfig:
    """The oracle's judge flags as a ``ParticipantsConfig`` without a simulated user.

    A local judge (vllm/hf) is the participants' "user model" judge: the judge model is the user model, and
    the engine/device flags move over. The other backends map one to one.
    """
    local = args.judge_backend in LOCAL_JUDGE_BACKENDS
    return ParticipantsConfig(
        judge_styles=tuple(dict.fromkeys(args.styles)),
        user_backend=args.judge_backend if local else "rule",
        judge_backend="user" if local else args.judge_backend,
        user_model=args.judge_model if local else None,
        judge_model=args.judge_model,
        user_dtype=args.judge_dtype,
        user_device=args.judge_device,
        user_vllm_tp=args.judge_tp,
        user_vllm_gpu_start=args.judge_gpu_start,
        user_vllm_gpu_memory_utilization=args.judge_gpu_memory_utilization,
        openai_base_url=args.openai_base_url,
        api_max_concurrency=args.api_max_concurrency,
        api_max_attempts=args.api_max_attempts,
    )


def build_policy(args) -> ChatBackend:
    """The policy: transformers (batched) or an in-process vLLM engine on --gen_gpu."""
    if args.use_vllm:
        engine = build_vllm_engine(args.model, gpu_start=args.gen_gpu, gpu_memory_utilization=args.vllm_gpu_memory_utilization)
        return VLLMChatBackend(engine, tokenizer=load_tokenizer(args.model), name=f"vllm:{args.model}")
    device = f"cuda:{args.gen_gpu}" if args.device == "auto" and torch.cuda.is_available() else args.device
    return load_policy(args.model, dtype=args.dtype, device=device, batch_size=args.generation_batch_size)


def run(args, config: ParticipantsConfig, results_path: Path, completions_path: Path) -> dict:
    styles = list(config.judge_styles)
    prompts = load_split(args.val_jsonl, load_tokenizer(args.model), args.eval_n, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, label="eval")
    if not prompts:
        raise DataError(f"{args.val_jsonl}: no prompts left after filtering to {args.max_prompt_tokens} tokens")
    # A rule or API judge costs nothing to build: build it first so a missing key fails before generation.
    # A local judge model loads only after the policy is gone (the two never share memory).
    participants = None if args.judge_backend in LOCAL_JUDGE_BACKENDS else build_participants(config)
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
        {"prompts": prompts, "baseline": baseline, "oracle": oracle, "oracle_system_prompts": {s: oracle_system_prompt(s) for s in styles}},
    )
    logger.info("baseline mean %.0f chars; oracle: %s", average_chars(baseline), {s: average_chars(a) for s, a in oracle.items()})

    if participants is None:
        participants = build_participants(config)
    results = {
        "meta": {
            "method": "incontext_oracle",
            "model": args.model,
            "judge_model": participants.judge_label if args.judge_backend == "rule" else args.judge_model,
            "judge_backend": args.judge_backend,
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
        },
        "results": {},
        "oracle_avg_lens": {s: average_chars(oracle[s]) for s in styles},
        "oracle_gen_time_s": oracle_times,
    }
    for style in styles:
        results["results"][style] = judge_against_baseline(participants.judges[style], prompts, oracle[style], baseline, seed=args.seed)
        print(format_style_line(f"oracle | {style}", results["results"][style]))
        write_json_atomic(results_path, results)
    return results


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load_project_env()
    args = parse_args(argv)
    args.dtype = concrete_dtype(args.dtype, args.device)
    try:
        config = judge_config(args)
        config.validate()
        require_vllm([flag for flag, on in (("--use_vllm", args.use_vllm), ("--judge_backend vllm", args.judge_backend == "vllm")) if on])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    eval_dir = Path(args.eval_dir)
    index = next_run_index(eval_dir, args.run_name)
    results_path = eval_dir / f"{args.run_name}_{index}.json"
    completions_path = eval_dir / f"{args.run_name}_completions_{index}.json"
    try:
        results = run(args, config, results_path, completions_path)
    except (DataError, ModelLoadError, BackendError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"in-context oracle ({args.model}) vs the same model without the persona; baseline {results['meta']['baseline_avg_completion_len']:.0f} chars")
    for style, metrics in results["results"].items():
        print(f"  {format_style_line(style, metrics)} oracle {results['oracle_avg_lens'][style]:.0f} chars")
    print(f"results: {results_path}\ncompletions: {completions_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
