"""Full-weight updates of the policy's vLLM engine, in memory (no checkpoint written and re-read).

vLLM runs its model in worker processes, and ``LLM.collective_rpc`` carries the arguments there as msgpack, which
keeps bytes but not tensors. So the training process packs each weight as (name, dtype, shape, raw bytes)
(``pack_weights``), and ``PolicyWeightReceiver`` — mixed into vLLM's worker through the engine's
``worker_extension_cls`` — rebuilds the tensors and hands them to the worker's own ``reload_weights``, vLLM's
in-place weight loading in checkpoint format (fused projections, tied embeddings and sharding handled by the
model's ``load_weights``, as when the engine loaded the checkpoint).

On a GPU the weights travel through host memory (device → host → worker → device): a few seconds per update for
an 8B model. vLLM's CUDA-IPC weight transfer would avoid the host copy; it is not used here because nothing on
this project's CPU machines can test it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

WORKER_EXTENSION = "sdpo.models.vllm_weight_sync.PolicyWeightReceiver"
PackedWeight = tuple[str, str, list[int], bytes]


def pack_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[PackedWeight]:
    """Each weight cast once to ``dtype`` in host memory, as (name, dtype name, shape, raw bytes)."""
    packed = []
    for name, tensor in named_tensors:
        host = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        raw = host.reshape(-1).view(torch.uint8).numpy().tobytes()
        packed.append((name, str(dtype).removeprefix("torch."), list(host.shape), raw))
    return packed


def unpack_weights(packed: Iterable[PackedWeight]) -> list[tuple[str, torch.Tensor]]:
    """The inverse of ``pack_weights``."""
    return [
        (name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape))
        for name, dtype, shape, raw in packed
    ]


class PolicyWeightReceiver:
    """Methods vLLM adds to its worker class (``worker_extension_cls=WORKER_EXTENSION``), called by
    ``collective_rpc``."""

    def receive_policy_weights(self, packed: list[PackedWeight]) -> int:
        """Load the packed weights in place; returns how many tensors arrived."""
        weights = unpack_weights(packed)
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return len(weights)
