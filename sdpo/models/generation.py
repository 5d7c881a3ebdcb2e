"""Chat rendering and batched sampling with a local Hugging Face model.

One implementation, used by the policy (``OnlineSDPOUpdater``), the local user simulator and judge
(``HFChatBackend``) and the signal analysis. Two rules hold everywhere:

* Every call states its sampling parameters explicitly (``SamplingParams``). transformers fills any
  generation field left unset from the model's ``generation_config.json`` (Qwen3 ships T=0.6,
  top-p 0.95, top-k 20), which silently changes the sampling distribution; here every field that
  shapes the distribution is set, so nothing is inherited.
* The exact sampled token ids travel with the text (``Generation.token_ids``), ending with the stop
  token only when the model emitted one, so scoring never re-tokenizes decoded text.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Passed to every chat template: Qwen3-style templates read it (thinking off, as in the reference);
# templates that do not use the variable ignore it.
DEFAULT_CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one generation call.

    Attributes:
        max_new_tokens: upper bound on generated tokens (the stop token counts).
        temperature: softmax temperature; ``0`` means greedy decoding.
        top_p: nucleus sampling mass; ``1.0`` disables it.
        top_k: keep the k most likely tokens; ``0`` disables it.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_generation_config(self, stop_token_ids: list[int], pad_token_id: int, model_config=None):
        """A GenerationConfig with every distribution-shaping field set (nothing inherited).

        min_p is the one filter transformers applies whenever it is not None (even at 0.0, a full
        softmax per step), so it is neutralised explicitly only when ``model_config`` (the model's
        own generation config) would otherwise supply a value.
        """
        from transformers import GenerationConfig

        inherited_min_p = getattr(model_config, "min_p", None)
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not self.greedy,
            temperature=1.0 if self.greedy else self.temperature,
            top_p=1.0 if self.greedy else self.top_p,
            top_k=0 if self.greedy else self.top_k,
            min_p=0.0 if inherited_min_p is not None else None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad_token_id,
        )


@dataclass
class Generation:
    """One sampled completion.

    Attributes:
        token_ids: the sampled ids, through the stop token inclusive when the model emitted one.
        text: ``token_ids`` decoded with special tokens skipped.
        finished: True when the model emitted a stop token; False when cut at ``max_new_tokens``.
    """

    token_ids: list[int]
    text: str
    finished: bool


def encode_chat(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    max_length: int | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    """Render ``messages`` with the tokenizer's chat template and tokenize without adding specials.

    Longer than ``max_length`` → the oldest tokens are dropped (left truncation), so the end of the
    conversation and the generation prompt survive.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; use an instruct/chat model"
        )
    kwargs = {**DEFAULT_CHAT_TEMPLATE_KWARGS, **(chat_template_kwargs or {})}
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of completions known only as text (logged or offline data): ``text.rstrip()`` + EOS, as an
    assistant turn that ended there; the one text→completion-ids rule of the online and offline learners."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token; the completion cannot be closed")
    return tokenizer([text.rstrip() + tokenizer.eos_token for text in texts], add_special_tokens=False)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any eos ids in the model's generation config (Qwen lists two)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (ids, attention_mask) tensors."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device`` when ``dtype`` is a half type, else a no-op."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


# Prompts prefilled together are padded to at most this multiple of their real tokens (``length_groups``); the
# update's micro-batches (``sdpo.core``) use the same bound.
MAX_PADDING_RATIO = 1.25


def length_groups(lengths: Sequence[int], max_padding_ratio: float = MAX_PADDING_RATIO) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length: sorted, and a new group starts whenever padding every
    member to the group's longest would exceed ``max_padding_ratio`` times their real tokens. A batch of prompts of
    very different lengths would otherwise be padded (and computed) to its longest one."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        candidate = [*current, index]
        if current and len(candidate) * lengths[index] > max_padding_ratio * sum(lengths[i] for i in candidate):
            groups.append(current)
            candidate = [index]
        current = candidate
    if current:
        groups.append(current)
    return groups


