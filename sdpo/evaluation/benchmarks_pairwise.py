"""AlpacaEval 2 (length-controlled win rate) and an Arena-Hard-style pairwise judgement, judged by any
of the project's chat backends (Claude, an OpenAI-compatible server, an in-process vLLM model).

Both go through the ``alpaca_eval`` package: its ``PairwiseAnnotator`` formats the judge prompt, calls the
judge, parses the verdict and keeps track of which answer was shown first; its
``get_length_controlled_winrate`` fits the AlpacaEval-2 length-controlled GLM. Only the judge call is
ours: ``BackendCompletions`` is the annotator's ``fn_completions`` and sends every prompt through
``sdpo.chat.backends`` (the SDKs' retry and one-line failures), so the judge can be any backend instead
of the OpenAI client alpaca_eval would build.

* AlpacaEval 2: the AE-2 annotator's own prompt (``alpaca_eval_clf_gpt4_turbo``, the one inside the
  paper's ``weighted_alpaca_eval_gpt4_turbo``) against the reference outputs (gpt4_turbo). The paper's
  annotator weights by the judge's probability of each verdict token; the judges here return text, so
  each verdict is the judge's one-token answer (alpaca_eval's ``is_binarize`` form of the same prompt).
  The LC GLM needs AlpacaEval's per-instruction difficulty (``df_gamed.csv`` of the
  ``tatsu-lab/alpaca_eval`` Hub dataset, read through the Hub cache, so an offline machine needs it
  cached); without it the raw win rate is reported and the LC value is left empty with a note.
* Arena-Hard style: our judge prompt (``prompts/arena_hard_style_judge.txt``: the judge answers first,
  then compares, then gives one of five verdicts ``[[A>>B]] … [[B>>A]]``), every pair judged in both
  orders, score = the model's mean result over both (win 1, tie 0.5, loss 0) in percent. Arena-Hard-Auto
  itself is not a pip package; its v2 questions and baseline answers are read from its files.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdpo.chat.backends import ChatBackend
from sdpo.data.data_sources import DataError
from sdpo.models.generation import SamplingParams
from sdpo.utils.file_io import iter_jsonl

ARENA_JUDGE_PROMPT = Path(__file__).parent / "prompts" / "arena_hard_style_judge.txt"
VERDICTS = {"A>>B": 1, "A>B": 1, "A=B": 1.5, "B>A": 2, "B>>A": 2}  # alpaca_eval's preference codes
ARENA_CATEGORIES = {"arena_hard_hard": "hard_prompt", "arena_hard_creative": "creative_writing"}


def missing_pairwise_packages() -> list[str]:
    return [name.replace("_", "-") for name in ("alpaca_eval",) if importlib.util.find_spec(name) is None]


@dataclass(frozen=True)
class PairwiseItem:
    """One prompt with the baseline's answer. ``index``: the prompt's position in AlpacaEval (the LC GLM's
    instruction-difficulty key)."""

    uid: str
    instruction: str
    baseline_output: str
    baseline_generator: str
    category: str = ""
    index: int = 0


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) of a .jsonl file or a .json list; a bad row is a DataError naming file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return [(f"{path}: row {i + 1}", row) for i, row in enumerate(data)]
    rows = []
    for line, row, error in iter_jsonl(path):
        if error:
            raise DataError(f"{path}:{line}: {error}")
        rows.append((f"{path}:{line}", row))
    return rows


def _field(where: str, row, name: str) -> str:
    value = row.get(name) if isinstance(row, dict) else None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string")
    return value


def load_alpaca_eval_set(path: Path) -> list[PairwiseItem]:
    """AlpacaEval rows (``instruction``, reference ``output``, ``generator``), as in the
    ``tatsu-lab/alpaca_eval`` ``alpaca_eval_gpt4_baseline`` eval set; ``index`` = the row's position."""
    items = []
    for index, (where, row) in enumerate(_rows(path)):
        items.append(
            PairwiseItem(
                uid=str(index),
                instruction=_field(where, row, "instruction"),
                baseline_output=_field(where, row, "output"),
                baseline_generator=row.get("generator") or "reference",
                category=row.get("dataset") or "",
                index=index,
            )
        )
    return items


