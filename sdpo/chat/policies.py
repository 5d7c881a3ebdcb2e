"""The policy answering prompts: one home for the online loop, checkpoint evaluation, the oracle and live chat.

A policy is a ``backends.ChatBackend``: ``generate(conversations, sampling) -> list[str]``, one stripped reply
per conversation. Where it comes from:

* ``load_policy(model, adapter=...)``: a transformers model (Hub id, local folder or bundled alias),
  optionally with a LoRA adapter applied unmerged (adapter weights stay fp32 and are computed under autocast,
  as during training; merging into bf16 weights would round small deltas away).
* ``TrainingPolicy(updater)``: the model being trained, through ``OnlineSDPOUpdater.generate`` (transformers,
  or its vLLM engine with the newest adapter hot-swapped in).
* ``backends.VLLMChatBackend``: a vLLM engine; over a ``VLLMPolicyEngine`` (LoRA enabled) ``use_adapter(path)``
  swaps a LoRA adapter in.

``answer`` runs any of them over many conversations in chunks with a progress bar; ``release`` shuts a policy's
vLLM engine down and frees its accelerator memory.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdpo.chat.backends import ChatBackend, HFChatBackend
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import (
    ModelLoadError,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_dtype,
)


def answer(
    policy: ChatBackend, conversations: Sequence[list[dict]], sampling: SamplingParams, *, batch_size: int, label: str
) -> list[str]:
    """The policy's reply to every conversation, ``batch_size`` at a time, in input order."""
    replies: list[str] = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=label, unit="batch", leave=False):
        replies.extend(policy.generate(list(conversations[start : start + batch_size]), sampling))
    return replies


def load_policy(
    model: str,
    *,
    adapter: str | Path | None = None,
    dtype: str = "bfloat16",
    device: str = "auto",
    batch_size: int = 8,
    max_input_tokens: int | None = None,
) -> HFChatBackend:
    """A transformers policy; with ``adapter``, that LoRA adapter applied (unmerged) to ``model``.

    An adapter folder that carries a tokenizer (``save_checkpoint`` stores one) supplies the tokenizer.
    Loading failures raise ``ModelLoadError`` with one line.
    """
    network, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
    name = f"hf:{model}"
    if adapter is not None:
        from peft import PeftModel

        try:
            network = PeftModel.from_pretrained(network, adapter)
        except (OSError, RuntimeError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelLoadError(f"adapter {adapter} could not be applied to {model} ({first_line})") from error
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(str(adapter))
        name = f"hf:{model}+{adapter}"
    compute_dtype = resolve_dtype(dtype)
    mixed = any(p.dtype != compute_dtype for p in network.parameters())
    return HFChatBackend(
        network,
        tokenizer,
        batch_size=batch_size,
        max_input_tokens=max_input_tokens,
        autocast_dtype=compute_dtype if mixed else None,
        name=name,
    )


class TrainingPolicy(ChatBackend):
    """The policy being trained, answering through the updater (its exact generation path)."""

    def __init__(self, updater):
        self.updater = updater
        self.name = f"training:{updater.config.model_name_or_path}"

    def generate(self, conversations: list[list[dict]], sampling: SamplingParams) -> list[str]:
        return [generation.text.strip() for generation in self.updater.generate(conversations, sampling)]


def release(*policies: ChatBackend) -> None:
    """Shut down the vLLM engines of ``policies``, collect what the caller dropped, hand cached GPU memory back."""
    from sdpo.models.vllm_engines import shutdown_engine

    for policy in policies:
        llm = getattr(getattr(policy, "engine", policy), "llm", None)
        if llm is not None:
            shutdown_engine(llm)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
