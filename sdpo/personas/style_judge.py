"""Pairwise style judges: which of two responses suits a persona better, judged in both orders.

Protocol (shared by every judge, local, vLLM, API or rule-based):

* The judge sees the persona (system), the raw request and two responses labelled A and B, and must
  end its answer with one line ``Judgement: A``, ``Judgement: B`` or ``Judgement: C`` (C = tie or
  unsure). It judges style, tone, formatting, length and complexity only — not correctness.
* Every pair is judged twice, as (A, B) and as (B, A), to cancel position bias. The second verdict is
  mapped back (A↔B) and a winner is kept only when both orders agree; otherwise the pair is a tie.
* Decisions: 0 = the first response wins, 1 = the second wins, −1 = tie, disagreement or unparsed.

Two protocols (``PROTOCOLS``): ``reasoning`` (above: a short justification may come first, then the verdict
line) and ``paper`` (App. D.3: the judge answers with exactly one character, A, B or C, and nothing else;
``parse_paper_verdict`` accepts only that character, surrounding whitespace aside, and anything else is
unparsed).

``parse_judgement`` is strict where the reference was noisy: only the last ``Judgement:`` line counts,
and its letter must stand alone (the reference also scanned the whole text for any A/B/C character,
and read "Judgment: based on..." as B). Outputs without a verdict line are counted in
``last_n_unparsed`` so a misbehaving judge is visible instead of silently turning into ties.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod

from sdpo.chat.backends import ChatBackend, HFChatBackend, TokenBudget
from sdpo.models.generation import SamplingParams
from sdpo.personas.user_simulator import get_persona, resolve_style

_JUDGE_RULES = (
    "You are a strict grader. You will see a request this user sent and two candidate responses, A and B. "
    "Decide which response better suits the user's preferences described above.\n"
    "- Consider only style, tone, formatting, length and verbosity, and level of complexity, measured "
    "against the profile.\n"
    "- Ignore whether the content is factually correct.\n"
    "- Do not rewrite or improve either response.\n"
    "- You may give a short justification first.\n"
    "- Finish with exactly one final line, which must be one of: `Judgement: A`, `Judgement: B`, "
    "`Judgement: C`. Use C when neither response is better or you cannot tell."
)

# App. D.3 (our wording): the persona decides, and the answer is one character with no reasoning.
_PAPER_JUDGE_RULES = (
    "You will see a request this user sent and two candidate responses, A and B. Decide which response this "
    "user would prefer, judging only style, tone, formatting, length and level of complexity against the "
    "profile, not factual correctness.\n"
    "Answer with exactly one character and nothing else: A if response A fits the user better, B if response B "
    "does, C if they fit equally well or you cannot tell."
)
PROTOCOLS = ("reasoning", "paper")
# One character plus what a tokenizer may add around it; more would only be text the strict parse rejects.
PAPER_VERDICT_MAX_TOKENS = 4

# The verdict line: optional list/quote/emphasis decoration, "Judgement" or "Judgment" in any case,
# a colon (possibly inside the emphasis), then a single letter that is not the start of a word.
_VERDICT_LINE = re.compile(
    r"^[\s>*_#`-]*judge?ment[\s*_`]*:[\s*_`]*([abc])(?![a-z0-9])[\s*_`.!]*$",
    re.IGNORECASE,
)
_VERDICT_VALUES = {"a": 0, "b": 1, "c": -1, "A": 0, "B": 1, "C": -1}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {list(PROTOCOLS)}")


def build_judge_messages(
    style: str, prompt: str, response_a: str, response_b: str, *, protocol: str = "reasoning"
) -> list[dict]:
    """Chat messages asking a model which of two responses the profiled user prefers."""
    check_protocol(protocol)
    rules = _PAPER_JUDGE_RULES if protocol == "paper" else _JUDGE_RULES
    question = (
        "Which response does this user prefer? Answer A, B or C."
        if protocol == "paper"
        else "As this user, which response do you prefer? Explain briefly, then end with the line "
        "`Judgement: A`, `Judgement: B` or `Judgement: C`."
    )
    system = f"{get_persona(style)}\n\n{rules}"
    user = f"User prompt:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n{question}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_paper_verdict(text: str) -> int | None:
    """The paper protocol's verdict: the whole answer is one of A, B, C (A → 0, B → 1, C → −1); else None."""
    return _VERDICT_VALUES.get(text.strip()) if text.strip() in ("A", "B", "C") else None