def _arena_answer(where: str, row) -> str:
    """An Arena-Hard-Auto answer row's text: ``messages[-1].content.answer`` (v2 files), or ``answer``."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        content = row["messages"][-1].get("content") if isinstance(row["messages"][-1], dict) else None
        content = content.get("answer") if isinstance(content, dict) else content
        if isinstance(content, str):
            return content
    return _field(where, row, "answer")


def load_arena_hard_set(questions: Path, baseline_answers: dict[str, Path]) -> list[PairwiseItem]:
    """Arena-Hard-Auto v2 ``question.jsonl`` rows (``uid``, ``category``, ``prompt``) joined by uid with the
    answers of each category's baseline (``model_answer/<model>.jsonl``; v2: o3-mini for ``hard_prompt``,
    gemini-2.0-flash for ``creative_writing``). ``baseline_answers``: category → file; questions of other
    categories are left out."""
    answers = {}
    for category, path in baseline_answers.items():
        by_uid, generator = {}, path.stem
        for where, row in _rows(path):
            by_uid[_field(where, row, "uid")] = _arena_answer(where, row)
            generator = row.get("model") or generator
        answers[category] = (by_uid, generator)
    items = []
    for where, row in _rows(questions):
        uid, category = _field(where, row, "uid"), _field(where, row, "category")
        if category not in answers:
            continue
        by_uid, generator = answers[category]
        if uid not in by_uid:
            raise DataError(f"{where}: question {uid} has no answer in {baseline_answers[category]}")
        items.append(PairwiseItem(uid, _field(where, row, "prompt"), by_uid[uid], generator, category))
    return items


def generate_answers(generator: ChatBackend, items: list[PairwiseItem], sampling: SamplingParams) -> list[str]:
    """The evaluated model's answer to each prompt (one user turn, no system prompt)."""
    return generator.generate([[{"role": "user", "content": item.instruction}] for item in items], sampling)


class BackendCompletions:
    """alpaca_eval's ``fn_completions`` over one of our chat backends: ChatML prompts → conversations →
    ``backend.generate`` (greedy) → ``{"completions": [...]}``."""

    def __init__(self, backend: ChatBackend, max_new_tokens: int):
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.__name__ = f"sdpo_backend_completions[{backend.name}]"

    def __call__(self, prompts: list[str], **_ignored) -> dict:
        from alpaca_eval.utils import prompt_to_chatml

        conversations = [prompt_to_chatml(prompt) for prompt in prompts]
        texts = self.backend.generate(conversations, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0))
        return {"completions": texts}


def arena_verdict_parser(completion: str) -> list:
    """The last ``[[X]]`` verdict label of a judgement (alpaca_eval preference code), or [] when none."""
    labels = re.findall(r"\[\[([AB]>>?[AB]|A=B)\]\]", completion.replace(" ", ""))
    labels = [label for label in labels if label in VERDICTS]
    return [VERDICTS[labels[-1]]] if labels else [None]


def ae2_verdict_parser(completion: str) -> list:
    """AE-2's one-token verdict: ``m`` → output_1, ``M`` → output_2 (anything else: no preference)."""
    token = completion.strip().strip("`'\"").strip()
    return [1 if token == "m" else 2 if token == "M" else None]


def _annotator(
    name: str, prompt_template: Path, backend: ChatBackend, parser, max_new_tokens: int, shuffle: bool, work_dir: Path
):
    """A ``PairwiseAnnotator`` from a one-annotator config written to ``work_dir``; the judge call and the
    parser are ours (passed to alpaca_eval as callables)."""
    from alpaca_eval.annotators import PairwiseAnnotator

    folder = work_dir / "alpaca_eval_configs" / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {name: {"prompt_template": str(prompt_template.resolve()), "batch_size": 1, "is_shuffle": shuffle}}
    (folder / "configs.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return PairwiseAnnotator(
        annotators_config=str(folder / "configs.yaml"),
        caching_path=None,
        is_avoid_reannotations=False,
        fn_completions=BackendCompletions(backend, max_new_tokens),
        fn_completion_parser=parser,
    )


