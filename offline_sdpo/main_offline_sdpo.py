"""Offline SDPO training on logged interactions (x, y, o): the paper's §4.1 / Eq. 4 setting.

Reads logged interactions (a local JSONL/Parquet file, a dataset folder or a Hub dataset; rows in the
interaction schema, or TRL's conversational ``messages`` / ``prompt``+``completion`` rows, see
``auxiliary/interaction_schema.py``), trains the model with ``OfflineSDPOTrainer`` and writes
checkpoints plus ``final_model/`` into the output folder.

The command line is TRL's: flags come from the dataclasses (``OfflineSDPOConfig`` = every
``TrainingArguments`` field plus the SDPO fields, ``ModelArguments``, ``DataArguments``), with
``--config file.yaml`` for any of them (the command line wins over the file). The reference's names
still work: --train_jsonl (--dataset_name), --base_model (--model_name_or_path), --batch_size
(--per_device_train_batch_size), --grad_accum (--gradient_accumulation_steps), --num_epochs
(--num_train_epochs), --use_lora (--use_peft), --wandb_project (--project), --dtype (--compute_dtype),
--warmup_ratio (--warmup_steps below 1).

One process (CPU or one GPU), from anywhere:

    python offline_sdpo/main_offline_sdpo.py --dataset_name data/sharegpt/sharegpt_interactions.jsonl \\
        --model_name_or_path smollm2-135m-instruct --max_steps 20 --per_device_train_batch_size 2 \\
        --gradient_accumulation_steps 2 --report_to none
    python offline_sdpo/main_offline_sdpo.py --config my_run.yaml --max_steps 5

Several processes (DDP): GPUs via the accelerate config, or CPU via accelerate's multi-GPU launcher
(no GPU present: processes talk over gloo) or torchrun:

    accelerate launch --config_file multigpu_accelerate_config.yaml --num_processes 4 \\
        offline_sdpo/main_offline_sdpo.py --dataset_name ...
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no offline_sdpo/main_offline_sdpo.py --dataset_name ...   # CPU, 2 processes
    torchrun --nproc_per_node 2 offline_sdpo/main_offline_sdpo.py --dataset_name ...

``scripts/train_offline_sdpo.sh`` wraps all of this with the reference's environment variables.

``--method sft`` trains the paper's Table-4 baseline instead: TRL's ``SFTTrainer`` on the logged replies y
of the same tuples (``offline_sdpo/sft_baseline.py``), with every other flag meaning the same. The launch
prints its global batch (per device x accumulation x processes); ``--global_batch_size 32`` (Table 5)
stops before anything loads when the launch gives another.

Defaults are the reference's (spec §11.4) except the batch: lr 2e-6 cosine with 5% warm-up, per-device batch 4 × 2
accumulation steps (× 4 processes of the default launch = Table 5's 32), 2 epochs, grad clip 10, activation
checkpointing, 8-bit AdamW when bitsandbytes and CUDA are available (plain AdamW otherwise; the log says which),
full fine-tuning, ``ignore_first_k`` 2, ``simple_signal`` loss, reporting to wandb. Deliberate simplifications and
changes: no KL-to-reference term (inactive in every reference config); hindsight variant ``online`` by default (the
paper's Table-1 template; the reference's offline variants via ``--hindsight_variant``); over-long completions
skipped and counted instead of silently losing their EOS; weights fp32 with bf16 autocast on CPU (pure bf16 loses
AdamW updates at lr 2e-6), bf16 weights on GPU as in the reference unless ``--weights_dtype float32``.

Every argument, the output folder, the reporting backend and the data are checked before the model
loads; a problem is one ``error:`` line and a non-zero exit.

Outputs in ``--output_dir``: ``checkpoint-<step>/`` (resumable: ``--resume_from_checkpoint latest``),
``final_model/`` (model + tokenizer; with ``--use_peft`` the adapter, and with ``--merge_lora`` also
``final_model_merged/``), ``data_report.json`` (rows skipped and why), ``train_summary.json`` (world
size, examples per rank, parameter checksum per rank, optimizer, seconds per step, final metrics).

Merging a LoRA adapter later:

    from peft import AutoPeftModelForCausalLM
    AutoPeftModelForCausalLM.from_pretrained("OUT/final_model").merge_and_unload().save_pretrained("OUT/merged")
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offline_sdpo.config import OfflineSDPOConfig, sharded_launch
from offline_sdpo.data import InteractionDataset, OfflineSDPOCollator, drop_overlong_completions, load_interactions
from offline_sdpo.offline_sdpo_trainer import OfflineSDPOTrainer
from offline_sdpo.sft_baseline import SFTBaselineTrainer, sft_config, sft_dataset
from sdpo.data.data_sources import DataError
from sdpo.learner.config import DEFAULT_LORA_TARGET_MODULES
from sdpo.models.lora import LoRASetupError, attach_lora
from sdpo.models.model_loading import DTYPES, ModelLoadError, load_model_and_tokenizer, load_tokenizer
from sdpo.utils.command_line import ConfigParser, UsageError, mask_secrets, mask_secrets_in_logs, remember_secrets
from sdpo.utils.env_file import load_project_env
from sdpo.utils.file_io import OutputFolderError, check_output_folder

DEFAULT_BASE_MODEL = "Qwen/Qwen3-4B"
DATA_REPORT_FILE = "data_report.json"
SUMMARY_FILE = "train_summary.json"


@dataclass
class ModelArguments:
    """The model to train and its adapters, with TRL's ``ModelConfig`` names (only the fields this trainer
    honours)."""

    model_name_or_path: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={
            "help": "Hub id, local folder or bundled alias (smollm2-135m-instruct).",
            "aliases": ["--base_model"],
        },
    )
    weights_dtype: str = field(
        default="auto",
        metadata={
            "help": "Storage dtype of trained weights: auto = float32 on CPU (fp32 master weights + autocast), "
            "--compute_dtype on GPU and for LoRA's frozen base (reference).",
            "choices": ["auto", *sorted(DTYPES)],
        },
    )
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto = flash_attention_2 when installed on CUDA, else sdpa."}
    )
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters instead of all weights (usually wants a larger lr).",
            "aliases": ["--use_lora"],
        },
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES), metadata={"help": "Module names that get adapters."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also write final_model_merged/ (the adapter merged into the base)."}
    )

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError(f"lora_r and lora_alpha must be >= 1, got {self.lora_r} and {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataArguments:
    """Where the logged interactions come from (TRL's ``ScriptArguments`` names)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a local .jsonl / .parquet / .json file, a dataset folder, or a Hub dataset id.",
            "aliases": ["--train_jsonl"],
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip and count malformed rows instead of stopping at the first."}
    )

    def __post_init__(self):
        if not self.dataset_name:
            raise ValueError("no training data: pass --dataset_name (or --train_jsonl) FILE_OR_HUB_ID")


