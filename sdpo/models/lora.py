"""The one LoRA set-up of the project (online learner, offline trainer, live chat): trainable peft adapters on a
causal LM, fresh or resumed from a saved adapter folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class LoRASetupError(ValueError):
    """The adapters cannot be attached; the message is one line naming the setting to change."""


def attach_lora(
    model,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str],
    resume_from: str | Path | None = None,
):
    """``model`` wrapped in trainable LoRA adapters (no bias, causal-LM task): those saved at ``resume_from``, or
    fresh ones of rank ``r`` and scale ``alpha / r`` on ``target_modules``. peft keeps the adapters in fp32."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LoRASetupError(
            f"LoRA could not be attached ({first_line}); set lora_target_modules to module names of this model"
        ) from None
