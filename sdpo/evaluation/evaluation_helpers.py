"""Evaluation helpers for every evaluator: prompts in, judging and win-rate statistics, results files out.

Used by ``eval_online_sdpo.py`` (and the checkpoint evaluator) in this order:

1. ``load_prompts`` reads a JSONL file with a string field per row (``prompt`` by default);
   ``filter_by_prompt_tokens`` drops prompts whose rendered chat form is too long;
   ``select_prompts`` takes a seeded random subset (same permutation as the reference's
   ``datasets.Dataset.shuffle(seed=...)``, so the same file and seed give the same prompts).
2. ``compute_metrics`` turns the judge's per-example decisions into the win-rate dictionary stored
   in ``eval_history`` (reference spec §5.4.3, plus ``winrate_inc_ties``, which the reference only
   printed); ``format_metrics_line`` is its one-line console form. ``judge_against_baseline`` /
   ``judge_every_style`` run a judge (both orders) and ``compute_metrics`` for every evaluator.
3. ``write_json_atomic`` rewrites the results file after every evaluation (temp file + rename, so a
   crash never leaves a half-written file), ``next_run_index`` numbers runs ``<run_name>_<idx>.json``,
   and ``write_completions_snapshot`` rewrites a few
   truncated completions per evaluation to a JSONL file inside the run's own output folder (the
   reference wrote to a hard-coded ``~/output/sdpo/``).

JSON has no NaN or infinity; ``to_json_safe`` maps them to ``null`` and every writer here uses it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sdpo.data.data_sources import DataError  # noqa: F401 - raised here, re-exported for callers
from sdpo.data.interaction_schema import SYSTEM, USER, parse_messages
from sdpo.models.generation import encode_chat
from sdpo.utils.file_io import (  # noqa: F401 - part of this module's API
    iter_jsonl,
    replace_atomically,
    to_json_safe,
    write_json_atomic,
    write_jsonl_atomic,
)

logger = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"

# Judge decisions: which completion the judge preferred after both presentation orders agreed.
CURRENT_WINS = 0  # completion A: the policy being trained
BASELINE_WINS = 1  # completion B: the baseline (the policy before training, or --baseline_model)
TIE = -1  # a tie, an unparsable judgement, or the two presentation orders disagreeing
DECISION_VALUES = (CURRENT_WINS, BASELINE_WINS, TIE)


# --------------------------------------------------------------------------------------------------
# Prompts: load, length-filter, select
# --------------------------------------------------------------------------------------------------


# A prompt is the request text, or a conversation (TRL's conversational format) that ends with a user turn.
Prompt = str | list[dict]


def as_conversation(prompt: Prompt) -> list[dict]:
    """The policy's context for ``prompt``: a single user turn for a string, the conversation itself otherwise."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def request_text(prompt: Prompt) -> str:
    """What the simulated user and the judge read as the request: the string, or the conversation's last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def load_prompts(path: str | os.PathLike, field: str = "prompt") -> list[Prompt]:
    """Every row's prompt, in file order: the stripped string ``field``, or a conversation.

    A conversation is ``field`` given as a list of messages, or a ``messages`` list (TRL's conversational
    format), ending with the user turn the policy answers. Blank lines are skipped; anything else raises
    ``DataError`` naming the file, the 1-based line number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found; pass an existing JSONL file with a {field!r} field per line")
    with path.open("rb") as handle:
        start = handle.read(4096)
    if start.startswith(GZIP_MAGIC):
        raise DataError(f"{path}: gzip-compressed; decompress it first (gunzip -k {path})")
    to_jsonl = f"prompt files are JSON Lines, one object per line (jq -c '.[]' {path} > prompts.jsonl)"
    prompts: list[Prompt] = []
    for line_number, row, error in iter_jsonl(path):
        where = f"{path}:{line_number}"
        if error and not prompts and start.lstrip().startswith(b"["):
            raise DataError(f"{path}: a JSON array spread over lines; {to_jsonl}")
        if error:
            raise DataError(f"{where}: {error}; each line must be one JSON object — fix or delete that line")
        if isinstance(row, list):
            raise DataError(f"{where}: expected a JSON object with a {field!r} field, got a JSON array; {to_jsonl}")
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(row).__name__}")
        key = field if field in row else "messages" if "messages" in row else None
        if key is None:
            present = ", ".join(repr(k) for k in list(row)[:10]) or "none"
            raise DataError(
                f"{where}: no {field!r} field (fields present: {present}); "
                f"give each line a {field!r} string or a 'messages' list"
            )
        value = row[key]
        if isinstance(value, list):
            try:
                messages = parse_messages(value, key)
            except ValueError as error:
                raise DataError(f"{where}: {error}") from None
            first = next((message for message in messages if message.role != SYSTEM), None)
            if first is None or first.role != USER:
                raise DataError(f"{where}: field {key!r} must start with a user message (after any system message)")
            if messages[-1].role != USER or not messages[-1].text.strip():
                raise DataError(
                    f"{where}: field {key!r} must end with a non-empty user message (the request the policy answers)"
                )
            prompts.append([message.as_chat() for message in messages])
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {key!r} must be a string or a list of messages, got {type(value).__name__}"
            )
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty; remove that row")
        prompts.append(value.strip())
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return prompts


