"""Evaluate saved checkpoints against a baseline model, judged by several user personas (no training).

For every checkpoint the policy answers the same held-out prompts once, and one judge per style
compares each answer with the baseline's answer to the same prompt, in both orders (a verdict counts
only when both orders agree). A checkpoint is either a full model folder (``config.json`` + weights)
or a LoRA adapter folder (``adapter_config.json``), as ``OnlineSDPOUpdater.save_checkpoint`` writes
them (``<run dir>/checkpoints/step_<n>``, ``checkpoints/last``, or the ``merged`` sub-folder of a
checkpoint saved with ``save_merged_model``); an adapter is applied to the base model its
``adapter_config.json`` names.

GPU (the reference setup, via the script: vLLM policy, Qwen3-32B judge on a vLLM engine):
    CHECKPOINTS="runs/x/checkpoints/step_5 runs/x/checkpoints/step_10" BASELINE_MODEL=Qwen/Qwen3-8B \
        ./scripts/eval_checkpoints.sh
CPU (embedded SmolLM2-135M, rule-based judge, 24 MT-Bench prompts; about 2 minutes for two checkpoints
on 2 cores), e.g. on checkpoints of a quickstart run made with ``--save_checkpoints``:
    CHECKPOINTS="runs/<id>/checkpoints/step_8 runs/<id>/checkpoints/step_16" PRESET=cpu ./scripts/eval_checkpoints.sh
Direct:
    python auxiliary/eval_checkpoints.py --checkpoints runs/x/checkpoints/step_8 \
        --baseline_model smollm2-135m-instruct \
        --val_jsonl data/mtbench_prompts/validation.jsonl --eval_styles short no_lists --judge_backend rule \
        --device cpu --eval_n 24 --eval_max_new_tokens 96 --run_name ckpt_demo --out_dir runs/ckpt_demo
Every setting is a field of CheckpointEvalConfig (below) or ParticipantsArguments (the judges, as in
eval_online_sdpo.py); a YAML file may hold any of them by name, and the command line wins over it:
    python auxiliary/eval_checkpoints.py --config ckpt.yaml --eval_n 50
A bad command line or config file (the same checkpoint twice, a --run_name that is not a plain file name, a
missing --val_jsonl, an --out_dir below a file) ends with one line and exit status 2; an unusable checkpoint,
judge or prompt file with one line per problem and exit status 1; both before any model loads.

Order of work: every checkpoint path is checked first (one error line per unusable path, before any
model is loaded); then the judges are built, the baseline answers once, and each checkpoint in turn is
loaded, answers, is judged with every style and is freed. The results file is rewritten after every
checkpoint, so a crash keeps the finished ones.

Seed: ``--seed`` (default 424242, the reference's) selects the evaluation prompts and seeds sampling
(re-seeded before each model, so a checkpoint's answers do not depend on its place in the list). The
online loop selects its evaluation prompts with seed 1234, so the default evaluates a *different*
subset of the validation file than the training run did; ``--seed 1234`` (with the same --val_jsonl,
--eval_n and --max_prompt_tokens) evaluates the training run's subset.

Outputs in ``--out_dir`` (``<idx>`` = the smallest unused integer >= 1):
    <run_name>_<idx>.json
        meta: baseline_model, checkpoints, eval_styles, eval_n (used), eval_n_requested, val_jsonl,
              max_prompt_tokens, eval_max_new_tokens, temperature, seed, use_vllm, judge_local,
              judge_model ("local" for the user-model judge, "rule-based", or the API model), user_model,
              run_name, baseline_avg_completion_len (characters), settings (every field by name)
        results: one entry per finished checkpoint, in order:
              checkpoint (path as given), checkpoint_name (folder name), kind ("full" or "lora_adapter"),
              base_model (adapters; else null), load_time_s, gen_time_s, avg_completion_len (characters),
              eval_styles: {style: {n, wins_a, wins_b, ties, coverage, winrate_a (ties excluded, %), se,
              se_bootstrap, n_effective, winrate_inc_ties (ties as half, %), n_unparsed, judge_time_s}}
              ("a" = the checkpoint, "b" = the baseline; NaN written as null)
    <run_name>_completions_<idx>.json
        prompts, baseline (answers), checkpoints: [{checkpoint, completions}] (rewritten with the results)
A table of win rates per checkpoint and style is printed at the end.

Deliberate differences from the reference: checkpoints may be LoRA adapters (the reference needed merged
16 GB folders); all paths are validated before any work; with --use_vllm one engine serves every adapter
(hot-swapped) instead of one engine per checkpoint; judges are built before the baseline, so a missing key
or model fails before generation (peak memory is unchanged: the judge coexists with each checkpoint
anyway); the evaluation is batched; sampling parameters are explicit; `n_unparsed` is stored; the
results file is written after every checkpoint; completions are kept; --eval_styles defaults to the three
styles of the reference script instead of being required; judges can be local, vLLM, OpenAI-compatible,
Anthropic or rule-based (the flags of eval_online_sdpo.py).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.chat.backends import BackendError, VLLMChatBackend
from sdpo.chat.policies import answer, load_policy, release
from sdpo.evaluation.evaluation_helpers import (
    DataError,
    as_conversation,
    average_chars,
    check_run_name,
    format_style_line,
    judge_every_style,
    load_split,
    numbered_results_paths,
    seed_everything,
    write_json_atomic,
)
from sdpo.learner.config import check_ranges
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import (
    ModelLoadError,
    concrete_dtype,
    is_local_model_path,
    load_tokenizer,
    resolve_model_path,
)
from sdpo.models.vllm_engines import VLLMPolicyEngine, require_vllm
from sdpo.personas.participants import (
    ParticipantsArguments,
    ParticipantsConfig,
    build_participants,
    check_remote_backends,
)
from sdpo.personas.user_simulator import DEFAULT_EVAL_STYLES, resolve_style
from sdpo.utils.command_line import ConfigParser, UsageError, settings_record
from sdpo.utils.env_file import load_project_env
from sdpo.utils.file_io import check_output_folder

logger = logging.getLogger("eval_checkpoints")

FULL_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class CheckpointEvalConfig:
    """What to compare (checkpoints, baseline, judged styles), on which prompts, how answers are generated, where
    the results go; the judges are ``ParticipantsArguments``. The flags are the reference's names."""

    # ---- what to compare
    checkpoints: list[str] = field(
        default_factory=list,
        metadata={"help": "Checkpoint folders: full models or LoRA adapters (e.g. <run>/checkpoints/step_5)."},
    )
    baseline_model: str | None = field(
        default=None,
        metadata={"help": "The model every checkpoint is compared with: HF id, local folder or bundled alias."},
    )
    eval_styles: list[str] = field(
        default_factory=lambda: list(DEFAULT_EVAL_STYLES), metadata={"help": "Personas judging every checkpoint."}
    )
    # ---- data
    val_jsonl: str | None = field(
        default=None, metadata={"help": "Evaluation prompts (JSONL with a string field 'prompt')."}
    )
    eval_n: int = field(default=100, metadata={"help": "Number of evaluation prompts."})
    max_prompt_tokens: int = field(
        default=2048, metadata={"help": "Drop prompts longer than this once chat-rendered (baseline tokenizer)."}
    )
    seed: int = field(
        default=424242,
        metadata={
            "help": "Prompt selection and sampling seed; the online loop uses 1234 (pass it to evaluate the training "
            "run's subset)."
        },
    )
    # ---- generation
    eval_max_new_tokens: int = field(default=2048, metadata={"help": "Generation budget per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (top-p 1, no top-k; 0 = greedy)."})
    dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Weights dtype of the baseline and checkpoints (float32 for exact fp32 checkpoints; auto: "
            "bfloat16 where computed natively, else float32)."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "Device of the baseline and checkpoint models: auto, cpu, cuda, cuda:1, ..."}
    )
    generation_batch_size: int = field(
        default=8, metadata={"help": "Prompts per batched generate call (transformers)."}
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate with one vLLM engine on the adapters' base model, swapping in each LoRA adapter "
            "(adapter checkpoints only)."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "GPU memory share of the policy vLLM engine."}
    )
    # ---- outputs
    out_dir: str = field(default="./eval", metadata={"help": "Where the results and completions files go."})
    run_name: str | None = field(
        default=None, metadata={"help": "Results file prefix (letters, digits, '.', '_', '-')."}
    )

    def __post_init__(self):
        missing = [
            name for name in ("checkpoints", "baseline_model", "val_jsonl", "run_name") if not getattr(self, name)
        ]
        if missing:
            raise ValueError("the following arguments are required: " + ", ".join(f"--{m}" for m in missing))
        check_run_name(self.run_name)
        seen: dict[Path, str] = {}
        for given in self.checkpoints:
            folder = Path(given).expanduser().resolve()
            if folder in seen:
                raise ValueError(f"--checkpoints {seen[folder]} and {given} are the same checkpoint; pass each once")
            seen[folder] = given
        if not Path(self.val_jsonl).is_file():
            raise ValueError(f"--val_jsonl {self.val_jsonl}: no such file")
        self.eval_styles = list(dict.fromkeys(resolve_style(style) for style in self.eval_styles))
        self.dtype = concrete_dtype(self.dtype, self.device)
        check_ranges(self, at_least_one=("eval_n", "max_prompt_tokens", "eval_max_new_tokens", "generation_batch_size"))
        check_ranges(self, non_negative=("temperature",))
        if not (math.isfinite(self.vllm_gpu_memory_utilization) and 0 < self.vllm_gpu_memory_utilization <= 1):
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        check_output_folder(self.out_dir)


