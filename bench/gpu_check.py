"""GPU check: one online and one offline SDPO step on a Qwen3-architecture model built from a config.

Made for a CUDA machine that has only torch, transformers, accelerate and peft: no network, no weights to
download, no data files.

    python bench/gpu_check.py                          # Qwen3-0.6B's shape (~0.6B params), random weights, CUDA
    python bench/gpu_check.py --tiny --device cpu      # the same code on a ~0.1M-parameter Qwen3, seconds on CPU
    python bench/gpu_check.py --attn flash_attention_2 --batch_size 8 --new_tokens 128 --repeats 2
    python bench/gpu_check.py --scaling                # also docs/scaling.md's figures on this machine's GPUs

Online step (through ``OnlineSDPOUpdater`` with ``model=`` and ``tokenizer=``): generate ``--new_tokens`` at
batch ``--batch_size``, teacher and student scoring, backward, optimizer. Offline step: the logged-interaction
loss of the offline trainer (``sdpo.core.sdpo_loss`` in ``simple_signal`` mode, first 2 tokens ignored) on the
same batch, backward, optimizer. Weights are fp32 master weights under bf16 autocast (the project's default);
attention is sdpa (flash kernels on CUDA) unless ``--attn`` says otherwise. One warm-up step precedes the
measured ones.

Prints seconds per phase, generation tokens/s, training MFU (student forward + backward, linear-layer FLOPs as
in bench/online_step.py) against a bf16 matmul peak measured in this run, and peak memory (CUDA: the allocator's
peak; CPU: peak RSS), then one JSON line with every figure.

``--scaling`` then saves the model and runs ``bench/online_scaling.py`` on it: interactions/s of 1 process vs
one process per visible GPU (DDP and FSDP2; needs 2 or more GPUs, else only the 1-process figure), and, where vLLM is
installed, the policy generating colocated vs on a local ``vllm serve`` with runtime LoRA loading.

The tokenizer is built here with ``tokenizers``: the 256 byte symbols, ChatML special tokens and synthetic
word tokens up to the model's vocabulary size, so a random model can sample any id and still decode to text.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

from bench.online_step import (
    FOLLOW_UP,
    PROMPTS,
    linear_parameter_counts,
    matmul_peak_gflops,
    run_step,
    summarise,
)
from sdpo.core import encode_student_teacher_contexts, pad_contexts_and_completions, sdpo_loss
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import OnlineSDPOUpdater

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-0.6B's published shape (596M parameters with tied embeddings).
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QWEN3_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
OFFLINE_IGNORE_FIRST_K = 2  # the offline trainer's default


def build_tokenizer(vocab_size: int):
    """A byte-level ChatML tokenizer with exactly ``vocab_size`` ids (eos = <|im_end|>, pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    letters = "abcdefghijklmnopqrstuvwxyz"
    index = 0
    while len(vocab) < vocab_size:
        word, rest = "", index
        while True:
            word, rest = letters[rest % 26] + word, rest // 26 - 1
            if rest < 0:
                break
        vocab["Ġ" + word] = len(vocab)  # "Ġ" is the byte-level symbol of a space: decodes to " word"
        index += 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(shape: dict, tokenizer, attn: str, device: torch.device):
    """A Qwen3ForCausalLM with random weights (fp32 master weights), built directly on ``device``."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        **shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model


def offline_step(updater: OnlineSDPOUpdater, conversations: list, completions: list[list[int]], sync) -> dict:
    """One offline-trainer step on logged (x, y, o): simple_signal loss, backward, optimizer."""
    pairs = [encode_student_teacher_contexts(updater.tokenizer, c, FOLLOW_UP) for c in conversations]
    pad = updater.tokenizer.pad_token_id
    student = pad_contexts_and_completions(
        [s for s, _ in pairs], completions, pad, ignore_first_k=OFFLINE_IGNORE_FIRST_K
    )
    teacher = pad_contexts_and_completions(
        [t for _, t in pairs], completions, pad, ignore_first_k=OFFLINE_IGNORE_FIRST_K
    )
    student, teacher = student.to(updater.device), teacher.to(updater.device)
    timings: dict = {}
    out = sdpo_loss(
        updater.model,
        student,
        teacher,
        loss_mode="simple_signal",
        autocast_dtype=updater.autocast_dtype,
        timings=timings,
    )
    sync()
    tick = time.perf_counter()
    out.loss.backward()
    sync()
    backward_s = time.perf_counter() - tick
    tick = time.perf_counter()
    updater.optimizer.step()
    updater.optimizer.zero_grad(set_to_none=True)
    sync()
    return {
        "teacher_s": timings["teacher_forward"],
        "student_fwd_s": timings["student_forward"],
        "backward_s": backward_s,
        "optimizer_s": time.perf_counter() - tick,
        "loss": float(out.loss.detach()),
        "completion_tokens": int(student.completion_mask.sum()),
        "padded_tokens": student.input_ids.numel(),
    }


PHASES = (
    ("generate_s", "generate"),
    ("teacher_s", "teacher"),
    ("student_fwd_s", "student fwd"),
    ("backward_s", "backward"),
    ("optimizer_s", "optimizer"),
)


def phase_line(title: str, figures: dict) -> str:
    """One printed line: seconds per phase, step total, throughput, MFU, peak memory (and the loss when known)."""
    phases = ", ".join(f"{name} {figures[key]:.2f} s" for key, name in PHASES if key in figures)
    throughput = (
        f"generation {figures['gen_tok_per_s']:.0f} tok/s"
        if "gen_tok_per_s" in figures
        else f"training {figures['train_tok_per_s']:.0f} tok/s"
    )
    loss = f"; loss {figures['loss']:.4f}" if "loss" in figures else ""
    return (
        f"{title}: {phases} = {figures['step_s']:.2f} s; {throughput}; training MFU {figures['train_mfu']:.1%}; "
        f"peak memory {figures['peak_memory_gib']:.2f} GiB{loss}"
    )


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny Qwen3 (vocab 512, 2 layers) instead of Qwen3-0.6B's shape"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cuda | cuda:1 | cpu")
    parser.add_argument("--attn", default="sdpa", help="attention implementation: sdpa | flash_attention_2 | eager")
    parser.add_argument("--batch_size", type=int, default=8, help="interactions per step")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per response")
    parser.add_argument("--repeats", type=int, default=1, help="measured steps (after one warm-up step)")
    parser.add_argument(
        "--matmul_size", type=int, default=0, help="side of the peak-measuring matmul (0: 8192 on CUDA, 512 on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also measure 1 vs N processes (N = visible GPUs) and colocated vs server vLLM (bench/online_scaling.py)",
    )
    args = parser.parse_args(argv)
    if min(args.batch_size, args.new_tokens, args.repeats) < 1 or args.matmul_size < 0:
        parser.error("--batch_size, --new_tokens and --repeats must be >= 1, --matmul_size >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    shape = QWEN3_TINY if args.tiny else QWEN3_0_6B
    tokenizer = build_tokenizer(shape["vocab_size"])
    model = build_model(shape, tokenizer, args.attn, device)
    config = OnlineSDPOConfig(
        model_name_or_path=f"qwen3-{'tiny' if args.tiny else '0.6b'}-random",
        device=str(device),
        torch_dtype="bfloat16",
        attn_implementation=args.attn,
        max_new_tokens=args.new_tokens,
        generation_batch_size=args.batch_size,
        max_context_length=1024,
        checkpoint_every_n_steps=0,
    )
    updater = OnlineSDPOUpdater(config, model=model, tokenizer=tokenizer)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = matmul_peak_gflops(torch.bfloat16, device, size=args.matmul_size or (8192 if device.type == "cuda" else 512))
    body, head = linear_parameter_counts(updater.model)
    n_params = sum(p.numel() for p in updater.model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    attention = updater.model.config._attn_implementation
    print(
        f"{device_name} ({device}), torch {torch.__version__}, {type(updater.model).__name__} "
        f"{n_params / 1e6:.1f}M params (linear: body {body / 1e6:.1f}M + head {head / 1e6:.1f}M), "
        f"attention {attention}, fp32 weights + bf16 autocast"
    )
    print(f"bf16 matmul peak measured here: {peak:.1f} GFLOP/s")

    conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(args.batch_size)]
    run_step(updater, args.batch_size, args.new_tokens)  # warm-up: kernels, allocator, autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    online = summarise(
        [run_step(updater, args.batch_size, args.new_tokens) for _ in range(args.repeats)],
        body,
        head,
        args.batch_size,
        peak,
    )
    online["peak_memory_gib"] = peak_memory_gib(device)

    completions = [g.token_ids for g in updater.generate(conversations)]
    offline_step(updater, conversations, completions, sync)  # warm-up at the offline shapes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = [offline_step(updater, conversations, completions, sync) for _ in range(args.repeats)]
    offline = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
    train_s = offline["student_fwd_s"] + offline["backward_s"]
    offline["step_s"] = train_s + offline["teacher_s"] + offline["optimizer_s"]
    train_flops = 6 * (body * offline["padded_tokens"] + head * (offline["completion_tokens"] + args.batch_size))
    offline["train_mfu"] = train_flops / train_s / 1e9 / peak
    offline["train_tok_per_s"] = offline["padded_tokens"] / offline["step_s"]
    offline["peak_memory_gib"] = peak_memory_gib(device)

    print(phase_line(f"online step  (batch {args.batch_size}, {args.new_tokens} new tokens)", online))
    print(phase_line(f"offline step (batch {args.batch_size}, logged completions)", offline))
    result = {
        "device": str(device),
        "architecture": type(updater.model).__name__,
        "params": n_params,
        "attention": attention,
        "matmul_peak_tflops": peak / 1000,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "online": online,
        "offline": offline,
    }
    if not all(math.isfinite(v) for phase in (online, offline) for v in phase.values()):
        raise SystemExit(f"error: a non-finite figure: {json.dumps(result)}")
    if args.scaling:
        result["scaling"] = scaling_figures(updater, tokenizer, device, args)
    print(json.dumps(result))
    return result


def scaling_figures(updater: OnlineSDPOUpdater, tokenizer, device: torch.device, args: argparse.Namespace) -> list:
    """docs/scaling.md's figures for this model on this machine (bench/online_scaling.py in fresh processes)."""
    import importlib.util
    import tempfile

    from bench import online_scaling

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    processes = gpus if gpus > 1 else (2 if device.type == "cpu" else 1)
    engines = ["hf"]
    if importlib.util.find_spec("vllm") is not None:
        engines += ["colocate", "server"]
    else:
        print("scaling: vLLM is not installed here: colocated vs server generation not measured")
    if device.type == "cuda" and gpus < 2:
        print("scaling: one GPU visible: the 1-vs-N processes comparison needs two or more")
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as folder:
        updater.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return online_scaling.main(
            [
                "--model",
                folder,
                "--device",
                device.type,
                "--dtype",
                "bfloat16" if device.type == "cuda" else "float32",
                "--processes",
                str(processes),
                "--engines",
                ",".join(engines),
                "--parallelisms",
                "ddp,fsdp2",
                "--batch_size",
                str(max(args.batch_size, processes)),
                "--new_tokens",
                str(args.new_tokens),
                "--steps",
                str(args.repeats + 1),
            ]
        )


if __name__ == "__main__":
    main()
