"""Moved: the policy engine lives in ``auxiliary.vllm_engines`` with every other vLLM engine. This name stays
for code that imports it from here."""

from auxiliary.vllm_engines import VLLMPolicyEngine

__all__ = ["VLLMPolicyEngine"]
