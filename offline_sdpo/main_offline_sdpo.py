"""Offline SDPO training on logged interactions (x, y, o): the paper's §4.1 / Eq. 4 setting.

Reads an interaction JSONL (``prompt`` = message list, ``completion`` = the logged assistant message,
``user_response`` = the user's next message), trains the base model with ``OfflineSDPOTrainer`` and
writes checkpoints plus ``final_model/`` into the output folder.

One process (CPU or one GPU), from the repository root:

    python -m offline_sdpo.main_offline_sdpo --train_jsonl data/sharegpt/sharegpt_interactions.jsonl \\
        --base_model smollm2-135m-instruct --max_steps 20 --batch_size 2 --grad_accum 2 --report_to none

Several processes (DDP): GPUs via the accelerate config, or CPU via accelerate's multi-GPU launcher
(no GPU present: processes talk over gloo) or torchrun:

    accelerate launch --config_file multigpu_accelerate_config.yaml --num_processes 4 \\
        offline_sdpo/main_offline_sdpo.py --train_jsonl ...            # PYTHONPATH=. for the file form
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no offline_sdpo/main_offline_sdpo.py --train_jsonl ...   # CPU, 2 processes
    torchrun --nproc_per_node 2 offline_sdpo/main_offline_sdpo.py --train_jsonl ...

``scripts/train_offline_sdpo.sh`` wraps all of this with the reference's environment variables.

Defaults are the reference's (spec §11.4): lr 2e-6 cosine with 5% warm-up, per-device batch 4 × 8
accumulation steps, 2 epochs, grad clip 10, activation checkpointing, 8-bit AdamW when bitsandbytes and
CUDA are available (plain AdamW otherwise; the log says which), full fine-tuning, ``ignore_first_k`` 2,
``simple_signal`` loss. Deliberate simplifications and changes: no KL-to-reference term (inactive in
every reference config); hindsight variant ``online`` by default (the paper's Table-1 template; the
reference's offline variants via ``--hindsight_variant``); over-long completions skipped and counted
instead of silently losing their EOS; weights fp32 with bf16 autocast on CPU (pure bf16 loses AdamW
updates at lr 2e-6), bf16 weights on GPU as in the reference unless ``--weights_dtype float32``.

Outputs in ``--output_dir``: ``checkpoint-<step>/`` (resumable: ``--resume_from_checkpoint latest``),
``final_model/`` (model + tokenizer; with ``--use_lora`` the adapter, and with ``--merge_lora`` also
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
from pathlib import Path

import torch

from auxiliary.model_loading import DTYPES, ModelLoadError, load_model_and_tokenizer, load_tokenizer
from offline_sdpo.offline_sdpo_trainer import (
    OVERLONG_POLICIES,
    InteractionDataError,
    InteractionDataset,
    OfflineSDPOCollator,
    OfflineSDPOConfig,
    OfflineSDPOTrainer,
    drop_overlong_completions,
    load_interactions,
)
from online_sdpo_updater_config import DEFAULT_LORA_TARGET_MODULES
from sdpo_core import HINDSIGHT_VARIANTS, LOSS_MODES

DEFAULT_BASE_MODEL = "Qwen/Qwen3-4B"
DATA_REPORT_FILE = "data_report.json"
SUMMARY_FILE = "train_summary.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Offline SDPO on logged (x, y, o) interactions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Data and model
    parser.add_argument(
        "--train_jsonl", required=True, help="interaction JSONL: prompt / completion / user_response per line"
    )
    parser.add_argument(
        "--base_model", default=DEFAULT_BASE_MODEL, help="Hub id, local folder or bundled alias (smollm2-135m-instruct)"
    )
    parser.add_argument(
        "--output_dir",
        default=os.environ.get("OUTPUT_DIR") or "./local_checkpoints",
        help="checkpoints, final_model/, reports (default: $OUTPUT_DIR, else ./local_checkpoints)",
    )
    parser.add_argument(
        "--skip_bad_rows", action="store_true", help="skip and count malformed rows instead of stopping at the first"
    )
    # SDPO
    parser.add_argument(
        "--hindsight_variant",
        default="online",
        choices=sorted(HINDSIGHT_VARIANTS),
        help="teacher context: online = o in the last user turn (paper Table 1); offline_v1 / offline_assistant = reference offline forms",
    )
    parser.add_argument("--hindsight_template", default=None, help="custom hindsight wording with a {follow_up} slot")
    parser.add_argument(
        "--loss_mode",
        default="simple_signal",
        choices=LOSS_MODES,
        help="simple_signal = sampled-token policy gradient (paper); full_distillation = top-K reverse KL (extension)",
    )
    parser.add_argument(
        "--ignore_first_k", type=int, default=2, help="leave the first k completion tokens out of the loss"
    )
    parser.add_argument("--signal_clip", type=float, default=0.0, help="clip A_t to +-signal_clip (0: off)")
    parser.add_argument("--distillation_topk", type=int, default=20, help="top-K support for full_distillation")
    parser.add_argument(
        "--max_context_length", type=int, default=2048, help="left-truncate contexts to this many tokens"
    )
    parser.add_argument("--max_completion_length", type=int, default=2048, help="completion token budget, EOS included")
    parser.add_argument(
        "--overlong_completion",
        default="skip",
        choices=OVERLONG_POLICIES,
        help="skip: drop and count longer completions; truncate: train on the first tokens, without EOS",
    )
    # Optimisation
    parser.add_argument("--learning_rate", type=float, default=2e-6)
    parser.add_argument("--batch_size", type=int, default=4, help="interactions per device per micro-batch")
    parser.add_argument("--grad_accum", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--num_epochs", type=float, default=2.0)
    parser.add_argument(
        "--max_steps", type=int, default=-1, help="stop after this many optimizer steps (overrides epochs)"
    )
    parser.add_argument("--lr_scheduler_type", default="cosine")
    parser.add_argument("--warmup_ratio", type=float, default=0.05, help="share of all steps spent warming up")
    parser.add_argument("--max_grad_norm", type=float, default=10.0)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument(
        "--optim",
        default="auto",
        help="auto = adamw_bnb_8bit with bitsandbytes on CUDA, else adamw_torch; or any transformers optimizer name",
    )
    parser.add_argument("--seed", type=int, default=42)
    # Precision and memory
    parser.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype of the forward passes"
    )
    parser.add_argument(
        "--weights_dtype",
        default="auto",
        choices=["auto", *sorted(DTYPES)],
        help="storage dtype of trained weights: auto = float32 on CPU (fp32 master weights + autocast), --dtype on GPU (reference)",
    )
    parser.add_argument(
        "--no_gradient_checkpointing", action="store_true", help="keep activations (faster, more memory)"
    )
    parser.add_argument(
        "--attn_implementation", default="auto", help="auto = flash_attention_2 when installed on CUDA, else sdpa"
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=None, help="default: 4 on CUDA, 0 on CPU")
    # LoRA
    parser.add_argument(
        "--use_lora", action="store_true", help="train LoRA adapters instead of all weights (usually wants a larger lr)"
    )
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=128)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_target_modules", nargs="+", default=list(DEFAULT_LORA_TARGET_MODULES))
    parser.add_argument(
        "--merge_lora", action="store_true", help="also write final_model_merged/ (adapter merged into the base)"
    )
    # Checkpoints and logging
    parser.add_argument("--save_steps", type=int, default=200)
    parser.add_argument("--save_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--report_to", default="wandb", choices=["wandb", "none"])
    parser.add_argument(
        "--run_name", default=os.environ.get("WANDB_NAME"), help="wandb run name (default: $WANDB_NAME)"
    )
    parser.add_argument("--wandb_project", default=os.environ.get("WANDB_PROJECT") or "offline-sdpo")
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint-<step> folder, or 'latest' (newest in --output_dir; starts fresh when there is none)",
    )
    parser.add_argument(
        "--print_token_table_every", type=int, default=0, help="print a per-token signal table every N steps (0: off)"
    )
    return parser


def print0(config: OfflineSDPOConfig, *parts) -> None:
    if config.process_index == 0:
        print("[offline-sdpo]", *parts, flush=True)


def check_wandb_ready() -> None:
    """Fail before any loading when wandb would stop at a login prompt."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise SystemExit(
        "error: --report_to wandb but wandb has no credentials: run `wandb login`, set WANDB_API_KEY, "
        "set WANDB_MODE=offline, or pass --report_to none"
    )


