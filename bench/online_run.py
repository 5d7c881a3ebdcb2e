"""Benchmark a whole quickstart-sized online run, ours against the reference's path, in one invocation.

    OMP_NUM_THREADS=2 .venv/bin/python bench/online_run.py                 # PRESET=cpu sizes (16 / 4 x 24 / 96 tokens)
    OMP_NUM_THREADS=1 .venv/bin/python bench/online_run.py --train_n 4 --eval_n 8 --eval_every 2 --new_tokens 24

The run is that of ``scripts/quickstart_cpu.sh`` (``scripts/eval_online_sdpo.sh PRESET=cpu``): SmolLM2-135M with
LoRA r 16, lr 1e-4, ``simple_signal``, rule-based user (style ``short``) and judges (``short``, ``no_lists``,
``answer_directly_reduce_formatting``), 16 interactions, an evaluation of 24 prompts before training (the
baseline) and after every 4 interactions, 96 new tokens, seed 1234, MT-Bench prompts. It drives the loop's
library pieces (``OnlineSDPOUpdater``, the rule-based participants) as ``eval_online_sdpo.py`` does, but writes
no results files, so both settings share one process and one machine state:

* ``ours``: bf16 autocast over fp32 adapters where the CPU multiplies bf16 natively (else fp32: emulated bf16 is
  ~100x slower), generation from the inference copy (LoRA merged), evaluation generation batched by 8, fp32
  head on the completion positions only, fused AdamW, and the adapter-sized resume checkpoint that the CLI
  writes after every interaction (``--resume_every 1``).
* ``reference``: the reference implementation's path: fp32 everywhere, batch-1 evaluation generation, logits
  and an fp32 log-softmax over the full vocabulary at every position, per-tensor AdamW, and a checkpoint with
  a merged full model after every step.

Prints per setting the wall time and its phases (training-time generation, training steps, evaluation
generation, judging, checkpoints), its CPU seconds, tokens generated and win rates; then the speed-up in wall and
in CPU seconds, the thread count and the load average (other processes on the machine distort wall times; run on a
quiet machine).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import torch
from online_step import ReferenceStyleScoring, machine_line, use_threads

from sdpo.evaluation.evaluation_helpers import as_conversation, compute_metrics, load_split, seed_everything
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import EmptyResponseError, OnlineSDPOUpdater
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import concrete_dtype, load_tokenizer, resolve_model_path
from sdpo.personas.rule_based_user import RuleBasedJudge, RuleBasedUserSimulator

REPO = Path(__file__).resolve().parents[1]
PHASES = ("train_generation", "train_steps", "eval_generation", "judging", "checkpoints")


def base_config(args, checkpoint_dir: str) -> OnlineSDPOConfig:
    """The PRESET=cpu learner of ``eval_online_sdpo.py`` (its ``build_config`` with the preset's flags)."""
    return OnlineSDPOConfig(
        model_name_or_path=args.model,
        device="cpu",
        torch_dtype=concrete_dtype(args.dtype, "cpu"),
        attn_implementation="sdpa",
        use_lora=True,
        lora_r=16,
        lora_alpha=32,
        loss_mode="simple_signal",
        learning_rate=1e-4,
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        generation_batch_size=8,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=0,
        max_checkpoints=0,
    )


def reference_config(config: OnlineSDPOConfig) -> OnlineSDPOConfig:
    return OnlineSDPOConfig(
        **{
            **config.to_dict(),
            "torch_dtype": "float32",
            "generation_batch_size": 1,
            "inference_copy": False,
            "save_merged_model": True,
            "max_checkpoints": 2,  # bounds disk; every save still writes the merged model
        }
    )


class PhaseClock:
    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def timed(self, phase: str, work, *arguments):
        started = time.perf_counter()
        result = work(*arguments)
        self.seconds[phase] += time.perf_counter() - started
        return result


def run_setting(name: str, config: OnlineSDPOConfig, args, train_prompts, eval_prompts) -> dict:
    """One whole run; returns wall time, phase seconds, token counts and the final win rate."""
    reference = name == "reference"
    seed_everything(args.seed)
    updater = OnlineSDPOUpdater(config)
    if reference:
        updater.optimizer = torch.optim.AdamW(
            updater.trainable_parameters, lr=config.learning_rate, eps=config.adam_epsilon, foreach=False, fused=False
        )
    simulator = RuleBasedUserSimulator(args.style)
    judges = {style: RuleBasedJudge(style) for style in [args.style, *args.eval_styles]}
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    eval_conversations = [as_conversation(p) for p in eval_prompts]
    clock = PhaseClock()
    tokens = {"train": 0, "eval": 0}
    win_rates = []

    def generate_eval() -> list[str]:
        generations = clock.timed("eval_generation", updater.generate, eval_conversations, sampling)
        tokens["eval"] += sum(len(g.token_ids) for g in generations)
        return [g.text.strip() for g in generations]

    def evaluate(baseline: list[str]) -> None:
        current = generate_eval()
        decisions = clock.timed("judging", judges[args.style].choose_batch_generated, eval_prompts, current, baseline)
        for style in args.eval_styles:
            clock.timed("judging", judges[style].choose_batch_generated, eval_prompts, current, baseline)
        win_rates.append(compute_metrics(decisions, seed=args.seed, n_bootstrap=100)["winrate_inc_ties"])

    started, cpu_started = time.perf_counter(), time.process_time()
    with ReferenceStyleScoring() if reference else contextlib.nullcontext():
        baseline = generate_eval()
        for index, prompt in enumerate(train_prompts):
            messages = as_conversation(prompt)
            response = clock.timed("train_generation", updater.generate_response, messages)
            tokens["train"] += len(response.token_ids)
            feedback = simulator.generate_feedback([prompt], [response.text])[0]
            try:
                clock.timed("train_steps", updater.train_step, messages, response, feedback)
            except EmptyResponseError:
                pass
            # The reference saves step_<n> with a merged model after every step; the CLI refreshes its resume one.
            clock.timed(
                "checkpoints",
                updater.save_checkpoint,
                None if reference else "resume",
                {"interactions_done": index + 1},
            )
            if (index + 1) % args.eval_every == 0 or index + 1 == len(train_prompts):
                evaluate(baseline)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        **clock.seconds,
        **{f"{k}_tokens": v for k, v in tokens.items()},
        "win_rates": win_rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy (alias, path or Hub id)")
    parser.add_argument(
        "--data_dir",
        default=str(REPO / "data" / "mtbench_prompts"),
        help="folder with train.jsonl and validation.jsonl",
    )
    parser.add_argument("--train_n", type=int, default=16, help="interactions")
    parser.add_argument("--eval_n", type=int, default=24, help="evaluation prompts")
    parser.add_argument("--eval_every", type=int, default=4, help="evaluate after every n interactions")
    parser.add_argument("--new_tokens", type=int, default=96, help="max new tokens (training and evaluation)")
    parser.add_argument("--style", default="short", help="persona of the rule-based user and primary judge")
    parser.add_argument("--eval_styles", nargs="*", default=["no_lists", "answer_directly_reduce_formatting"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--dtype", default="auto", help="our compute dtype; auto: bfloat16 where the CPU has native bf16, else float32"
    )
    parser.add_argument("--settings", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    args = parser.parse_args()
    data = Path(args.data_dir)
    for split in ("train.jsonl", "validation.jsonl"):
        if not (data / split).is_file():
            raise SystemExit(
                f"error: {data / split} is missing; run scripts/prepare_data_mtbench.sh or pass --data_dir"
            )

    threads = use_threads()
    print(machine_line(threads))
    workdir = Path(tempfile.mkdtemp(prefix="online_run_"))
    try:
        config = base_config(args, str(workdir / "ours"))
        tokenizer = load_tokenizer(resolve_model_path(args.model))
        train_prompts = load_split(
            data / "train.jsonl", tokenizer, args.train_n, max_prompt_tokens=2048, seed=args.seed, label="train"
        )
        eval_prompts = load_split(
            data / "validation.jsonl", tokenizer, args.eval_n, max_prompt_tokens=2048, seed=args.seed, label="eval"
        )
        print(f"our compute dtype: {config.torch_dtype}")
        print(
            f"run: {len(train_prompts)} interactions, evaluation of {len(eval_prompts)} prompts before training and "
            f"every {args.eval_every}, {args.new_tokens} new tokens, style {args.style} "
            f"(+{len(args.eval_styles)} judges), seed {args.seed}"
        )
        settings = {
            "ours": config,
            "reference": reference_config(
                OnlineSDPOConfig(**{**config.to_dict(), "checkpoint_dir": str(workdir / "reference")})
            ),
        }
        results = {}
        for name in args.settings:
            results[name] = run_setting(name, settings[name], args, train_prompts, eval_prompts)
            r = results[name]
            phases = ", ".join(f"{p} {r[p]:.1f}" for p in PHASES)
            generated = r["train_tokens"] + r["eval_tokens"]
            print(
                f"{name:<10} wall {r['wall_s']:7.1f} s  CPU {r['cpu_s']:7.1f} s  ({phases} s)  "
                f"generated {generated} tokens "
                f"({r['train_tokens']} training, {r['eval_tokens']} evaluation)  "
                f"win rates (ties half, %) {r['win_rates']}"
            )
        if len(results) == 2:
            ratio = results["reference"]["wall_s"] / results["ours"]["wall_s"]
            cpu_ratio = results["reference"]["cpu_s"] / results["ours"]["cpu_s"]
            print(
                f"whole-run speed-up over the reference path: {ratio:.2f}x (target >= 3x); in CPU seconds "
                f"{cpu_ratio:.2f}x (other jobs' load inflates wall time only)"
            )
        print(machine_line(threads))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
