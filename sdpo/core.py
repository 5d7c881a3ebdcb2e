"""The SDPO math, in one place: hindsight contexts, per-token scoring, and the two loss modes.

Online training, offline training and the signal analysis all call these functions.

Notation (paper Eq. 1): x is the conversation up to the latest user turn, y the assistant response,
o the user's next message. With one network π and the hindsight context x⊕o (o placed into x by a
template), the per-token signal is

    A_t = log π(y_t | x⊕o, y_<t) − log π(y_t | x, y_<t)            (teacher minus student)

Loss modes:
  * ``simple_signal``  — the paper's sampled-token policy gradient: L = −mean_t stopgrad(A_t)·log π(y_t|x,y_<t),
    A_t optionally clipped to ±signal_clip; per-sequence token mean, then batch mean.
  * ``full_distillation`` — the reference's default: reverse KL(student ‖ teacher) restricted to the
    student's top-K tokens at each position plus one "tail" bucket holding the remaining mass (or,
    without the tail, the top-K renormalised); per-sequence token mean, then batch mean.

Scoring conventions: contexts are left-padded, completions right-padded, position ids follow the
attention mask. A too-long x loses the same oldest tokens in the student and the teacher context
(``encode_hindsight_contexts``), never o or y. The output head runs in fp32 (autocast off) on the
completion positions only, on the decoder's hidden states, and the log-softmax in fp32, in chunks of
sequences small enough that a large vocabulary never materialises more than ``FP32_LOGIT_ELEMENTS``
fp32 logits at once; logits are divided by the sampling temperature first (T = 1 by default).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

# length_groups (and its bound) live with generation, which groups prompts the same way; the update imports them here.
from sdpo.models.generation import MAX_PADDING_RATIO, autocast_context, encode_chat, length_groups  # noqa: F401

# --------------------------------------------------------------------------------------------------
# Hindsight contexts
# --------------------------------------------------------------------------------------------------

FOLLOW_UP_SLOT = "{follow_up}"

HINDSIGHT_AFTER_REPLY_TEMPLATE = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[What follows is the next message this user will send after reading your reply. "
    "Let it shape how you answer the request above.]\n"
    "{follow_up}"
)
# Table 1's framing: o is a future message of the user that should guide the answer; it does not say that o
# reacts to the answer, so an unrelated o need not read as feedback.
HINDSIGHT_FUTURE_MESSAGE_TEMPLATE = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[Below is a message this user will send in the future. Use it to guide your answer to the request above.]\n"
    "{follow_up}"
)
# The default by measurement (auxiliary/sdpo_signal_analysis.py, bundled cases, SmolLM2-135M, 12 cases, same
# answers): mean |A_t| on unrelated follow-ups 0.298 (future message) vs 0.305 (after reply), on relevant ones
# 0.246 vs 0.250, and the part due to the follow-up's content, mean |A_rel − A_unrel|, 0.238 vs 0.234. The
# differences are within noise at 135M; the paper's framing does not lose on relevant follow-ups, so it is used.
HINDSIGHT_ONLINE_TEMPLATE = HINDSIGHT_FUTURE_MESSAGE_TEMPLATE
HINDSIGHT_OFFLINE_V1_TEMPLATE = (
    "\n\n[HINDSIGHT CONTEXT]\n"
    "An earlier assistant reply to this request fell short, and the user reacted to it with the "
    "message below. Taking that reaction into account, write a better answer to the original request.\n"
    "Future User Message: {follow_up}"
)
HINDSIGHT_ASSISTANT_TURN_TEMPLATE = (
    "=== HINDSIGHT CONTEXT ===\n"
    "[What follows is the next message this user will send after reading your reply. "
    "Let it shape how you answer the request above.]\n"
    "{follow_up}"
)


@dataclass(frozen=True)
class HindsightVariant:
    """Where the follow-up goes and with which wording.

    Attributes:
        template: text with a ``{follow_up}`` slot.
        placement: ``last_user`` appends to the content of the last user message (paper Table 1);
            ``last_message`` appends to the last message whatever its role (reference offline v1);
            ``assistant_turn`` adds a new assistant message holding the block (reference offline, new layout).
    """

    template: str
    placement: str


HINDSIGHT_VARIANTS = {
    "online": HindsightVariant(HINDSIGHT_ONLINE_TEMPLATE, "last_user"),
    # The earlier online wording, kept so the measurement above can be repeated (--hindsight_variant).
    "online_after_reply": HindsightVariant(HINDSIGHT_AFTER_REPLY_TEMPLATE, "last_user"),
    "offline_v1": HindsightVariant(HINDSIGHT_OFFLINE_V1_TEMPLATE, "last_message"),
    "offline_assistant": HindsightVariant(HINDSIGHT_ASSISTANT_TURN_TEMPLATE, "assistant_turn"),
}


def check_hindsight_template(template: str) -> None:
    if template.count(FOLLOW_UP_SLOT) != 1:
        raise ValueError(f"hindsight template must contain the slot {FOLLOW_UP_SLOT} exactly once: {template!r}")


def build_hindsight_messages(
    messages: list[dict], follow_up: str, *, variant: str = "online", template: str | None = None
) -> list[dict]:
    """Return a copy of ``messages`` with the follow-up ``o`` placed as the variant says.

    ``template`` overrides the variant's wording (the placement stays the variant's).
    """
    if variant not in HINDSIGHT_VARIANTS:
        raise ValueError(f"unknown hindsight variant {variant!r}: use one of {sorted(HINDSIGHT_VARIANTS)}")
    if not isinstance(follow_up, str) or not follow_up.strip():
        raise ValueError("the user follow-up is empty: there is no hindsight signal to learn from")
    if not messages:
        raise ValueError("cannot build a hindsight context for an empty conversation")
    spec = HINDSIGHT_VARIANTS[variant]
    wording = spec.template if template is None else template
    check_hindsight_template(wording)
    block = wording.replace(FOLLOW_UP_SLOT, follow_up.strip())
    teacher = copy.deepcopy(messages)
    if spec.placement == "assistant_turn":
        teacher.append({"role": "assistant", "content": block})
        return teacher
    if spec.placement == "last_message":
        target = len(teacher) - 1
    else:
        users = [i for i, m in enumerate(teacher) if m.get("role") == "user"]
        if not users:
            raise ValueError("the conversation has no user message to attach the follow-up to")
        target = users[-1]
    teacher[target]["content"] = teacher[target]["content"] + block
    return teacher


@dataclass(frozen=True)
class HindsightContexts:
    """Token ids of the student context x and the teacher context x⊕o, cut consistently.

    Attributes:
        student / teacher: the two contexts (generation prompt included).
        truncated_tokens: how many of x's oldest tokens were dropped from both (0 when x fitted).
    """

    student: list[int]
    teacher: list[int]
    truncated_tokens: int = 0


def encode_hindsight_contexts(
    tokenizer,
    messages: list[dict],
    follow_up: str,
    *,
    variant: str = "online",
    template: str | None = None,
    max_context_length: int | None = None,
    chat_template_kwargs: dict | None = None,
) -> HindsightContexts:
    """Render x and x⊕o and, when x is longer than ``max_context_length``, cut the same oldest tokens from both.

    The budget bounds x, i.e. the student context, which is then exactly the (left-truncated) context the
    policy generated from; the teacher keeps those same x tokens plus the hindsight block, so it may exceed
    the budget by the block's length. Only tokens the two renderings share (x's beginning) are ever cut,
    never o or anything after it; a budget too small for that is an error.
    """
    teacher_messages = build_hindsight_messages(messages, follow_up, variant=variant, template=template)
    student, teacher = (
        encode_chat(tokenizer, m, chat_template_kwargs=chat_template_kwargs) for m in (messages, teacher_messages)
    )
    excess = 0 if max_context_length is None else len(student) - max_context_length
    if excess <= 0:
        return HindsightContexts(student, teacher)
    shared = next((i for i, (a, b) in enumerate(zip(student, teacher)) if a != b), min(len(student), len(teacher)))
    if excess > shared:
        raise ValueError(
            f"max_context_length={max_context_length} is too small: fitting x would cut {excess} tokens but only "
            f"the first {shared} are shared by the student and teacher contexts; raise max_context_length"
        )
    return HindsightContexts(student[excess:], teacher[excess:], excess)


def encode_student_teacher_contexts(
    tokenizer, messages: list[dict], follow_up: str, **options
) -> tuple[list[int], list[int]]:
    """(student, teacher) token ids of ``encode_hindsight_contexts`` (same options), without the truncation count."""
    contexts = encode_hindsight_contexts(tokenizer, messages, follow_up, **options)
    return contexts.student, contexts.teacher


# --------------------------------------------------------------------------------------------------
# Per-token scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class CompletionBatch:
    """Contexts (left-padded) followed by completions (right-padded), ready for one forward pass."""

    input_ids: torch.Tensor  # (B, L + T)
    attention_mask: torch.Tensor  # (B, L + T)
    position_ids: torch.Tensor  # (B, L + T)
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) float, 0 on padding and on ignored leading tokens

    @property
    def completion_width(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device) -> CompletionBatch:
        return CompletionBatch(*(t.to(device) for t in vars(self).values()))


def pad_contexts_and_completions(
    contexts: list[list[int]], completions: list[list[int]], pad_token_id: int, *, ignore_first_k: int = 0
) -> CompletionBatch:
    """Build a scoring batch. ``ignore_first_k`` masks the first k tokens of every completion."""
    if len(contexts) != len(completions) or not contexts:
        raise ValueError(f"need as many contexts as completions (got {len(contexts)} and {len(completions)})")
    if any(len(c) == 0 for c in completions):
        raise ValueError("cannot score an empty completion")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("cannot score a completion under an empty context")
    batch, ctx_width, comp_width = len(contexts), max(map(len, contexts)), max(map(len, completions))
    input_ids = torch.full((batch, ctx_width + comp_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((batch, comp_width), dtype=torch.float32)
    for row, (ctx, comp) in enumerate(zip(contexts, completions)):
        input_ids[row, ctx_width - len(ctx) : ctx_width] = torch.tensor(ctx)
        input_ids[row, ctx_width : ctx_width + len(comp)] = torch.tensor(comp)
        attention_mask[row, ctx_width - len(ctx) : ctx_width + len(comp)] = 1
        completion_mask[row, ignore_first_k : len(comp)] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return CompletionBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        completion_ids=input_ids[:, ctx_width:].clone(),
        completion_mask=completion_mask,
    )


# Largest fp32 logit block materialised at once (1 GiB): bounds memory for 150k-token vocabularies.
FP32_LOGIT_ELEMENTS = 2**28


@dataclass
class TokenScores:
    """Per-token log-probabilities of a completion batch (all fp32, zero where the mask is zero).

    Attributes:
        logprobs: (B, T) log π(y_t | context, y_<t) of the completion tokens.
        mask: (B, T) 1.0 for scored tokens.
        topk_logprobs / topk_indices: (B, T, K) this model's K most likely tokens, when asked for.
        gathered_logprobs: (B, T, K') log-probs at caller-given indices, when asked for.
        entropy: (B, T) entropy of the full next-token distribution (detached), when asked for.
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    gathered_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass(frozen=True)
class LogitBlend:
    """A teacher whose logits are (1 − mix)·z_reference + mix·z_model (the sister paper's trust-region teacher).

    Attributes:
        reference: the frozen reference network (may be ``model`` itself when ``reference_context`` switches
            its LoRA adapter off).
        mix: weight of the current model's logits, in [0, 1]; 0 is the reference alone, 1 the current model.
        reference_context: a zero-argument callable returning the context manager the reference runs under.
    """

    reference: object
    mix: float
    reference_context: Callable[[], AbstractContextManager] = nullcontext


def _hidden_and_head(model, batch: CompletionBatch, keep: int, fp32_head: bool):
    """The last ``keep`` positions' decoder states and the function that turns a row block of them into fp32 logits."""
    forward = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    # A DistributedDataParallel wrapper must run its own forward (it prepares the gradient all-reduce there), so
    # wrapped models keep their head in the compute dtype. An FSDP2 root gathers the head and embeddings in its own
    # forward: its head runs in fp32 inside it (all kept positions at once, not chunked).
    sharded = _is_fsdp2(model)
    if fp32_head and not sharded and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.get_decoder()(**forward).last_hidden_state[:, -keep:, :], _Fp32Head(model)
    with _fp32_head_inside_forward(model) if fp32_head and sharded else nullcontext():
        return model(**forward, logits_to_keep=keep).logits[:, -keep:, :], torch.Tensor.float


def _is_fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def _fp32_head_inside_forward(model):
    """Within: ``model``'s output head computes fp32 logits with autocast off (``_Fp32Head``'s arithmetic), run by
    the model's own forward, where an FSDP2 root has its weight gathered."""
    head = model.get_output_embeddings()
    fp32_head = _Fp32Head(model)
    fp32_head.softcap = None  # the model's forward applies its own soft-capping, to the fp32 logits

    def fp32_forward(hidden: torch.Tensor) -> torch.Tensor:
        fp32_head.weight, fp32_head.bias = head.weight, head.bias  # the gathered tensors of this forward
        return fp32_head(hidden)

    head.forward = fp32_forward
    try:
        yield
    finally:
        del head.forward


def score_completions(
    model,
    batch: CompletionBatch,
    *,
    topk: int = 0,
    gather_indices: torch.Tensor | None = None,
    temperature: float = 1.0,
    fp32_head: bool = True,
    blend: LogitBlend | None = None,
    entropy: bool = False,
) -> TokenScores:
    """Log-probabilities of ``batch.completion_ids`` under ``model`` (differentiable unless in no_grad).

    ``topk`` > 0 also returns the model's top-K log-probs per position; ``gather_indices`` (B, T, K')
    returns the log-probs at those vocabulary indices (used to read one side at the other's top-K).
    ``temperature`` scores under softmax(logits / T), the distribution that sampled y at temperature T.
    ``fp32_head`` runs the LM head in fp32 (autocast off) on the scored positions, so bf16 rounding of the
    logits never reaches the loss; False keeps the model's own head (bf16 logits under autocast, upcast).
    ``blend`` scores under the trust-region mixture of ``model`` and a reference (``LogitBlend``).
    ``entropy`` also returns the per-position entropy of the full next-token distribution (detached).
    """
    if temperature <= 0:
        raise ValueError(f"scoring temperature must be > 0, got {temperature}")
    width = batch.completion_width
    # Position t of the kept block predicts completion token t; the last one predicts past y and is
    # dropped from the (small) results rather than sliced off the logits, whose slice backward would
    # zero-fill a full-size gradient.
    keep = width + 1
    hidden, head = _hidden_and_head(model, batch, keep, fp32_head)
    if blend is not None:
        with blend.reference_context():
            reference_hidden, reference_head = _hidden_and_head(blend.reference, batch, keep, fp32_head)

        def chunk_logits(rows: slice) -> torch.Tensor:
            return torch.lerp(reference_head(reference_hidden[rows]), head(hidden[rows]), blend.mix)
    else:

        def chunk_logits(rows: slice) -> torch.Tensor:
            return head(hidden[rows])

    batch_size, positions = hidden.shape[:2]
    vocab = getattr(model, "module", model).get_output_embeddings().weight.shape[0]
    targets = torch.nn.functional.pad(batch.completion_ids.to(hidden.device), (0, 1))
    extra_target = gather_indices[:, :1] if gather_indices is not None else None
    indices = torch.cat([gather_indices, extra_target], dim=1) if gather_indices is not None else None
    # fp32 logits and log-softmax over as many sequences at once as fit the element budget.
    rows_per_chunk = max(1, FP32_LOGIT_ELEMENTS // (positions * vocab))
    logprobs, topk_values, topk_indices, gathered, entropies = [], [], [], [], []
    for start in range(0, batch_size, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, batch_size))
        logits = chunk_logits(rows)
        if temperature != 1.0:
            logits = logits / temperature
        normaliser = logits.logsumexp(dim=-1, keepdim=True)
        logprobs.append((logits.gather(-1, targets[rows].unsqueeze(-1)) - normaliser).squeeze(-1))
        if topk:
            values, top = logits.topk(topk, dim=-1)
            topk_values.append(values - normaliser)
            topk_indices.append(top)
        if indices is not None:
            gathered.append(logits.gather(-1, indices[rows]) - normaliser)
        if entropy:
            with torch.no_grad():
                probs = (logits - normaliser).exp()
                entropies.append(normaliser.squeeze(-1) - (probs * logits).sum(-1))
    mask = batch.completion_mask.to(hidden.device)
    drop_last = slice(0, width)
    return TokenScores(
        logprobs=torch.cat(logprobs)[:, drop_last] * mask,
        mask=mask,
        topk_logprobs=torch.cat(topk_values)[:, drop_last] if topk else None,
        topk_indices=torch.cat(topk_indices)[:, drop_last] if topk else None,
        gathered_logprobs=torch.cat(gathered)[:, drop_last] if indices is not None else None,
        entropy=torch.cat(entropies)[:, drop_last] * mask if entropy else None,
    )


class _Fp32Head:
    """The model's output projection applied in fp32 with autocast off (final logit soft-capping included)."""

    def __init__(self, model):
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"fp32 scoring needs a plain nn.Linear output head, found {type(head).__name__}; "
                "score with fp32_head=False (e.g. when the head carries a LoRA adapter)"
            )
        self.weight = head.weight
        self.bias = head.bias
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            logits = torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# --------------------------------------------------------------------------------------------------
# Losses (pure tensor functions)
# --------------------------------------------------------------------------------------------------

