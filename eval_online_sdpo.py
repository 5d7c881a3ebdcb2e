"""Online SDPO with periodic evaluation: the continual-personalization experiment.

Per optimizer step: ``--interactions_per_step`` B training prompts are answered in one batched generation,
the simulated user (a persona) writes B follow-ups, and the policy is updated at once on the B tuples with
the SDPO signal log π(y|x,o) − log π(y|x). Every ``--eval_every`` interactions the current policy answers the
held-out prompts and one persona judge per style compares each answer with the untrained baseline's, in both
orders. ``--style_schedule`` switches the user's persona during training (the paper's preference flip, Fig. 4,
and sequential preferences, Fig. 6); every scheduled style is judged at every evaluation, so retention shows.
``--oracle`` first judges the in-context oracle (the same policy told the persona in a system message): the
reference line of what the model can do in context, which is what SDPO distills.

GPU (the reference setup, via the script):
    ./scripts/eval_online_sdpo.sh
The paper's figures (Table 5 settings): ./scripts/reproduce_paper.sh (FIGURE=fig4|fig5|fig6)
CPU, embedded model, rule-based user and judge, MT-Bench prompts (about 5 minutes on 2 cores):
    ./scripts/quickstart_cpu.sh
Direct:
    python eval_online_sdpo.py --model smollm2-135m-instruct --user_backend rule --judge_backend rule \
        --train_jsonl data/mtbench_prompts/train.jsonl --val_jsonl data/mtbench_prompts/validation.jsonl \
        --interactions_per_step 2 --style_schedule short:2,no_lists:2 --oracle --run_name demo --out_dir runs/demo
Resume an interrupted run (same out_dir; its original arguments are reused; .env is read as by the scripts):
    python eval_online_sdpo.py --resume --out_dir runs/demo

Outputs (all inside --out_dir; results JSON in --eval_dir, default --out_dir):
    <run_name>_<idx>.json               meta, eval_history, training_metrics (rewritten after every step)
    <run_name>_completions_<idx>.json   every evaluation's current and baseline completions
    <run_name>_completions.jsonl        the first 10 eval prompts per evaluation, truncated, for a quick look
    baseline_completions.json           the baseline's answers (kept for --resume)
    oracle_completions.json             with --oracle: the persona-prompted answers per style
    winrate.png                         win rate ± SE and coverage vs interactions, one line per judged style
    checkpoints/last/                   resume state (adapter or model, optimizer, step, RNG)
    checkpoints/step_<n>/               with --save_checkpoints, one per optimizer step
    run_state.json                      the arguments and file names of this run

After a crash (kill -9, Ctrl-C, an API outage): every interaction recorded in the results file up to the last
resume checkpoint is kept byte for byte by ``--resume``; interactions after it are recomputed from the
checkpoint's RNG state, so the resumed run equals an uninterrupted one. Files are replaced atomically (a
complete new file before the old one goes), and a checkpoint's previous version is kept until the new one is
complete. A run that failed before its first interaction can simply be started again.

Deliberate differences from the reference: batched interactions and evaluation generation; persona schedules;
the oracle line; everything under the run's directory; results written after every step; python/numpy/torch
seeded; the final evaluation uses --temperature; strict judge parsing with unparsed verdicts counted
(n_unparsed); the ties-as-half win rate stored.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sdpo.chat.backends import BackendError
from sdpo.utils.command_line import ArgumentParser
from sdpo.utils.env_file import load_project_env
from sdpo.evaluation.evaluation_helpers import (
    DataError,
    Prompt,
    as_conversation,
    average_chars,
    format_metrics_line,
    judge_every_style,
    load_split,
    next_run_index,
    request_text,
    save_completions_snapshot,
    seed_everything,
    write_json_atomic,
)
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import DTYPES, ModelLoadError, concrete_dtype
from sdpo.evaluation.oracle import oracle_answers
from sdpo.personas.participants import (
    ParticipantsConfig,
    add_participant_arguments,
    build_participants,
    StyleSchedule,
    check_remote_backends,
    style_name,
)
from sdpo.evaluation.plots import plot_winrate
from sdpo.chat.policies import TrainingPolicy, answer, load_policy, release
from sdpo.utils.tracking import REPORT_TO, Tracker
from sdpo.models.vllm_engines import require_vllm
from sdpo.learner.updater import EmptyResponseError, OnlineSDPOUpdater, complete_checkpoint, read_extra_state
from sdpo.learner.config import OnlineSDPOConfig

logger = logging.getLogger("eval_online_sdpo")

RESUME_TAG = "last"
TEXT_PREVIEW_CHARS = 300
# Arguments that may differ on --resume without changing what the run computes.
RESUME_OVERRIDABLE = {"resume", "debug_first_example", "report_to", "wandb"}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The reference's TL;DR experiments put this instruction in a system message (--system_prompt tldr).
SYSTEM_PROMPTS = {
    "general": None,
    "tldr": "Summarize the following post in one or two sentences, starting with \"TL;DR:\".",
}
DEFAULTS = OnlineSDPOConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    # ---- policy and training
    policy = parser.add_argument_group("policy and training")
    policy.add_argument("--model", default=DEFAULTS.model_name_or_path, help="policy: HF id, local folder or bundled alias (smollm2-135m-instruct)")
    policy.add_argument("--lr", type=float, default=DEFAULTS.learning_rate, help="learning rate (constant)")
    policy.add_argument("--optim", default=DEFAULTS.optimizer, choices=["adamw", "adamw_8bit"], help="optimizer (adamw_8bit needs bitsandbytes, CUDA)")
    policy.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    policy.add_argument("--lora_r", type=int, default=DEFAULTS.lora_r, help="LoRA rank")
    policy.add_argument("--lora_alpha", type=int, default=DEFAULTS.lora_alpha, help="LoRA alpha (scale = alpha / r)")
    policy.add_argument("--loss_mode", default=DEFAULTS.loss_mode, choices=["simple_signal", "full_distillation"], help="SDPO loss; simple_signal is the paper's sampled-token form")
    policy.add_argument("--distillation_topk", type=int, default=DEFAULTS.distillation_topk, help="K of the top-K distillation")
    policy.add_argument("--train_steps_per_example", type=int, default=DEFAULTS.train_steps_per_example, help="gradient steps per batch of interactions")
    policy.add_argument("--interactions_per_step", type=int, default=1, help="interactions per optimizer step: one batched generation, B follow-ups, one update (1 = the reference)")
    policy.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens, help="training-time generation budget")
    policy.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="sampling temperature (training and evaluation)")
    policy.add_argument("--system_prompt", default="general", choices=sorted(SYSTEM_PROMPTS), help="general: no system message; tldr: the reference's TL;DR instruction")
    policy.add_argument("--dtype", default=DEFAULTS.torch_dtype, help="compute dtype (trainable weights stay fp32 under autocast); auto: bfloat16 where the hardware computes it natively, else float32")
    policy.add_argument("--device", default=DEFAULTS.device, help="policy device: auto, cpu, cuda, cuda:1, ...")
    policy.add_argument("--generation_batch_size", type=int, default=DEFAULTS.generation_batch_size, help="prompts per batched generate call")
    policy.add_argument("--use_vllm", action="store_true", help="generate the policy's answers with vLLM (needs LoRA; adapter hot-swapped after each update)")
    policy.add_argument("--vllm_gpu_memory_utilization", type=float, default=DEFAULTS.vllm_gpu_memory_utilization, help="GPU memory share of the policy vLLM engine")
    # ---- data
    data = parser.add_argument_group("data")
    data.add_argument("--train_jsonl", help="training prompts (JSONL: a 'prompt' string, or a 'messages' list ending with the user turn, per line)")
    data.add_argument("--val_jsonl", help="held-out evaluation prompts (same format)")
    data.add_argument("--train_n", type=int, default=10, help="number of training interactions")
    data.add_argument("--eval_n", type=int, default=50, help="number of evaluation prompts")
    data.add_argument("--max_prompt_tokens", type=int, default=2048, help="drop prompts longer than this once chat-rendered")
    # The reference's Python default is 42 and its script's 1234 (scripts/eval_online_sdpo.sh): both kept.
    data.add_argument("--seed", type=int, default=42, help="seeds data selection, sampling (python/numpy/torch) and the bootstrap")
    # ---- user and evaluation
    add_participant_arguments(parser)
    evaluation = parser.add_argument_group("evaluation")
    # The reference's Python default; its script defaults to no_emojis (scripts/eval_online_sdpo.sh).
    evaluation.add_argument("--style", type=style_name, default="concise_casual_beginner", help="persona of the simulated user and of the primary judge (without --style_schedule)")
    evaluation.add_argument("--style_schedule", default=None, help='personas over time, "styleA:N,styleB:M": the user takes styleA for N interactions, then styleB, ...; every scheduled style is judged')
    evaluation.add_argument("--eval_styles", nargs="*", type=style_name, default=[], help="further personas judging the same completions")
    evaluation.add_argument("--oracle", action="store_true", help="before training, judge the in-context oracle (persona in a system message) against the baseline, per judged style")
    evaluation.add_argument("--baseline_model", default=None, help="model for the baseline completions (default: the policy before training)")
    evaluation.add_argument("--eval_every", type=int, default=1, help="evaluate after every N interactions (0: only at the end)")
    evaluation.add_argument("--eval_max_new_tokens", type=int, default=2048, help="generation budget for evaluation")
    evaluation.add_argument("--min_decided", type=int, default=5, help="the plot draws win rates from fewer decided pairs hollow, without error bars")
    # ---- outputs
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--out_dir", default="./live_eval_results", help="run directory: checkpoints, completions, plot, results")
    outputs.add_argument("--eval_dir", default=None, help="where the results JSON goes (default: --out_dir)")
    outputs.add_argument("--run_name", help="name of the run (results file prefix; letters, digits, '.', '_', '-')")
    outputs.add_argument("--save_checkpoints", action="store_true", help="keep a checkpoint after every optimizer step (checkpoints/step_<n>)")
    outputs.add_argument("--resume_every", type=int, default=1, help="refresh the resume checkpoint every N interactions, at step boundaries (0: only at the end)")
    outputs.add_argument("--resume", action="store_true", help="continue the interrupted run in --out_dir with its original arguments")
    outputs.add_argument("--report_to", default="none", choices=REPORT_TO, help="experiment tracking (WANDB_MODE=offline works without network)")
    outputs.add_argument("--wandb", action="store_true", help="alias of --report_to wandb")
    outputs.add_argument("--wandb_project", default=DEFAULTS.wandb_project, help="project of the wandb/trackio run")
    outputs.add_argument("--debug_first_example", action="store_true", help="print the first simulator and judge inputs and outputs in full")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, checked for everything that can be checked before a model loads (argparse errors: exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.wandb:
        args.report_to = "wandb"
    if args.resume:
        return args
    missing = [flag for flag in ("train_jsonl", "val_jsonl", "run_name") if not getattr(args, flag)]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(f"--{m}" for m in missing))
    if not RUN_NAME.fullmatch(args.run_name):
        parser.error(f"--run_name {args.run_name!r}: use letters, digits, '.', '_' and '-' only (it names files inside --out_dir)")
    for flag in ("train_jsonl", "val_jsonl"):
        path = Path(getattr(args, flag))
        if not path.is_file():
            parser.error(f"--{flag} {path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")
    for flag in ("out_dir", "eval_dir"):
        path = getattr(args, flag)
        if path and Path(path).exists() and not Path(path).is_dir():
            parser.error(f"--{flag} {path} is a file; pass a folder")
    finite_positive = ("lr", "vllm_gpu_memory_utilization", "user_vllm_gpu_memory_utilization")
    at_least_one = ("lora_r", "lora_alpha", "distillation_topk", "train_steps_per_example", "interactions_per_step", "max_new_tokens",
                    "generation_batch_size", "train_n", "eval_n", "max_prompt_tokens", "eval_max_new_tokens")
    for flag in finite_positive:
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag} must be a finite number > 0, got {value}")
    for flag in at_least_one:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("eval_every", "resume_every", "min_decided"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.dtype != "auto" and args.dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype!r}: use auto or one of {sorted(DTYPES)}")
    args.dtype = concrete_dtype(args.dtype, args.device)
    if args.optim == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--optim adamw_8bit needs bitsandbytes (pip install bitsandbytes, CUDA); or use --optim adamw")
    try:
        StyleSchedule.parse(args.style_schedule, args.style)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    return args


def schedule_of(args) -> StyleSchedule:
    return StyleSchedule.parse(args.style_schedule, args.style)


def participants_config(args) -> ParticipantsConfig:
    """Simulated users for the scheduled styles; judges for those, --style and --eval_styles (primary first)."""
    schedule = schedule_of(args)
    judged = (*schedule.styles, *([] if args.style_schedule else [args.style]), *args.eval_styles)
    return ParticipantsConfig.from_args(args, user_styles=schedule.styles, judge_styles=judged)


def build_config(args, checkpoint_dir: Path) -> OnlineSDPOConfig:
    return OnlineSDPOConfig(
        model_name_or_path=args.model,
        learning_rate=args.lr,
        optimizer=args.optim,
        use_lora=args.use_lora,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        loss_mode=args.loss_mode,
        distillation_topk=args.distillation_topk,
        train_steps_per_example=args.train_steps_per_example,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        torch_dtype=args.dtype,
        device=args.device,
        generation_batch_size=args.generation_batch_size,
        use_vllm=args.use_vllm,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_every_n_steps=1 if args.save_checkpoints else 0,
        max_checkpoints=0,
        wandb_project=args.wandb_project,
        wandb_run_name=args.run_name,
    )


class RunFiles:
    """Paths of one run; ``run_state.json`` pins them (and the arguments) for --resume."""

    def __init__(self, out_dir: Path, eval_dir: Path, run_name: str, index: int):
        self.out_dir, self.eval_dir = out_dir, eval_dir
        self.results = eval_dir / f"{run_name}_{index}.json"
        self.completions = eval_dir / f"{run_name}_completions_{index}.json"
        self.snapshot = out_dir / f"{run_name}_completions.jsonl"
        self.baseline = out_dir / "baseline_completions.json"
        self.oracle = out_dir / "oracle_completions.json"
        self.plot = out_dir / "winrate.png"
        self.state = out_dir / "run_state.json"
        self.checkpoints = out_dir / "checkpoints"

    def finished_interactions(self) -> int:
        """Interactions recorded in the results file (0 when it does not exist yet)."""
        if not self.results.is_file():
            return 0
        return len(json.loads(self.results.read_text())["training_metrics"])


def _run_files(out_dir: Path, state: dict) -> RunFiles:
    return RunFiles(out_dir, Path(state["args"]["eval_dir"]), state["args"]["run_name"], state["index"])


def start_or_resume(args) -> tuple[argparse.Namespace, RunFiles, dict | None]:
    """New run: pick the result index and write run_state.json. Resume: reload args and results.

    A run_state.json whose run finished no interaction (it failed at start-up) does not block a new start.
    """
    out_dir = Path(args.out_dir)
    state_path = out_dir / "run_state.json"
    if args.resume:
        if not state_path.is_file():
            raise SystemExit(f"error: --resume needs {state_path} from an earlier run; start a new run without --resume")
        state = json.loads(state_path.read_text())
        stored = argparse.Namespace(**{**vars(build_parser().parse_args([])), **state["args"]})
        defaults = build_parser()
        for name, value in vars(args).items():
            if name not in RESUME_OVERRIDABLE | {"out_dir"} and value != defaults.get_default(name) and value != state["args"].get(name):
                logger.warning("--resume keeps the run's original --%s=%r (ignoring %r)", name, state["args"].get(name), value)
        for name in RESUME_OVERRIDABLE:
            setattr(stored, name, getattr(args, name))
        files = _run_files(out_dir, state)
        results = json.loads(files.results.read_text()) if files.results.is_file() else None
        return stored, files, results
    if state_path.is_file():
        previous = _run_files(out_dir, json.loads(state_path.read_text()))
        if previous.finished_interactions() or (previous.checkpoints / RESUME_TAG).exists():
            raise SystemExit(f"error: {out_dir} already holds a run; continue it with --resume or choose another --out_dir")
        logger.info("%s holds a run that finished no interaction; starting over", out_dir)
    args.eval_dir = str(Path(args.eval_dir or args.out_dir))
    files = RunFiles(out_dir, Path(args.eval_dir), args.run_name, next_run_index(args.eval_dir, args.run_name))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path, {"args": vars(args), "index": int(files.results.stem.rsplit("_", 1)[1])})
    return args, files, None


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: the checkpoint (None: the untrained policy), the interactions it covers, and what
    was recorded since the checkpoint before it (the results file may not have been rewritten before a crash)."""

    checkpoint: Path | None = None
    interactions_done: int = 0
    pending: dict | None = None


