"""Per-token SDPO signal analysis: where does a user follow-up move the model's token probabilities?

For each sampled case (a prompt x, an unrelated follow-up and a feedback follow-up) the script samples
one answer y from x, keeps its exact token ids, and scores y under three contexts in one batched
forward pass:

    sig_unrel[t]  = log π(y_t | x⊕o_unrelated, y_<t) − log π(y_t | x, y_<t)
    sig_follow[t] = log π(y_t | x⊕o_feedback,  y_<t) − log π(y_t | x, y_<t)

(x⊕o = the hindsight context of ``sdpo_core``, H-online by default). The paper's claim (Section 4.3)
is that sig_unrel ≈ 0 while a relevant follow-up gives large signed signals on the tokens it is about.

Commands:

    # GPU, the reference setting (Qwen3-8B, 24 cases, 256 new tokens at T=1.0, bf16)
    ./scripts/run_signal_analysis.sh
    python auxiliary/sdpo_signal_analysis.py --model Qwen/Qwen3-8B --out_dir out/signals

    # CPU, the bundled SmolLM2-135M-Instruct (fp32, or bf16 where the CPU computes it natively): ~2 min on 2 cores
    MODEL=smollm2-135m-instruct N_CASES=12 ./scripts/run_signal_analysis.sh --max_new_tokens 128 --min_y_tokens 48
    # On a machine shared with other jobs, one torch thread avoids OpenMP oversubscription (measured with
    # other jobs running: 105 s with OMP_NUM_THREADS=1 vs 487 s with the default 2 threads; same output).
    OMP_NUM_THREADS=1 MODEL=smollm2-135m-instruct N_CASES=12 \
        ./scripts/run_signal_analysis.sh --max_new_tokens 128 --min_y_tokens 48

The 135M model barely reads the follow-up, so on CPU the two heatmaps look alike; the run checks the
pipeline, not the paper's claim (which needs an 8B-class model on a GPU).

Outputs in ``--out_dir``:
  * ``sdpo_signals.json`` — ``{"meta": {model, seed, max_new_tokens, temperature, do_sample, min_y_tokens,
    cases_json, hindsight_variant, ...}, "cases": [{name, tag, raw_prompt, unrelated_followup,
    followup_message, completion_text, n_tokens, completion_token_ids, completion_tokens, sig_unrel,
    sig_follow, attempts, finished}], "skipped": [{name, tag, attempts, longest_n_tokens}]}``;
  * ``summary.json`` and a console table — per case and overall (all cases, and per tag): mean |signal|
    and mean signal for the unrelated and the feedback follow-up, the ratio
    mean|sig_unrel| / mean|sig_follow| (≈ 0 if unrelated follow-ups carry no signal), and, to separate
    the feedback's content from the mere presence of a hindsight block, mean|sig_follow − sig_unrel|
    and the per-token correlation of the two signals;
  * ``unrelated.png``, ``followup.png`` (one heatmap row per kept case, the first ``--max_cols`` tokens),
    ``stacked.png`` (unrelated above feedback), ``side_by_side.png`` (unrelated left, feedback right),
    ``case{N}_tokens.png`` (the first ``--token_n`` tokens of case N, 1-based heatmap row, coloured by
    their two signals). Colours: RdBu on a TwoSlopeNorm(vmin, 0, vmax) — red = the follow-up makes the
    token less likely, white ≈ unchanged, blue = more likely; values clipped to [vmin, vmax]; NaN
    (row shorter than ``--max_cols``) white. The figures are drawn by ``auxiliary/plots.py``
    (``signal_colormap`` / ``signal_color_hex`` give the colour of a signal value to any other caller).

Bad input (arguments, the cases file, an output folder that cannot be written, an unknown device) is
found before the model loads and ends the run with one ``error: ...`` line and exit code 2; exit code 1
means no case reached ``--min_y_tokens`` (the skipped list is still written).

Choices that differ from the reference script (spec §10):
  * the default hindsight block is H-online (the paper's Table 1 form) instead of H-offline-v1;
    ``--hindsight_variant offline_v1`` reproduces the reference;
  * sampling uses T from the case file with top-p 1.0 and no top-k, stated explicitly (the reference
    inherited Qwen3's generation config, top-p 0.95 / top-k 20);
  * log-probs come from fp32 log-softmax through training's scorer (``sdpo.core.score_hindsight``), at the
    temperature y was sampled at (1 when greedy), as the updater scores; contexts longer than 2048 tokens
    lose their oldest tokens;
  * the default cases file is found relative to the repository root (the reference's path broke when
    the script moved into ``auxiliary/``);
  * a case whose answer stays shorter than ``--min_y_tokens`` after ``--max_retries`` extra samples is
    listed under ``skipped`` instead of stopping the run; with ``do_sample`` false there is one attempt.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdpo.core import (
    HINDSIGHT_VARIANTS,
    encode_student_teacher_contexts,
    pad_contexts_and_completions,
    score_hindsight,
)
from sdpo.evaluation.evaluation_helpers import seed_everything
from sdpo.evaluation.signal_plots import (
    SIGNAL_HEATMAP_FILES,
    SignalFigureSettings,
    token_figure_name,
    write_signal_figures,
)
from sdpo.models.generation import Generation, SamplingParams, encode_chat, generate
from sdpo.models.model_loading import ModelLoadError, concrete_dtype, load_model_and_tokenizer, resolve_device
from sdpo.utils.command_line import ConfigParser, UsageError
from sdpo.utils.env_file import load_project_env
from sdpo.utils.file_io import check_output_folder, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES_JSON = REPO_ROOT / "auxiliary" / "signal_analysis_cases.json"
MAX_CONTEXT_TOKENS = 2048

# --------------------------------------------------------------------------------------------------
# Cases file
# --------------------------------------------------------------------------------------------------

TOP_LEVEL_KEYS = ("version", "description", "defaults", "cases")
DEFAULTS_KEYS = ("max_new_tokens", "temperature", "do_sample", "variant_suffix_pool")
CASE_FIELDS = ("id", "tag", "raw_prompt", "unrelated_followup", "feedback_followup")
CASE_TAGS = ("reinforce", "constrain")


class SignalAnalysisError(ValueError):
    """A bad argument, input or output path, found before the work; the message is one line saying what to do."""


class CaseFileError(SignalAnalysisError):
    """The cases file cannot be used; the message names the file and every problem found."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_empty_string(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _defaults_problems(defaults) -> list[str]:
    if not isinstance(defaults, dict):
        return [f"'defaults' must be an object, got {type(defaults).__name__}"]
    problems = [f"defaults: missing field '{key}'" for key in DEFAULTS_KEYS if key not in defaults]
    expected = ", ".join(DEFAULTS_KEYS)
    problems += [
        f"defaults: unknown field '{key}' (expected {expected})" for key in defaults if key not in DEFAULTS_KEYS
    ]
    tokens = defaults.get("max_new_tokens", 1)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        problems.append(f"defaults: 'max_new_tokens' must be a positive integer, got {tokens!r}")
    temperature = defaults.get("temperature", 1.0)
    if not _is_number(temperature) or temperature < 0:
        problems.append(f"defaults: 'temperature' must be a number >= 0, got {temperature!r}")
    if not isinstance(defaults.get("do_sample", True), bool):
        problems.append(f"defaults: 'do_sample' must be true or false, got {defaults['do_sample']!r}")
    pool = defaults.get("variant_suffix_pool", ["x"])
    if not isinstance(pool, list) or not pool or not all(_non_empty_string(s) for s in pool):
        problems.append("defaults: 'variant_suffix_pool' must be a non-empty list of non-empty strings")
    return problems


