"""Online SDPO with periodic evaluation: the continual-personalization experiment.

For each training prompt: the policy answers, the simulated user (a persona) writes a follow-up, and
the policy is updated at once with the SDPO signal log π(y|x,o) − log π(y|x). Every ``--eval_every``
interactions the current policy answers the held-out prompts and a persona judge compares each answer
with the untrained baseline's, in both orders.

GPU (the reference setup, via the script):
    ./scripts/eval_online_sdpo.sh
CPU, embedded model, rule-based user and judge, MT-Bench prompts (about 5 minutes on 2 cores):
    ./scripts/quickstart_cpu.sh
Direct:
    python eval_online_sdpo.py --model smollm2-135m-instruct --user_backend rule --judge_backend rule \
        --train_jsonl data/mtbench_prompts/train.jsonl --val_jsonl data/mtbench_prompts/validation.jsonl \
        --run_name demo --out_dir runs/demo
Resume an interrupted run (same out_dir; its original arguments are reused):
    python eval_online_sdpo.py --resume --out_dir runs/demo

Outputs (all inside --out_dir; results JSON in --eval_dir, default --out_dir):
    <run_name>_<idx>.json               meta, eval_history, training_metrics (rewritten after every interaction)
    <run_name>_completions_<idx>.json   every evaluation's current and baseline completions
    <run_name>_completions.jsonl        the first 10 eval prompts per evaluation, truncated, for a quick look
    baseline_completions.json           the baseline's answers (kept for --resume)
    winrate.png                         win rate ± SE vs interaction step, one line per judged style
    checkpoints/last/                   resume state (adapter or model, optimizer, step, RNG)
    checkpoints/step_<n>/               with --save_checkpoints, one per interaction
    run_state.json                      the arguments and file names of this run

Deliberate differences from the reference: batched evaluation generation; everything under the run's
directory; results written after every interaction; python/numpy/torch seeded; the final evaluation
uses --temperature; strict judge parsing with unparsed verdicts counted (n_unparsed); the ties-as-half
win rate stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from auxiliary.backends import BackendError
from auxiliary.evaluation_helpers import (
    DataError,
    answer_in_batches,
    compute_metrics,
    format_metrics_line,
    generation_texts,
    load_split,
    next_run_index,
    plot_winrate,
    save_completions_snapshot,
    seed_everything,
    user_turn,
    write_json_atomic,
)
from auxiliary.generation import SamplingParams, encode_chat, generate
from auxiliary.model_loading import ModelLoadError, load_model_and_tokenizer
from auxiliary.participants import Participants, add_participant_arguments, build_participants
from auxiliary.user_simulator import resolve_style
from online_sdpo_updater import EmptyResponseError, OnlineSDPOUpdater
from online_sdpo_updater_config import OnlineSDPOConfig

logger = logging.getLogger("eval_online_sdpo")

RESUME_TAG = "last"
TEXT_PREVIEW_CHARS = 300
# Arguments that may differ on --resume without changing what the run computes.
RESUME_OVERRIDABLE = {"resume", "debug_first_example", "wandb"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- policy and training
    policy = parser.add_argument_group("policy and training")
    policy.add_argument("--model", default="Qwen/Qwen3-8B", help="policy: HF id, local folder or bundled alias (smollm2-135m-instruct)")
    policy.add_argument("--lr", type=float, default=5e-6, help="learning rate (constant)")
    policy.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    policy.add_argument("--lora_r", type=int, default=256, help="LoRA rank")
    policy.add_argument("--lora_alpha", type=int, default=512, help="LoRA alpha (scale = alpha / r)")
    policy.add_argument("--loss_mode", default="full_distillation", choices=["simple_signal", "full_distillation"], help="SDPO loss; simple_signal is the paper's sampled-token form")
    policy.add_argument("--distillation_topk", type=int, default=20, help="K of the top-K distillation")
    policy.add_argument("--train_steps_per_example", type=int, default=1, help="gradient steps per interaction")
    policy.add_argument("--max_new_tokens", type=int, default=2048, help="training-time generation budget")
    policy.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (training and evaluation)")
    policy.add_argument("--dtype", default="bfloat16", help="compute dtype (trainable weights stay fp32 under autocast)")
    policy.add_argument("--device", default="auto", help="policy device: auto, cpu, cuda, cuda:1, ...")
    policy.add_argument("--generation_batch_size", type=int, default=8, help="prompts per batched generate call")
    policy.add_argument("--use_vllm", action="store_true", help="generate the policy's answers with vLLM (needs LoRA; adapter hot-swapped after each update)")
    policy.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3, help="GPU memory share of the policy vLLM engine")
    # ---- data
    data = parser.add_argument_group("data")
    data.add_argument("--train_jsonl", help="training prompts (JSONL with a string field 'prompt')")
    data.add_argument("--val_jsonl", help="held-out evaluation prompts (same format)")
    data.add_argument("--train_n", type=int, default=10, help="number of training interactions")
    data.add_argument("--eval_n", type=int, default=50, help="number of evaluation prompts")
    data.add_argument("--max_prompt_tokens", type=int, default=2048, help="drop prompts longer than this once chat-rendered")
    data.add_argument("--seed", type=int, default=42, help="seeds data selection, sampling (python/numpy/torch) and the bootstrap")
    # ---- user and evaluation
    add_participant_arguments(parser)
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--style", default="concise_casual_beginner", help="persona of the simulated user and of the primary judge")
    evaluation.add_argument("--eval_styles", nargs="*", default=[], help="further personas judging the same completions")
    evaluation.add_argument("--baseline_model", default=None, help="model for the baseline completions (default: the policy before training)")
    evaluation.add_argument("--eval_every", type=int, default=1, help="evaluate after every N interactions (0: only at the end)")
    evaluation.add_argument("--eval_max_new_tokens", type=int, default=2048, help="generation budget for evaluation")
    # ---- outputs
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--out_dir", default="./live_eval_results", help="run directory: checkpoints, completions, plot, results")
    outputs.add_argument("--eval_dir", default=None, help="where the results JSON goes (default: --out_dir)")
    outputs.add_argument("--run_name", help="name of the run (results file prefix)")
    outputs.add_argument("--save_checkpoints", action="store_true", help="keep a checkpoint after every interaction (checkpoints/step_<n>)")
    outputs.add_argument("--resume_every", type=int, default=1, help="refresh the resume checkpoint every N interactions (0: never)")
    outputs.add_argument("--resume", action="store_true", help="continue the interrupted run in --out_dir with its original arguments")
    outputs.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without network)")
    outputs.add_argument("--wandb_project", default="live-sdpo-eval", help="W&B project")
    outputs.add_argument("--debug_first_example", action="store_true", help="print the first simulator and judge inputs and outputs in full")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        missing = [flag for flag in ("train_jsonl", "val_jsonl", "run_name") if not getattr(args, flag)]
        if missing:
            parser.error("the following arguments are required: " + ", ".join(f"--{m}" for m in missing))
    return args




def build_config(args) -> OnlineSDPOConfig:
    return OnlineSDPOConfig(
        model_name_or_path=args.model,
        learning_rate=args.lr,
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
        checkpoint_dir=str(Path(args.out_dir) / "checkpoints"),
        checkpoint_every_n_steps=1 if args.save_checkpoints else 0,
        max_checkpoints=0,
        log_to_wandb=args.wandb,
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
        self.plot = out_dir / "winrate.png"
        self.state = out_dir / "run_state.json"
        self.checkpoints = out_dir / "checkpoints"


def start_or_resume(args) -> tuple[argparse.Namespace, RunFiles, dict | None]:
    """New run: pick the result index and write run_state.json. Resume: reload args and results."""
    out_dir = Path(args.out_dir)
    state_path = out_dir / "run_state.json"
    if args.resume:
        if not state_path.is_file():
            raise SystemExit(f"error: --resume needs {state_path} from an earlier run; start a new run without --resume")
        state = json.loads(state_path.read_text())
        stored = argparse.Namespace(**state["args"])
        parser = build_parser()
        for name, value in vars(args).items():
            if name not in RESUME_OVERRIDABLE | {"out_dir"} and value != parser.get_default(name) and value != state["args"].get(name):
                logger.warning("--resume keeps the run's original --%s=%r (ignoring %r)", name, state["args"].get(name), value)
        for name in RESUME_OVERRIDABLE:
            setattr(stored, name, getattr(args, name))
        files = RunFiles(out_dir, Path(stored.eval_dir), stored.run_name, state["index"])
        results = json.loads(files.results.read_text()) if files.results.is_file() else None
        return stored, files, results
    if state_path.is_file():
        raise SystemExit(f"error: {out_dir} already holds a run; continue it with --resume or choose another --out_dir")
    args.eval_dir = str(Path(args.eval_dir or args.out_dir))
    files = RunFiles(out_dir, Path(args.eval_dir), args.run_name, next_run_index(args.eval_dir, args.run_name))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path, {"args": vars(args), "index": int(files.results.stem.rsplit("_", 1)[1])})
    return args, files, None










def eval_sampling(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.eval_max_new_tokens, temperature=args.temperature, top_p=1.0)


def baseline_completions(args, files: RunFiles, eval_prompts: list[str], updater: OnlineSDPOUpdater) -> list[str]:
    """The baseline's answers: loaded on resume, else generated by --baseline_model or the untrained policy."""
    if files.baseline.is_file():
        stored = json.loads(files.baseline.read_text())
        if stored["prompts"] == eval_prompts:
            return stored["completions"]
        raise SystemExit(f"error: {files.baseline} was made for other eval prompts; start a new run")
    sampling = eval_sampling(args)
    conversations = [user_turn(p) for p in eval_prompts]
    if not args.baseline_model or args.baseline_model == args.model:
        texts = answer_in_batches(lambda b: generation_texts(updater.generate(b, sampling)), conversations, args.generation_batch_size, "baseline")
    else:
        model, tokenizer = load_model_and_tokenizer(args.baseline_model, dtype=args.dtype, device=args.device)

        def answer_batch(batch):
            contexts = [encode_chat(tokenizer, m, max_length=4096) for m in batch]
            return generation_texts(generate(model, tokenizer, contexts, sampling, batch_size=args.generation_batch_size))

        texts = answer_in_batches(answer_batch, conversations, args.generation_batch_size, "baseline")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_json_atomic(files.baseline, {"model": args.baseline_model or args.model, "prompts": eval_prompts, "completions": texts})
    logger.info("baseline: %d completions, mean %.0f chars", len(texts), np.mean([len(t) for t in texts]) if texts else 0)
    return texts


