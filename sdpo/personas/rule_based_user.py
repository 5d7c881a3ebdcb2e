"""A deterministic, programmatic user: style checks instead of a language model.

For the styles whose preference a program can check honestly (emojis, opening praise and closing
filler, lists, headers, bold, length, punctuation, hedging words), ``find_violations`` lists what a
response does that the persona dislikes. On top of it:

* ``RuleBasedUserSimulator`` writes a short, natural follow-up naming the problems (wording picked
  deterministically from the inputs, so runs repeat exactly), or a brief approval when there are none.
* ``RuleBasedJudge`` prefers the response with the lower summed violation severity (a tie within 10%), speaking the
  same ``Judgement:`` protocol as the model judges, in both orders, with the same bookkeeping.

Useful as a free, instant, noise-free user for CPU runs and tests, and as a sanity check of the LLM
judges. Only what is listed per style is checked; for example the ``exclamation`` persona's taste for
clarifying questions is not.

Fenced and inline code is removed before the punctuation, list and header checks, so ``!=`` or a
``# comment`` inside code is not held against a response.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sdpo.personas.style_judge import PairwiseJudge
from sdpo.personas.user_simulator import UserSimulator, resolve_style

# Thresholds, chosen to match what the personas describe as "long" or "short".
SHORT_MAX_WORDS = 60  # "short": a reply of a few sentences at most
CONCISE_MAX_WORDS = 150  # "answer_directly_reduce_formatting": concise plain text
LONG_LIST_ITEMS = 5  # a list with this many items or more counts as long


@dataclass(frozen=True)
class Violation:
    """Something a response does that the persona dislikes.

    Attributes:
        reason: what the response did, as a clause after "the reply ..." (``uses emojis (✅)``).
        request: what the user asks for instead, after "please ..." (``leave out the emojis``).
        severity: how much of it: one per offending item (emoji, header, list item, punctuation mark, ...),
            or for a length limit the share of the limit the reply runs over (90 words against 60: 0.5).
    """

    reason: str
    request: str
    severity: float = 1.0


# Emoji and pictograph blocks, dingbats, misc symbols, flags, variation selector 16 and ZWJ.
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\u231a\u231b\u23e9-\u23fa\u3030\u303d\u3297\u3299\ufe0f\u200d]"
)
# Icon-like geometric shapes (■ ▶ ◆ ●) that writing_tics_v2 also dislikes.
_ICON = re.compile("[\u25a0-\u25ff]")
_FENCED_CODE = re.compile(r"```.*?(```|$)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LIST_ITEM = re.compile(r"^(\s*)(?:[-*+•]|\d{1,3}[.)])\s+\S")
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_WORD = re.compile(r"[A-Za-z0-9']+")

_OPENING_PRAISE = re.compile(
    r"^\W*(?:"
    r"(?:what an?|that's an?|that is an?|this is an?|such an?)?\s*"
    r"(?:great|good|excellent|fantastic|wonderful|interesting|insightful|thoughtful|fascinating|awesome|"
    r"brilliant|amazing|lovely)\s+(?:question|point|idea|observation|topic|thought|ask)"
    r"|(?:absolutely|certainly|of course|sure thing|great)\s*[!,.]"
    r"|i(?:'d| would)? (?:be )?(?:happy|glad|delighted) to help"
    r"|happy to help"
    r"|thanks? (?:you )?for (?:asking|the question|reaching out)"
    r"|you(?:'re| are) (?:absolutely|totally|completely) right"
    r")",
    re.IGNORECASE,
)
_CLOSING_FILLER = re.compile(
    r"(?:i )?hope (?:this|that|it) (?:helps|clarifies|answers|was helpful)"
    r"|let me know if"
    r"|feel free to (?:ask|reach out|let me know)"
    r"|don't hesitate to"
    r"|if you have any (?:other|more|further)? ?questions"
    r"|is there anything else"
    r"|happy (?:coding|learning|writing|reading|cooking|travell?ing)"
    r"|good luck",
    re.IGNORECASE,
)
_FOLLOW_UP_OFFER = re.compile(
    r"let me know|would you like (?:me )?to|do you want me to|shall i|should i|want me to"
    r"|feel free to|is there anything else|can i help",
    re.IGNORECASE,
)
_HEDGES = ("generally", "typically", "often", "usually")


def _strip_code(text: str) -> str:
    return _INLINE_CODE.sub(" ", _FENCED_CODE.sub(" ", text))


def _quote(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return f'"{text if len(text) <= limit else text[: limit - 1].rstrip() + "…"}"'


def _examples(found: list[str], limit: int = 3) -> str:
    distinct = list(dict.fromkeys(found))
    return ", ".join(distinct[:limit])


def _word_count(text: str) -> int:
    return len(_WORD.findall(text))


def _list_items(text: str) -> list[tuple[int, str]]:
    """(indent width, line) of every list item line."""
    items = []
    for line in text.splitlines():
        match = _LIST_ITEM.match(line)
        if match:
            items.append((len(match.group(1).replace("\t", "    ")), line))
    return items


def _has_nested_list(text: str) -> bool:
    items = _list_items(text)
    return bool(items) and any(indent > min(i for i, _ in items) for indent, _ in items)


def _headers(text: str) -> list[str]:
    return [line for line in text.splitlines() if _HEADER.match(line)]


def _last_sentences(text: str, count: int = 2) -> str:
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(sentences[-count:])


def _check_emojis(text: str) -> list[Violation]:
    found = [ch for ch in _EMOJI.findall(text) if ch not in "\ufe0f\u200d"]
    if not found:
        return []
    return [Violation(f"uses emojis ({_examples(found)})", "leave out the emojis", len(found))]


def _check_icons(text: str) -> list[Violation]:
    found = _ICON.findall(text)
    if not found:
        return []
    return [Violation(f"uses icon symbols ({_examples(found)})", "drop the icon symbols", len(found))]


def _check_opening_praise(text: str) -> list[Violation]:
    match = _OPENING_PRAISE.match(text.strip())
    if not match:
        return []
    return [
        Violation(
            f"opens with praise or pleasantries ({_quote(match.group(0).strip())})", "skip the opening compliments"
        )
    ]


def _check_closing_filler(text: str) -> list[Violation]:
    match = _CLOSING_FILLER.search(_last_sentences(text))
    if not match:
        return []
    return [
        Violation(
            f"ends with filler ({_quote(match.group(0))})", "stop when the answer is done, without closing filler"
        )
    ]


def _check_follow_up_offer(text: str) -> list[Violation]:
    ending = _last_sentences(text, 1)
    match = _FOLLOW_UP_OFFER.search(ending)
    if match:
        return [Violation(f"ends by offering more help ({_quote(match.group(0))})", "end without offering more help")]
    if ending.rstrip().endswith("?"):
        return [Violation(f"ends with a follow-up question ({_quote(ending)})", "end without a follow-up question")]
    return []


def _check_headers(text: str) -> list[Violation]:
    headers = _headers(_strip_code(text))
    if not headers:
        return []
    return [Violation(f"uses markdown headers ({len(headers)})", "drop the headers", len(headers))]


def _check_bold(text: str) -> list[Violation]:
    bold = _BOLD.findall(_strip_code(text))
    if not bold:
        return []
    return [Violation(f"uses bold text ({len(bold)}x)", "drop the bold text", len(bold))]


def _check_any_list(text: str) -> list[Violation]:
    items = _list_items(_strip_code(text))
    if not items:
        return []
    return [Violation(f"uses a list ({len(items)} items)", "write plain paragraphs instead of lists", len(items))]


def _check_long_list(text: str) -> list[Violation]:
    items = _list_items(_strip_code(text))
    if len(items) < LONG_LIST_ITEMS:
        return []
    return [
        Violation(
            f"has a long list ({len(items)} items)", "keep lists short or use prose", len(items) / LONG_LIST_ITEMS
        )
    ]


def _check_nested_list(text: str) -> list[Violation]:
    if not _has_nested_list(_strip_code(text)):
        return []
    return [Violation("uses nested lists", "avoid nested lists")]


def _check_needs_list(text: str) -> list[Violation]:
    if _list_items(_strip_code(text)):
        return []
    return [Violation("has no lists, just paragraphs", "organise the answer as a list")]


def _check_needs_header(text: str) -> list[Violation]:
    if _headers(_strip_code(text)):
        return []
    return [Violation("has no markdown headers", "add headers to structure it")]


def _check_length(limit: int):
    def check(text: str) -> list[Violation]:
        words = _word_count(text)
        if words <= limit:
            return []
        return [Violation(f"is too long ({words} words)", f"keep it under {limit} words", (words - limit) / limit)]

    return check


def _check_punctuation(text: str) -> list[Violation]:
    prose = _strip_code(text)
    marks = {
        "commas": prose.count(","),
        "semicolons": prose.count(";"),
        # a colon followed by a space or line end, so times (10:30) and URLs (https://) are not counted
        "colons": len(re.findall(r":(?=\s|$)", prose)),
        "dashes": len(re.findall(r"[—–]|\s--\s", prose)),
    }
    used = [f"{name} ({count})" for name, count in marks.items() if count]
    if not used:
        return []
    request = "write simple sentences without commas, semicolons, colons or dashes"
    return [Violation(f"uses {', '.join(used)}", request, sum(marks.values()))]


def _check_exclamation(text: str) -> list[Violation]:
    count = len(re.findall(r"!(?!=)", _strip_code(text)))
    if not count:
        return []
    return [Violation(f"uses exclamation marks ({count})", "drop the exclamation marks", count)]


def _check_hedges(text: str) -> list[Violation]:
    found = [w.lower() for w in _WORD.findall(text) if w.lower() in _HEDGES]
    if not found:
        return []
    return [
        Violation(
            f"hedges with {_examples([repr(w) for w in found])}",
            "commit to an answer without hedging words",
            len(found),
        )
    ]


_RULES = {
    "no_emojis": (_check_emojis,),
    "writing_tics": (_check_emojis,),
    "writing_tics_v2": (_check_emojis, _check_icons),
    "less_filler_praise_sycophancy": (_check_opening_praise, _check_closing_filler),
    "sycophantic_and_praise": (_check_opening_praise, _check_closing_filler),
    "no_filler_followup": (_check_follow_up_offer,),
    "answer_directly_reduce_formatting": (
        _check_headers,
        _check_bold,
        _check_long_list,
        _check_length(CONCISE_MAX_WORDS),
    ),
    "no_lists": (_check_any_list, _check_headers),
    "more_lists": (_check_needs_list, _check_needs_header),
    "formatting": (_check_long_list, _check_nested_list),
    "less_formatting": (_check_headers, _check_nested_list),
    "short": (_check_length(SHORT_MAX_WORDS),),
    "no_punctuation": (_check_punctuation,),
    "exclamation": (_check_exclamation,),
    "committing": (_check_hedges,),
}

RULE_BASED_STYLES: list[str] = sorted(_RULES)


def _rule_based_style(style: str) -> str:
    name = resolve_style(style)
    if name not in _RULES:
        raise ValueError(
            f"style {style!r} has no programmatic checks; rule-based styles: {', '.join(RULE_BASED_STYLES)}"
        )
    return name


def check(style: str, text: str) -> list[Violation]:
    """Every violation of ``style`` found in ``text``."""
    return [v for rule in _RULES[_rule_based_style(style)] for v in rule(text)]


def find_violations(style: str, text: str) -> list[str]:
    """Human-readable reasons why ``text`` does not suit ``style`` (empty when it does)."""
    return [v.reason for v in check(style, text)]


def _pick(options: tuple[str, ...], *keys: str) -> str:
    """A choice among ``options`` that depends only on ``keys`` (stable across runs and machines)."""
    digest = hashlib.sha256("\x00".join(keys).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


_APPROVALS = (
    "Thanks, that is how I like it.",
    "Good, that works for me.",
    "Perfect, this is the style I want.",
    "Nice, keep answering like that.",
)
_OPENERS = (
    "Not quite how I like it.",
    "Hmm, could you change how you write this?",
    "This isn't the style I want.",
    "Please adjust your answer.",
)
_COMPLAINTS = ("Your reply {reasons}.", "The answer {reasons}.", "What you wrote {reasons}.")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def write_feedback(style: str, prompt: str, completion: str) -> str:
    """The rule-based user's follow-up to ``completion``."""
    violations = check(style, completion)
    if not violations:
        return _pick(_APPROVALS, style, prompt, completion)
    opener = _pick(_OPENERS, "opener", style, prompt, completion)
    template = _pick(_COMPLAINTS, "complaint", style, prompt, completion)
    reasons = _join([v.reason for v in violations])
    requests = _join([v.request for v in violations])
    return f"{opener} {template.format(reasons=reasons)} Next time, please {requests}."