def _case_problems(index: int, case, seen_ids: set) -> list[str]:
    if not isinstance(case, dict):
        return [f"case {index}: must be an object, got {type(case).__name__}"]
    label = f"case {index} ({case['id']!r})" if _non_empty_string(case.get("id")) else f"case {index} (no id)"
    problems = [f"{label}: missing field '{field}'" for field in CASE_FIELDS if field not in case]
    problems += [
        f"{label}: unknown field '{key}' (expected {', '.join(CASE_FIELDS)})" for key in case if key not in CASE_FIELDS
    ]
    problems += [
        f"{label}: field '{field}' must be a non-empty string"
        for field in CASE_FIELDS
        if field in case and not _non_empty_string(case[field])
    ]
    if _non_empty_string(case.get("tag")) and case["tag"] not in CASE_TAGS:
        problems.append(f"{label}: tag {case['tag']!r} is not one of {', '.join(CASE_TAGS)}")
    if _non_empty_string(case.get("id")):
        if case["id"] in seen_ids:
            problems.append(f"{label}: duplicate id")
        seen_ids.add(case["id"])
    return problems


def validate_cases(data) -> list[str]:
    """Every problem with a parsed cases file, one readable line each (empty list = valid)."""
    if not isinstance(data, dict):
        return [f"the top level must be an object with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(data).__name__}"]
    problems = [f"missing top-level key '{key}'" for key in TOP_LEVEL_KEYS if key not in data]
    expected = ", ".join(TOP_LEVEL_KEYS)
    problems += [f"unknown top-level key '{key}' (expected {expected})" for key in data if key not in TOP_LEVEL_KEYS]
    if "version" in data and not _non_empty_string(data["version"]):
        problems.append("'version' must be a non-empty string")
    if "description" in data and not isinstance(data["description"], str):
        problems.append("'description' must be a string")
    if "defaults" in data:
        problems += _defaults_problems(data["defaults"])
    if "cases" in data:
        cases = data["cases"]
        if not isinstance(cases, list) or not cases:
            problems.append("'cases' must be a non-empty list")
        else:
            seen_ids: set = set()
            for index, case in enumerate(cases):
                problems += _case_problems(index, case, seen_ids)
    return problems