def evaluate(args, updater, participants: Participants, eval_prompts, baseline, interaction: int, debug: bool) -> tuple[dict, list[str]]:
    """Judge the current policy against the baseline with every style; returns (metrics, completions)."""
    started = time.perf_counter()
    sampling = eval_sampling(args)
    current = answer_in_batches(
        lambda b: generation_texts(updater.generate(b, sampling)), [user_turn(p) for p in eval_prompts], args.generation_batch_size, "eval generation"
    )
    gen_time = time.perf_counter() - started
    primary_style = resolve_style(args.style)
    metrics: dict = {}
    for style, judge in tqdm(participants.judges.items(), desc="judging", unit="style", leave=False):
        started = time.perf_counter()
        decisions = judge.choose_batch_generated(eval_prompts, current, baseline)
        style_metrics = {
            **compute_metrics(decisions, seed=args.seed),
            "n_unparsed": judge.last_n_unparsed,
            "judge_time_s": round(time.perf_counter() - started, 1),
        }
        if debug and style == primary_style and judge.last_raw_outputs:
            print(f"[debug] judge ({style}) verdict on eval prompt 0: {decisions[0]}; raw AB output:\n{judge.last_raw_outputs[0]['ab'][:1000]}")
        if style == primary_style:
            metrics.update(style_metrics)
        else:
            metrics[f"secondary_{style}"] = style_metrics
    metrics.update(
        step=updater.step,
        interaction=interaction,
        eval_gen_time_s=round(gen_time, 1),
        avg_completion_chars=round(float(np.mean([len(t) for t in current])), 1) if current else 0.0,
    )
    return metrics, current