def resume_point(files: RunFiles, previous: dict | None) -> ResumePoint:
    """The last complete checkpoint, proven consistent with the results file, or one line saying what is missing.

    The results file records the interaction its newest checkpoint covers; a checkpoint that is gone, incomplete or
    older stops the run instead of silently training again over finished interactions.
    """
    claimed = (previous or {}).get("meta", {}).get("resume_checkpoint_interactions", 0)
    checkpoint = complete_checkpoint(files.checkpoints / RESUME_TAG)
    if checkpoint is None:
        if claimed:
            raise DataError(
                f"{files.checkpoints / RESUME_TAG} is missing or incomplete, so the {claimed} finished interactions in "
                f"{files.results} cannot be continued; start a new run with another --out_dir"
            )
        return ResumePoint()
    state = read_extra_state(checkpoint)
    done = int(state.get("interactions_done", 0))
    if done < claimed:
        raise DataError(
            f"{checkpoint} covers {done} interactions but {files.results} was written after a checkpoint at {claimed}; "
            "the newer checkpoint is gone: start a new run with another --out_dir"
        )
    return ResumePoint(checkpoint, done, state.get("pending") or {})


def _nothing_pending() -> dict:
    """What a run recorded since its last resume checkpoint, before anything was."""
    return {"records": [], "evaluations": [], "completions": []}