def parse_arguments(argv=None) -> tuple[CheckpointEvalConfig, ParticipantsArguments]:
    """The evaluation's and the judges' settings (``--config run.yaml`` may hold any field); one ``UsageError``."""
    return ConfigParser((CheckpointEvalConfig, ParticipantsArguments), description=__doc__).parse(argv)


class CheckpointError(ValueError):
    """A checkpoint path cannot be evaluated; the message names the path and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to evaluate.

    Attributes:
        given: the path as passed on the command line (recorded in the results).
        path: the folder.
        base_model: for a LoRA adapter, the model it applies to (from ``adapter_config.json``); None for
            a full model folder.
        lora_rank: the adapter's rank ``r`` (None for a full model).
    """

    given: str
    path: Path
    base_model: str | None = None
    lora_rank: int | None = None

    @property
    def is_adapter(self) -> bool:
        return self.base_model is not None

    @property
    def kind(self) -> str:
        return "lora_adapter" if self.is_adapter else "full"


# --------------------------------------------------------------------------------------------------
# Checkpoint validation
# --------------------------------------------------------------------------------------------------


def _checkpoint_hint(path: Path) -> str:
    """Names of checkpoint folders inside ``path`` (or its ``checkpoints/``), for a pointer in the error."""
    folders = [
        p for parent in (path, path / "checkpoints") if parent.is_dir() for p in sorted(parent.iterdir()) if p.is_dir()
    ]
    found = [
        str(p.relative_to(path))
        for p in folders
        if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()
    ]
    return f"; checkpoints inside it: {', '.join(found[:6])}" if found else ""


