"""The paper's only offline baseline (Table 4): supervised fine-tuning on the logged assistant replies y.

The same prepared (x, y, o) tuples SDPO trains on become TRL conversational prompt-completion rows
(prompt = the history x, completion = the logged reply y; o is not used), trained with TRL's
``SFTTrainer`` (loss on completion tokens only). The optimisation settings are the offline run's own
``TrainingArguments`` fields, copied into an ``SFTConfig``, so ``--method sft`` differs from SDPO in the
loss alone: same data after the same filtering, same batch, schedule, optimizer, launch and checkpoints.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from offline_sdpo.config import OfflineSDPOConfig
from offline_sdpo.data import chat_messages
from sdpo.data.interaction_schema import Interaction


def sft_dataset(interactions: list[Interaction], chat_template_kwargs: dict | None = None) -> Dataset:
    """Prompt-completion rows: x as chat messages, y as one assistant message (thinking off by default)."""
    template_kwargs = {"enable_thinking": False, **(chat_template_kwargs or {})}
    return Dataset.from_list(
        [
            {
                "prompt": chat_messages(interaction.history),
                "completion": [{"role": "assistant", "content": interaction.completion.text.rstrip()}],
                "chat_template_kwargs": template_kwargs,
            }
            for interaction in interactions
        ]
    )


def sft_config(config: OfflineSDPOConfig, weights_dtype: torch.dtype) -> SFTConfig:
    """The offline run's ``TrainingArguments`` as an ``SFTConfig``: sequences up to context + completion
    budget, loss on the completion only. bf16 mixed precision only where fp32 master weights train on a
    GPU (on CPU, and for weights already stored in bf16, the forward runs in the stored dtype)."""
    names = {f.name for f in fields(TrainingArguments) if f.init}
    values = {name: value for name, value in config.to_dict().items() if name in names}
    values["hub_token"] = config.hub_token  # to_dict() masks it
    on_cuda = config.device.type == "cuda"
    values["bf16"] = on_cuda and config.compute_dtype == "bfloat16" and weights_dtype == torch.float32
    values["use_cpu"] = config.use_cpu
    return SFTConfig(
        **values,
        max_length=config.max_context_length + config.max_completion_length,
        completion_only_loss=True,
        dataset_num_proc=None,
    )


class SFTBaselineTrainer(SFTTrainer):
    """``SFTTrainer`` that counts the examples each rank trained on (for ``train_summary.json``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.examples_seen += len(inputs["input_ids"])
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