METHODS = ("sdpo", "sft")


@dataclass
class MethodArguments:
    """What is trained on the logged tuples, and the global batch the launch must give."""

    method: str = field(
        default="sdpo",
        metadata={
            "help": "sdpo: self-distillation from the follow-ups (Eq. 4). sft: the paper's Table-4 baseline, "
            "TRL SFTTrainer on the logged replies y (same data, batch, schedule and launch).",
            "choices": METHODS,
        },
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Stop before loading when per-device batch x accumulation x processes differs from this "
            "(Table 5: 32)."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")


@dataclass(frozen=True)
class OfflineArguments:
    """Everything one run needs, parsed and checked once."""

    data: DataArguments
    model: ModelArguments
    config: OfflineSDPOConfig
    method: MethodArguments = field(default_factory=MethodArguments)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring's layout, and each flag's default."""


def build_parser() -> ConfigParser:
    return ConfigParser(
        (DataArguments, ModelArguments, OfflineSDPOConfig, MethodArguments),
        description=__doc__,
        formatter_class=HelpFormatter,
    )


def parse_arguments(argv: list[str] | None = None) -> OfflineArguments:
    """Parse the command line and ``--config`` file; every problem is a one-line ``UsageError``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_distributed_launch(on_cpu=not torch.cuda.is_available())
    data, model, config, method = build_parser().parse(argv)
    return OfflineArguments(data, model, config, method)


# --------------------------------------------------------------------------------------------------
# Checks before anything is loaded
# --------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str) -> None:
    """The output folder exists (or can be made) and is writable."""
    try:
        path = check_output_folder(output_dir, "--output_dir")
    except OutputFolderError as error:
        raise UsageError(str(error)) from None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output_dir {path} cannot be created ({error.strerror}); pass a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {path} is not writable; pass a writable folder")


def global_batch(config: OfflineSDPOConfig) -> tuple[int, str]:
    """(interactions per optimizer step, how it is made up) of this launch."""
    size = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    return size, (
        f"{config.per_device_train_batch_size} per device x {config.gradient_accumulation_steps} accumulation x "
        f"{config.world_size} processes = {size}"
    )


def check_global_batch(arguments: OfflineArguments) -> None:
    """A requested ``--global_batch_size`` is what the launch gives, or one line says how to get it."""
    wanted = arguments.method.global_batch_size
    size, made_of = global_batch(arguments.config)
    if wanted is not None and size != wanted:
        raise UsageError(
            f"--global_batch_size {wanted}, but this launch gives {made_of}: change --per_device_train_batch_size, "
            "--gradient_accumulation_steps or the number of processes (WORLD_SIZE)"
        )


def check_wandb_ready() -> None:
    """Fail before any loading when wandb would stop at a login prompt."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise UsageError(
        "--report_to wandb but wandb has no credentials: run `wandb login`, set WANDB_API_KEY, "
        "set WANDB_MODE=offline, or pass --report_to none"
    )


def check_reporters(config: OfflineSDPOConfig) -> None:
    """Each ``--report_to`` backend is installed (and wandb logged in) before anything loads."""
    from transformers import integrations

    for backend in config.report_to:
        if not getattr(integrations, f"is_{backend}_available")():
            raise UsageError(f"--report_to {backend}: the {backend} package is not installed (pip install {backend})")
        if backend == "wandb":
            check_wandb_ready()
            os.environ["WANDB_PROJECT"] = config.project


def check_distributed_launch(on_cpu: bool) -> None:
    """FSDP / DeepSpeed only where they really run: on CPU processes accelerate silently turns either into
    plain DDP (every rank holding the whole model), so that is refused, as is DeepSpeed not installed.
    Called before the arguments are parsed (``TrainingArguments`` itself sets DeepSpeed up) and again
    with the parsed ``use_cpu``."""
    kind = sharded_launch()
    if kind is None:
        return
    if on_cpu:
        raise UsageError(
            f"the accelerate config asks for {kind}, but this run is on CPU, where accelerate would run plain DDP "
            "instead (every process holding the whole model): launch CPU processes without that config "
            "(scripts/train_offline_sdpo.sh with CPU=1 trains with DDP over gloo) or run on GPUs"
        )
    if kind == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(
            "the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed, or use "
            "multigpu_accelerate_config.yaml (DDP) or accelerate_configs/fsdp.yaml"
        )


PARALLELISM = {
    "NO": "single process",
    "MULTI_CPU": "DDP over gloo (CPU processes)",
    "MULTI_GPU": "DDP (GPUs)",
    "FSDP": "FSDP (parameters, gradients and optimizer state sharded)",
    "DEEPSPEED": "DeepSpeed",
}


def describe_parallelism(trainer: OfflineSDPOTrainer) -> str:
    """What accelerate actually runs, for the log (FSDP: with the model's own wrap unit)."""
    accelerator = trainer.accelerator
    kind = accelerator.distributed_type.value
    text = PARALLELISM.get(kind, kind) + ("" if kind == "NO" else f", {accelerator.num_processes} processes")
    if kind == "FSDP":
        plugin = accelerator.state.fsdp_plugin
        wrap = plugin.transformer_cls_names_to_wrap or getattr(trainer.model, "_no_split_modules", None)
        text += f", FSDP{plugin.fsdp_version} wrap unit {', '.join(wrap or ['none (one unit)'])}"
    if kind == "DEEPSPEED":
        text += f" ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage}"
    return text


# What a checkpoint the Trainer can resume from holds, whatever wrote it (full model, LoRA adapter, FSDP
# shards, DeepSpeed): the trainer state, weights, and the optimizer state.
CHECKPOINT_PARTS = {
    "trainer_state.json": ("trainer_state.json",),
    "weights": ("model*.safetensors*", "adapter_model.*", "pytorch_model*", "global_step*"),
    "optimizer state": ("optimizer*", "global_step*"),
}


def checkpoint_gap(folder: Path) -> str | None:
    """What ``folder`` lacks to be resumed from (an interrupted save leaves a partial one), or None."""
    missing = [part for part, patterns in CHECKPOINT_PARTS.items() if not any(any(folder.glob(p)) for p in patterns)]
    return f"{folder} has no {', no '.join(missing)}" if missing else None


def resolve_resume(value: str | None, output_dir: str, config: OfflineSDPOConfig | None = None) -> str | None:
    """The checkpoint to resume from: ``value`` checked, or for ``latest`` the newest complete checkpoint
    of ``output_dir`` (partial ones are skipped, with a note when ``config`` is given), or None."""
    if value is None:
        return None
    if value != "latest":
        gap = checkpoint_gap(Path(value)) if Path(value).is_dir() else f"{value} is not a folder"
        if gap:
            raise UsageError(f"--resume_from_checkpoint: {gap}; pass a complete checkpoint-<step> folder or 'latest'")
        return value
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folders = Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if Path(output_dir).is_dir() else []
    steps = {int(f.name.rsplit("-", 1)[1]): f for f in folders if f.is_dir() and f.name.rsplit("-", 1)[1].isdigit()}
    for step in sorted(steps, reverse=True):
        gap = checkpoint_gap(steps[step])
        if gap is None:
            return str(steps[step])
        if config is not None:
            print0(config, f"skipping a partial checkpoint: {gap}")
    return None


# --------------------------------------------------------------------------------------------------
# Data, model, training
# --------------------------------------------------------------------------------------------------


def print0(config: OfflineSDPOConfig, *parts) -> None:
    if config.process_index == 0:
        print("[offline-sdpo]", *parts, flush=True)


def read_data(arguments: OfflineArguments):
    """The validated tuples and the report of rows left out (no tokenizer needed yet)."""
    data, config = arguments.data, arguments.config
    return load_interactions(
        data.dataset_name,
        hindsight_variant=config.hindsight_variant,
        skip_bad_rows=data.skip_bad_rows,
        dataset_config=data.dataset_config,
        split=data.dataset_train_split,
    )


def training_dataset(arguments: OfflineArguments, interactions, report, tokenizer) -> InteractionDataset:
    """The tuples minus over-long completions; the report is printed and saved on the main process."""
    data, config = arguments.data, arguments.config
    read = len(interactions) + report.total
    if config.overlong_completion == "skip":
        interactions = drop_overlong_completions(
            interactions, OfflineSDPOCollator.from_config(tokenizer, config), report
        )
    if not interactions:
        raise DataError(f"{data.dataset_name}: every row was skipped ({dict(report.counts)})")
    if config.process_index == 0:
        summary = {"train_jsonl": str(data.dataset_name), "rows_read": read, "rows_used": len(interactions)}
        (Path(config.output_dir) / DATA_REPORT_FILE).write_text(json.dumps({**summary, **report.as_dict()}, indent=2))
    print0(
        config,
        f"data: {len(interactions)} of {read} tuples used; skipped {dict(report.counts) or 0}"
        f" (details in {DATA_REPORT_FILE})",
    )
    for example in report.examples[:5]:
        print0(config, f"  skipped {example}")
    return InteractionDataset(interactions)


def load_policy(arguments: OfflineArguments):
    """The model to train (LoRA-wrapped when asked) and its tokenizer; weights dtype chosen per device."""
    model_args, config = arguments.model, arguments.config
    on_cuda = config.device.type == "cuda"
    weights_dtype = model_args.weights_dtype
    if weights_dtype == "auto":
        # LoRA: the frozen base in the compute dtype (peft keeps the adapters in fp32 either way).
        weights_dtype = config.compute_dtype if on_cuda or model_args.use_peft else "float32"
    attn = model_args.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    # Under FSDP / DeepSpeed the wrapper places (and shards) the weights; load them on the host.
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype=weights_dtype,
        device="cpu" if sharded_launch() else config.device,
        attn_implementation=attn,
    )
    if model_args.use_peft:
        try:
            model = attach_lora(
                model,
                r=model_args.lora_r,
                alpha=model_args.lora_alpha,
                dropout=model_args.lora_dropout,
                target_modules=model_args.lora_target_modules,
            )
        except LoRASetupError as error:
            raise UsageError(str(error).replace("set lora_target_modules", "set --lora_target_modules")) from None
    stored = next(p.dtype for p in model.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    autocast = f"autocast {config.compute_dtype}" if stored != DTYPES[config.compute_dtype] else "no autocast"
    print0(
        config,
        f"model {model_args.model_name_or_path}: {trainable / 1e6:.1f}M of {total / 1e6:.1f}M params trainable, "
        f"trained weights {str(stored).removeprefix('torch.')}, {autocast}, attention {attn}",
    )
    if stored == torch.bfloat16 and config.learning_rate < 1e-4:
        print0(
            config,
            "note: bf16 weights round away most AdamW updates at this learning rate; "
            "--weights_dtype float32 keeps fp32 master weights (more memory)",
        )
    return model, tokenizer


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of an FSDP2 DTensor (no communication), else itself."""
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter


def write_summary(trainer: OfflineSDPOTrainer, arguments: OfflineArguments, extra: dict) -> dict:
    """Per-rank evidence (examples seen, checksum of the rank's trainable weights — identical across ranks
    under DDP, the local shard under FSDP / DeepSpeed) gathered to the main process; a collective."""
    config = arguments.config
    checksum = sum(float(local_shard(p).detach().double().sum()) for p in trainer.model.parameters() if p.requires_grad)
    evidence = torch.tensor([[float(trainer.examples_seen), checksum]], dtype=torch.float64, device=config.device)
    gathered = trainer.accelerator.gather(evidence).cpu().view(-1, 2)
    summary = {
        "world_size": config.world_size,
        "examples_seen_per_rank": [int(v) for v in gathered[:, 0].tolist()],
        "trainable_param_checksum_per_rank": gathered[:, 1].tolist(),
        "global_step": trainer.state.global_step,
        "base_model": arguments.model.model_name_or_path,
        "hindsight_variant": config.hindsight_variant,
        "method": arguments.method.method,
        "loss_mode": config.loss_mode if arguments.method.method == "sdpo" else "sft",
        "global_batch_size": global_batch(config)[0],
        "use_lora": arguments.model.use_peft,
        **extra,
    }
    if config.process_index == 0:
        (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_trainer(method: str, arguments: OfflineArguments, model, tokenizer, dataset, callbacks):
    """The SDPO trainer, or for ``--method sft`` TRL's SFTTrainer on the same tuples' (x, y)."""
    config = arguments.config
    if method == "sdpo":
        return OfflineSDPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks) or None,
        )
    stored = next(p.dtype for p in model.parameters() if p.requires_grad)
    return SFTBaselineTrainer(
        model=model,
        args=sft_config(config, stored),
        train_dataset=sft_dataset(dataset.interactions, config.chat_template_kwargs),
        processing_class=tokenizer,
        callbacks=list(callbacks) or None,
    )


def run(arguments: OfflineArguments, callbacks=()) -> dict:
    """Train as ``arguments`` say; returns the training summary. ``callbacks`` are extra TrainerCallbacks.
    Problems found before training are ``UsageError`` / ``DataError`` / ``ModelLoadError``."""
    config, model_args, method = arguments.config, arguments.model, arguments.method.method
    check_global_batch(arguments)
    check_output_dir(config.output_dir)
    check_reporters(config)
    check_distributed_launch(config.use_cpu)
    print0(
        config,
        f"method {method}, world size {config.world_size}, device {config.device}, optimizer {config.optim.value}"
        f" ({config.optim_reason})",
    )
    print0(config, f"global batch: {global_batch(config)[1]} interactions per optimizer step")
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir, config)
    if config.resume_from_checkpoint == "latest" and resume is None:
        print0(config, f"no complete checkpoint in {config.output_dir} yet: starting fresh")
    elif resume:
        print0(config, f"resuming from {resume}")
    elif resolve_resume("latest", config.output_dir):
        print0(
            config,
            f"note: {config.output_dir} already holds checkpoints; starting fresh, same-step checkpoints get "
            "overwritten (--resume_from_checkpoint latest continues instead)",
        )

    interactions, report = read_data(arguments)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    dataset = training_dataset(arguments, interactions, report, tokenizer)
    model, tokenizer = load_policy(arguments)
    trainer = build_trainer(method, arguments, model, tokenizer, dataset, callbacks)
    parallelism = describe_parallelism(trainer)
    print0(config, f"running {parallelism}")
    started = time.perf_counter()
    first_step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - started
    steps = trainer.state.global_step - first_step

    final_dir = Path(config.output_dir) / "final_model"
    trainer.save_model(str(final_dir))
    adapter_note = " (LoRA adapter; see the module docstring to merge)" if model_args.use_peft else ""
    print0(config, f"saved {final_dir}{adapter_note}")
    summary = write_summary(
        trainer,
        arguments,
        {
            "optimizer": config.optim.value,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "parallelism": parallelism,
            "resumed_from": resume,
            "steps_this_session": steps,
            "seconds_per_step": elapsed / steps if steps else None,
            "train_metrics": result.metrics,
        },
    )
    if model_args.use_peft and model_args.merge_lora and trainer.is_world_process_zero():
        merged_dir = Path(config.output_dir) / "final_model_merged"
        trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        print0(config, f"saved {merged_dir}")
    print0(
        config,
        f"done: {steps} optimizer steps in {elapsed:.1f}s"
        + (f" ({elapsed / steps:.2f} s/step)" if steps else "")
        + f"; examples per rank {summary['examples_seen_per_rank']}",
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    remember_secrets(list(sys.argv[1:] if argv is None else argv))
    mask_secrets_in_logs()
    try:
        load_project_env()
        run(parse_arguments(argv))
    # command_line.UsageError: a .env that is not text
    except (UsageError, DataError, ModelLoadError) as error:
        print(f"error: {mask_secrets(str(error))}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
