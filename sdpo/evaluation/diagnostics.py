"""Collapse diagnostics: the numbers that tell a long online run is degenerating before the win rate does.

    entry.update(collapse_diagnostics(updater, conversations, answers))   # once per evaluation
    draw_diagnostics(axes, eval_history)                                   # the panel under the win-rate curve

Per evaluation, on the policy's answers to the evaluation prompts:
  * ``policy_entropy_mean`` — mean next-token entropy of the policy (T = 1) over the answer tokens; a collapsing
    policy grows overconfident and this falls;
  * ``distinct_1`` / ``distinct_2`` — distinct word uni-/bigrams over all n-grams across the answers (Li et al.,
    2016): answers that converge on one template drive it down;
  * ``base_logratio_mean`` — mean of log π(y_t|x) − log π_base(y_t|x) over the answer tokens, a one-sample
    per-token estimate of KL(π ‖ π_base) (y is sampled from π); only where the base model is at hand without a copy
    (LoRA: the adapter switched off) or already held by the teacher (``base``/``trust_region``);
  * ``answer_tokens_mean`` — mean answer length in tokens.
Per training step the updater logs ``policy_entropy_mean`` (from the scoring pass it runs anyway) and
``completion_tokens``. Answers arrive as text, so they are tokenized as the updater tokenizes a logged reply
(text + EOS); the scores are diagnostics, not the training signal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DIAGNOSTIC_KEYS = ("policy_entropy_mean", "base_logratio_mean", "distinct_1", "distinct_2", "answer_tokens_mean")
SCORING_BATCH = 8


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams across ``texts`` (lower-cased, whitespace words); 0 without any."""
    grams = []
    for text in texts:
        words = text.lower().split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def base_reference(updater):
    """A ``BaseTeacher`` giving the initial network without a new copy (None where that would need one)."""
    from sdpo.teachers import BaseTeacher, is_lora_model

    if isinstance(updater.teacher, BaseTeacher):
        return updater.teacher
    return BaseTeacher(updater.model) if is_lora_model(updater.model) else None


def collapse_diagnostics(updater, conversations: Sequence[list[dict]], answers: Sequence[str]) -> dict:
    """The evaluation's diagnostics (module docstring) for ``answers`` given to ``conversations``."""
    import torch

    from sdpo.core import pad_contexts_and_completions, score_completions
    from sdpo.models.generation import autocast_context

    tokenizer = updater.tokenizer
    kept = [(c, a) for c, a in zip(conversations, answers) if a.strip()]
    stats = {"distinct_1": distinct_n(answers, 1), "distinct_2": distinct_n(answers, 2)}
    if not kept:
        return stats
    contexts = [updater.encode_context(conversation) for conversation, _ in kept]
    completions = tokenizer([a.rstrip() + tokenizer.eos_token for _, a in kept], add_special_tokens=False)["input_ids"]
    completions = [ids[: updater.config.max_new_tokens] for ids in completions]
    reference = base_reference(updater)
    entropy_sum = logratio_sum = tokens = 0.0
    was_training = updater.model.training
    updater.model.eval()
    try:
        for start in range(0, len(kept), SCORING_BATCH):
            rows = slice(start, start + SCORING_BATCH)
            batch = pad_contexts_and_completions(contexts[rows], completions[rows], tokenizer.pad_token_id).to(
                updater.device
            )
            with torch.no_grad(), autocast_context(updater.device, updater.autocast_dtype):
                policy = score_completions(updater.model, batch, entropy=True, fp32_head=updater.config.fp32_lm_head)
                entropy_sum += float(policy.entropy.sum())
                tokens += float(policy.mask.sum())
                if reference is not None:
                    with reference.reference_context():
                        base = score_completions(
                            reference.reference_network, batch, fp32_head=updater.config.fp32_lm_head
                        )
                    logratio_sum += float(((policy.logprobs - base.logprobs) * policy.mask).sum())
    finally:
        updater.model.train(was_training)
    stats["policy_entropy_mean"] = entropy_sum / max(tokens, 1.0)
    stats["answer_tokens_mean"] = tokens / len(kept)
    if reference is not None:
        stats["base_logratio_mean"] = logratio_sum / max(tokens, 1.0)
    return stats


def has_diagnostics(eval_history: Sequence[Mapping]) -> bool:
    return any(key in entry for entry in eval_history for key in DIAGNOSTIC_KEYS)


def draw_diagnostics(axes, eval_history: Sequence[Mapping]) -> None:
    """Entropy, KL estimate and distinct-2 (left axis) and answer length (right axis) over interactions."""
    series = [
        ("policy_entropy_mean", "policy entropy (nats/token)", "tab:purple", axes),
        ("base_logratio_mean", "log π/π_base (≈ KL, nats/token)", "tab:red", axes),
        ("distinct_2", "distinct-2", "tab:green", axes),
    ]
    length_axes = axes.twinx()
    series.append(("answer_tokens_mean", "answer length (tokens, right)", "0.4", length_axes))
    lines = []
    for key, label, color, target in series:
        points = [(entry.get("interaction", entry.get("step")), entry[key]) for entry in eval_history if key in entry]
        if points:
            xs, ys = zip(*points)
            lines += target.plot(
                xs, ys, marker=".", color=color, label=label, linestyle="--" if target is length_axes else "-"
            )
    axes.set_ylabel("collapse\ndiagnostics")
    length_axes.set_ylabel("tokens")
    axes.grid(alpha=0.3)
    if lines:
        axes.legend(handles=lines, fontsize="x-small", loc="upper left", frameon=False, ncols=2)