@torch.no_grad()
def generate(
    model,
    tokenizer,
    contexts: list[list[int]],
    sampling: SamplingParams,
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    max_padding_ratio: float = MAX_PADDING_RATIO,
    streamer=None,
    adapter_names: list[str] | None = None,
) -> list[Generation]:
    """Sample one completion per context (token-id lists); results come back in input order.

    Contexts are sorted by length and decoded ``batch_size`` at a time. Within a batch, the prompts are prefilled
    in length groups (``length_groups``: each group padded to at most ``max_padding_ratio`` times its real tokens),
    and the groups' KV caches are joined, left-padded and masked, so the whole batch decodes together. The split is
    by cost: a prefill computes every padded position, whereas a decode step reads every weight once whatever the
    batch size, so one decode loop over the batch beats one per group while padding the prefill would not.

    With ``streamer`` (a transformers streamer, which receives the batch's tokens as they are sampled) or
    ``adapter_names`` (PEFT's mixed-adapter batch: one loaded adapter name per context) the contexts run as one
    batch in the given order; with ``adapter_names`` transformers prefills it (PEFT routes the adapters inside
    the model's own forward, which the grouped prefill bypasses).
    """
    if not contexts:
        return []
    if any(len(c) == 0 for c in contexts):
        raise ValueError("cannot generate from an empty context")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    config = sampling.to_generation_config(stops, tokenizer.pad_token_id, getattr(model, "generation_config", None))
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    extra = {}
    if streamer is not None or adapter_names is not None:
        order, batch_size = list(range(len(contexts))), len(contexts)
        extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    results: list[Generation | None] = [None] * len(contexts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [contexts[i] for i in chunk]
            ids, mask = left_pad(batch, tokenizer.pad_token_id)
            with autocast_context(device, autocast_dtype):
                cache = prefill(model, batch, tokenizer.pad_token_id, max_padding_ratio) if not extra else {}
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                    streamer=streamer,
                    **extra,
                    **cache,
                )
            new_tokens = out[:, ids.shape[1] :].tolist()
            for row, index in enumerate(chunk):
                results[index] = _cut_at_stop(new_tokens[row], stops, tokenizer)
    finally:
        model.train(was_training)
    return results


