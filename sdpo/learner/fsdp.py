"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the online learner: sharding, full weights, checkpoints.

Used by ``OnlineSDPOUpdater`` under ``--parallelism fsdp2`` with several processes (see
``sdpo.learner.distributed``). Each decoder layer and then the root model become one FSDP unit: parameters,
gradients and AdamW state live as 1/N shards (``DTensor``), a unit's full weights exist only while it runs.

* ``shard_policy(model)``: the sharding itself. No parameter cast (``MixedPrecisionPolicy`` without
  ``param_dtype``): the all-gathers carry the stored dtype (fp32 master weights, the compute dtype for LoRA's frozen
  base) and the learner's own autocast casts for the matmuls, so the arithmetic is one process's; gradients are
  reduced in fp32.
* ``GenerationTwin``: a plain full copy in the compute dtype for HF generation (processes generate different
  numbers of tokens, and per-layer all-gathers inside ``generate`` would deadlock), refreshed from the shards after
  every update, when all processes are in step anyway (not built where a vLLM server generates).
* ``full_model_state`` / ``full_optimizer_state`` / ``load_optimizer_state``: checkpoints hold the full tensors,
  written by the main process in the single-process format (optimizer state keyed by trainable-parameter order), so
  a checkpoint resumes under 1 process, DDP or FSDP2 alike.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class the model names in ``_no_split_modules`` (as accelerate's
    transformer wrap policy finds them; ``LlamaDecoderLayer``, ``Qwen3DecoderLayer``, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} names no decoder-layer class in _no_split_modules; FSDP2 needs one unit per layer "
            "(use --parallelism ddp)"
        )
    return layers


def shard_policy(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, head); in place, returns ``model``.
    The process group must be up (``DataParallel.set_up``)."""
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process calls it, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class GenerationTwin:
    """A plain (unsharded) copy of the policy in the compute dtype that HF generation runs on.

    Built from the full model before it is sharded: a weight already in the compute dtype is taken over as it is
    (sharding copies the training model's weights into new shard storage, so the full tensor would otherwise be
    freed), any other is cast. ``refresh`` copies the trainable parameters back from their shards (an all-gather
    of each, so every process calls it at the same point: after the optimizer step); frozen weights never change.
    Costs one full copy of the model in the compute dtype per process, the memory generation needs anyway.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        memo = {
            id(p): torch.nn.Parameter(
                p.detach() if p.dtype == dtype or not p.is_floating_point() else p.detach().to(dtype),
                requires_grad=False,
            )
            for p in model.parameters()
        }
        self.model = copy.deepcopy(model, memo)
        self.model.eval()
        self._parameters = dict(self.model.named_parameters())

    @torch.no_grad()
    def refresh(self, sharded: torch.nn.Module) -> None:
        for name, parameter in sharded.named_parameters():
            if parameter.requires_grad:
                self._parameters[name].copy_(full_tensor(parameter.detach()))


def full_model_state(model: torch.nn.Module, *, trainable_only: bool = False) -> dict:
    """The full state dict on the main process (CPU tensors), empty elsewhere; a collective. ``trainable_only``:
    only the parameters that train (a LoRA adapter, without gathering the frozen base). A parameter registered
    under two names (a tied output head) appears once, under its first name, as ``save_pretrained`` writes it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(parameter), name) != name:
            state.pop(name, None)
    return state


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """Trainable parameter names in the order the learner builds its optimizer (``model.parameters()``)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on the main process in ``optimizer.state_dict()`` form (parameters numbered in
    trainable order, as one process saves it), empty elsewhere; a collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]
        ],
    }


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full ``optimizer.state_dict()``-form state (any launch wrote it) into the sharded optimizer; every
    process calls it with the same state."""
    names = _trainable_names(model)
    by_name = {
        "state": {names[i]: copy.copy(value) for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
