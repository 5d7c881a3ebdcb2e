"""Worker of tests/test_online_distributed.py: a few online SDPO steps on fixed interactions, this process's share.

    python tests/distributed_worker.py MODEL_DIR OUT.pt CHECKPOINT_DIR                       # one process
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no tests/distributed_worker.py MODEL_DIR OUT.pt CHECKPOINT_DIR      # two (gloo on CPU)
    ... tests/distributed_worker.py MODEL_DIR OUT.pt CHECKPOINT_DIR fsdp2 [TEACHER [DTYPE]]  # two, FSDP2

Each step's global batch is split between the processes (``DataParallel.shard``); the last step's batch has one
interaction, so a second process trains on nothing and only joins the gradient reduction. The main process
writes every step's metrics and the trained weights (LoRA and full fine-tuning) to OUT.pt. After the last step
it saves a checkpoint, takes one more step, and a second updater resumed from that checkpoint takes the same step
(``resumed``: its metrics and weights, to compare with the continued run's).
"""

import sys

import torch

from sdpo.learner import distributed
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.fsdp import full_tensor
from sdpo.learner.updater import OnlineSDPOUpdater

PROMPTS = [
    "Explain TCP in two sentences.",
    "Give me three tips for a job interview, with a short reason for each tip and an example of what to say.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet river at dusk.",
]
RESPONSES = [
    "TCP is a reliable, ordered transport protocol. It retransmits lost packets!",
    "1. Prepare.\n2. Listen.\n3. Ask questions.",
    "Paris, of course! It is the capital and largest city of France.",
    "Leaves drift on the stream / the river hums in amber / dusk folds the water",
]
FOLLOW_UPS = ["Too long.", "No lists, please.", "Skip the exclamation marks.", "Shorter."]
# Global batch sizes per step: uneven shares, then one interaction for two processes.
STEP_BATCHES = [[0, 1, 2, 3], [3, 0, 1], [2]]


def train(model_dir: str, checkpoint_dir: str, *, use_lora: bool, parallelism: str, teacher: str, dtype: str) -> dict:
    torch.manual_seed(0)
    config = OnlineSDPOConfig(
        model_name_or_path=model_dir,
        device="cpu",
        torch_dtype=dtype,
        use_lora=use_lora,
        lora_r=8,
        lora_alpha=16,
        learning_rate=5e-2 if use_lora else 1e-2,
        max_new_tokens=64,
        max_context_length=256,
        do_sample=False,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=0,
        parallelism=parallelism,
        teacher=teacher,
        # A visible EMA step and trust-region blend (the defaults would keep both near the base model).
        teacher_ema_rate=0.5,
        trust_region_mix=0.5,
    )
    updater = OnlineSDPOUpdater(config)
    parallel = updater.parallel
    initial = trainable_weights(updater)

    def step(learner: OnlineSDPOUpdater, batch: list[int]) -> dict:
        rows = parallel.shard(batch)
        done = learner.train_step_batch(
            [[{"role": "user", "content": PROMPTS[i]}] for i in rows],
            [RESPONSES[i] for i in rows],
            [FOLLOW_UPS[i] for i in rows],
        )
        return {"loss": done["loss"], "grad_norm": done["grad_norm"], "shares": parallel.gather([len(rows)])}

    metrics = [step(updater, batch) for batch in STEP_BATCHES]
    weights = trainable_weights(updater)
    last = updater.save_checkpoint("last")
    continued = step(updater, STEP_BATCHES[0])
    resumed_updater = OnlineSDPOUpdater(config, resume_from=last)
    resumed = step(resumed_updater, STEP_BATCHES[0])
    # Generation reads the full weights (under FSDP2 a twin refreshed from the shards): greedy, so comparable.
    answer = resumed_updater.generate([[{"role": "user", "content": PROMPTS[0]}]])[0].token_ids
    return {
        "metrics": metrics,
        "initial": initial,
        "weights": weights,
        "continued": {**continued, "weights": trainable_weights(updater)},
        "resumed": {**resumed, "weights": trainable_weights(resumed_updater), "step": resumed_updater.step},
        "answer": answer,
        "world_size": parallel.world_size,
        "learning_rate": config.learning_rate,
        "sharded": updater.sharded,
    }


def trainable_weights(updater: OnlineSDPOUpdater) -> dict:
    """Every trainable weight, whole (under FSDP2 gathered from the shards: every process calls this)."""
    return {name: full_tensor(p.detach()).clone() for name, p in updater.model.named_parameters() if p.requires_grad}


def main(
    model_dir: str,
    out: str,
    checkpoint_dir: str,
    parallelism: str = "auto",
    teacher: str = "live",
    dtype: str = "float32",
) -> None:
    results = {
        mode: train(
            model_dir,
            f"{checkpoint_dir}/{mode}",
            use_lora=mode == "lora",
            parallelism=parallelism,
            teacher=teacher,
            dtype=dtype,
        )
        for mode in ("lora", "full")
    }
    if distributed.current().is_main_process:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:7])