def prefill(model, contexts: list[list[int]], pad_token_id: int, max_padding_ratio: float = MAX_PADDING_RATIO) -> dict:
    """The KV cache of every context but its last token, as ``model.generate`` would build it for ``contexts``
    left-padded to the longest, but computed in length groups, so that a short prompt is not computed at a long
    one's width. Returned as the keyword argument that passes it to ``generate`` (transformers 5.24 renamed
    ``past_key_values`` to ``cache``); empty when no context has more than one token (nothing to reuse).

    Only the decoder runs (no LM head: ``generate`` computes the first logits from the last token). A model whose
    cache is not one plain tensor pair per layer (e.g. sliding-window layers) is prefilled as a single group (or
    left to ``generate`` when a context has a single token).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    prefixes = [c[:-1] for c in contexts]
    width = max(map(len, prefixes))
    if width == 0:
        return {}
    device = next(model.parameters()).device
    config = model.config.get_text_config(decoder=True)
    keyword = _cache_keyword(model)
    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers):
        return {keyword: _decoder_cache(model, prefixes, pad_token_id, device, config)} if all(prefixes) else {}
    groups = length_groups([len(p) for p in prefixes], max_padding_ratio)
    if len(groups) == 1:
        return {keyword: _decoder_cache(model, prefixes, pad_token_id, device, config)}
    # One-token contexts have no prefix: their rows stay zeros, masked like any padding.
    groups = [group for group in groups if prefixes[group[-1]]]
    joined = None
    for group in groups:
        cache = _decoder_cache(model, [prefixes[i] for i in group], pad_token_id, device, config)
        if joined is None:
            joined = [
                (layer.keys.new_zeros(_rows(layer.keys, len(prefixes), width)),
                 layer.values.new_zeros(_rows(layer.values, len(prefixes), width)))
                for layer in cache.layers
            ]  # fmt: skip
        rows = torch.tensor(group, device=device)
        for (keys, values), layer in zip(joined, cache.layers):
            group_width = layer.keys.shape[-2]
            keys[rows, :, width - group_width :] = layer.keys
            values[rows, :, width - group_width :] = layer.values
    return {keyword: DynamicCache(joined, config=config)}


def _cache_keyword(model) -> str:
    """How this transformers version names the cache argument of ``forward`` and ``generate``."""
    return "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"


def _rows(states: torch.Tensor, batch_size: int, width: int) -> tuple[int, ...]:
    """The shape of ``states`` ([group, heads, length, head_dim]) for the whole batch at ``width`` positions."""
    return (batch_size, states.shape[1], width, states.shape[3])


def _decoder_cache(model, prefixes: list[list[int]], pad_token_id: int, device, config):
    """One left-padded forward of the decoder over ``prefixes``, with the positions ``generate`` gives them."""
    from transformers import DynamicCache

    ids, mask = left_pad(prefixes, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=config)
    arguments = {_cache_keyword(model): cache}
    model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **arguments)
    return cache


def _cut_at_stop(tokens: list[int], stops: list[int], tokenizer) -> Generation:
    stop_set = set(stops)
    for position, token in enumerate(tokens):
        if token in stop_set:
            kept = tokens[: position + 1]
            return Generation(kept, tokenizer.decode(kept, skip_special_tokens=True), finished=True)
    return Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), finished=False)


class InferenceCopy:
    """A generation-only twin of a training model whose matmul weights already sit in the compute dtype.

    With fp32 master weights under autocast, every decode step would re-cast every weight matrix to bf16,
    and a LoRA model runs its adapters as extra small matmuls per projection; both are per-token overhead.
    The twin holds each ``nn.Linear`` weight once in ``dtype`` (LoRA deltas merged in, computed in fp32)
    and shares every other tensor (embeddings, norms, biases) with the training model, so it stays
    current for free except for the matmul weights, which ``refresh`` rewrites after an update. A tied
    output head gets its own ``dtype`` copy while the input embedding stays shared. Generating from the
    twin under the training model's autocast does the same arithmetic as generating from the training
    model itself (bf16 casts of the same fp32 values), minus the casts; only merged LoRA differs by
    rounding, since x·(W + ΔW) replaces x·W + x·ΔW. Costs one ``dtype`` copy of the linear weights.
    """

    def __init__(self, model, dtype: torch.dtype):
        lora_layers = _lora_layers(model)
        if lora_layers:
            sources = {_unwrapped_name(name): (module.base_layer, module) for name, module in lora_layers.items()}
        else:
            linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            sources = {name: (module, None) for name, module in linears}
        embedding = model.get_input_embeddings().weight
        tied_head = model.get_output_embeddings() if model.get_output_embeddings().weight is embedding else None
        # deepcopy with every parameter pre-mapped: shared tensors stay shared, linear weights become new ones.
        memo = {id(p): p for p in model.parameters()}
        for linear, _ in sources.values():
            if linear.weight is not embedding:
                fresh = torch.empty_like(linear.weight, dtype=dtype)
                memo[id(linear.weight)] = torch.nn.Parameter(fresh, requires_grad=False)
        twin = copy.deepcopy(model, memo)
        self.model = twin.unload() if lora_layers else twin
        self.model.eval()
        modules = dict(self.model.named_modules())
        self._pairs = [
            (modules[name], linear, lora) for name, (linear, lora) in sources.items() if linear is not tied_head
        ]
        if tied_head is not None and embedding.dtype != dtype:
            head = self.model.get_output_embeddings()
            head.weight = torch.nn.Parameter(torch.empty_like(embedding, dtype=dtype), requires_grad=False)
            self._pairs.append((head, tied_head, None))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rewrite the twin's matmul weights from the training model's current ones."""
        for target, linear, lora in self._pairs:
            if lora is None:
                target.weight.copy_(linear.weight)
            else:
                delta = sum(lora.get_delta_weight(name).float() for name in lora.active_adapters if name in lora.lora_A)
                target.weight.copy_(linear.weight.float() + delta)


def _lora_layers(model) -> dict:
    """peft LoRA layers by module name (empty for a plain model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _unwrapped_name(peft_name: str) -> str:
    """A module's name inside the base model once the peft wrapper (``base_model.model.``) is gone."""
    return peft_name.removeprefix("base_model.model.")