def sharded_launch() -> str | None:
    """``FSDP`` / ``DeepSpeed`` when accelerate launched this process with one of them, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed"
    return None


def choose_optimizer(requested: str, on_cuda: bool) -> tuple[str, str]:
    """(transformers optimizer name, why)."""
    if requested != "auto":
        return requested, "as requested"
    if sharded_launch():
        return "adamw_torch", f"plain AdamW: 8-bit AdamW state does not shard under {sharded_launch()}"
    if on_cuda and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit", "8-bit AdamW (bitsandbytes), as the reference"
    reason = "no CUDA device" if not on_cuda else "bitsandbytes not installed"
    return "adamw_torch", f"plain AdamW: 8-bit AdamW needs bitsandbytes on CUDA ({reason})"


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if value is None:
        return None
    if value == "latest":
        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if not (Path(value) / "trainer_state.json").is_file():
        raise SystemExit(
            f"error: {value} is not a Trainer checkpoint (no trainer_state.json); pass a checkpoint-<step> folder or 'latest'"
        )
    return value


def build_config(args, on_cuda: bool, optimizer: str) -> OfflineSDPOConfig:
    workers = args.dataloader_num_workers if args.dataloader_num_workers is not None else (4 if on_cuda else 0)
    return OfflineSDPOConfig(
        output_dir=args.output_dir,
        hindsight_variant=args.hindsight_variant,
        hindsight_template=args.hindsight_template,
        loss_mode=args.loss_mode,
        ignore_first_k=args.ignore_first_k,
        signal_clip=args.signal_clip,
        distillation_topk=args.distillation_topk,
        max_context_length=args.max_context_length,
        max_completion_length=args.max_completion_length,
        overlong_completion=args.overlong_completion,
        compute_dtype=args.dtype,
        print_token_table_every=args.print_token_table_every,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        optim=optimizer,
        seed=args.seed,
        activation_checkpointing=not args.no_gradient_checkpointing,
        dataloader_num_workers=workers,
        dataloader_pin_memory=on_cuda,
        # Without a GPU, say so: otherwise accelerate joins the launcher's process group but runs each
        # process as an independent single-process job (world size 1, no gradient sync).
        use_cpu=not on_cuda,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        report_to=[] if args.report_to == "none" else [args.report_to],
        run_name=args.run_name,
    )


def load_data(args, config: OfflineSDPOConfig, tokenizer) -> InteractionDataset:
    """Validated rows minus over-long completions; the report is printed and saved on the main process."""
    try:
        interactions, report = load_interactions(
            args.train_jsonl, hindsight_variant=args.hindsight_variant, skip_bad_rows=args.skip_bad_rows
        )
    except InteractionDataError as error:
        raise SystemExit(f"error: {error}") from None
    read = len(interactions) + report.total
    if args.overlong_completion == "skip":
        interactions = drop_overlong_completions(
            interactions, OfflineSDPOCollator.from_config(tokenizer, config), report
        )
    if not interactions:
        raise SystemExit(f"error: {args.train_jsonl}: every row was skipped ({dict(report.counts)})")
    if config.process_index == 0:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        summary = {
            "train_jsonl": str(args.train_jsonl),
            "rows_read": read,
            "rows_used": len(interactions),
            **report.as_dict(),
        }
        (Path(config.output_dir) / DATA_REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print0(
        config,
        f"data: {len(interactions)} of {read} rows used; skipped {dict(report.counts) or 0}"
        f" (details in {DATA_REPORT_FILE})",
    )
    for example in report.examples[:5]:
        print0(config, f"  skipped {example}")
    return InteractionDataset(interactions)


def load_policy(args, config: OfflineSDPOConfig, on_cuda: bool):
    """The model to train (LoRA-wrapped when asked) and its tokenizer; weights dtype chosen per device."""
    weights_dtype = args.weights_dtype
    if weights_dtype == "auto":
        # LoRA: the frozen base in the compute dtype (peft keeps the adapters in fp32 either way).
        weights_dtype = args.dtype if on_cuda or args.use_lora else "float32"
    attn = args.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    # Under FSDP / DeepSpeed the wrapper places (and shards) the weights; load them on the host.
    model, tokenizer = load_model_and_tokenizer(
        args.base_model,
        dtype=weights_dtype,
        device="cpu" if sharded_launch() else config.device,
        attn_implementation=attn,
    )
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=list(args.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise SystemExit(
                f"error: LoRA could not be attached ({error}); set --lora_target_modules to module names of this model"
            ) from None
    stored = next(p.dtype for p in model.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    autocast = f"autocast {args.dtype}" if stored != DTYPES[args.dtype] else "no autocast"
    print0(
        config,
        f"model {args.base_model}: {trainable / 1e6:.1f}M of {total / 1e6:.1f}M params trainable, "
        f"trained weights {str(stored).removeprefix('torch.')}, {autocast}, attention {attn}",
    )
    if stored == torch.bfloat16 and args.learning_rate < 1e-4:
        print0(
            config,
            "note: bf16 weights round away most AdamW updates at this learning rate; "
            "--weights_dtype float32 keeps fp32 master weights (more memory)",
        )
    return model, tokenizer


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of an FSDP2 DTensor (no communication), else itself."""
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter


