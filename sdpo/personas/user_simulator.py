"""Simulated users: the persona table, the simulator prompt, and simulators over any chat backend.

A simulated user reads one (request, response) pair and writes the follow-up message a real user with
a given style preference would send next. That follow-up is the hindsight signal SDPO learns from;
the preference itself lives only in the persona text (``STYLE_PERSONAS``), never in the policy's
context.

* ``STYLE_PERSONAS``: the 32 profiles of the newer reference table, each a short second-person
  paragraph starting with ``USER PROFILE:``. ``STYLE_ALIASES`` maps the misspelled key of the older
  table to its canonical name; ``CORE_STYLES`` and ``DEFAULT_EVAL_STYLES`` are the groupings the
  scripts use.
* ``build_simulator_messages``: system = persona + rules, user = the labelled request and response
  followed by a cue. The ``"claude"`` variant asks for at most two sentences with no preface.
* ``LLMUserSimulator``: the simulator over any ``ChatBackend``; an empty follow-up is replaced by a
  neutral fallback and counted. The ``"paper"`` variant follows App. D.3: a very brief reply that
  may approve a fitting response and never solves the task. ``StyleUserSimulator`` is the reference's
  name for the local transformers version.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from sdpo.chat.backends import ChatBackend, HFChatBackend, TokenBudget
from sdpo.models.generation import SamplingParams

STYLE_PERSONAS: dict[str, str] = {
    "concise_casual_beginner": (
        "USER PROFILE: You like answers that are short and clear, written the way a friend would talk, "
        "and pitched at someone new to the topic. Long, formal or jargon-packed replies put you off."
    ),
    "detailed_professional_expert": (
        "USER PROFILE: You are an expert and want thorough, professional answers: well organised, "
        "impersonal and analytical, with precise, sophisticated wording. Depth matters to you, but padding "
        "does not, so the answer should not run longer than it needs to. Your own messages are brief."
    ),
    "concise_casual_expert": (
        "USER PROFILE: You know the field well and want replies that are as short as possible and very "
        "relaxed in tone. Slang and informal phrasing are welcome; stiff, formal writing is not."
    ),
    "concise_professional_beginner": (
        "USER PROFILE: You are a newcomer to most topics and want replies that are as short as possible "
        "while staying strictly formal and professional in tone."
    ),
    "concise_professional_expert": (
        "USER PROFILE: You are an expert who wants replies that are as short as possible yet written with "
        "a rich vocabulary and intricate sentences; you enjoy semicolons and em-dashes."
    ),
    "detailed_casual_beginner": (
        "USER PROFILE: You are learning and like thorough explanations in a friendly, conversational "
        "voice that walk through things one step at a time."
    ),
    "detailed_casual_expert": (
        "USER PROFILE: You are an expert who wants in-depth, detailed answers delivered in a very casual, "
        "chatty voice. Formal writing bores you."
    ),
    "detailed_professional_beginner": (
        "USER PROFILE: You want long, professional answers that only use plain, everyday words. Technical "
        "jargon frustrates you."
    ),
    "poetic": (
        "USER PROFILE: You love answers written like poetry: lyrical, full of vivid images and metaphors. "
        "Flat, matter-of-fact prose disappoints you, even though you write your own messages in ordinary "
        "language."
    ),
    "literal": (
        "USER PROFILE: You want plain, clear, short answers that say things directly. Flowery or poetic "
        "language annoys you."
    ),
    "no_punctuation": (
        "USER PROFILE: You find punctuation-heavy writing tiresome. You especially dislike commas, "
        "semicolons, colons and em-dashes, and would rather read simple sentences that barely need them."
    ),
    "no_emojis": (
        "USER PROFILE: You dislike emojis and decorative icons in answers (for example ✅, 📌 or 🧠) and "
        "want plain text only."
    ),
    "short": "USER PROFILE: You want replies to be extremely short and to the point.",
    "less_filler_praise_sycophancy": (
        'USER PROFILE: You dislike replies that open by complimenting you or your question ("great '
        'question" and the like), that agree with you just to please you, or that close with filler such as '
        '"I hope this helps" or "let me know if you need anything else". You want the answer and nothing '
        "around it."
    ),
    "answer_directly_reduce_formatting": (
        "USER PROFILE: You want the reply to answer your question directly, from its first sentence, in short "
        "plain text. Long lists and heavy markdown such as bold text and ### headers put you off."
    ),
    "clarification_first": (
        "USER PROFILE: When your request is ambiguous, you want the assistant to ask you a clarifying "
        "question before answering rather than guess what you meant."
    ),
    "single_answer": (
        "USER PROFILE: You dislike being given several options to choose from. You want the assistant to "
        "commit to the single best answer."
    ),
    "writing_tics": "USER PROFILE: You do not like emojis appearing in answers.",
    "writing_tics_v2": (
        "USER PROFILE: You specifically dislike emojis and icon symbols in answers. Other formatting, such "
        "as lists or headers, is fine with you."
    ),
    "formatting": (
        "USER PROFILE: Long bullet lists bother you, and nested bullet lists even more. You prefer answers "
        "written as flowing paragraphs."
    ),
    "no_sycophantic": (
        "USER PROFILE: You want an assistant that pushes back: it should challenge your assumptions when "
        "they are wrong and disagree with you when that is warranted, rather than simply go along. Your own "
        "feedback is always very brief."
    ),
    "sycophantic_and_praise": (
        "USER PROFILE: You dislike flattery and people-pleasing. Replies should not open by praising you or "
        "your question, should not simply agree with you to be agreeable, and should not end with filler "
        'such as "hope this helps".'
    ),
    "answer_first": (
        "USER PROFILE: You want every reply to begin with a short, direct answer that stands on its own, "
        "set apart at the very top, and only then the full explanation."
    ),
    "no_filler_followup": (
        "USER PROFILE: You dislike replies that end by offering more help or asking a follow-up question, "
        'such as "let me know if..." or "would you like me to...".'
    ),
    "high_initiative": (
        "USER PROFILE: You like an assistant that takes the lead in the conversation by asking you "
        "follow-up questions that move things forward."
    ),
    "committing": (
        'USER PROFILE: You want one committed answer. Hedging words such as "generally", "typically", '
        '"often" or "usually" annoy you.'
    ),
    "no_lists": "USER PROFILE: You dislike lists and markdown headers. You want answers written as plain paragraphs.",
    "more_lists": (
        "USER PROFILE: Plain blocks of paragraphs bore you. You want answers organised with lists and markdown headers."
    ),
    "more_formatting": (
        "USER PROFILE: You love richly formatted answers with lists, headers and other markdown; the more "
        "structure, the better."
    ),
    "less_formatting": "USER PROFILE: You want answers with less formatting: fewer ### headers and no nested lists.",
    "opinionated": (
        "USER PROFILE: You want the assistant to take a clear position and to disagree with you when it "
        "thinks you are wrong. Lists of options and balanced trade-offs frustrate you."
    ),
    "exclamation": (
        "USER PROFILE: You dislike exclamation marks in answers. When a request of yours is ambiguous, you "
        "appreciate a clarifying question before the answer."
    ),
}

# Older reference configs used a misspelled key; accept it as a name for the same persona.
STYLE_ALIASES: dict[str, str] = {"answer_direclty_reduce_formatting": "answer_directly_reduce_formatting"}

# The 8 {concise, detailed} x {casual, professional} x {beginner, expert} profiles (in-context oracle).
CORE_STYLES: list[str] = [
    f"{length}_{tone}_{level}"
    for length in ("concise", "detailed")
    for tone in ("casual", "professional")
    for level in ("beginner", "expert")
]

# Styles evaluated by default when checkpoints are compared.
DEFAULT_EVAL_STYLES: list[str] = ["less_filler_praise_sycophancy", "no_emojis", "answer_directly_reduce_formatting"]

PROMPT_VARIANTS = ("default", "claude", "paper")

# Sent in place of an empty simulator output, so training always has a follow-up to condition on.
FALLBACK_FEEDBACK = "Please rework your answer so it better matches the way I like responses to be written."


def resolve_style(style: str) -> str:
    """Canonical persona name for ``style`` (aliases resolved); unknown → ValueError listing the styles."""
    name = STYLE_ALIASES.get(style, style)
    if name not in STYLE_PERSONAS:
        raise ValueError(f"unknown style {style!r}; known styles: {', '.join(sorted(STYLE_PERSONAS))}")
    return name


def get_persona(style: str) -> str:
    """The persona paragraph of ``style``."""
    return STYLE_PERSONAS[resolve_style(style)]


_SIMULATOR_RULES = {
    "default": (
        "You are writing the next message this user sends in a chat with an AI assistant.\n"
        "- Speak as the user described above, in simple language.\n"
        "- Comment only on how well the assistant's response fits the preferences in the profile.\n"
        "- Do not answer the original request yourself.\n"
        "- Leave out any feedback that has nothing to do with the profile.\n"
        "- Output only the text of the message."
    ),
    "claude": (
        "You are writing the next message this user sends in a chat with an AI assistant.\n"
        "- Speak as the user described above, in plain, straightforward language.\n"
        "- Keep it very brief: two sentences at most.\n"
        "- Judge the response only against the preferences in the profile; ignore everything else.\n"
        "- Do not answer the original request yourself.\n"
        "- If the response already suits the profile, you may simply say so.\n"
        "- Output only the message itself, with no label or preface."
    ),
    # App. D.3 (our wording): very brief, only the reply against the profile, approval allowed, never the task.
    "paper": (
        "You are this user, writing your next chat message to an AI assistant after reading its response.\n"
        "- React only to how the response fits the preferences in the profile; say nothing about anything else.\n"
        "- Be very brief: a few words, one short sentence at most.\n"
        "- If the response already fits the profile, you may just say briefly that it does.\n"
        "- Never do the task or answer the request yourself, and do not rewrite the response.\n"
        "- Write only the message, with no label, quotes or preface."
    ),
}


def build_simulator_messages(style: str, prompt: str, completion: str, *, variant: str = "default") -> list[dict]:
    """Chat messages asking a model to write the profiled user's follow-up to ``completion``.

    System = persona, blank line, rules; user = the labelled original request and assistant response,
    then a cue to write the next message.
    """
    if variant not in _SIMULATOR_RULES:
        raise ValueError(f"unknown prompt variant {variant!r}; use one of {list(PROMPT_VARIANTS)}")
    system = f"{get_persona(style)}\n\n{_SIMULATOR_RULES[variant]}"
    user = (
        f"Original user request:\n{prompt}\n\n"
        f"Assistant response:\n{completion}\n\n"
        "Now write the user's next message to the assistant."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class UserSimulator(ABC):
    """Writes one follow-up message per (request, response) pair."""

    @abstractmethod
    def generate_feedback(self, prompts: list[str], completions: list[str], rewards=None) -> list[str]:
        """One follow-up per pair. ``rewards`` exists for interface compatibility and is ignored."""


class LLMUserSimulator(UserSimulator):
    """A persona-prompted language model as the user, over any ``ChatBackend``.

    Attributes:
        n_empty_feedback: how many empty outputs were replaced by ``FALLBACK_FEEDBACK`` so far.
    """

    def __init__(
        self,
        backend: ChatBackend,
        style: str,
        *,
        sampling: SamplingParams = SamplingParams(max_new_tokens=128, temperature=0.7),
        prompt_variant: str = "default",
        budget: TokenBudget | None = None,
    ):
        if prompt_variant not in PROMPT_VARIANTS:
            raise ValueError(f"unknown prompt variant {prompt_variant!r}; use one of {list(PROMPT_VARIANTS)}")
        self.backend = backend
        self.style = resolve_style(style)
        self.sampling = sampling
        self.prompt_variant = prompt_variant
        self.budget = budget
        self.n_empty_feedback = 0

    def build_messages(self, prompt: str, completion: str) -> list[dict]:
        """The simulator conversation for one pair (fields clipped to the token budget when one is set)."""

        def build(request: str, response: str) -> list[dict]:
            return build_simulator_messages(self.style, request, response, variant=self.prompt_variant)

        if self.budget is None:
            return build(prompt, completion)
        return self.budget.fit(build, [prompt, completion])

    def generate_feedback(self, prompts: list[str], completions: list[str], rewards=None) -> list[str]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        conversations = [self.build_messages(p, c) for p, c in zip(prompts, completions)]
        texts = self.backend.generate(conversations, self.sampling)
        feedback = []
        for text in texts:
            text = text.strip()
            if not text:
                self.n_empty_feedback += 1
                text = FALLBACK_FEEDBACK
            feedback.append(text)
        return feedback


class StyleUserSimulator(LLMUserSimulator):
    """The simulated user on a local transformers model (the reference's ``StyleUserSimulator``).

    Prompts longer than ``max_input_tokens`` have the request and response clipped in the middle so
    the persona and rules always reach the model.
    """

    def __init__(
        self,
        model,
        tokenizer,
        style: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        batch_size: int = 8,
        max_input_tokens: int = 2048,
    ):
        super().__init__(
            HFChatBackend(model, tokenizer, batch_size=batch_size, max_input_tokens=max_input_tokens),
            style,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
            budget=TokenBudget(tokenizer, max_input_tokens),
        )
