"""Settings of one online run (data, the simulated user's personas, evaluation, outputs) beside the learner's.

``eval_online_sdpo.py`` parses ``OnlineSDPOConfig`` (the learner), ``ParticipantsArguments`` (user and judges) and
``OnlineRunConfig`` (this file) with one ``ConfigParser``; ``OnlineArguments`` carries the three.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.data.data_sources import DataError
from sdpo.evaluation.evaluation_helpers import check_run_name, load_prompts
from sdpo.learner import distributed
from sdpo.learner.config import OnlineSDPOConfig, check_ranges
from sdpo.models.model_loading import is_local_model_path
from sdpo.personas.participants import ParticipantsArguments, ParticipantsConfig, StyleSchedule
from sdpo.personas.style_judge import PROTOCOLS
from sdpo.personas.user_simulator import resolve_style
from sdpo.utils.command_line import ConfigParser, UsageError, settings_record
from sdpo.utils.file_io import check_output_folder
from sdpo.utils.tracking import REPORT_TO

STYLE_BASELINES = ("base", "introduced")
# The paper-era TL;DR runs asked for the summary once, in a system message (--system_prompt tldr), over posts
# whose trailing "TL;DR:" cue was removed (auxiliary/preprocess_tldr_dataset.py --prompt_format post).
SYSTEM_PROMPTS = {
    "general": None,
    "tldr": "Summarize the following post in one or two sentences.",
}
# Settings that may differ on --resume without changing what the run computes.
RESUME_OVERRIDABLE = ("resume", "debug_first_example", "report_to", "wandb", "out_dir", "vllm_server_url")
VLLM_MODES = ("colocate", "server")


def _check_file(flag: str, value: str | None) -> None:
    path = Path(value or "")
    if not path.is_file():
        raise ValueError(f"--{flag} {value}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")


def _check_folder(flag: str, value: str | None) -> None:
    if value:
        check_output_folder(value, f"--{flag}")


def check_local_model(flag: str, name: str | None) -> None:
    """A model given as a local path must be an existing folder (checked before any model loads)."""
    if not name or not is_local_model_path(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        problem = "is a file; pass the model folder" if path.exists() else "does not exist; fix the path"
        raise DataError(f"--{flag} {name}: {problem}")


@dataclass
class OnlineRunConfig:
    """One online run: which prompts, which personas over time, how it is evaluated, where it is written."""

    # ---- data
    train_jsonl: str | None = field(
        default=None,
        metadata={
            "help": "Training prompts (JSONL: a 'prompt' string, or a 'messages' list ending with the user turn, "
            "per line)."
        },
    )
    val_jsonl: str | None = field(default=None, metadata={"help": "Held-out evaluation prompts (same format)."})
    train_n: int = field(default=10, metadata={"help": "Number of training interactions."})
    eval_n: int = field(default=50, metadata={"help": "Number of evaluation prompts."})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "Drop prompts longer than this once chat-rendered."})
    # The reference's Python default is 42 and its script's 1234 (scripts/eval_online_sdpo.sh): both kept.
    seed: int = field(
        default=42, metadata={"help": "Seeds data selection, sampling (python/numpy/torch) and the bootstrap."}
    )
    # ---- the interactions
    interactions_per_step: int = field(
        default=1,
        metadata={
            "help": "Interactions per optimizer step: one batched generation, B follow-ups, one update "
            "(1 = the reference)."
        },
    )
    system_prompt: str = field(
        default="general",
        metadata={
            "help": "general: no system message; tldr: the reference's TL;DR instruction.",
            "choices": sorted(SYSTEM_PROMPTS),
        },
    )
    # ---- the user's personas and evaluation
    # The reference's Python default; its script defaults to no_emojis (scripts/eval_online_sdpo.sh).
    style: str = field(
        default="concise_casual_beginner",
        metadata={"help": "Persona of the simulated user and of the primary judge (without --style_schedule)."},
    )
    style_schedule: str | None = field(
        default=None,
        metadata={
            "help": 'Personas over time, "styleA:N,styleB:M": the user takes styleA for N interactions, then '
            "styleB, ...; every scheduled style is judged."
        },
    )
    eval_styles: list[str] = field(
        default_factory=list, metadata={"help": "Further personas judging the same completions."}
    )
    oracle: bool = field(
        default=False,
        metadata={
            "help": "Before training, judge the in-context oracle (persona in a system message) against the "
            "baseline, per judged style."
        },
    )
    baseline_model: str | None = field(
        default=None,
        metadata={"help": "Model for the baseline completions (default: the policy before training)."},
    )
    eval_every: int = field(default=1, metadata={"help": "Evaluate after every N interactions (0: only at the end)."})
    eval_at_start: bool = field(
        default=False,
        metadata={"help": "Also evaluate before the first update (interaction 0), where the paper's curves start."},
    )
    style_baseline: str = field(
        default="base",
        metadata={
            "help": "What each style is judged against. base: the policy before training, at every evaluation; "
            "introduced: the policy when the style entered the schedule (its answers are taken at the switch and "
            "the style is judged from then on; paper Fig. 6).",
            "choices": list(STYLE_BASELINES),
        },
    )
    preflight: int = field(
        default=0,
        metadata={
            "help": "Before training, check on N training prompts whether the hindsight teacher's answers beat the "
            "policy's (judged per user style) and how much its follow-ups move token log-probs against an "
            "unrelated one; one verdict line per style, stored in the results meta (0: no check)."
        },
    )
    preflight_only: bool = field(
        default=False,
        metadata={"help": "Stop after the --preflight check (no training, no evaluation); scripts/preflight_check.sh."},
    )
    protocol: str = field(
        default="reasoning",
        metadata={
            "help": "Judge and simulated-user prompts. reasoning: the judge may reason and ends with a verdict "
            "line; paper: the judge answers one character A/B/C, the user replies very briefly and may approve "
            "(App. D.3).",
            "choices": list(PROTOCOLS),
        },
    )
    eval_max_new_tokens: int = field(default=2048, metadata={"help": "Generation budget for evaluation."})
    min_decided: int = field(
        default=5,
        metadata={"help": "The plot draws win rates from fewer decided pairs hollow, without error bars."},
    )
    # ---- where the policy generates (docs/scaling.md)
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "With --use_vllm: colocate = a vLLM engine inside each training process; server = the policy "
            "generates on --vllm_server_url (`vllm serve` with runtime LoRA loading), which gets the adapter after "
            "every update (needs --use_lora).",
            "choices": list(VLLM_MODES),
        },
    )
    vllm_server_url: str | None = field(
        default=None,
        metadata={
            "help": "With --vllm_mode server: the server, e.g. http://127.0.0.1:8000 (started with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank R)."
        },
    )
    # ---- outputs
    out_dir: str = field(
        default="./live_eval_results",
        metadata={"help": "Run directory: checkpoints, completions, plot, results."},
    )
    eval_dir: str | None = field(default=None, metadata={"help": "Where the results JSON goes (default: --out_dir)."})
    run_name: str | None = field(
        default=None,
        metadata={"help": "Name of the run (results file prefix; letters, digits, '.', '_', '-')."},
    )
    save_checkpoints: bool = field(
        default=False,
        metadata={"help": "Keep a checkpoint after every optimizer step (checkpoints/step_<n>)."},
    )
    resume_every: int = field(
        default=1,
        metadata={
            "help": "Refresh the resume checkpoint every N interactions, at step boundaries (0: only at the end)."
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the interrupted run in --out_dir with its original settings."},
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Experiment tracking (WANDB_MODE=offline works without network).",
            "choices": list(REPORT_TO),
        },
    )
    wandb: bool = field(default=False, metadata={"help": "Alias of --report_to wandb."})
    wandb_project: str = field(default="live-sdpo", metadata={"help": "Project of the wandb/trackio run."})
    debug_first_example: bool = field(
        default=False,
        metadata={"help": "Print the first simulator and judge inputs and outputs in full."},
    )

    def __post_init__(self):
        if self.wandb:
            self.report_to = "wandb"
        _check_folder("out_dir", self.out_dir)
        _check_folder("eval_dir", self.eval_dir)
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"--vllm_mode {self.vllm_mode!r}: choose one of {', '.join(VLLM_MODES)}")
        if self.resume:
            return  # the stored settings are checked when they are read back
        if self.vllm_mode == "server" and not self.vllm_server_url:
            raise ValueError("--vllm_mode server needs --vllm_server_url, e.g. http://127.0.0.1:8000")
        missing = [name for name in ("train_jsonl", "val_jsonl", "run_name") if not getattr(self, name)]
        if missing:
            raise ValueError("the following arguments are required: " + ", ".join(f"--{m}" for m in missing))
        check_run_name(self.run_name)
        _check_file("train_jsonl", self.train_jsonl)
        _check_file("val_jsonl", self.val_jsonl)
        check_ranges(
            self,
            at_least_one=("interactions_per_step", "train_n", "eval_n", "max_prompt_tokens", "eval_max_new_tokens"),
        )
        for name in ("eval_every", "resume_every", "min_decided", "preflight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.preflight_only and not self.preflight:
            raise ValueError("--preflight_only needs --preflight N (the number of training prompts to check)")
        self.style = resolve_style(self.style)
        self.eval_styles = [resolve_style(style) for style in self.eval_styles]
        StyleSchedule.parse(self.style_schedule, self.style)

    @property
    def schedule(self) -> StyleSchedule:
        return StyleSchedule.parse(self.style_schedule, self.style)

    @property
    def judged_styles(self) -> tuple[str, ...]:
        """Every scheduled style (or --style), then --eval_styles; the first is the primary judge."""
        schedule = self.schedule
        return tuple(
            dict.fromkeys((*schedule.styles, *([] if self.style_schedule else [self.style]), *self.eval_styles))
        )


@dataclass(frozen=True)
class OnlineArguments:
    """The three parsed settings of an online run."""

    learner: OnlineSDPOConfig
    participants: ParticipantsArguments
    run: OnlineRunConfig

    def participants_config(self) -> ParticipantsConfig:
        """Simulated users for the scheduled styles; judges for those, --style and --eval_styles."""
        config = ParticipantsConfig.from_args(
            self.participants, user_styles=self.run.schedule.styles, judge_styles=self.run.judged_styles
        )
        return dataclasses.replace(config, protocol=self.run.protocol)

    def check_inputs(self) -> None:
        """Everything about the run's files and models that can be checked before a model loads: both prompt
        files read and validated in full, local model folders present, a batch the training prompts can fill.
        One ``DataError`` line naming the file, line or flag."""
        run, participants = self.run, self.participants
        train = load_prompts(run.train_jsonl)
        load_prompts(run.val_jsonl)
        config = self.participants_config()
        local_user = config.user_backend in ("hf", "vllm") and (config.user_styles or config.judge_backend == "user")
        check_local_model("model_name_or_path", self.learner.model_name_or_path)
        check_local_model("user_model_name_or_path", participants.user_model_name_or_path if local_user else None)
        check_local_model("baseline_model", run.baseline_model)
        usable = min(run.train_n, len(train))
        if run.interactions_per_step > usable:
            raise DataError(
                f"--interactions_per_step {run.interactions_per_step} exceeds the {usable} training interactions "
                f"(--train_n {run.train_n}, {len(train)} prompts in {run.train_jsonl}): no step would be full; "
                f"use --interactions_per_step {usable} or more prompts"
            )

    def to_dict(self) -> dict:
        """Every setting by field name (what results meta and run_state.json record); no URL credentials."""
        return settings_record(self.learner, self.participants, self.run)

    @classmethod
    def from_dict(cls, settings: dict) -> OnlineArguments:
        """The inverse of ``to_dict`` (unknown keys are ignored, missing ones take their defaults)."""

        def build(dataclass_type):
            names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
            return dataclass_type(**{k: v for k, v in settings.items() if k in names})

        return cls(build(OnlineSDPOConfig), build(ParticipantsArguments), build(OnlineRunConfig))


def build_parser(description: str | None = None) -> ConfigParser:
    """The online loop's parser: the learner, the participants and the run, one flag (and YAML key) per field."""
    parser = ConfigParser((OnlineSDPOConfig, ParticipantsArguments, OnlineRunConfig), description=description)
    # The online loop keeps its checkpoints in <out_dir>/checkpoints and saves only with --save_checkpoints.
    parser.set_defaults(checkpoint_every_n_steps=0, max_checkpoints=0)
    return parser