def write_summary(trainer: OfflineSDPOTrainer, config: OfflineSDPOConfig, args, extra: dict) -> dict:
    """Per-rank evidence (examples seen, checksum of the rank's trainable weights — identical across ranks
    under DDP, the local shard under FSDP / DeepSpeed) gathered to the main process; a collective."""
    checksum = sum(float(local_shard(p).detach().double().sum()) for p in trainer.model.parameters() if p.requires_grad)
    evidence = torch.tensor([[float(trainer.examples_seen), checksum]], dtype=torch.float64, device=config.device)
    gathered = trainer.accelerator.gather(evidence).cpu().view(-1, 2)
    summary = {
        "world_size": config.world_size,
        "examples_seen_per_rank": [int(v) for v in gathered[:, 0].tolist()],
        "trainable_param_checksum_per_rank": gathered[:, 1].tolist(),
        "global_step": trainer.state.global_step,
        "base_model": args.base_model,
        "hindsight_variant": config.hindsight_variant,
        "loss_mode": config.loss_mode,
        "use_lora": args.use_lora,
        **extra,
    }
    if config.process_index == 0:
        (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args, callbacks=()) -> dict:
    """Train as ``args`` say; returns the training summary. ``callbacks`` are extra TrainerCallbacks."""
    on_cuda = torch.cuda.is_available()
    if args.report_to == "wandb":
        check_wandb_ready()
        os.environ["WANDB_PROJECT"] = args.wandb_project
    optimizer, optimizer_reason = choose_optimizer(args.optim, on_cuda)
    config = build_config(args, on_cuda, optimizer)
    print0(
        config, f"world size {config.world_size}, device {config.device}, optimizer {optimizer} ({optimizer_reason})"
    )
    resume = resolve_resume(args.resume_from_checkpoint, config.output_dir)
    if args.resume_from_checkpoint == "latest" and resume is None:
        print0(config, f"no checkpoint in {config.output_dir} yet: starting fresh")
    elif resume:
        print0(config, f"resuming from {resume}")
    elif resolve_resume("latest", config.output_dir):
        print0(
            config,
            f"note: {config.output_dir} already holds checkpoints; starting fresh, same-step checkpoints get "
            "overwritten (--resume_from_checkpoint latest continues instead)",
        )

    try:
        tokenizer = load_tokenizer(args.base_model)
        dataset = load_data(args, config, tokenizer)
        model, tokenizer = load_policy(args, config, on_cuda)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    print0(
        config,
        f"global batch {global_batch} interactions per optimizer step "
        f"({config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulation x {config.world_size} processes)",
    )

    trainer = OfflineSDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks) or None
    )
    started = time.perf_counter()
    first_step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - started
    steps = trainer.state.global_step - first_step

    final_dir = Path(config.output_dir) / "final_model"
    trainer.save_model(str(final_dir))
    print0(
        config, f"saved {final_dir}" + (" (LoRA adapter; see the module docstring to merge)" if args.use_lora else "")
    )
    summary = write_summary(
        trainer,
        config,
        args,
        {
            "optimizer": optimizer,
            "resumed_from": resume,
            "steps_this_session": steps,
            "seconds_per_step": elapsed / steps if steps else None,
            "train_metrics": result.metrics,
        },
    )
    if args.use_lora and args.merge_lora and trainer.is_world_process_zero():
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
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
