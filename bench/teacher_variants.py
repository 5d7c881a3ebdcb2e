"""What each teacher kind costs and does, on the same interactions: live, ema, base, trust_region.

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_variants.py                       # CPU preset (LoRA r 16)
    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_variants.py --full_weights        # no LoRA: EMA/base are copies
    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_variants.py --interactions 8 --new_tokens 48

The learner is the CPU preset's (``scripts/quickstart_cpu.sh``: SmolLM2-135M, LoRA r 16, lr 1e-4,
``simple_signal``, 4 interactions per step, 96 new tokens, rule-based user with style ``short``). The initial
policy answers ``--interactions`` everyday prompts (``online_step.PROMPTS`` and eight more, cycled) once and the
rule-based user replies once; every
variant then trains on exactly these (x, y, o) tuples, each in its own fresh process (so peak memory is its own),
with the same seed. Per variant it prints the mean training-step time, the peak resident memory, the parameters
the teacher holds beyond the policy, and the last step's signal (mean A_t, std), the policy's mean token entropy
and the teacher's mean log-prob; then each figure as a ratio to ``live``, measured in the same run. The thread
count, the CPU and the load average are printed (other processes on the machine distort the timings).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import time

from online_step import PROMPTS as STEP_PROMPTS

TEACHERS = ("live", "ema", "base", "trust_region")
STYLE = "short"
PROMPTS = [
    *STEP_PROMPTS,
    "Suggest a weekly plan for learning to cook simple dinners.",
    "Why do cats purr, and what does it mean?",
    "Explain the difference between weather and climate.",
    "Write a polite reply declining a wedding invitation.",
    "How should I prepare for a first marathon?",
    "What is a mortgage and how does interest work on it?",
    "Describe how a bill becomes a law in the United States.",
    "Recommend three board games for a family evening and say why.",
]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--interactions", type=int, default=16)
    parser.add_argument("--interactions_per_step", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument(
        "--full_weights", action="store_true", help="train all weights (EMA and base teachers copy them)"
    )
    parser.add_argument("--teacher_ema_rate", type=float, default=0.05)
    parser.add_argument("--trust_region_mix", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def learner_config(args, teacher: str, checkpoint_dir: str):
    from sdpo.learner.config import OnlineSDPOConfig

    lora = {} if args.full_weights else {"use_lora": True, "lora_r": 16, "lora_alpha": 32}
    return OnlineSDPOConfig(
        model_name_or_path=args.model,
        device="cpu",
        torch_dtype="auto",
        attn_implementation="sdpa",
        loss_mode="simple_signal",
        learning_rate=1e-4,
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=0,
        teacher=teacher,
        teacher_ema_rate=args.teacher_ema_rate,
        trust_region_mix=args.trust_region_mix,
        **lora,
    )


def record_interactions(args) -> list[tuple]:
    """(conversation, token ids, text, follow-up) of the initial policy and the rule-based user, once for all."""
    import tempfile

    from sdpo.evaluation.evaluation_helpers import as_conversation, seed_everything
    from sdpo.learner.updater import OnlineSDPOUpdater
    from sdpo.personas.rule_based_user import RuleBasedUserSimulator

    seed_everything(args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.interactions)]
    with tempfile.TemporaryDirectory() as folder:
        updater = OnlineSDPOUpdater(learner_config(args, "live", folder))
        conversations = [as_conversation(p) for p in prompts]
        generations = updater.generate(conversations)
    follow_ups = RuleBasedUserSimulator(STYLE).generate_feedback(prompts, [g.text for g in generations])
    return [
        (c, list(g.token_ids), g.text, o) for c, g, o in zip(conversations, generations, follow_ups) if g.text.strip()
    ]


def run_variant(args, teacher: str, interactions: list[tuple], results) -> None:
    """Train one teacher kind on the recorded interactions (in a fresh process); put its figures in ``results``."""
    import tempfile

    import torch

    from sdpo.evaluation.evaluation_helpers import seed_everything
    from sdpo.learner.updater import OnlineSDPOUpdater
    from sdpo.models.generation import Generation

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    seed_everything(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        updater = OnlineSDPOUpdater(learner_config(args, teacher, folder))
        step_seconds, metrics = [], {}
        for first in range(0, len(interactions), args.interactions_per_step):
            chunk = interactions[first : first + args.interactions_per_step]
            started = time.perf_counter()
            metrics = updater.train_step_batch(
                [c for c, _, _, _ in chunk],
                [Generation(ids, text, True) for _, ids, text, _ in chunk],
                [o for *_, o in chunk],
            )
            step_seconds.append(time.perf_counter() - started)
    results[teacher] = {
        "step_s": sum(step_seconds) / len(step_seconds),
        "teacher_forward_s": metrics["teacher_forward_time_s"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "extra_params_m": updater.teacher.extra_parameters() / 1e6,
        "signal_mean": metrics["signal_mean"],
        "signal_std": metrics["signal_std"],
        "entropy": metrics["policy_entropy_mean"],
        "teacher_logp": metrics["teacher_logp_mean"],
        "steps": len(step_seconds),
    }


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{cpu}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load}"


def main(argv=None) -> None:
    args = parse_arguments(argv)
    print(f"[bench] before: {machine_line()}")
    started = time.perf_counter()
    interactions = record_interactions(args)
    mode = "full weights" if args.full_weights else "LoRA r 16"
    print(f"[bench] {len(interactions)} interactions recorded in {time.perf_counter() - started:.0f} s ({mode})")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        for teacher in TEACHERS:
            process = context.Process(target=run_variant, args=(args, teacher, interactions, results))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise SystemExit(f"variant {teacher} failed (exit {process.exitcode})")
        results = dict(results)
    live = results["live"]
    header = (
        f"{'teacher':<13}{'step s':>8}{'x live':>8}{'teacher fwd s':>14}{'peak RSS MiB':>14}{'x live':>8}"
        f"{'extra params M':>16}{'signal mean':>13}{'signal std':>12}{'entropy':>9}{'teacher logp':>14}"
    )
    print(header)
    for teacher in TEACHERS:
        r = results[teacher]
        print(
            f"{teacher:<13}{r['step_s']:>8.2f}{r['step_s'] / live['step_s']:>8.2f}{r['teacher_forward_s']:>14.2f}"
            f"{r['peak_rss_mib']:>14.0f}{r['peak_rss_mib'] / live['peak_rss_mib']:>8.2f}{r['extra_params_m']:>16.2f}"
            f"{r['signal_mean']:>13.4f}{r['signal_std']:>12.4f}{r['entropy']:>9.3f}{r['teacher_logp']:>14.3f}"
        )
    print(f"[bench] {live['steps']} steps per variant; last step's statistics; after: {machine_line()}")


if __name__ == "__main__":
    main()