def _head2head(annotator, items: list[PairwiseItem], first: list[str], second: list[str], generators) -> list[dict]:
    outputs_1 = [
        {"instruction": item.instruction, "output": text, "generator": generators[0], "index": item.index}
        for item, text in zip(items, first)
    ]
    outputs_2 = [
        {"instruction": item.instruction, "output": text, "generator": generators[1], "index": item.index}
        for item, text in zip(items, second)
    ]
    return annotator.annotate_head2head(outputs_1, outputs_2, keys_to_merge=["instruction", "index"], is_ordered=True)


def alpaca_eval_2(
    items: list[PairwiseItem], outputs: list[str], model_name: str, judge: ChatBackend, work_dir: Path
) -> dict:
    """AlpacaEval 2: win rate and LC win rate (percent) of ``outputs`` against the reference outputs."""
    import pandas as pd
    from alpaca_eval.constants import EVALUATORS_CONFIG_DIR
    from alpaca_eval.metrics import get_length_controlled_winrate, get_winrate

    template = Path(EVALUATORS_CONFIG_DIR) / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
    annotator = _annotator("sdpo_alpaca_eval_2", template, judge, ae2_verdict_parser, 4, True, work_dir)
    generators = (items[0].baseline_generator if items else "reference", model_name)
    annotations = pd.DataFrame(_head2head(annotator, items, [i.baseline_output for i in items], outputs, generators))
    judged = annotations[annotations["preference"].notna()]
    result = {
        "n": len(items),
        "n_judged": len(judged),
        "judge": judge.name,
        "annotator_prompt": "alpaca_eval_clf_gpt4_turbo (binarized verdict)",
    }
    if judged.empty:
        return {**result, "win_rate": None, "length_controlled_winrate": None, "note": "the judge gave no verdict"}
    result["win_rate"] = float(get_winrate(judged)["win_rate"])
    try:
        lc = get_length_controlled_winrate(judged, save_weights_dir=None, is_add_glm_preference_inplace=False)
        result["length_controlled_winrate"] = float(lc["length_controlled_winrate"])
        result["lc_standard_error"] = float(lc["lc_standard_error"])
    except (OSError, ValueError, KeyError) as error:  # no Hub file (offline), or a fit the data cannot support
        result["length_controlled_winrate"] = None
        reason = (
            "AlpacaEval's df_gamed.csv is not in the Hub cache (fetch it once with network)"
            if isinstance(error, OSError)
            else f"{type(error).__name__}: {str(error).split('. ')[0][:160]}"
        )
        result["note"] = f"length-controlled GLM unavailable: {reason}"
    return result


def arena_hard_style(
    items: list[PairwiseItem],
    outputs: list[str],
    model_name: str,
    judge: ChatBackend,
    work_dir: Path,
    max_judge_tokens: int = 2048,
) -> dict:
    """Win rate (percent) of ``outputs`` against the baseline answers, each pair judged in both orders."""
    annotator = _annotator(
        "sdpo_arena_hard_style", ARENA_JUDGE_PROMPT, judge, arena_verdict_parser, max_judge_tokens, False, work_dir
    )
    baseline = [item.baseline_output for item in items]
    generator = items[0].baseline_generator if items else "baseline"
    model_second = _head2head(annotator, items, baseline, outputs, (generator, model_name))
    model_first = _head2head(annotator, items, outputs, baseline, (model_name, generator))
    scores = []
    for game in model_second:
        if game["preference"] is not None and game["preference"] == game["preference"]:
            scores.append({1: 0.0, 1.5: 0.5, 2: 1.0, 0: 0.5}[game["preference"]])
    for game in model_first:
        if game["preference"] is not None and game["preference"] == game["preference"]:
            scores.append({1: 1.0, 1.5: 0.5, 2: 0.0, 0: 0.5}[game["preference"]])
    return {
        "n": len(items),
        "games": 2 * len(items),
        "games_judged": len(scores),
        "judge": judge.name,
        "baseline": generator,
        "win_rate": 100 * sum(scores) / len(scores) if scores else None,
    }