class RuleBasedUserSimulator(UserSimulator):
    """A user simulator that complains about exactly the rule violations it finds."""

    def __init__(self, style: str):
        self.style = _rule_based_style(style)

    def generate_feedback(self, prompts: list[str], completions: list[str], rewards=None) -> list[str]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        return [write_feedback(self.style, p, c) for p, c in zip(prompts, completions)]


def severity(violations: list[Violation]) -> float:
    """How far a response is from the persona: the summed severity of its violations (0 = none)."""
    return sum(v.severity for v in violations)


def _describe(label: str, violations: list[Violation]) -> str:
    if not violations:
        return f"Response {label}: no violations."
    listed = "; ".join(v.reason for v in violations)
    return f"Response {label}: {len(violations)} violation(s), severity {severity(violations):.2f}: {listed}."


class RuleBasedJudge(PairwiseJudge):
    """Prefers the response further from violating the persona: lower summed severity wins.

    Severities within ``TIE_MARGIN`` of each other (relative to the larger) are a tie (C), as a reader would not
    tell 70 words from 72; otherwise the judge decides even when both responses break the rule, which a
    person also would (the shorter of two long answers suits "short" better). Counting violations instead
    left most pairs of similar-length answers tied.
    """

    TIE_MARGIN = 0.1

    def __init__(self, style: str):
        super().__init__()
        self.style = _rule_based_style(style)

    def _raw_verdicts(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[str]:
        verdicts = []
        for first, second in zip(firsts, seconds):
            violations_a, violations_b = check(self.style, first), check(self.style, second)
            score_a, score_b = severity(violations_a), severity(violations_b)
            letter = (
                "C"
                if abs(score_a - score_b) <= self.TIE_MARGIN * max(score_a, score_b)
                else "A"
                if score_a < score_b
                else "B"
            )
            verdicts.append(f"{_describe('A', violations_a)}\n{_describe('B', violations_b)}\nJudgement: {letter}")
        return verdicts