def load_cases_file(path: str | os.PathLike) -> dict:
    """Read and validate a cases file; raise ``CaseFileError`` (one line) naming the file and every problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaseFileError(f"cases file {path} does not exist (pass --cases_json or set CASES_JSON)") from None
    except IsADirectoryError:
        raise CaseFileError(f"cases file {path} is a folder; pass the JSON file (--cases_json or CASES_JSON)") from None
    except UnicodeDecodeError as error:
        raise CaseFileError(
            f"cases file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as error:
        raise CaseFileError(f"cases file {path} cannot be read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise CaseFileError(
            f"cases file {path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    problems = validate_cases(data)
    if problems:
        raise CaseFileError(f"cases file {path} has {len(problems)} problem(s): {'; '.join(problems)}")
    return data


@dataclass(frozen=True)
class SampledCase:
    """One analysed case: a base case with a length-encouraging suffix appended to its prompt."""

    name: str
    tag: str
    prompt: str
    unrelated_followup: str
    feedback_followup: str


def sample_cases(cases: list[dict], suffix_pool: list[str], n_cases: int, seed: int) -> list[SampledCase]:
    """Draw ``n_cases`` (base case, suffix) pairs uniformly with replacement, named ``<id>_v<NN>``."""
    rng = random.Random(seed)
    sampled = []
    for index in range(n_cases):
        base = rng.choice(cases)
        suffix = rng.choice(suffix_pool)
        sampled.append(
            SampledCase(
                name=f"{base['id']}_v{index:02d}",
                tag=base["tag"],
                prompt=f"{base['raw_prompt'].rstrip()} {suffix.strip()}",
                unrelated_followup=base["unrelated_followup"],
                feedback_followup=base["feedback_followup"],
            )
        )
    return sampled


# --------------------------------------------------------------------------------------------------
# Sampling and scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class SampledAnswer:
    """The outcome of sampling one case: the longest generation seen and how many tries it took."""

    generation: Generation
    attempts: int
    accepted: bool


def sample_long_answers(
    model,
    tokenizer,
    contexts: list[list[int]],
    sampling: SamplingParams,
    *,
    min_tokens: int,
    max_retries: int,
    batch_size: int,
) -> list[SampledAnswer]:
    """Sample one answer per context, resampling the short ones (fewer than ``min_tokens`` ids).

    All pending contexts are sampled together each round, so retries cost one batched call per round.
    Greedy decoding would repeat itself, so it gets a single attempt.
    """
    rounds = 1 if sampling.greedy else 1 + max_retries
    longest: list[Generation | None] = [None] * len(contexts)
    attempts = [0] * len(contexts)
    pending = list(range(len(contexts)))
    for _ in range(rounds):
        generations = generate(model, tokenizer, [contexts[i] for i in pending], sampling, batch_size=batch_size)
        still_short = []
        for index, generation in zip(pending, generations):
            attempts[index] += 1
            if longest[index] is None or len(generation.token_ids) > len(longest[index].token_ids):
                longest[index] = generation
            if len(generation.token_ids) < min_tokens:
                still_short.append(index)
        pending = still_short
        if not pending:
            break
    return [
        SampledAnswer(generation=g, attempts=n, accepted=len(g.token_ids) >= min_tokens)
        for g, n in zip(longest, attempts)
    ]


@torch.no_grad()
def score_case_signals(
    model,
    tokenizer,
    prompt: str,
    completion_ids: list[int],
    unrelated_followup: str,
    feedback_followup: str,
    *,
    hindsight_variant: str = "online",
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(sig_unrel, sig_follow) of one completion, float32 arrays of length ``len(completion_ids)``.

    The signal is ``sdpo.core.score_hindsight``'s, the scorer training uses: y under x (twice) against
    x⊕o_unrelated and x⊕o_feedback, at ``temperature`` (the one y was sampled at, as the updater scores).
    """
    messages = [{"role": "user", "content": prompt}]
    student, teacher_unrelated = encode_student_teacher_contexts(
        tokenizer, messages, unrelated_followup, variant=hindsight_variant, max_context_length=MAX_CONTEXT_TOKENS
    )
    _, teacher_feedback = encode_student_teacher_contexts(
        tokenizer, messages, feedback_followup, variant=hindsight_variant, max_context_length=MAX_CONTEXT_TOKENS
    )
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    student_batch = pad_contexts_and_completions([student, student], [completion_ids] * 2, pad).to(device)
    teacher_batch = pad_contexts_and_completions([teacher_unrelated, teacher_feedback], [completion_ids] * 2, pad)
    scores = score_hindsight(model, student_batch, teacher_batch.to(device), temperature=temperature)
    signals = np.asarray(scores.signal_rows([len(completion_ids)] * 2), dtype=np.float32)
    return signals[0], signals[1]


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def signal_statistics(sig_unrel: np.ndarray, sig_follow: np.ndarray) -> dict:
    """Mean |signal| and mean signal of both follow-ups over the given tokens, and their |·| ratio.

    Two more numbers separate what the feedback's *content* does from what any hindsight block does:
    ``mean_abs_follow_minus_unrel`` (= mean |log π(y_t|x⊕o_feedback) − log π(y_t|x⊕o_unrelated)|) and
    the per-token Pearson correlation of the two signals (NaN when either is constant).
    """
    abs_unrel, abs_follow = float(np.abs(sig_unrel).mean()), float(np.abs(sig_follow).mean())
    varies = sig_unrel.size > 1 and np.std(sig_unrel) > 0 and np.std(sig_follow) > 0
    return {
        "n_tokens": int(sig_unrel.size),
        "mean_abs_unrel": abs_unrel,
        "mean_unrel": float(sig_unrel.mean()),
        "mean_abs_follow": abs_follow,
        "mean_follow": float(sig_follow.mean()),
        "abs_ratio_unrel_to_follow": abs_unrel / abs_follow if abs_follow > 0 else float("nan"),
        "mean_abs_follow_minus_unrel": float(np.abs(sig_follow - sig_unrel).mean()),
        "corr_unrel_follow": float(np.corrcoef(sig_unrel, sig_follow)[0, 1]) if varies else float("nan"),
    }


