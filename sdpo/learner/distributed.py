"""Data parallelism for the online learner and loop, on accelerate: one object, a no-op in a single process.

Under ``accelerate launch --num_processes N`` (over NCCL on GPUs, over gloo on CPU processes) every process trains
on its share of each interaction batch, in one of two ways (``check_launch`` picks, before any model loads):

* ``ddp`` (default): every process holds the whole policy; ``wrap(model)`` puts it in torch's
  ``DistributedDataParallel`` (through ``Accelerator.prepare_model``) for the scoring forward passes, and the plain
  model stays what generates and is saved.
* ``fsdp2`` (``--parallelism fsdp2``, or an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version:
  2``): ``sdpo.learner.fsdp`` shards the policy with torch's ``fully_shard`` (each decoder layer, then the root), so
  weights, gradients and AdamW state are 1/N per process. Every forward then all-gathers, a collective, so the
  learner runs the same number of micro-batches on every process (a shorter share pads with one-token micro-batches
  of zero weight). HF generation, where processes produce different numbers of tokens, runs on a full
  compute-dtype copy refreshed from the shards after every update; checkpoints gather the full tensors to the main
  process, which writes them in the single-process format. Works on CPU processes too (gloo), unlike accelerate's
  FSDP plugin, which runs plain DDP there. DeepSpeed and FSDP1 configs are refused with one line.

What the learner and the loop use from the process group:

* ``gradient_sync(last)``: a context; under DDP, micro-batches other than a process's last one skip the all-reduce
  (``no_sync``), so each process reduces once per optimizer step whatever number of micro-batches it has (FSDP2
  reduce-scatters every micro-batch instead: holding a full gradient would cost what sharding saves).
* ``sum(x)``, ``max(x)``, ``gather(objects)``, ``broadcast(obj)``, ``shard(items)``, ``wait()``: the collectives the
  loop uses to split interactions and evaluation prompts and to bring results to the main process.

Both average gradients over processes; the learner scales each process's loss by its share of the global batch
(``len(group) * N / total``), so the reduced gradient is the gradient of the global batch mean whatever the
shares: the same step as one process on the whole batch.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from functools import cached_property

import torch

# How long processes wait at a collective for the main process (judging a few hundred prompts with an LLM judge
# takes minutes; torch's default is 10 to 30 minutes).
COLLECTIVE_TIMEOUT = timedelta(hours=3)
SHARDED_LAUNCH_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}


class LaunchError(ValueError):
    """The process launch cannot run the online loop; the message says what to launch instead."""


def launched_world_size() -> int:
    """Processes of this launch as ``accelerate launch``/``torchrun`` set them in the environment (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_sharding() -> str | None:
    """What the accelerate launch's config asks for: ``fsdp2``, ``fsdp1``, ``deepspeed`` or None (DDP/none)."""
    if os.environ.get(SHARDED_LAUNCH_ENV["DeepSpeed"], "").lower() == "true":
        return "deepspeed"
    if os.environ.get(SHARDED_LAUNCH_ENV["FSDP"], "").lower() == "true":
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1").strip() == "2" else "fsdp1"
    return None


def check_launch(config=None) -> str:
    """The parallelism this launch runs (``ddp`` or ``fsdp2``) for the learner ``config`` (an
    ``OnlineSDPOConfig``; None: its defaults), or one ``LaunchError`` line, before any model loads.

    ``config.parallelism`` ``auto`` follows the accelerate config (``distributed_type: FSDP`` with ``fsdp_version:
    2`` means FSDP2, anything else DDP); DeepSpeed and FSDP1 are refused."""
    requested = getattr(config, "parallelism", "auto")
    sharding = launched_sharding()
    if sharding in ("deepspeed", "fsdp1"):
        kind = "DeepSpeed" if sharding == "deepspeed" else "FSDP1 (fsdp_version: 1)"
        raise LaunchError(
            f"the accelerate config asks for {kind}, which the online loop does not run: use an FSDP2 config "
            "(distributed_type: FSDP, fsdp_version: 2) or --parallelism fsdp2, or DDP (multigpu_accelerate_config.yaml)"
        )
    if sharding == "fsdp2" and requested == "ddp":
        raise LaunchError(
            "the accelerate config asks for FSDP2 but --parallelism is ddp: drop --parallelism (auto) or launch "
            "with a DDP config (multigpu_accelerate_config.yaml)"
        )
    return "fsdp2" if "fsdp2" in (requested, sharding) else "ddp"


class DataParallel:
    """This process's place in the launch: rank, world size, device, and the collectives (see the module)."""

    def __init__(self):
        # Only a multi-process launch pays for accelerate's process-group set-up.
        self.world_size = launched_world_size()
        self.rank = int(os.environ.get("RANK", "0") or 0)

    @cached_property
    def accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # broadcast_buffers=False: DDP would otherwise broadcast buffers (rotary tables) at every forward, a
        # collective that deadlocks when processes run different numbers of micro-batches.
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # CPU processes: DDP over gloo (accelerate's MULTI_CPU)
            mixed_precision="no",
            # Processes wait for the main one while it judges or writes (minutes with LLM judges).
            kwargs_handlers=[
                DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT),
            ],
        )
        if accelerator.num_processes != self.world_size:
            raise LaunchError(
                f"WORLD_SIZE={self.world_size} but accelerate set up {accelerator.num_processes} process(es) "
                f"({accelerator.distributed_type}); launch with accelerate launch --num_processes {self.world_size}"
            )
        return accelerator

    def set_up(self) -> None:
        """Set the process group up (the first ``Accelerator`` does; MULTI_CPU over gloo on CPU processes)."""
        if self.distributed:
            _ = self.accelerator

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str | torch.device:
        """The policy's device: under a multi-GPU launch ``auto``/``cuda`` mean this process's own GPU."""
        if self.distributed and requested in ("auto", "cuda") and self.accelerator.device.type != "cpu":
            return self.accelerator.device
        return requested

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DDP under a multi-process launch (it stays on its device), else ``model`` itself."""
        if not self.distributed:
            return model
        return self.accelerator.prepare_model(model, device_placement=False)

    def gradient_sync(self, wrapped: torch.nn.Module, last: bool):
        """Context for one micro-batch's forward and backward: DDP's all-reduce only on the ``last`` one."""
        if not self.distributed or last:
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def join_gradient_sync(self, wrapped: torch.nn.Module, token_id: int, device) -> None:
        """Take part in the gradient all-reduce with a zero gradient (a process with nothing to train on)."""
        logits = wrapped(input_ids=torch.tensor([[token_id]], device=device)).logits
        (logits.float().sum() * 0.0).backward()

    def max(self, value: int) -> int:
        """The largest ``value`` of any process."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        largest = torch.tensor([int(value)], dtype=torch.int64, device=self.accelerator.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest.item())

    def sum(self, value: float) -> float:
        """``value`` summed over processes."""
        if not self.distributed:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(total, reduction="sum").item())

    def gather(self, objects: list) -> list:
        """Every process's ``objects`` (picklable), concatenated in rank order, on every process."""
        if not self.distributed:
            return list(objects)
        from accelerate.utils import gather_object

        self.set_up()
        return gather_object(list(objects))

    def broadcast(self, obj):
        """The main process's ``obj`` (picklable) on every process."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        self.set_up()
        return broadcast_object_list([obj])[0]

    def shard(self, items: list) -> list:
        """This process's contiguous share of ``items`` (sizes differ by at most one; ``gather`` reassembles)."""
        if not self.distributed:
            return list(items)
        per, extra = divmod(len(items), self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return list(items[start : start + per + (self.rank < extra)])

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.distributed:
            self.accelerator.wait_for_everyone()


_current: DataParallel | None = None


def current() -> DataParallel:
    """This process's ``DataParallel`` (one per process: the loop and the learner share its process group)."""
    global _current
    if _current is None:
        _current = DataParallel()
    return _current


def accelerate_cpu_launch(processes: int, script: str, *args: str) -> list[str]:
    """The ``accelerate launch`` command that runs ``script`` as ``processes`` DDP processes on CPU (gloo), as
    ``scripts/eval_online_sdpo.sh`` does for ``WORLD_SIZE=processes`` without a GPU."""
    import sys

    from sdpo.utils.network import free_port

    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), script, *args,
    ]  # fmt: skip