def inspect_checkpoint(given: str) -> Checkpoint:
    """Classify ``given`` as a full model or a LoRA adapter folder, or raise ``CheckpointError``."""
    path = Path(given).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {given}: no such folder")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {given}: not a folder (pass the checkpoint folder, not a file inside it)")
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            settings = json.loads(adapter_config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"checkpoint {given}: adapter_config.json is not valid JSON ({error})") from None
        base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
        if not base:
            raise CheckpointError(f"checkpoint {given}: adapter_config.json names no base_model_name_or_path")
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
            raise CheckpointError(
                f"checkpoint {given}: LoRA adapter without weights (no {' or '.join(ADAPTER_WEIGHTS)})"
            )
        if is_local_model_path(base) and not Path(base).expanduser().is_dir():
            raise CheckpointError(f"checkpoint {given}: its base model {base} (adapter_config.json) does not exist")
        return Checkpoint(given=given, path=path, base_model=base, lora_rank=settings.get("r"))
    if (path / "config.json").is_file():
        if not any((path / name).is_file() for name in FULL_MODEL_WEIGHTS):
            raise CheckpointError(
                f"checkpoint {given}: config.json but no model weights (no {', '.join(FULL_MODEL_WEIGHTS)})"
            )
        return Checkpoint(given=given, path=path)
    raise CheckpointError(
        f"checkpoint {given}: neither a model folder (config.json) nor a LoRA adapter "
        f"(adapter_config.json){_checkpoint_hint(path)}"
    )