def parse_judgement(text: str) -> int | None:
    """Decision of the last verdict line of ``text``: A → 0, B → 1, C → −1; no verdict line → None."""
    for line in reversed(text.splitlines()):
        match = _VERDICT_LINE.match(line.strip())
        if match:
            return _VERDICT_VALUES[match.group(1).lower()]
    return None


def combine_orders(decision_ab: int | None, decision_ba: int | None) -> int:
    """Final decision from the (A, B) and (B, A) verdicts: the agreed winner, else −1 (unparsed = −1)."""
    if decision_ab is None or decision_ba is None or decision_ab == -1:
        return -1
    mapped_back = {0: 1, 1: 0, -1: -1}[decision_ba]
    return decision_ab if decision_ab == mapped_back else -1


class PairwiseJudge(ABC):
    """Compares responses pairwise in both orders.

    Attributes (refreshed by every ``choose_batch_generated`` call):
        last_n_unparsed: how many single verdicts (AB or BA) had no parseable verdict line.
        last_raw_outputs: per pair, ``{"ab": text, "ba": text}`` — the judge's raw outputs.
    """

    def __init__(self, protocol: str = "reasoning"):
        check_protocol(protocol)
        self.protocol = protocol
        self.last_n_unparsed = 0
        self.last_raw_outputs: list[dict] = []

    def parse(self, text: str) -> int | None:
        """The decision in one raw verdict text, by this judge's protocol (None = unparsed)."""
        return parse_paper_verdict(text) if self.protocol == "paper" else parse_judgement(text)

    @abstractmethod
    def _raw_verdicts(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[str]:
        """One verdict text per (prompt, response shown as A, response shown as B), in input order."""

    def choose_batch_generated(
        self, prompts: list[str], completions_a: list[str], completions_b: list[str]
    ) -> list[int]:
        """0 = A preferred, 1 = B preferred, −1 = tie / orders disagree / unparsed, per pair."""
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(completions_a)} A, {len(completions_b)} B")
        n = len(prompts)
        # Both orders in one batch: one engine call for vLLM, a full thread pool for the APIs.
        raw = self._raw_verdicts(prompts + prompts, completions_a + completions_b, completions_b + completions_a)
        raw_ab, raw_ba = raw[:n], raw[n:]
        ab = [self.parse(text) for text in raw_ab]
        ba = [self.parse(text) for text in raw_ba]
        self.last_n_unparsed = sum(d is None for d in ab + ba)
        self.last_raw_outputs = [{"ab": x, "ba": y} for x, y in zip(raw_ab, raw_ba)]
        return [combine_orders(x, y) for x, y in zip(ab, ba)]


class LLMStyleJudge(PairwiseJudge):
    """A persona-prompted language model as the judge, over any ``ChatBackend`` (greedy by default)."""

    def __init__(
        self,
        backend: ChatBackend,
        style: str,
        *,
        sampling: SamplingParams = SamplingParams(max_new_tokens=1024, temperature=0.0),
        budget: TokenBudget | None = None,
        protocol: str = "reasoning",
    ):
        super().__init__(protocol)
        self.backend = backend
        self.style = resolve_style(style)
        if protocol == "paper":
            budget_tokens = min(sampling.max_new_tokens, PAPER_VERDICT_MAX_TOKENS)
            sampling = dataclasses.replace(sampling, max_new_tokens=budget_tokens)
        self.sampling = sampling
        self.budget = budget

    def build_messages(self, prompt: str, response_a: str, response_b: str) -> list[dict]:
        """The judge conversation for one ordered pair (fields clipped to the token budget when one is set)."""

        def build(request: str, first: str, second: str) -> list[dict]:
            return build_judge_messages(self.style, request, first, second, protocol=self.protocol)

        if self.budget is None:
            return build(prompt, response_a, response_b)
        return self.budget.fit(build, [prompt, response_a, response_b])

    def _raw_verdicts(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[str]:
        conversations = [self.build_messages(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]
        return self.backend.generate(conversations, self.sampling)


class StyleJudge(LLMStyleJudge):
    """The judge on a local transformers model (the reference's ``StyleJudge``, generation mode).

    Unlike the reference (which cut inputs at 2048 tokens from the right, losing response B and the
    question), over-long pairs have the request and both responses clipped in the middle, fairly, so
    the rules, both labels and the final question always reach the model.
    """

    def __init__(
        self,
        model,
        tokenizer,
        style: str,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 1024,
        max_input_tokens: int = 4096,
    ):
        super().__init__(
            HFChatBackend(model, tokenizer, batch_size=batch_size, max_input_tokens=max_input_tokens),
            style,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            budget=TokenBudget(tokenizer, max_input_tokens),
        )