def summarize(cases: list[dict]) -> dict:
    """Per-case statistics, then pooled over all tokens of all cases and of each tag."""
    per_case = [
        {
            "name": c["name"],
            "tag": c["tag"],
            **signal_statistics(np.asarray(c["sig_unrel"]), np.asarray(c["sig_follow"])),
        }
        for c in cases
    ]

    def pooled(selected: list[dict]) -> dict | None:
        if not selected:
            return None
        return signal_statistics(
            np.concatenate([np.asarray(c["sig_unrel"]) for c in selected]),
            np.concatenate([np.asarray(c["sig_follow"]) for c in selected]),
        )

    return {
        "per_case": per_case,
        "overall": pooled(cases),
        "by_tag": {tag: pooled([c for c in cases if c["tag"] == tag]) for tag in CASE_TAGS},
    }


def format_summary_table(summary: dict) -> str:
    """The console table of ``summarize``: one line per case, then the pooled rows."""
    header = (
        f"{'case':<44} {'tag':<9} {'tokens':>6} {'|unrel|':>8} {'unrel':>8} {'|follow|':>8} {'follow':>8} {'ratio':>6} "
        f"{'|f-u|':>6} {'corr':>5}"
    )
    lines = [header, "-" * len(header)]

    def row(label: str, tag: str, stats: dict) -> str:
        ratio = stats["abs_ratio_unrel_to_follow"]
        return (
            f"{label[:44]:<44} {tag:<9} {stats['n_tokens']:>6} "
            f"{stats['mean_abs_unrel']:>8.3f} {stats['mean_unrel']:>8.3f} "
            f"{stats['mean_abs_follow']:>8.3f} {stats['mean_follow']:>8.3f} {ratio:>6.2f} "
            f"{stats['mean_abs_follow_minus_unrel']:>6.3f} {stats['corr_unrel_follow']:>5.2f}"
        )

    lines += [row(c["name"], c["tag"], c) for c in summary["per_case"]]
    lines.append("-" * len(header))
    for tag, stats in summary["by_tag"].items():
        if stats is not None:
            lines.append(row(f"all {tag} cases (pooled tokens)", tag, stats))
    if summary["overall"] is not None:
        lines.append(row("all cases (pooled tokens)", "", summary["overall"]))
    lines.append(
        "signals in nats per token; ratio = mean|sig_unrel| / mean|sig_follow|; |f-u| = mean|sig_follow - sig_unrel| "
        "(the part due to the feedback's content); corr = per-token correlation of the two signals"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

SIGNALS_FILE = "sdpo_signals.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class SignalAnalysisConfig:
    """Every setting of one run, parsed by ``ConfigParser`` (flags, or a YAML ``--config`` by field name) and
    checked in ``__post_init__``; ``$MODEL``, ``$CASES_JSON``, ``$OUT_DIR``, ``$N_CASES`` and ``$SEED`` are the
    defaults of their fields. ``max_new_tokens`` and ``temperature`` are None where the cases file's defaults apply.
    """

    # ---- inputs and outputs
    model: str = field(
        default_factory=lambda: os.environ.get("MODEL", "Qwen/Qwen3-8B"),
        metadata={"help": "Hub id, local folder or bundled alias ($MODEL)."},
    )
    cases_json: Path = field(
        default_factory=lambda: Path(os.environ.get("CASES_JSON", str(DEFAULT_CASES_JSON))),
        metadata={"help": "Cases file ($CASES_JSON)."},
    )
    out_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("OUT_DIR", "signal_analysis_out")),
        metadata={"help": "Output folder ($OUT_DIR)."},
    )
    # String defaults: argparse converts them with the field's type, so a bad $N_CASES is one usage line.
    n_cases: int = field(
        default_factory=lambda: os.environ.get("N_CASES", "24"),
        metadata={"help": "Cases to sample, with replacement ($N_CASES)."},
    )
    seed: int = field(
        default_factory=lambda: os.environ.get("SEED", "123"),
        metadata={"help": "Seed for case sampling and generation ($SEED)."},
    )
    hindsight_variant: str = field(
        default="online",
        metadata={"help": "Hindsight block for x⊕o (sdpo.core).", "choices": sorted(HINDSIGHT_VARIANTS)},
    )
    # ---- model
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto: bfloat16 where the device computes it natively, else float32 (the one rule of every entry "
            "point).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    # ---- generation
    max_new_tokens: int | None = field(default=None, metadata={"help": "Override the cases file default."})
    temperature: float | None = field(default=None, metadata={"help": "Override the cases file default."})
    min_y_tokens: int = field(
        default=80, metadata={"help": "Resample answers shorter than this (ids, stop token included)."}
    )
    max_retries: int = field(
        default=6, metadata={"help": "Extra samples for a short answer before the case is skipped."}
    )
    batch_size: int = field(default=8, metadata={"help": "Generation batch size."})
    # ---- figures
    max_cols: int = field(default=120, metadata={"help": "Tokens per heatmap row."})
    vmin: float = field(default=-15.0, metadata={"help": "Colour scale minimum (values below are clipped)."})
    vmax: float = field(default=3.0, metadata={"help": "Colour scale maximum (values above are clipped)."})
    token_case_index: int = field(default=1, metadata={"help": "1-based heatmap row drawn as token boxes."})
    token_n: int = field(default=15, metadata={"help": "Tokens shown in the token-box figure."})

    def __post_init__(self):
        problems = _argument_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        check_output_folder(self.out_dir)

    @property
    def figures(self) -> SignalFigureSettings:
        return SignalFigureSettings(
            max_cols=self.max_cols,
            vmin=self.vmin,
            vmax=self.vmax,
            token_case_index=self.token_case_index,
            token_n=self.token_n,
        )

    def output_files(self) -> list[str]:
        return [SIGNALS_FILE, SUMMARY_FILE, *SIGNAL_HEATMAP_FILES, token_figure_name(self.token_case_index)]


def _argument_problems(args: SignalAnalysisConfig) -> list[str]:
    minimums = {
        "n_cases": 1,
        "min_y_tokens": 1,
        "max_retries": 0,
        "batch_size": 1,
        "max_cols": 1,
        "token_n": 1,
        "token_case_index": 1,
    }
    problems = [
        f"--{name} must be >= {low}, got {getattr(args, name)}"
        for name, low in minimums.items()
        if getattr(args, name) < low
    ]
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.seed < 2**32:
        problems.append(f"--seed must be in 0..2**32-1, got {args.seed}")
    if not (math.isfinite(args.vmin) and math.isfinite(args.vmax) and args.vmin < 0 < args.vmax):
        problems.append(
            f"need finite --vmin < 0 < --vmax (the colour scale is centred on 0), got {args.vmin} and {args.vmax}"
        )
    return problems


def parse_args(argv: list[str] | None = None) -> SignalAnalysisConfig:
    """The run's settings from ``argv`` (and ``--config FILE``; env vars as fallbacks); one ``UsageError`` line."""
    parser = ConfigParser(
        SignalAnalysisConfig, description="Per-token SDPO signal heatmaps: unrelated vs feedback follow-ups (spec §10)."
    )
    (config,) = parser.parse(argv)
    return config


def prepare_out_dir(out_dir: Path, file_names: list[str]) -> None:
    """Create the output folder (``check_output_folder`` refused a file already) and check that every output file
    can be written there.

    Done before the model loads, so a bad folder costs seconds instead of the whole scoring run.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SignalAnalysisError(
            f"cannot create --out_dir {out_dir}: {error.strerror}; pass a folder you can write to"
        ) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SignalAnalysisError(f"--out_dir {out_dir} is not writable; pass a folder you can write to")
    for name in file_names:
        if (out_dir / name).is_dir():
            raise SignalAnalysisError(
                f"{out_dir / name} is a folder where an output file goes; remove it or pick another --out_dir"
            )


def resolve_checked_device(name: str) -> torch.device:
    """``resolve_device`` with a one-line error for a misspelt device or CUDA asked for where there is none."""
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise SignalAnalysisError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SignalAnalysisError(
            f"--device {name} asks for CUDA but no CUDA device is visible; use --device cpu or auto"
        )
    return device


def run(config: SignalAnalysisConfig) -> int:
    started = time.time()
    # Every input and output is checked before the model loads.
    cases_file = load_cases_file(config.cases_json)
    defaults = cases_file["defaults"]
    max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else defaults["max_new_tokens"]
    if max_new_tokens < config.min_y_tokens:
        source = "--max_new_tokens" if config.max_new_tokens is not None else f"max_new_tokens of {config.cases_json}"
        raise SignalAnalysisError(
            f"{source} {max_new_tokens} < --min_y_tokens {config.min_y_tokens}: every case would be skipped; "
            "pass a larger --max_new_tokens or a smaller --min_y_tokens"
        )
    temperature = config.temperature if config.temperature is not None else float(defaults["temperature"])
    do_sample = defaults["do_sample"] and temperature > 0
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0, top_p=1.0, top_k=0
    )
    prepare_out_dir(config.out_dir, config.output_files())
    device = resolve_checked_device(config.device)

    cases = sample_cases(cases_file["cases"], defaults["variant_suffix_pool"], config.n_cases, config.seed)
    dtype = concrete_dtype(config.dtype, device)
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=dtype, device=device)
    model.eval()
    # Seeded after loading: weight initialisation inside from_pretrained may draw from the torch RNG.
    seed_everything(config.seed)
    print(
        f"model {config.model} on {device} ({dtype}); {len(cases)} cases; "
        f"hindsight {config.hindsight_variant}; {sampling}"
    )

    contexts = [
        encode_chat(tokenizer, [{"role": "user", "content": c.prompt}], max_length=MAX_CONTEXT_TOKENS) for c in cases
    ]
    answers = sample_long_answers(
        model,
        tokenizer,
        contexts,
        sampling,
        min_tokens=config.min_y_tokens,
        max_retries=config.max_retries,
        batch_size=config.batch_size,
    )

    kept, skipped = [], []
    for case, answer in zip(cases, answers):
        ids = answer.generation.token_ids
        if not answer.accepted:
            skipped.append(
                {"name": case.name, "tag": case.tag, "attempts": answer.attempts, "longest_n_tokens": len(ids)}
            )
            print(
                f"skipped {case.name}: longest of {answer.attempts} answers "
                f"has {len(ids)} < {config.min_y_tokens} tokens"
            )
            continue
        sig_unrel, sig_follow = score_case_signals(
            model,
            tokenizer,
            case.prompt,
            ids,
            case.unrelated_followup,
            case.feedback_followup,
            hindsight_variant=config.hindsight_variant,
            temperature=temperature if do_sample else 1.0,
        )
        if not sig_unrel.size == sig_follow.size == len(ids):
            raise RuntimeError(
                f"{case.name}: signal lengths {sig_unrel.size}/{sig_follow.size} differ from {len(ids)} tokens"
            )
        kept.append(
            {
                "name": case.name,
                "tag": case.tag,
                "raw_prompt": case.prompt,
                "unrelated_followup": case.unrelated_followup,
                "followup_message": case.feedback_followup,
                "completion_text": answer.generation.text,
                "n_tokens": len(ids),
                "completion_token_ids": list(ids),
                "completion_tokens": tokenizer.convert_ids_to_tokens(list(ids)),
                "sig_unrel": [round(float(v), 6) for v in sig_unrel],
                "sig_follow": [round(float(v), 6) for v in sig_follow],
                "attempts": answer.attempts,
                "finished": answer.generation.finished,
                # Decoded per token for the token-box figure; not part of the JSON.
                "completion_pieces": [tokenizer.decode([i]) for i in ids],
            }
        )
        print(
            f"{case.name}: {len(ids)} tokens, mean|sig_unrel| {np.abs(sig_unrel).mean():.3f}, "
            f"mean sig_follow {sig_follow.mean():+.3f}"
        )

    out_dir = config.out_dir
    meta = {
        "model": config.model,
        "seed": config.seed,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "do_sample": do_sample,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_y_tokens": config.min_y_tokens,
        "max_retries": config.max_retries,
        "cases_json": str(config.cases_json.resolve()),
        "cases_version": cases_file["version"],
        "n_cases_requested": config.n_cases,
        "hindsight_variant": config.hindsight_variant,
        "dtype": dtype,
        "device": str(device),
    }
    json_cases = [{key: value for key, value in c.items() if key != "completion_pieces"} for c in kept]
    write_json_atomic(out_dir / SIGNALS_FILE, {"meta": meta, "cases": json_cases, "skipped": skipped})
    summary = summarize(kept)
    write_json_atomic(out_dir / SUMMARY_FILE, {"meta": meta, **summary, "skipped": skipped})
    if not kept:
        print(
            f"error: no case reached {config.min_y_tokens} tokens; lower --min_y_tokens or raise --max_new_tokens. "
            f"Wrote {out_dir / SIGNALS_FILE} (skipped list only), no figures."
        )
        return 1
    print(format_summary_table(summary))
    if config.figures.token_case_index > len(kept):
        print(
            f"warning: --token_case_index {config.figures.token_case_index} is outside 1..{len(kept)}; "
            "no token figure drawn"
        )
    written = write_signal_figures(kept, out_dir, config.figures)
    print(f"wrote {out_dir / SIGNALS_FILE}, {out_dir / SUMMARY_FILE}, {', '.join(p.name for p in written)}")
    print(f"kept {len(kept)} / {len(cases)} cases ({len(skipped)} skipped) in {time.time() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; a bad argument, input or output path ends it with one ``error:`` line and exit code 2."""
    load_project_env()
    try:
        return run(parse_args(argv))
    except (UsageError, SignalAnalysisError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
