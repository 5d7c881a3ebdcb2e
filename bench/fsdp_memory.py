"""Peak memory per process of the online learner: 1 process vs N DDP vs N FSDP2 processes (``--parallelism``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fsdp_memory.py                      # CPU, bundled 135M model, N = 2
    python bench/fsdp_memory.py --model /path/to/model --processes 4 --lora      # any model; LoRA instead of full

Each configuration runs in fresh processes: the policy loads, takes ``--steps`` optimizer steps on a fixed batch of
``--batch_size`` interactions (its share per process), generates ``--new_tokens`` for one prompt, and writes a
checkpoint. Printed per configuration and process: the tensors it holds after training (parameters or their
shards, gradients, AdamW moments, generation copies; each storage counted once) and its peak resident set size
(``ru_maxrss``: CPU memory, so on a GPU machine the host side only), with ratios to the single process measured
in the same run. FSDP2 shards parameters, gradients and AdamW moments (1/N each) and adds the full compute-dtype
copy HF generation runs on.

Every process runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (``--mmap_threshold``, default 64 KiB; 0 leaves
glibc's default): FSDP2 allocates and frees every layer's gathered weights at each forward and backward, and with
glibc's adaptive threshold those blocks end up on the heap, which does not shrink (measured here: +1 GB peak RSS per
process for LoRA on the 135M model).
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
    held = parallel.gather([round(held_tensor_mib(updater))])
    updater.save_checkpoint("last")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = parallel.gather([round(peak_mib)])
    if parallel.is_main_process:
        Path(args.out).write_text(json.dumps({"peak_rss_mib": peaks, "held_mib": held, "sharded": updater.sharded}))


def held_tensor_mib(updater) -> float:
    """MiB of the tensors this process holds for the policy: parameters (this process's shards under FSDP2), their
    gradients, optimizer state, the generation copy (twin or inference copy) and teacher copies; each storage once."""
    import torch
    from torch.distributed.tensor import DTensor

    modules = [updater.model, updater.generation_model(), getattr(updater.teacher, "network", None)]
    modules.append(getattr(updater.teacher, "reference", None))
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
    tensors += [p.grad for p in updater.trainable_parameters if p.grad is not None]
    tensors += [v for state in updater.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


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
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
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
    parser.add_argument("--mmap_threshold", type=int, default=65536, help="glibc MALLOC_MMAP_THRESHOLD_ (0: default)")
    parser.add_argument("--parallelism", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mode = "LoRA" if args.lora else "full fine-tuning"
    threshold = args.mmap_threshold or "glibc default"
    print(f"{args.model}, {mode}, {args.dtype}, batch {args.batch_size}, {args.steps} steps, CPU processes, mmap "
          f"threshold {threshold}")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        baseline = None
        for processes, parallelism in ((1, "auto"), (args.processes, "ddp"), (args.processes, "fsdp2")):
            result = measure(args, processes, parallelism, Path(folder))
            held, peak = max(result["held_mib"]), max(result["peak_rss_mib"])
            baseline = baseline or (held, peak)
            label = "1 process" if processes == 1 else f"{processes} x {parallelism}"
            print(
                f"{label:>12}: tensors held {result['held_mib']} MiB ({held / baseline[0]:.2f}x), "
                f"peak RSS {result['peak_rss_mib']} MiB ({peak / baseline[1]:.2f}x the single process)"
            )


if __name__ == "__main__":
    main()