def run(args, files: RunFiles, previous: dict | None) -> dict:
    seed_everything(args.seed)
    config = build_config(args)
    resume_from = files.checkpoints / RESUME_TAG if previous is not None and (files.checkpoints / RESUME_TAG).is_dir() else None
    updater = OnlineSDPOUpdater(config, resume_from=resume_from)
    done = int(updater.extra_state.get("interactions_done", 0)) if resume_from else 0

    train_prompts = load_split(args.train_jsonl, updater.tokenizer, args.train_n, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, label="train")
    eval_prompts = load_split(args.val_jsonl, updater.tokenizer, args.eval_n, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, label="eval")
    if not eval_prompts or not train_prompts:
        raise DataError(f"no prompts left after filtering ({len(train_prompts)} train, {len(eval_prompts)} eval); check the files and --max_prompt_tokens")

    baseline = baseline_completions(args, files, eval_prompts, updater)
    participants = build_participants(args, args.style, args.eval_styles)

    results = {
        "meta": {
            "model": args.model,
            "style": resolve_style(args.style),
            "loss_mode": args.loss_mode,
            "distillation_topk": args.distillation_topk,
            "learning_rate": args.lr,
            "use_lora": config.use_lora,
            "lora_r": args.lora_r,
            "use_vllm": args.use_vllm,
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
            "eval_styles": [resolve_style(s) for s in args.eval_styles],
            "n_skipped": 0,
        },
        "eval_history": [],
        "training_metrics": [],
    }
    completions_log: list[dict] = []
    if previous is not None:
        results["training_metrics"] = previous["training_metrics"][:done]
        results["eval_history"] = [e for e in previous["eval_history"] if e["interaction"] <= done]
        results["meta"]["n_skipped"] = sum(1 for m in results["training_metrics"] if m.get("skipped"))
        if files.completions.is_file():
            completions_log = [c for c in json.loads(files.completions.read_text()) if c["interaction"] <= done]
        logger.info("resumed at interaction %d/%d (step %d)", done, len(train_prompts), updater.step)

    def save_results() -> None:
        write_json_atomic(files.results, results)
        write_json_atomic(files.completions, completions_log)
        if results["eval_history"]:
            plot_winrate(results["eval_history"], files.plot, primary_style=results["meta"]["style"], title=f"{args.run_name}: {args.model}")

    def run_evaluation(interaction: int) -> None:
        metrics, current = evaluate(args, updater, participants, eval_prompts, baseline, interaction, args.debug_first_example and not results["eval_history"])
        results["eval_history"].append(metrics)
        completions_log.append({"step": updater.step, "interaction": interaction, "current": current, "baseline": baseline})
        save_completions_snapshot(files.snapshot, updater.step, eval_prompts, current, baseline)
        save_results()
        print(format_metrics_line(metrics, results["meta"]["style"]))
        for key, value in metrics.items():
            if key.startswith("secondary_"):
                print(format_metrics_line({**value, "step": updater.step}, key[len("secondary_") :]))
        if args.wandb:
            import wandb

            wandb.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=updater.step)

    save_results()
    progress = tqdm(range(done, len(train_prompts)), desc="interactions", unit="it", initial=done, total=len(train_prompts))
    for index in progress:
        prompt = train_prompts[index]
        messages = user_turn(prompt)
        started = time.perf_counter()
        response = updater.generate_response(messages)
        gen_time = time.perf_counter() - started
        started = time.perf_counter()
        feedback = participants.simulator.generate_feedback([prompt], [response.text])[0]
        sim_time = time.perf_counter() - started
        if args.debug_first_example and index == 0:
            build = getattr(participants.simulator, "build_messages", None)
            shown = json.dumps(build(prompt, response.text), indent=1)[:2000] if build else f"{prompt[:500]!r} → {response.text[:500]!r}"
            print(f"[debug] simulator input:\n{shown}\n[debug] follow-up: {feedback!r}")
        preview = {"prompt": prompt[:TEXT_PREVIEW_CHARS], "response": response.text[:TEXT_PREVIEW_CHARS], "feedback": feedback[:TEXT_PREVIEW_CHARS]}
        try:
            metrics = updater.train_step(messages, response, feedback)
        except EmptyResponseError as error:
            logger.warning("interaction %d skipped: %s", index + 1, error)
            metrics = {"step": updater.step, "skipped": str(error)}
            results["meta"]["n_skipped"] += 1
        metrics.update(interaction=index + 1, gen_time_s=round(gen_time, 2), sim_time_s=round(sim_time, 2), **preview)
        results["training_metrics"].append(metrics)
        progress.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", logp=f"{metrics.get('policy_logp_mean', float('nan')):.2f}")
        logger.info("interaction %d: follow-up %r", index + 1, feedback[:120])
        if args.eval_every > 0 and (index + 1) % args.eval_every == 0:
            run_evaluation(index + 1)
        save_results()
        if args.resume_every > 0 and ((index + 1) % args.resume_every == 0 or index + 1 == len(train_prompts)):
            updater.save_checkpoint(RESUME_TAG, extra_state={"interactions_done": index + 1})

    if not results["eval_history"] or results["eval_history"][-1]["interaction"] != len(train_prompts):
        run_evaluation(len(train_prompts))
    save_results()
    return results


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    args, files, previous = start_or_resume(args)
    if args.wandb:
        import wandb

        wandb.init(project=args.wandb_project, name=args.run_name, config=vars(args), dir=str(files.out_dir), id=f"{args.run_name}-{files.results.stem}", resume="allow")
    try:
        run(args, files, previous)
    except (DataError, ModelLoadError, BackendError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        if files.state.is_file():
            print(f"results so far: {files.results}; continue with: python eval_online_sdpo.py --resume --out_dir {files.out_dir}", file=sys.stderr)
        return 1
    finally:
        if args.wandb:
            import wandb

            wandb.finish()
    print(f"results: {files.results}\nplot: {files.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