LOSS_MODES = ("simple_signal", "full_distillation")
# Whose K most likely tokens form the support of the top-K distillation at each position.
TOPK_SUPPORTS = ("student", "teacher")
ADVANTAGE_CENTERINGS = ("none", "sequence")
# Bound on |log π − log π_old| before exponentiating the importance weight (as TRL and lasgroup/SDPO do).
LOG_RATIO_BOUND = 20.0


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of each row counting only mask == 1 entries; an all-masked row gives 0."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def sdpo_signal(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A_t = log π(y_t|x⊕o) − log π(y_t|x), without gradient, zero on masked tokens."""
    return (teacher_logprobs - student_logprobs).detach() * mask


def center_advantages(advantages: torch.Tensor, mask: torch.Tensor, centering: str = "none") -> torch.Tensor:
    """``sequence``: subtract from every scored A_t its sequence's mean over scored tokens (what the reference
    batch trainer did); ``none``: unchanged. Masked entries stay zero."""
    if centering not in ADVANTAGE_CENTERINGS:
        raise ValueError(f"unknown advantage_centering {centering!r}: use one of {list(ADVANTAGE_CENTERINGS)}")
    if centering == "none":
        return advantages
    return (advantages - masked_sequence_mean(advantages, mask).unsqueeze(-1)) * mask