def _newer(entries: list[dict], after: int, until: int) -> list[dict]:
    return [e for e in entries if after < e["interaction"] <= until]


def policy_conversation(prompt: Prompt, system_prompt: str | None) -> list[dict]:
    """The policy's context for one prompt: its conversation, after the run's system message when one is set."""
    conversation = as_conversation(prompt)
    if not system_prompt or conversation[0]["role"] == "system":
        return conversation
    return [{"role": "system", "content": system_prompt}, *conversation]


class OnlineRun:
    """One online SDPO run: baseline, optional oracle, batched interactions, evaluations, results files."""

    def __init__(self, args, files: RunFiles, previous: dict | None):
        self.args = args
        self.files = files
        self.schedule = schedule_of(args)
        self.participants_config = participants_config(args)
        self.system_prompt = SYSTEM_PROMPTS[args.system_prompt]
        self.eval_sampling = SamplingParams(max_new_tokens=args.eval_max_new_tokens, temperature=args.temperature, top_p=1.0)
        self.previous = previous
        self.tracker = Tracker()

    # ------------------------------------------------------------------ set-up

    def conversations(self, prompts: list[Prompt]) -> list[list[dict]]:
        return [policy_conversation(p, self.system_prompt) for p in prompts]

    def baseline_completions(self, eval_prompts: list[str], policy) -> list[str]:
        """The baseline's answers: loaded on resume, else generated by --baseline_model or the untrained policy."""
        files, args = self.files, self.args
        if files.baseline.is_file():
            stored = json.loads(files.baseline.read_text())
            if stored["prompts"] == eval_prompts:
                return stored["completions"]
            raise DataError(f"{files.baseline} was made for other eval prompts; start a new run")
        seed_everything(args.seed)
        separate = bool(args.baseline_model) and args.baseline_model != args.model
        if separate:
            policy = load_policy(args.baseline_model, dtype=args.dtype, device=args.device, batch_size=args.generation_batch_size)
        texts = answer(policy, self.conversations(eval_prompts), self.eval_sampling, batch_size=args.generation_batch_size, label="baseline")
        if separate:
            release(policy)
        del policy
        write_json_atomic(files.baseline, {"model": args.baseline_model or args.model, "prompts": eval_prompts, "completions": texts})
        logger.info("baseline: %d completions, mean %.0f chars", len(texts), average_chars(texts))
        return texts

    def oracle_metrics(self, policy, participants, eval_prompts: list[str], baseline: list[str]) -> dict:
        """The in-context oracle judged against the baseline, per judged style (stored answers reused on resume)."""
        styles = list(participants.judges)
        if self.files.oracle.is_file():
            answers = json.loads(self.files.oracle.read_text())["completions"]
        else:
            sampling = self.eval_sampling
            answers, _ = oracle_answers(
                policy, eval_prompts, styles, sampling, batch_size=self.args.generation_batch_size, seed=self.args.seed, system_prompt=self.system_prompt
            )
            write_json_atomic(self.files.oracle, {"prompts": eval_prompts, "completions": answers})
        metrics = {}
        for style in styles:
            metrics[style] = judge_every_style({style: participants.judges[style]}, eval_prompts, answers[style], baseline, seed=self.args.seed, label="oracle")[style]
            metrics[style]["avg_completion_chars"] = average_chars(answers[style])
        return metrics

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        args, files = self.args, self.files
        config = self.participants_config
        config.validate()
        require_vllm([flag for flag, on in (("--use_vllm", args.use_vllm), ("--user_vllm", config.uses_vllm)) if on])
        # Remote and rule participants cost nothing to build: built first, a bad key fails before the model loads.
        participants = build_participants(config) if config.user_backend not in ("hf", "vllm") else None
        if participants is not None:
            check_remote_backends(participants)
        seed_everything(args.seed)
        resume = resume_point(files, self.previous)
        checkpoint, done = resume.checkpoint, resume.interactions_done
        updater = OnlineSDPOUpdater(build_config(args, files.checkpoints), resume_from=checkpoint)

        train_prompts = load_split(args.train_jsonl, updater.tokenizer, args.train_n, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, label="train")
        eval_prompts = load_split(args.val_jsonl, updater.tokenizer, args.eval_n, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, label="eval")
        if not eval_prompts or not train_prompts:
            raise DataError(f"no prompts left after filtering ({len(train_prompts)} train, {len(eval_prompts)} eval); check the files and --max_prompt_tokens")
        policy = TrainingPolicy(updater)
        baseline = self.baseline_completions(eval_prompts, policy)
        if participants is None:
            participants = build_participants(config)
        results = self.initial_results(participants, train_prompts, eval_prompts, resume)
        if args.oracle and "oracle" not in results["meta"]:
            results["meta"]["oracle"] = self.oracle_metrics(policy, participants, eval_prompts, baseline)
            self.save(results)
        if checkpoint is None:
            # Training draws from the same stream whether the baseline was generated now or read from disk.
            seed_everything(args.seed)
        self.tracker = Tracker.start(
            args.report_to, project=args.wandb_project, name=args.run_name, config=vars(args), directory=str(files.out_dir), run_id=f"{args.run_name}-{files.results.stem}"
        )
        self.train_and_evaluate(updater, policy, participants, train_prompts, eval_prompts, baseline, results, done)
        return results

    def initial_results(self, participants, train_prompts, eval_prompts, resume: ResumePoint) -> dict:
        args = self.args
        meta = {
            "model": args.model,
            "style": self.participants_config.judge_styles[0],
            "style_schedule": [list(segment) for segment in self.schedule.segments] if args.style_schedule else None,
            "switch_points": [list(point) for point in self.schedule.switch_points(len(train_prompts))],
            "loss_mode": args.loss_mode,
            "distillation_topk": args.distillation_topk,
            "learning_rate": args.lr,
            "optimizer": args.optim,
            "use_lora": args.use_lora or args.use_vllm,
            "lora_r": args.lora_r,
            "use_vllm": args.use_vllm,
            "interactions_per_step": args.interactions_per_step,
            "system_prompt": args.system_prompt,
            "train_n": len(train_prompts),
            "eval_n": len(eval_prompts),
            "train_n_requested": args.train_n,
            "eval_n_requested": args.eval_n,
            "eval_every": args.eval_every,
            "eval_max_new_tokens": args.eval_max_new_tokens,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "train_steps_per_example": args.train_steps_per_example,
            "judge_model": participants.judge_label,
            "judge_local": args.judge_local,
            "baseline_model": args.baseline_model or args.model,
            "user_model": participants.user_label,
            "run_name": args.run_name,
            "eval_styles": list(self.participants_config.judge_styles[1:]),
            "n_skipped": 0,
        }
        results = {"meta": meta, "eval_history": [], "training_metrics": []}
        self.completions_log: list[dict] = []
        self.pending = _nothing_pending()
        done = resume.interactions_done
        meta["resume_checkpoint_interactions"] = done
        previous = self.previous or {"meta": {}, "training_metrics": [], "eval_history": []}
        if "oracle" in previous["meta"]:
            meta["oracle"] = previous["meta"]["oracle"]
        records = previous["training_metrics"]
        if records and records[-1]["interaction"] > done:
            logger.warning(
                "interactions %d-%d came after the last resume checkpoint (--resume_every %d) and are done again",
                done + 1, records[-1]["interaction"], args.resume_every,
            )
        completions = json.loads(self.files.completions.read_text()) if self.previous and self.files.completions.is_file() else []
        # What the results file holds up to the checkpoint, then what the checkpoint recorded after that file was written.
        for key, kept, pending_key in (("training_metrics", records, "records"), ("eval_history", previous["eval_history"], "evaluations")):
            results[key] = _newer(kept, 0, done)
            last = results[key][-1]["interaction"] if results[key] else 0
            results[key] += _newer((resume.pending or {}).get(pending_key, []), last, done)
        self.completions_log = _newer(completions, 0, done)
        last = self.completions_log[-1]["interaction"] if self.completions_log else 0
        self.completions_log += _newer((resume.pending or {}).get("completions", []), last, done)
        meta["n_skipped"] = sum(1 for m in results["training_metrics"] if m.get("skipped"))
        if done:
            logger.info("resumed at interaction %d/%d", done, len(train_prompts))
        return results

    def save(self, results: dict) -> None:
        write_json_atomic(self.files.results, results)
        write_json_atomic(self.files.completions, self.completions_log)
        meta = results["meta"]
        if results["eval_history"] or meta.get("oracle"):
            plot_winrate(
                results["eval_history"],
                self.files.plot,
                styles=list(self.participants_config.judge_styles),
                oracle=meta.get("oracle"),
                switch_points=[tuple(point) for point in meta["switch_points"]],
                min_decided=self.args.min_decided,
                title=f"{self.args.run_name}: {self.args.model}",
            )

    def evaluate(self, policy, participants, eval_prompts, baseline, interaction: int, step: int) -> tuple[dict, list[str]]:
        """Judge the current policy against the baseline with every style; returns (history entry, completions)."""
        started = time.perf_counter()
        current = answer(policy, self.conversations(eval_prompts), self.eval_sampling, batch_size=self.args.generation_batch_size, label="eval generation")
        gen_time = time.perf_counter() - started
        per_style = judge_every_style(participants.judges, eval_prompts, current, baseline, seed=self.args.seed, label=f"interaction {interaction}")
        primary = self.participants_config.judge_styles[0]
        entry = {**per_style[primary], **{f"secondary_{style}": metrics for style, metrics in per_style.items() if style != primary}}
        entry.update(step=step, interaction=interaction, eval_gen_time_s=round(gen_time, 1), avg_completion_chars=average_chars(current))
        return entry, current

    def interact(self, updater, participants, prompts: list[Prompt], first: int) -> tuple[list, list[str], list[str], float, float]:
        """One batch of interactions: responses (one generation call) and follow-ups (one call per persona)."""
        started = time.perf_counter()
        responses = updater.generate(self.conversations(prompts))
        gen_time = time.perf_counter() - started
        styles = [self.schedule.style_at(first + offset) for offset in range(len(prompts))]
        follow_ups = [""] * len(prompts)
        started = time.perf_counter()
        for style in dict.fromkeys(styles):
            rows = [i for i, s in enumerate(styles) if s == style]
            replies = participants.simulators[style].generate_feedback([request_text(prompts[i]) for i in rows], [responses[i].text for i in rows])
            for row, reply in zip(rows, replies):
                follow_ups[row] = reply
        return responses, follow_ups, styles, gen_time, time.perf_counter() - started

    def train_and_evaluate(self, updater, policy, participants, train_prompts, eval_prompts, baseline, results, done: int) -> None:
        args = self.args
        n = len(train_prompts)
        self.save(results)
        progress = tqdm(total=n, initial=done, desc="interactions", unit="it")
        for first in range(done, n, args.interactions_per_step):
            prompts = train_prompts[first : first + args.interactions_per_step]
            last = first + len(prompts)
            responses, follow_ups, styles, gen_time, sim_time = self.interact(updater, participants, prompts, first)
            if args.debug_first_example and first == 0:
                print(f"[debug] first interaction ({styles[0]}): {request_text(prompts[0])[:500]!r} → {responses[0].text[:500]!r}\n[debug] follow-up: {follow_ups[0]!r}")
            trainable, skipped = [], {}
            for row, response in enumerate(responses):
                try:
                    updater.completion_ids(response)
                    trainable.append(row)
                except EmptyResponseError as error:
                    skipped[row] = str(error)
                    logger.warning("interaction %d skipped: %s", first + row + 1, error)
            step_metrics = {}
            if trainable:
                step_metrics = updater.train_step_batch(
                    [policy_conversation(prompts[i], self.system_prompt) for i in trainable],
                    [responses[i] for i in trainable],
                    [follow_ups[i] for i in trainable],
                )
                self.tracker.log(step_metrics, step=updater.step, prefix="train")
            for row, prompt in enumerate(prompts):
                record = {"step": updater.step, "skipped": skipped[row]} if row in skipped else dict(step_metrics)
                record.update(
                    interaction=first + row + 1,
                    style=styles[row],
                    batch_size=len(prompts),
                    gen_time_s=round(gen_time, 2),
                    sim_time_s=round(sim_time, 2),
                    prompt=request_text(prompt)[:TEXT_PREVIEW_CHARS],
                    response=responses[row].text[:TEXT_PREVIEW_CHARS],
                    feedback=follow_ups[row][:TEXT_PREVIEW_CHARS],
                )
                results["training_metrics"].append(record)
                self.pending["records"].append(record)
            results["meta"]["n_skipped"] += len(skipped)
            progress.update(len(prompts))
            progress.set_postfix(loss=f"{step_metrics.get('loss', float('nan')):.4f}", style=styles[-1])
            if args.eval_every > 0 and last // args.eval_every > first // args.eval_every:
                self.record_evaluation(updater, policy, participants, eval_prompts, baseline, results, last)
            crossed_resume_point = args.resume_every > 0 and last // args.resume_every > first // args.resume_every
            if crossed_resume_point or last == n:
                # Checkpoint first, then the results that name it: a crash in between loses nothing, since the
                # checkpoint carries what was recorded since the previous one.
                updater.save_checkpoint(RESUME_TAG, extra_state={"interactions_done": last, "pending": self.pending})
                results["meta"]["resume_checkpoint_interactions"] = last
                self.pending = _nothing_pending()
            self.save(results)
        progress.close()
        if not results["eval_history"] or results["eval_history"][-1]["interaction"] != n:
            self.record_evaluation(updater, policy, participants, eval_prompts, baseline, results, n)
        self.save(results)

    def record_evaluation(self, updater, policy, participants, eval_prompts, baseline, results, interaction: int) -> None:
        debug = self.args.debug_first_example and not results["eval_history"]
        entry, current = self.evaluate(policy, participants, eval_prompts, baseline, interaction, updater.step)
        if debug:
            judge = participants.judges[results["meta"]["style"]]
            if judge.last_raw_outputs:
                print(f"[debug] judge raw AB output on eval prompt 0:\n{judge.last_raw_outputs[0]['ab'][:1000]}")
        completions = {"step": updater.step, "interaction": interaction, "current": current, "baseline": baseline}
        results["eval_history"].append(entry)
        self.completions_log.append(completions)
        self.pending["evaluations"].append(entry)
        self.pending["completions"].append(completions)
        save_completions_snapshot(self.files.snapshot, updater.step, eval_prompts, current, baseline)
        self.tracker.log(entry, step=updater.step, prefix="eval")