def parse_arguments(argv: list[str] | None = None, description: str | None = None) -> OnlineArguments:
    """Every setting, checked for everything that can be checked before a model loads (one ``UsageError``)."""
    learner, participants, run = build_parser(description).parse(argv)
    try:
        distributed.check_launch(learner)
    except distributed.LaunchError as error:
        raise UsageError(str(error)) from None
    if not run.resume:  # a resumed run's stored settings are checked once they are read back
        check_world_size(OnlineArguments(learner, participants, run))
    if run.vllm_mode == "server" and not learner.use_vllm:
        raise UsageError("--vllm_mode server needs --use_vllm: add it, or drop --vllm_mode server")
    if run.vllm_mode == "server" and not learner.use_lora:
        raise UsageError(
            "--vllm_mode server sends the server each new LoRA adapter: add --use_lora, or train all weights with "
            "the policy's engine in this process (--vllm_mode colocate)"
        )
    if learner.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--optim adamw_8bit needs bitsandbytes (pip install bitsandbytes, CUDA); or use --optim adamw")
    return OnlineArguments(learner, participants, run)


def check_world_size(arguments: OnlineArguments) -> None:
    """What several processes (``accelerate launch``) cannot run: fewer interactions per step than processes, or a
    colocated vLLM engine per process (untested; vLLM inside a torchrun launch needs its external-launcher
    executor). One ``UsageError`` line."""
    world_size = distributed.launched_world_size()
    if world_size == 1:
        return
    if world_size > arguments.run.interactions_per_step:
        raise UsageError(
            f"--interactions_per_step {arguments.run.interactions_per_step} is smaller than the {world_size} processes "
            f"launched: give each process at least one interaction per step (--interactions_per_step {world_size}) "
            "or launch fewer"
        )
    if arguments.run.preflight:
        raise UsageError(
            f"--preflight with {world_size} processes: the check runs in one process (scripts/preflight_check.sh "
            "without accelerate launch); drop --preflight here"
        )
    if arguments.learner.use_vllm and arguments.run.vllm_mode == "colocate":
        raise UsageError(
            f"--use_vllm with {world_size} processes: put the policy on a vLLM server (--vllm_mode server "
            "--vllm_server_url ..., docs/scaling.md); a colocated engine runs in one-process launches only"
        )