def filter_by_prompt_tokens(prompts: Sequence[Prompt], tokenizer, max_prompt_tokens: int) -> tuple[list[Prompt], int]:
    """Keep prompts whose chat rendering (generation prompt included) fits the budget.

    The token count is that of exactly what the policy is later fed (``encode_chat``, thinking off),
    so "≤ max_prompt_tokens" holds for the real model input. Returns ``(kept, n_dropped)``, order kept.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    kept = [
        prompt
        for prompt in prompts
        if len(encode_chat(tokenizer, as_conversation(prompt), add_generation_prompt=True)) <= max_prompt_tokens
    ]
    return kept, len(prompts) - len(kept)


def select_prompts(prompts: Sequence[Prompt], n: int, seed: int, *, label: str) -> list[Prompt]:
    """The first ``n`` prompts after a seeded shuffle.

    The shuffle is ``numpy.random.default_rng(seed).permutation(len(prompts))`` — the permutation
    ``datasets.Dataset.shuffle(seed=seed)`` uses, so selections match the reference implementation.
    With fewer than ``n`` prompts available, logs a warning naming ``label`` and both counts and
    returns all of them (shuffled); the caller records ``len(result)`` as the real size.
    """
    if n < 0:
        raise ValueError(f"{label}: number of prompts to select must be >= 0, got {n}")
    if len(prompts) < n:
        logger.warning(
            "%s: requested %d prompts but only %d are available (after filtering); using all %d",
            label,
            n,
            len(prompts),
            len(prompts),
        )
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:n]]


# --------------------------------------------------------------------------------------------------
# Win-rate statistics
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(
    path: str | os.PathLike, tokenizer, n: int, *, max_prompt_tokens: int, seed: int, label: str
) -> list[Prompt]:
    """Prompts of one JSONL split: loaded, length-filtered on the whole file, then ``n`` selected (seeded)."""
    kept, dropped = filter_by_prompt_tokens(load_prompts(path), tokenizer, max_prompt_tokens)
    if dropped:
        logger.info("%s: dropped %d prompts longer than %d tokens", label, dropped, max_prompt_tokens)
    return select_prompts(kept, n, seed, label=label)


def compute_metrics(decisions: Sequence[int], *, seed: int, n_bootstrap: int = 10_000) -> dict:
    """Win rate of the current policy over the baseline from pairwise judge decisions.

    ``decisions``: 0 = current (A) wins, 1 = baseline (B) wins, -1 = tie / inconsistent / unparsed.

    Returns (percentages in 0..100, plain Python numbers):
        n: number of decisions.
        wins_a, wins_b, ties: counts.
        coverage: share of decisive outcomes, 1 - ties / n.
        n_effective: wins_a + wins_b, the decisive outcomes the win rate is computed from.
        winrate_a: 100 * wins_a / n_effective (ties excluded); NaN when n_effective == 0.
        se: analytic standard error 100 * sqrt(p (1 - p) / n_effective); 0 when n_effective == 1,
            NaN when n_effective == 0.
        se_bootstrap: 100 * std (ddof=1) of ``n_bootstrap`` means of decisive outcomes resampled
            with replacement (``numpy.random.default_rng(seed)``); NaN when n_effective == 0 (the
            reference drops the key there; a fixed key set keeps every eval_history entry alike).
        winrate_inc_ties: 100 * (wins_a + 0.5 * ties) / n rounded to 2 decimals — ties count as half
            a win; defined (50.0) even when every outcome is a tie.
    """
    invalid = sorted({repr(d) for d in decisions if d not in DECISION_VALUES})
    if invalid:
        raise ValueError(f"decisions must be 0 (current wins), 1 (baseline wins) or -1 (tie); got {', '.join(invalid)}")
    if len(decisions) == 0:
        raise ValueError("no decisions to score: the evaluation set is empty")
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be >= 2 for a standard deviation, got {n_bootstrap}")
    n = len(decisions)
    wins_a = sum(1 for d in decisions if d == CURRENT_WINS)
    wins_b = sum(1 for d in decisions if d == BASELINE_WINS)
    ties = n - wins_a - wins_b
    n_effective = wins_a + wins_b

    if n_effective == 0:
        winrate_a = se = se_bootstrap = math.nan
    else:
        p = wins_a / n_effective
        winrate_a = 100.0 * p
        se = 100.0 * math.sqrt(p * (1.0 - p) / n_effective) if n_effective > 1 else 0.0
        # 1.0 marks a current-policy win; resample the decisive outcomes n_effective at a time. All
        # draws are made at once (n_bootstrap x n_effective: ~16 MB for 10k x 100 decisive outcomes).
        outcomes = np.array([1.0 if d == CURRENT_WINS else 0.0 for d in decisions if d != TIE])
        rng = np.random.default_rng(seed)
        bootstrap_means = rng.choice(outcomes, size=(n_bootstrap, n_effective), replace=True).mean(axis=1)
        se_bootstrap = 100.0 * float(np.std(bootstrap_means, ddof=1))

    return {
        "n": n,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": ties,
        "coverage": 1.0 - ties / n,
        "winrate_a": winrate_a,
        "se": se,
        "se_bootstrap": se_bootstrap,
        "n_effective": n_effective,
        "winrate_inc_ties": round(100.0 * (wins_a + 0.5 * ties) / n, 2),
    }


def _format_number(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def format_metrics_line(metrics: dict, label: str) -> str:
    """One console line, e.g. ``[concise] step 3: winrate 62.5% ± 7.7 (boot 7.7) | inc_ties 58.0% | ...``."""
    step = f" step {metrics['step']}" if "step" in metrics else ""
    parts = [
        f"[{label}]{step}: winrate {_format_number(metrics.get('winrate_a'), '.1f')}%"
        f" ± {_format_number(metrics.get('se'), '.1f')}"
        f" (boot {_format_number(metrics.get('se_bootstrap'), '.1f')})",
        f"inc_ties {_format_number(metrics.get('winrate_inc_ties'), '.1f')}%",
        f"A/B/tie {metrics.get('wins_a')}/{metrics.get('wins_b')}/{metrics.get('ties')}",
        f"coverage {_format_number(metrics.get('coverage'), '.2f')}",
        f"n_eff {metrics.get('n_effective')}/{metrics.get('n')}",
    ]
    if "n_unparsed" in metrics:
        parts.append(f"unparsed {metrics['n_unparsed']}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------------
# Judging against the baseline (every evaluator: online loop, checkpoints, oracle)
# --------------------------------------------------------------------------------------------------


def judge_against_baseline(
    judge, prompts: list[Prompt], completions: list[str], baseline: list[str], *, seed: int
) -> dict:
    """Win-rate metrics of ``completions`` (A) over ``baseline`` (B) under one judge, both orders."""
    started = time.perf_counter()
    decisions = judge.choose_batch_generated([request_text(p) for p in prompts], completions, baseline)
    return {
        **compute_metrics(decisions, seed=seed),
        "n_unparsed": judge.last_n_unparsed,
        "judge_time_s": round(time.perf_counter() - started, 1),
    }


def judge_every_style(
    judges: dict, prompts: list[Prompt], completions: list[str], baseline: list[str], *, seed: int, label: str
) -> dict[str, dict]:
    """``judge_against_baseline`` for every ``{style: judge}``, each printed as one console line."""
    per_style = {}
    for style, judge in judges.items():
        per_style[style] = judge_against_baseline(judge, prompts, completions, baseline, seed=seed)
        print(format_metrics_line(per_style[style], f"{label} | {style}"))
    return per_style


def average_chars(texts: Sequence[str]) -> float:
    """Mean length of ``texts`` in characters (0 for none)."""
    return round(float(np.mean([len(t) for t in texts])), 1) if texts else 0.0


SUMMARY_STYLE_WIDTH = 40


def format_style_line(style: str, metrics: dict) -> str:
    """``<style padded to 40> winrate=xx.x% +/-y.y (inc_ties=zz.z%)`` (the reference's table row)."""
    return (
        f"{style:<{SUMMARY_STYLE_WIDTH}} winrate={_format_number(metrics['winrate_a'], '.1f')}%"
        f" +/-{_format_number(metrics['se'], '.1f')} (inc_ties={_format_number(metrics['winrate_inc_ties'], '.1f')}%)"
        f" coverage={_format_number(metrics['coverage'], '.2f')}"
    )


# --------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------


def next_run_index(directory: str | os.PathLike, run_name: str) -> int:
    """Smallest integer ``idx >= 1`` such that ``<directory>/<run_name>_<idx>.json`` does not exist."""
    directory = Path(directory)
    index = 1
    while (directory / f"{run_name}_{index}.json").exists():
        index += 1
    return index


def numbered_results_paths(directory: str | os.PathLike, run_name: str) -> tuple[Path, Path]:
    """``<run_name>_<idx>.json`` and ``<run_name>_completions_<idx>.json`` in ``directory`` (``next_run_index``):
    the results files of the standalone evaluations."""
    directory = Path(directory)
    index = next_run_index(directory, run_name)
    return directory / f"{run_name}_{index}.json", directory / f"{run_name}_completions_{index}.json"


def write_completions_snapshot(
    path: str | os.PathLike,
    evaluations: Sequence[dict],
    prompts: Sequence[Prompt],
    n: int = 10,
    max_chars: int = 300,
) -> None:
    """Rewrite ``path`` (atomically) with ``{"step", "prompt", "current", "baseline"}`` lines for the first ``n``
    eval prompts of every evaluation (``{"step", "current", "baseline"}`` entries), texts cut to ``max_chars``.

    A quick look at how completions drift across evaluations (the full completions go in the completions JSON).
    Rewritten from the run's kept evaluations, so an evaluation redone after ``--resume`` appears once.
    """
    rows = []
    for evaluation in evaluations:
        current, baseline = evaluation["current"], evaluation["baseline"]
        if not len(prompts) == len(current) == len(baseline):
            raise ValueError(
                "prompts, current and baseline must have equal lengths, "
                f"got {len(prompts)}, {len(current)}, {len(baseline)}"
            )
        for prompt, current_text, baseline_text in list(zip(prompts, current, baseline))[:n]:
            rows.append(
                {
                    "step": evaluation["step"],
                    "prompt": request_text(prompt)[:max_chars],
                    "current": current_text[:max_chars],
                    "baseline": baseline_text[:max_chars],
                }
            )
    write_jsonl_atomic(path, rows)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(run_name: str, folder_flag: str = "--out_dir") -> None:
    """One ``ValueError`` line unless ``run_name`` is a plain file-name prefix (it names files in the folder)."""
    if not RUN_NAME.fullmatch(run_name):
        raise ValueError(
            f"--run_name {run_name!r}: use letters, digits, '.', '_' and '-' only (it names files inside {folder_flag})"
        )