def print_summary(results: dict) -> None:
    """Final win rate per judged style next to its in-context oracle, so a reader sees at a glance whether the
    model can follow the persona at all (an oracle near 50% means there is nothing for SDPO to distill)."""
    if not results["eval_history"]:
        return
    last = results["eval_history"][-1]
    oracle = results["meta"].get("oracle") or {}
    print(f"after {last['interaction']} interactions (step {last['step']}):")
    for style in [results["meta"]["style"], *results["meta"]["eval_styles"]]:
        metrics = last if style == results["meta"]["style"] else last.get(f"secondary_{style}", {})
        line = f"  {format_metrics_line(metrics, style)}"
        if style in oracle:
            line += f" || oracle {format_metrics_line(oracle[style], style).split(': ', 1)[1]}"
        print(line)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load_project_env()
    args = parse_args(argv)
    args, files, previous = start_or_resume(args)
    online_run = OnlineRun(args, files, previous)
    try:
        results = online_run.run()
    except (DataError, ModelLoadError, BackendError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        if files.results.is_file():
            print(f"results so far: {files.results}; continue with: python eval_online_sdpo.py --resume --out_dir {files.out_dir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; finished interactions are in {files.results}; continue with: python eval_online_sdpo.py --resume --out_dir {files.out_dir}", file=sys.stderr)
        return 130
    finally:
        online_run.tracker.finish()
    print_summary(results)
    print(f"results: {files.results}\nplot: {files.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