def clipped_importance_weights(
    student_logprobs: torch.Tensor, old_logprobs: torch.Tensor, is_clip: float
) -> torch.Tensor:
    """min(π/π_old, is_clip) per token, detached: the weight that corrects a loss computed on y sampled from
    π_old (the policy before this interaction's first update) for the current π, bounded from above."""
    log_ratio = (student_logprobs - old_logprobs).detach().clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return log_ratio.exp().clamp(max=is_clip)


def simple_signal_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    signal_clip: float = 0.0,
    advantage_centering: str = "none",
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token policy gradient with the SDPO signal as per-token advantage.

    A_t is centred per sequence when asked (``center_advantages``), then clipped to ±signal_clip when
    signal_clip > 0; ``importance_weights`` (B, T), when given, multiply each token's term. Returns (loss,
    advantages actually used). Without centring there is no baseline: the sign of A_t is the signal.
    """
    advantages = center_advantages(sdpo_signal(student_logprobs, teacher_logprobs, mask), mask, advantage_centering)
    if signal_clip > 0:
        advantages = advantages.clamp(-signal_clip, signal_clip)
    per_token = -advantages * student_logprobs
    if importance_weights is not None:
        per_token = per_token * importance_weights
    loss = masked_sequence_mean(per_token, mask).mean()
    return loss, advantages


def tail_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_k p_k): the log-mass outside the given K log-probs.

    The log-sum-exp is capped just below 0 so the tail stays finite (≥ log(1e-7) ≈ −16.1) when the
    K tokens hold (numerically) all the mass.
    """
    top_mass = topk_logprobs.logsumexp(dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.log(-torch.expm1(top_mass))


def support_distribution(topk_logprobs: torch.Tensor, *, add_tail: bool) -> torch.Tensor:
    """A proper log-distribution on a K-token support: K buckets + the tail bucket, or the K renormalised."""
    if add_tail:
        return torch.cat([topk_logprobs, tail_logprob(topk_logprobs)], dim=-1)
    return topk_logprobs - topk_logprobs.logsumexp(dim=-1, keepdim=True)


def _kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis (finite log-probs)."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(-1)


def distillation_divergence(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the last axis; the teacher is detached.

    alpha = 1: reverse KL(student ‖ teacher) (the paper's Eq. 2 and this project's default); alpha = 0: forward
    KL(teacher ‖ student); in between the generalised Jensen-Shannon divergence
    (1 − α)·KL(student ‖ m) + α·KL(teacher ‖ m) with m = (1 − α)·student + α·teacher (the sister
    paper's α).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    teacher_logprobs = teacher_logprobs.detach()
    if alpha == 1.0:
        return _kl(student_logprobs, teacher_logprobs)
    if alpha == 0.0:
        return _kl(teacher_logprobs, student_logprobs)
    mixture = torch.logaddexp(student_logprobs + math.log(1.0 - alpha), teacher_logprobs + math.log(alpha))
    return (1.0 - alpha) * _kl(student_logprobs, mixture) + alpha * _kl(teacher_logprobs, mixture)


def topk_reverse_kl(
    student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor, *, add_tail: bool = True
) -> torch.Tensor:
    """Per-position KL(student ‖ teacher) on a shared K-token support (last axis = K).

    add_tail=True: K buckets + one bucket for the remaining mass of each distribution.
    add_tail=False: both K-vectors renormalised to sum to one.
    """
    return topk_divergence(student_topk_logprobs, teacher_topk_logprobs, add_tail=add_tail, alpha=1.0)


def topk_divergence(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    add_tail: bool = True,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``distillation_divergence`` of the two distributions on a shared K-token support (``support_distribution``)."""
    return distillation_divergence(
        support_distribution(student_topk_logprobs, add_tail=add_tail),
        support_distribution(teacher_topk_logprobs, add_tail=add_tail),
        alpha,
    )


def full_distillation_loss(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    add_tail: bool = True,
    alpha: float = 1.0,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K self-distillation (reverse KL at alpha = 1). Returns (loss, per-token divergence)."""
    per_token = topk_divergence(student_topk_logprobs, teacher_topk_logprobs, add_tail=add_tail, alpha=alpha)
    weighted = per_token if importance_weights is None else per_token * importance_weights
    loss = masked_sequence_mean(weighted, mask).mean()
    return loss, per_token


@dataclass
class HindsightScores:
    """y scored under x (student) and x⊕o (teacher): what every SDPO loss and every signal display reads.

    Attributes:
        student: the student's ``TokenScores`` (differentiable when scored with gradient; entropy when asked for).
        teacher_logprobs: (B, T) log π_teacher(y_t|x⊕o), detached, zero on masked tokens.
        student_support / teacher_support: (B, T, K) both sides' log-probs on the top-K support (the student's or
            the teacher's K most likely tokens, ``topk_from``), when a top-K was asked for.
    """

    student: TokenScores
    teacher_logprobs: torch.Tensor
    student_support: torch.Tensor | None = None
    teacher_support: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.student.mask

    @property
    def signal(self) -> torch.Tensor:
        """(B, T) A_t of every completion token (``sdpo_signal``)."""
        return sdpo_signal(self.student.logprobs, self.teacher_logprobs, self.mask)

    def signal_rows(self, lengths: Sequence[int]) -> list[list[float]]:
        """A_t of row i's first ``lengths[i]`` tokens as floats (0 on tokens the loss ignores)."""
        signal = self.signal.float().cpu()
        return [signal[row, :length].tolist() for row, length in enumerate(lengths)]


def score_hindsight(
    model,
    student_batch: CompletionBatch,
    teacher_batch: CompletionBatch,
    *,
    distillation_topk: int = 0,
    topk_from: str = "student",
    teacher=None,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    fp32_head: bool = True,
    entropy: bool = False,
    timings: dict | None = None,
) -> HindsightScores:
    """The one SDPO scorer: y under x (with gradient unless the caller is in no_grad) and under x⊕o (no gradient).

    Training (``sdpo_loss``), the live chat's signal panel (through the updater's ``train_step``) and the signal
    analysis all read A_t from here, so they show the same numbers at the same ``temperature``. ``teacher`` is a
    ``sdpo.teachers.Teacher`` (None: the live teacher, ``model`` itself). ``distillation_topk`` > 0 also returns
    both sides on the K most likely tokens of the student (``topk_from="student"``) or of the teacher; the teacher
    is then read only at those K tokens and the sampled one. ``entropy`` asks for the student's next-token entropy.
    ``timings``, when given, accumulates seconds under ``student_forward`` and ``teacher_forward``.
    """
    if topk_from not in TOPK_SUPPORTS:
        raise ValueError(f"unknown topk_from {topk_from!r}: use one of {list(TOPK_SUPPORTS)}")
    device = student_batch.input_ids.device
    scoring = {"temperature": temperature, "fp32_head": fp32_head}
    sampled = student_batch.completion_ids.to(device).unsqueeze(-1)

    def score_teacher(gather: torch.Tensor | None, topk: int) -> TokenScores:
        started = time.perf_counter()
        with (
            torch.no_grad(),
            autocast_context(device, autocast_dtype),
            _teacher_scoring(teacher, model) as (teacher_model, blend),
        ):
            scores = score_completions(
                teacher_model, teacher_batch, gather_indices=gather, topk=topk, blend=blend, **scoring
            )
        _add_time(timings, "teacher_forward", started)
        return scores

    def score_student(gather: torch.Tensor | None, topk: int) -> TokenScores:
        started = time.perf_counter()
        with autocast_context(device, autocast_dtype):
            scores = score_completions(
                model, student_batch, topk=topk, gather_indices=gather, entropy=entropy, **scoring
            )
        _add_time(timings, "student_forward", started)
        return scores

    if distillation_topk and topk_from == "teacher":
        teacher_scores = score_teacher(sampled, distillation_topk)
        student = score_student(teacher_scores.topk_indices, 0)
        return HindsightScores(
            student,
            (teacher_scores.gathered_logprobs[..., 0] * student.mask).detach(),
            student.gathered_logprobs,
            teacher_scores.topk_logprobs,
        )
    student = score_student(None, distillation_topk)
    if distillation_topk:
        teacher_scores = score_teacher(torch.cat([student.topk_indices, sampled], dim=-1), 0)
        return HindsightScores(
            student,
            (teacher_scores.gathered_logprobs[..., -1] * student.mask).detach(),
            student.topk_logprobs,
            teacher_scores.gathered_logprobs[..., :-1],
        )
    teacher_scores = score_teacher(None, 0)
    return HindsightScores(student, (teacher_scores.logprobs * student.mask).detach())


@dataclass
class SDPOLoss:
    """One batch's SDPO loss and what the callers log.

    Attributes:
        loss: scalar to back-propagate (zero but attached to the graph when every token is masked).
        student_logprobs / teacher_logprobs: (B, T) log π(y_t|x) and log π_teacher(y_t|x⊕o), detached.
        mask: (B, T) scored tokens.
        advantages: (B, T) the per-token weights of ``simple_signal`` (centred and clipped when asked); in
            ``full_distillation`` mode the raw signal.
        kl_per_token: (B, T) detached per-position divergence in ``full_distillation`` mode, else None.
        entropy: (B, T) the student's next-token entropy on y (detached), when asked for.
        importance_weights: (B, T) the clipped importance weights applied, when ``is_clip`` was active.
        scores: the ``score_hindsight`` result the loss was computed from (``scores.signal`` = A_t).
    """

    loss: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    kl_per_token: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    importance_weights: torch.Tensor | None = None
    scores: HindsightScores | None = None

    @property
    def signal(self) -> torch.Tensor:
        return sdpo_signal(self.student_logprobs, self.teacher_logprobs, self.mask)


def sdpo_loss(
    model,
    student_batch: CompletionBatch,
    teacher_batch: CompletionBatch,
    *,
    loss_mode: str,
    distillation_topk: int = 20,
    distillation_add_tail: bool = True,
    distillation_alpha: float = 1.0,
    topk_from: str = "student",
    signal_clip: float = 0.0,
    advantage_centering: str = "none",
    is_clip: float = 0.0,
    old_logprobs: torch.Tensor | None = None,
    teacher=None,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    fp32_head: bool = True,
    entropy: bool = False,
    timings: dict | None = None,
) -> SDPOLoss:
    """Score y with ``score_hindsight`` (student with gradient, teacher without), then apply ``loss_mode``.

    ``teacher``, ``topk_from``, ``temperature``, ``fp32_head``, ``entropy`` and ``timings`` are passed to the
    scorer. In ``full_distillation`` mode the divergence (``distillation_alpha``: 1 reverse KL, 0 forward KL, in
    between the generalised JSD) is taken on the top-K support with or without the tail bucket. ``is_clip`` > 0 with
    ``old_logprobs`` (B, T) weights each token's loss by min(π/π_old, is_clip).
    """
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"unknown loss_mode {loss_mode!r}: use one of {list(LOSS_MODES)}")
    distill = loss_mode == "full_distillation"
    scores = score_hindsight(
        model,
        student_batch,
        teacher_batch,
        distillation_topk=distillation_topk if distill else 0,
        topk_from=topk_from,
        teacher=teacher,
        autocast_dtype=autocast_dtype,
        temperature=temperature,
        fp32_head=fp32_head,
        entropy=entropy,
        timings=timings,
    )
    student, teacher_logprobs, mask = scores.student, scores.teacher_logprobs, scores.mask
    weights = None
    if is_clip > 0 and old_logprobs is not None:
        weights = clipped_importance_weights(student.logprobs, old_logprobs.to(mask.device), is_clip) * mask
    if distill:
        loss, kl_per_token = full_distillation_loss(
            scores.student_support,
            scores.teacher_support,
            mask,
            add_tail=distillation_add_tail,
            alpha=distillation_alpha,
            importance_weights=weights,
        )
        advantages = scores.signal
        kl_per_token = kl_per_token.detach() * mask
    else:
        loss, advantages = simple_signal_loss(
            student.logprobs,
            teacher_logprobs,
            mask,
            signal_clip=signal_clip,
            advantage_centering=advantage_centering,
            importance_weights=weights,
        )
        kl_per_token = None
    return SDPOLoss(
        loss,
        student.logprobs.detach(),
        teacher_logprobs,
        mask,
        advantages,
        kl_per_token,
        entropy=student.entropy,
        importance_weights=weights,
        scores=scores,
    )


def _teacher_scoring(teacher, model):
    """The teacher's scoring context (yields the network to run and an optional ``LogitBlend``); live when None."""
    if teacher is None:
        return nullcontext((model, None))
    return teacher.scoring(model)


def _add_time(timings: dict | None, phase: str, started: float) -> None:
    if timings is not None:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over all scored tokens of the batch (a logging statistic)."""
    return float((values * mask).sum() / mask.sum().clamp(min=1.0))


def masked_std(values: torch.Tensor, mask: torch.Tensor) -> float:
    selected = values[mask > 0]
    return float(selected.std()) if selected.numel() > 1 else 0.0


def format_token_table(tokenizer, token_ids, student_logprobs, teacher_logprobs, *, limit: int = 200) -> str:
    """A readable per-token table (index, id, piece, log p(y|x), log p(y|x⊕o), signal) for debugging."""
    lines = [f"{'idx':>4} {'id':>7} {'token':<16} {'logp_x':>8} {'logp_xo':>8} {'signal':>8}"]
    for index, (token, lp_x, lp_xo) in enumerate(zip(token_ids[:limit], student_logprobs, teacher_logprobs)):
        piece = tokenizer.convert_ids_to_tokens(int(token)).replace("\n", "\\n")
        piece = piece if len(piece) <= 15 else piece[:12] + "..."
        lines.append(
            f"{index:>4} {int(token):>7} {piece:<16} {float(lp_x):>8.3f} {float(lp_xo):>8.3f} "
            f"{float(lp_xo - lp_x):>8.3f}"
        )
    return "\n".join(lines)