def inspect_checkpoints(paths: list[str], use_vllm: bool) -> list[Checkpoint]:
    """Every checkpoint, validated; all problems are collected into one ``CheckpointError`` (a line each)."""
    checkpoints, problems = [], []
    for given in paths:
        try:
            checkpoints.append(inspect_checkpoint(given))
        except CheckpointError as error:
            problems.append(str(error))
    if not problems and use_vllm:
        full = [c.given for c in checkpoints if not c.is_adapter]
        bases = {resolve_model_path(c.base_model) for c in checkpoints if c.is_adapter}
        if full:
            problems.append(
                f"--use_vllm evaluates LoRA adapters on one engine; {', '.join(full)} is a full model: drop "
                "--use_vllm or pass adapter folders"
            )
        elif len(bases) > 1:
            problems.append(
                f"--use_vllm needs adapters of one base model, got {', '.join(sorted(bases))}: evaluate each base "
                "in its own run"
            )
    if problems:
        raise CheckpointError("\n".join(problems))
    return checkpoints


def format_summary_table(results: list[dict]) -> str:
    """Per checkpoint a header line, then one indented ``format_style_line`` per style."""
    lines = []
    for entry in results:
        lines.append(f"{entry['checkpoint_name']} ({entry['checkpoint']})")
        lines.extend(f"  {format_style_line(style, metrics)}" for style, metrics in entry["eval_styles"].items())
    return "\n".join(lines)


def load_checkpoint_policy(checkpoint: Checkpoint, args):
    """The checkpoint as a transformers policy; an adapter is applied, unmerged, to its base model."""
    try:
        if checkpoint.is_adapter:
            return load_policy(
                checkpoint.base_model,
                adapter=checkpoint.path,
                dtype=args.dtype,
                device=args.device,
                batch_size=args.generation_batch_size,
                max_input_tokens=args.max_prompt_tokens,
            )
        return load_policy(
            str(checkpoint.path),
            dtype=args.dtype,
            device=args.device,
            batch_size=args.generation_batch_size,
            max_input_tokens=args.max_prompt_tokens,
        )
    except ModelLoadError as error:
        raise CheckpointError(f"checkpoint {checkpoint.given}: could not be loaded ({error})") from error


