"""The online loop under ``accelerate launch``: what each process does with its share, what the main one does alone.

N processes (``WORLD_SIZE=N ./scripts/eval_online_sdpo.sh``; DDP over NCCL on GPUs, gloo on CPU) each hold the
policy. Per optimizer step, each takes a contiguous share of the B interactions (``DataParallel.shard``),
generates its responses, gets their follow-ups from its own user simulator and scores them; the learner
all-reduces the gradients (``sdpo.learner.distributed``), so all processes take the same optimizer step.
Evaluation and baseline prompts are sharded the same way and the answers gathered in order. The main process
alone chooses the run's files, judges, tracks, and writes results, checkpoints and plots; the others wait at the
next collective.

Sampling: every process draws from its own stream, seeded per step from (seed, rank, first interaction), so a
resumed run draws what an uninterrupted one did without storing N random states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sdpo.chat.backends import ChatBackend
from sdpo.chat.policies import answer
from sdpo.evaluation.evaluation_helpers import seed_everything
from sdpo.learner.distributed import DataParallel, current
from sdpo.models.generation import SamplingParams

__all__ = ["DataParallel", "answer_sharded", "current", "on_main_then_shared", "seed_step"]


def answer_sharded(
    parallel: DataParallel,
    policy: ChatBackend,
    conversations: Sequence[list[dict]],
    sampling: SamplingParams,
    *,
    batch_size: int,
    label: str,
) -> list[str]:
    """``answer`` with the conversations split between the processes; every process gets all replies, in order."""
    replies = answer(policy, parallel.shard(list(conversations)), sampling, batch_size=batch_size, label=label)
    return parallel.gather(replies)


def on_main_then_shared(parallel: DataParallel, compute: Callable[[], object]):
    """``compute()`` on the main process, its value (or its exception, re-raised) on every process."""
    outcome: tuple[str, object] = ("value", None)
    if parallel.is_main_process:
        try:
            outcome = ("value", compute())
        except Exception as error:  # noqa: BLE001 (any error is shared, so every process stops with the same line)
            outcome = ("error", error)
    kind, value = parallel.broadcast(outcome)
    if kind == "error":
        raise value
    return value


def seed_step(parallel: DataParallel, seed: int, first: int) -> None:
    """Under several processes: this process's sampling stream for the step starting at interaction ``first``."""
    if parallel.distributed:
        seed_everything(int(np.random.SeedSequence([seed, parallel.rank, first]).generate_state(1)[0]))
