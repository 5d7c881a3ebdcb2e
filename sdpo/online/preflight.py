"""Pre-flight learnability check: before training, is there anything for SDPO to distill?

SDPO moves the policy towards what the hindsight teacher (the same model reading x⊕o) prefers. When the model is
too small to read o, or the persona too vague for the user to say anything useful, the teacher answers no
better than the student and a run learns nothing, which a user would otherwise find out only after the run. On
N training prompts, per user style:

(a) the policy samples y, the simulated user writes o, and y is scored under x, x⊕o and x⊕o_unrelated
    (a fixed follow-up about something else): mean |A_t| and mean A_t for the real follow-up and for the
    unrelated one (paper Fig. 8: a relevant o moves tokens, an unrelated one barely does);
(b) the hindsight teacher answers x⊕o itself, and the style's judge compares that answer with y in both orders.
    The verdict says whether the teacher beats the student's answer by more than two standard errors.

``eval_online_sdpo.py --preflight N`` runs it before the first update, prints one verdict line per style,
stores the figures in the results meta (``preflight``) and the win-rate plot draws them beside the oracle line.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from sdpo.core import (
    build_hindsight_messages,
    encode_hindsight_contexts,
    pad_contexts_and_completions,
    score_completions,
    sdpo_signal,
)
from sdpo.evaluation.evaluation_helpers import compute_metrics
from sdpo.learner.updater import EmptyResponseError

# Fixed, and about nothing any persona cares about (the paper's Fig. 8 uses the same kind of question).
UNRELATED_FOLLOW_UP = "What is 27 times 4?"
# The teacher must beat the student's answer by this many standard errors for "something to distill".
MARGIN_STANDARD_ERRORS = 2.0


def verdict_line(style: str, metrics: dict) -> str:
    """One line saying whether the hindsight teacher's answers beat the policy's own, for ``style``."""
    decided, winrate, se = metrics["n_effective"], metrics["winrate_a"], metrics["se"]
    if not decided or not math.isfinite(winrate):
        return (
            f"[pre-flight {style}] the judge decided none of {metrics['n']} teacher-vs-policy pairs: "
            "nothing measurable to distill; expect no learning"
        )
    share = f"the teacher beats the policy's answer in {winrate:.0f}% ± {se:.0f} of {decided} decided pairs"
    if winrate - MARGIN_STANDARD_ERRORS * se > 50.0:
        return f"[pre-flight {style}] {share}: there is something to distill"
    return f"[pre-flight {style}] {share}: nothing to distill at this size; expect no learning"


@torch.no_grad()
def token_signals(updater, conversations: list[list[dict]], responses: list, follow_ups: list[str]) -> list[np.ndarray]:
    """A_t = log π(y_t | x⊕o, y_<t) − log π(y_t | x, y_<t) per response, with the updater's hindsight wording."""
    config = updater.config
    signals = []
    for messages, response, follow_up in zip(conversations, responses, follow_ups):
        contexts = encode_hindsight_contexts(
            updater.tokenizer,
            messages,
            follow_up,
            template=config.hindsight_block_template,
            max_context_length=config.max_context_length,
            chat_template_kwargs=config.chat_template_kwargs,
        )
        completion = updater.completion_ids(response)
        batch = pad_contexts_and_completions(
            [contexts.student, contexts.teacher], [completion] * 2, updater.tokenizer.pad_token_id
        ).to(updater.device)
        autocast = (
            torch.autocast(updater.device.type, dtype=updater.autocast_dtype)
            if updater.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            scores = score_completions(updater.model, batch, temperature=updater.scoring_temperature)
        signal = sdpo_signal(scores.logprobs[:1], scores.logprobs[1:], scores.mask[1:])[0]
        signals.append(signal[scores.mask[1] > 0].float().cpu().numpy())
    return signals


def signal_summary(relevant: list[np.ndarray], unrelated: list[np.ndarray]) -> dict:
    """Pooled-token mean |A_t| and mean A_t for the user's follow-ups and the unrelated one."""
    rel, unrel = np.concatenate(relevant), np.concatenate(unrelated)
    return {
        "n_tokens": int(rel.size),
        "mean_abs_relevant": round(float(np.abs(rel).mean()), 4),
        "mean_relevant": round(float(rel.mean()), 4),
        "mean_abs_unrelated": round(float(np.abs(unrel).mean()), 4),
        "mean_unrelated": round(float(unrel.mean()), 4),
    }


def run_preflight(updater, participants, styles, conversations, requests: list[str], *, seed: int) -> dict:
    """The check on ``conversations`` (the policy's contexts) for every user style; ``{style: result}``.

    Each result holds the teacher-vs-policy judge metrics, the signal summary and the verdict line. Only
    generation and scoring: the policy is not updated.
    """
    updater.model.eval()
    responses = updater.generate(conversations)
    scorable = []
    for row, response in enumerate(responses):
        with contextlib.suppress(EmptyResponseError):  # an empty answer has no tokens to score
            updater.completion_ids(response)
            scorable.append(row)
    conversations = [conversations[row] for row in scorable]
    requests = [requests[row] for row in scorable]
    responses = [responses[row] for row in scorable]
    if not responses:
        raise ValueError("pre-flight: every sampled answer was empty; check the model and --max_new_tokens")
    answers = [r.text for r in responses]
    results = {}
    for style in styles:
        follow_ups = participants.simulators[style].generate_feedback(requests, answers)
        relevant = token_signals(updater, conversations, responses, follow_ups)
        unrelated = token_signals(updater, conversations, responses, [UNRELATED_FOLLOW_UP] * len(responses))
        teacher_contexts = [
            build_hindsight_messages(messages, follow_up, template=updater.config.hindsight_block_template)
            for messages, follow_up in zip(conversations, follow_ups)
        ]
        teacher_answers = [r.text for r in updater.generate(teacher_contexts)]
        judge = participants.judges[style]
        metrics = compute_metrics(judge.choose_batch_generated(requests, teacher_answers, answers), seed=seed)
        results[style] = {
            **metrics,
            "n_unparsed": judge.last_n_unparsed,
            "signals": signal_summary(relevant, unrelated),
            "unrelated_follow_up": UNRELATED_FOLLOW_UP,
            "verdict": verdict_line(style, metrics),
            "examples": [
                {
                    "prompt": request[:300],
                    "policy": answer[:300],
                    "follow_up": follow_up[:300],
                    "teacher": teacher[:300],
                }
                for request, answer, follow_up, teacher in list(zip(requests, answers, follow_ups, teacher_answers))[:3]
            ],
        }
    return results
