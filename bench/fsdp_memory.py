"""Peak memory per process of the online learner: 1 process vs N DDP vs N FSDP2 processes (``--parallelism``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fsdp_memory.py                      # CPU, bundled 135M model, N = 2
    python bench/fsdp_memory.py --model /path/to/model --processes 4 --lora      # any model; LoRA instead of full

Each configuration runs in fresh processes: the policy loads, takes ``--steps`` optimizer steps on a fixed batch of
``--batch_size`` interactions (its share per process), generates ``--new_tokens`` for one prompt, and writes a
checkpoint. Printed per configuration: the peak resident set size of each process (``ru_maxrss``; CPU memory, so
on a GPU machine it measures the host side only) and its ratio to the single process measured in the same run.
What FSDP2 shards (weights, gradients, AdamW moments: ``1/N`` each) is weighed against what it adds per process:
the full compute-dtype twin HF generation runs on, and the full gradients accumulated between reductions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from sdpo.learner.distributed import accelerate_cpu_launch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain TCP in two sentences.",
    "Give me three tips for a job interview.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
]
RESPONSE = "Here is a short answer with a few words, and an exclamation mark at the end!"
FOLLOW_UP = "No exclamation marks, please."


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration: train, generate, save; the main process writes every process's peak RSS."""
    import torch

    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    torch.manual_seed(0)
    config = OnlineSDPOConfig(
        model_name_or_path=args.model,
        device="cpu",
        torch_dtype=args.dtype,
        use_lora=args.lora,
        lora_r=16,
        lora_alpha=32,
        learning_rate=1e-5,
        max_new_tokens=args.new_tokens,
        do_sample=False,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_n_steps=0,
        parallelism=args.parallelism,
    )
    updater = OnlineSDPOUpdater(config)
    parallel = updater.parallel
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    for _ in range(args.steps):
        rows = parallel.shard(batch)
        updater.train_step_batch(
            [[{"role": "user", "content": p}] for p in rows], [RESPONSE] * len(rows), [FOLLOW_UP] * len(rows)
        )
    updater.generate([[{"role": "user", "content": PROMPTS[0]}]])
    updater.save_checkpoint("last")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = parallel.gather([round(peak_mib)])
    if parallel.is_main_process:
        Path(args.out).write_text(json.dumps({"peak_rss_mib": peaks, "sharded": updater.sharded}))


def measure(args: argparse.Namespace, processes: int, parallelism: str, folder: Path) -> dict:
    out = folder / f"{processes}-{parallelism}.json"
    own = [
        "--worker", "--model", args.model, "--dtype", args.dtype, "--steps", str(args.steps),
        "--batch_size", str(args.batch_size), "--new_tokens", str(args.new_tokens), "--parallelism", parallelism,
        "--checkpoint_dir", str(folder / f"ckpt-{processes}-{parallelism}"), "--out", str(out),
        *(["--lora"] if args.lora else []),
    ]  # fmt: skip
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, *own] if processes == 1 else accelerate_cpu_launch(processes, script, *own)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{processes} x {parallelism} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32: no autocast, one weight copy)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=32, help="generated tokens (also the training budget)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (default: full fine-tuning)")
    parser.add_argument("--parallelism", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mode = "LoRA" if args.lora else "full fine-tuning"
    print(f"{args.model}, {mode}, {args.dtype}, batch {args.batch_size}, {args.steps} steps, CPU processes")
    with tempfile.TemporaryDirectory() as folder:
        baseline = None
        for processes, parallelism in ((1, "auto"), (args.processes, "ddp"), (args.processes, "fsdp2")):
            result = measure(args, processes, parallelism, Path(folder))
            peak = max(result["peak_rss_mib"])
            baseline = baseline or peak
            label = "1 process" if processes == 1 else f"{processes} x {parallelism}"
            print(
                f"{label:>12}: peak RSS per process {result['peak_rss_mib']} MiB "
                f"(largest {peak} MiB, {peak / baseline:.2f}x the single process)"
            )


if __name__ == "__main__":
    main()
