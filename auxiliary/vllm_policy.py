"""Policy generation with an in-process vLLM engine, following the LoRA adapter being trained.

The transformers model trains; after every update its LoRA adapter is written to a folder and the
next generation call loads it under a fresh integer id (vLLM caches adapters by id). Prompts go in as
token ids rendered by ``auxiliary.generation.encode_chat``, so the policy sees exactly the contexts
that are scored, and the sampled token ids come back unchanged.

Targets vLLM >= 0.11 (``vllm.LLM(enable_lora=True, max_lora_rank=...)``, ``LLM.generate`` with
``{"prompt_token_ids": ...}`` prompts and ``lora_request=vllm.lora.request.LoRARequest(name, id, path)``).
"""

from __future__ import annotations

from pathlib import Path

from auxiliary.backends import vllm_sampling_params
from auxiliary.generation import Generation, SamplingParams


class VLLMPolicyEngine:
    """Generates for the policy with vLLM; ``load_adapter`` points it at the latest trained adapter."""

    def __init__(self, model_name_or_path: str, tokenizer, *, max_lora_rank: int, gpu_memory_utilization: float, dtype: str, max_model_len: int, seed: int = 0):
        import vllm

        self.llm = vllm.LLM(
            model=model_name_or_path,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
        )
        self.tokenizer = tokenizer
        self.adapter_path: Path | None = None
        self.adapter_version = 0

    def load_adapter(self, path: Path) -> None:
        """Use the adapter saved at ``path`` from the next call on."""
        self.adapter_path = Path(path)
        self.adapter_version += 1

    def generate(self, contexts: list[list[int]], sampling: SamplingParams, stop_token_ids: list[int]) -> list[Generation]:
        lora_request = None
        if self.adapter_path is not None:
            from vllm.lora.request import LoRARequest

            lora_request = LoRARequest(f"policy_v{self.adapter_version}", self.adapter_version, str(self.adapter_path))
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in contexts], vllm_sampling_params(sampling), lora_request=lora_request, use_tqdm=False
        )
        generations = []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            finished = completion.finish_reason == "stop"
            # vLLM keeps the sampled stop token in token_ids; guard against versions that drop it.
            if finished and (not ids or ids[-1] not in stop_token_ids):
                ids.append(self.tokenizer.eos_token_id)
            generations.append(Generation(ids, self.tokenizer.decode(ids, skip_special_tokens=True), finished))
        return generations