def build_adapter_engine(checkpoints: list[Checkpoint], args: CheckpointEvalConfig) -> VLLMChatBackend:
    """One vLLM engine on the adapters' base model, large enough for every adapter's rank."""
    base = checkpoints[0].base_model
    tokenizer = load_tokenizer(base)
    engine = VLLMPolicyEngine(
        resolve_model_path(base),
        tokenizer,
        max_lora_rank=max(c.lora_rank or 1 for c in checkpoints),
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        dtype=args.dtype,
        max_model_len=args.max_prompt_tokens + args.eval_max_new_tokens,
        seed=args.seed,
    )
    return VLLMChatBackend(engine, tokenizer=tokenizer, max_input_tokens=args.max_prompt_tokens, name=f"vllm:{base}")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(
    args: CheckpointEvalConfig,
    judges: ParticipantsArguments,
    checkpoints: list[Checkpoint],
    participants_config: ParticipantsConfig,
    results_path: Path,
    completions_path: Path,
) -> dict:
    tokenizer = load_tokenizer(args.baseline_model)
    prompts = load_split(
        args.val_jsonl, tokenizer, args.eval_n, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, label="eval"
    )
    if not prompts:
        raise DataError(f"{args.val_jsonl}: no prompts left after filtering to {args.max_prompt_tokens} tokens")
    participants = build_participants(participants_config)
    check_remote_backends(participants)
    conversations = [as_conversation(p) for p in prompts]
    sampling = SamplingParams(max_new_tokens=args.eval_max_new_tokens, temperature=args.temperature, top_p=1.0)

    def answers_of(policy, label: str) -> list[str]:
        seed_everything(args.seed)  # a checkpoint's answers do not depend on its place in the list
        # vLLM schedules a whole list best: one call for all prompts.
        batch_size = len(conversations) if isinstance(policy, VLLMChatBackend) else args.generation_batch_size
        return answer(policy, conversations, sampling, batch_size=batch_size, label=label)

    # With --use_vllm the baseline answers on the engine when it is the adapters' base model; otherwise it
    # answers with transformers first and is freed before the engine claims its share of the GPU.
    baseline_on_engine = args.use_vllm and resolve_model_path(args.baseline_model) == resolve_model_path(
        checkpoints[0].base_model
    )
    started = time.perf_counter()
    if not baseline_on_engine:
        baseline = answers_of(
            load_policy(
                args.baseline_model,
                dtype=args.dtype,
                device=args.device,
                batch_size=args.generation_batch_size,
                max_input_tokens=args.max_prompt_tokens,
            ),
            "baseline",
        )
        release()
    adapter_engine = build_adapter_engine(checkpoints, args) if args.use_vllm else None
    if baseline_on_engine:
        baseline = answers_of(adapter_engine, "baseline")
    logger.info(
        "baseline: %d answers in %.1f s, mean %.0f chars",
        len(baseline),
        time.perf_counter() - started,
        average_chars(baseline),
    )

    results = {
        "meta": {
            "baseline_model": args.baseline_model,
            "checkpoints": [c.given for c in checkpoints],
            "eval_styles": list(participants_config.judge_styles),
            "eval_n": len(prompts),
            "eval_n_requested": args.eval_n,
            "val_jsonl": args.val_jsonl,
            "max_prompt_tokens": args.max_prompt_tokens,
            "eval_max_new_tokens": args.eval_max_new_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "use_vllm": args.use_vllm,
            "judge_local": judges.judge_local,
            "judge_model": participants.judge_label,
            "user_model": judges.user_model_name_or_path,
            "run_name": args.run_name,
            "baseline_avg_completion_len": average_chars(baseline),
            "settings": settings_record(args, judges),
        },
        "results": [],
    }
    completions = {"prompts": prompts, "baseline": baseline, "checkpoints": []}

    def save() -> None:
        write_json_atomic(results_path, results)
        write_json_atomic(completions_path, completions)

    save()
    for number, checkpoint in enumerate(checkpoints, start=1):
        label = f"checkpoint {number}/{len(checkpoints)} {checkpoint.path.name}"
        started = time.perf_counter()
        if adapter_engine is not None:
            adapter_engine.use_adapter(checkpoint.path)
            policy = adapter_engine
        else:
            policy = load_checkpoint_policy(checkpoint, args)
        load_time = time.perf_counter() - started
        started = time.perf_counter()
        answers = answers_of(policy, label)
        gen_time = time.perf_counter() - started
        del policy
        if adapter_engine is None:
            release()
        per_style = judge_every_style(
            participants.judges, prompts, answers, baseline, seed=args.seed, label=checkpoint.path.name
        )
        results["results"].append(
            {
                "checkpoint": checkpoint.given,
                "checkpoint_name": checkpoint.path.name,
                "kind": checkpoint.kind,
                "base_model": checkpoint.base_model,
                "load_time_s": round(load_time, 1),
                "gen_time_s": round(gen_time, 1),
                "avg_completion_len": average_chars(answers),
                "eval_styles": per_style,
            }
        )
        completions["checkpoints"].append({"checkpoint": checkpoint.given, "completions": answers})
        save()
    if adapter_engine is not None:
        release(adapter_engine)
    return results


def main(argv=None) -> int:
    """Exit status 2 for a bad command line or config file, 1 for unusable checkpoints, data or judges."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    load_project_env()
    try:
        args, judges = parse_arguments(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        checkpoints = inspect_checkpoints(args.checkpoints, args.use_vllm)
        participants_config = ParticipantsConfig.from_args(judges, user_styles=(), judge_styles=args.eval_styles)
        participants_config.validate()
        require_vllm(
            [
                flag
                for flag, on in (
                    ("--use_vllm", args.use_vllm),
                    ("--user_vllm (local judge)", participants_config.uses_vllm),
                )
                if on
            ]
        )
    except ValueError as error:  # CheckpointError and ParticipantsError included: one line per problem
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    results_path, completions_path = numbered_results_paths(args.out_dir, args.run_name)
    try:
        results = run(args, judges, checkpoints, participants_config, results_path, completions_path)
    except (DataError, ModelLoadError, BackendError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        if results_path.is_file():
            print(f"finished checkpoints so far: {results_path}", file=sys.stderr)
        return 1
    print(format_summary_table(results["results"]))
    print(f"results: {results_path}\ncompletions: {completions_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
