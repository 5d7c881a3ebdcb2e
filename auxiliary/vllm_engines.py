"""vLLM engine construction (placeholder home until the GPU branch lands): import check and placement."""

from __future__ import annotations

import importlib.util
import os

from auxiliary.model_loading import resolve_model_path
from auxiliary.vllm_policy import VLLMPolicyEngine  # noqa: F401 - re-exported: the policy engine's home


def require_vllm(wanted_by: list[str]) -> None:
    """Fail before any work when a vLLM option is set but vLLM is not installed."""
    if wanted_by and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"{', '.join(wanted_by)} needs vLLM, which is not installed (pip install -r requirements-vllm.txt, GPU only); drop the option to use transformers")


def build_vllm_engine(model: str, *, tensor_parallel_size: int = 1, gpu_start: int = 0, gpu_memory_utilization: float = 0.9, **engine_kwargs):
    """In-process vLLM engine on GPUs [gpu_start, gpu_start + tensor_parallel_size) of the visible ones."""
    import vllm

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(64)]
    chosen = ids[gpu_start : gpu_start + tensor_parallel_size]
    if len(chosen) < tensor_parallel_size:
        raise ValueError(f"GPU start {gpu_start} with tensor parallel size {tensor_parallel_size} exceeds the visible GPUs ({visible})")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    try:
        return vllm.LLM(model=resolve_model_path(model), tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
