"""The policy generating on a vLLM server (``vllm serve``), which gets every new LoRA adapter at runtime.

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank R [--port 8000]
    python eval_online_sdpo.py ... --use_lora --use_vllm --vllm_mode server --vllm_server_url http://HOST:8000

``VLLMServerPolicyEngine`` has the interface of the colocated ``sdpo.models.vllm_engines.VLLMPolicyEngine``:
``generate(contexts, sampling, stop_token_ids)`` sends the chat-rendered token ids (the exact contexts that are
scored) to the server's ``/v1/completions`` with ``return_token_ids`` and returns the sampled ids unchanged;
``load_adapter(path)`` registers the adapter written at ``path`` under a new name through vLLM's runtime LoRA
route ``/v1/load_lora_adapter`` (and unloads the previous one), so the next answers come from the updated policy.
The server must see ``path`` (same machine or shared file system). Requests use the openai SDK and its retries.

``check()`` runs before any model loads: the server answers, serves a base model, and has runtime LoRA updating
enabled (without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` vLLM does not register the route, so it answers 404).
Full fine-tuning would need vLLM's weight-update route and a process group with the server; it is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdpo.chat.backends import BackendError
from sdpo.models.generation import Generation, SamplingParams

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 10.0
PROBE_ADAPTER = "sdpo-runtime-lora-probe"
SERVE_HINT = (
    "start one with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank R` "
    "(R >= --lora_r), or use --vllm_mode colocate"
)


class VLLMServerError(BackendError):
    """The vLLM server cannot serve the policy; the message says what to do."""


def api_root(url: str) -> str:
    """``http://host:port`` from a server URL given with or without ``/v1``."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


class VLLMServerPolicyEngine:
    """The policy on a running vLLM server; ``load_adapter`` swaps in the newest adapter (see the module)."""

    def __init__(
        self,
        url: str,
        *,
        registers_adapters: bool = True,
        max_retries: int = 3,
        timeout: float = 600.0,
        api_key: str | None = None,
    ):
        """``registers_adapters``: this process loads adapters into the server (under a multi-process launch only
        the main process does; the others follow the adapter names)."""
        import openai

        self.sdk = openai
        self.root = api_root(url)
        self.registers_adapters = registers_adapters
        # vLLM checks a key only when started with --api-key; the client insists on having one.
        api_key = api_key or os.environ.get("VLLM_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(
            base_url=f"{self.root}/v1", api_key=api_key, max_retries=max_retries, timeout=timeout
        )
        self.base_model: str | None = None
        self.adapter_version = 0
        self.adapter_name: str | None = None

    @property
    def name(self) -> str:
        return f"vllm-server@{self.root}"

    def check(self) -> None:
        """One ``VLLMServerError`` line unless the server answers, serves a model and can load adapters at runtime."""
        try:
            served = self.client.with_options(max_retries=1, timeout=CHECK_TIMEOUT_S).models.list().data
        except self.sdk.APIConnectionError as error:
            raise VLLMServerError(
                f"--vllm_server_url {self.root}: no server answers ({error.__cause__ or error}); {SERVE_HINT}"
            ) from None
        except self.sdk.APIStatusError as error:
            raise VLLMServerError(
                f"--vllm_server_url {self.root}: GET /v1/models answered HTTP {error.status_code}; is this a vLLM "
                "server?"
            ) from None
        bases = [model.id for model in served if getattr(model, "parent", None) is None]
        if not bases:
            raise VLLMServerError(f"--vllm_server_url {self.root}: the server lists no base model; {SERVE_HINT}")
        self.base_model = bases[0]
        # With runtime LoRA updating on, unloading an unknown adapter is a vLLM error about that adapter; without
        # it the route does not exist and the web framework answers a bare 404 "Not Found".
        if not self._has_runtime_lora_routes():
            raise VLLMServerError(
                f"--vllm_server_url {self.root}: the server has no runtime LoRA loading (/v1/load_lora_adapter); "
                f"restart it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora; {SERVE_HINT}"
            )
        logger.info("policy generation on %s (base model %s, runtime LoRA loading on)", self.root, self.base_model)

    def _has_runtime_lora_routes(self) -> bool:
        """Whether the server has vLLM's runtime LoRA routes: with them, unloading an unknown adapter is a vLLM error
        about that adapter; without them the route does not exist and the web framework answers 404 "Not Found"."""
        import httpx

        try:
            response = httpx.post(
                f"{self.root}/v1/unload_lora_adapter",
                json={"lora_name": PROBE_ADAPTER},
                headers={"Authorization": f"Bearer {self.client.api_key}"},
                timeout=CHECK_TIMEOUT_S,
            )
        except httpx.HTTPError as error:
            raise VLLMServerError(f"--vllm_server_url {self.root}: the LoRA route probe failed ({error})") from None
        if response.status_code != 404:
            return True
        try:
            return response.json() != {"detail": "Not Found"}
        except ValueError:
            return True

    def load_adapter(self, path: str | Path) -> None:
        """Answer with the adapter saved at ``path`` from the next call on (registered on the server by the main
        process; the previous version is unloaded)."""
        self.adapter_version += 1
        name = f"sdpo-policy-v{self.adapter_version}"
        if self.registers_adapters:
            self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
            if self.adapter_name is not None:
                self._post("unload_lora_adapter", {"lora_name": self.adapter_name})
        self.adapter_name = name

    def _post(self, route: str, body: dict) -> None:
        try:
            self.client.post(f"/{route}", body=body, cast_to=str)
        except self.sdk.APIError as error:
            detail = getattr(error, "message", None) or str(error)
            raise VLLMServerError(
                f"{self.name}: POST /v1/{route} failed ({detail}); the server must run with --enable-lora, "
                "--max-lora-rank >= --lora_r, and see the adapter folder (same machine or shared file system)"
            ) from None

    def generate(
        self, contexts: list[list[int]], sampling: SamplingParams, stop_token_ids: list[int]
    ) -> list[Generation]:
        """One completion per token-id context, from the newest adapter (or the base model before the first)."""
        if not contexts:
            return []
        import torch

        extra_body = {
            "return_token_ids": True,
            "stop_token_ids": list(stop_token_ids),
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "skip_special_tokens": True,
        }
        try:
            response = self.client.completions.create(
                model=self.adapter_name or self.base_model,
                prompt=[list(ids) for ids in contexts],
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                # Drawn from the run's torch stream, so a seeded (or resumed) run asks for the same samples.
                seed=int(torch.randint(0, 2**31 - 1, ()).item()),
                extra_body=extra_body,
            )
        except self.sdk.APIError as error:
            detail = getattr(error, "message", None) or str(error)
            raise VLLMServerError(f"{self.name}: generation failed ({detail}); continue with --resume") from None
        generations = [None] * len(contexts)
        for choice in response.choices:
            ids = list(getattr(choice, "token_ids", None) or [])
            finished = choice.finish_reason == "stop"
            # As the colocated engine: the stop token is part of y when it was sampled.
            if finished and (not ids or ids[-1] not in stop_token_ids):
                ids.append(stop_token_ids[0])
            generations[choice.index] = Generation(ids, choice.text, finished)
        return generations

    def close(self) -> None:
        """Unload the adapter this run registered (the server keeps running)."""
        if self.registers_adapters and self.adapter_name is not None:
            try:
                self._post("unload_lora_adapter", {"lora_name": self.adapter_name})
            except VLLMServerError as error:
                logger.warning("%s", error)
        self.client.close()
