"""Interactions per second of the whole online loop at B = 1 and B = 8 interactions per update, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/online_loop.py
    .venv/bin/python bench/online_loop.py --batch_sizes 1 8 --interactions 16 --max_new_tokens 32
    .venv/bin/python bench/online_loop.py --model Qwen/Qwen3-0.6B --device cuda --loss_mode full_distillation

Runs eval_online_sdpo.main (the CLI) in temporary folders, on the embedded model with the rule-based user and
judge by default, so it times everything a run does per interaction: the batched generation, the simulated user,
the update, the results JSON and the resume checkpoint. Fixed costs (model loading, the baseline answers, the
final evaluation on --eval_n prompts) are taken out by running each B twice, with B and B + M interactions, and
dividing M by the difference in wall time. An untimed first run warms the process up (allocator, page cache).
Arguments this script does not know go to every loop run (e.g. --loss_mode, --lr, --temperature).

Prints interactions/s at each B, the ratio to the first B, torch's thread count and the load average before and
after: other jobs on the machine slow the figures down, so compare figures only from a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import eval_online_sdpo
from auxiliary import preprocess_mtbench
from sdpo.online.config import parse_arguments
from sdpo.utils.command_line import UsageError

RUN_NAME = "bench"
LOG_TAIL_CHARS = 3000


class BenchError(RuntimeError):
    """A loop run failed; the message says which and where its log is."""


@dataclass(frozen=True)
class BenchSettings:
    model: str
    device: str
    dtype: str
    style: str
    batch_sizes: tuple[int, ...]
    interactions: int
    max_new_tokens: int
    eval_n: int
    data_dir: Path | None
    json_out: Path | None
    loop_args: tuple[str, ...]


# Seconds the loop records per batch of interactions (the same value on every record of the batch).
PHASE_FIELDS = {"generation": "gen_time_s", "user": "sim_time_s", "update": "train_time_s"}


@dataclass(frozen=True)
class RunTiming:
    """One loop run: its wall and CPU seconds, and the seconds its records attribute to each interaction phase."""

    wall_s: float
    cpu_s: float
    phases: dict[str, float]


@dataclass(frozen=True)
class Measurement:
    batch_size: int
    short_interactions: int
    short_s: float
    long_interactions: int
    long_s: float
    # This process's CPU seconds (all threads) over the measured interactions: on a shared machine wall time also
    # counts the time other jobs held the cores, CPU time does not (memory-bandwidth contention still shows in both).
    cpu_s: float
    # Per measured interaction (long run minus short run): generation, user, update, and "other" (results files,
    # resume checkpoints, the loop's own work) as the wall time the three do not account for.
    phase_s_per_interaction: dict[str, float]

    @property
    def interactions_per_s(self) -> float:
        elapsed = self.long_s - self.short_s
        return (self.long_interactions - self.short_interactions) / elapsed if elapsed > 0 else float("nan")

    @property
    def interactions_per_cpu_s(self) -> float:
        return (self.long_interactions - self.short_interactions) / self.cpu_s if self.cpu_s > 0 else float("nan")


def measurement(batch_size: int, short: tuple[int, RunTiming], long: tuple[int, RunTiming]) -> Measurement:
    (short_n, short_run), (long_n, long_run) = short, long
    measured = long_n - short_n
    phases = {name: (long_run.phases[name] - short_run.phases[name]) / measured for name in PHASE_FIELDS}
    phases["other"] = (long_run.wall_s - short_run.wall_s) / measured - sum(phases.values())
    cpu_s = long_run.cpu_s - short_run.cpu_s
    return Measurement(batch_size, short_n, short_run.wall_s, long_n, long_run.wall_s, cpu_s, phases)


def parse_settings(argv=None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy (alias, path or Hub id)")
    parser.add_argument("--device", default="cpu", help="policy device: cpu, cuda, auto")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype of the policy (auto: bfloat16 where computed natively, else float32)",
    )
    parser.add_argument("--style", default="short", help="persona of the rule-based user and judge")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="interactions per update to compare")
    parser.add_argument(
        "--interactions", type=int, default=16, help="measured interactions per batch size (a multiple of each)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generation budget, training and evaluation")
    parser.add_argument(
        "--eval_n", type=int, default=1, help="evaluation prompts (the final evaluation is a fixed cost)"
    )
    parser.add_argument(
        "--data_dir",
        type=Path,
        default=None,
        help="folder with train.jsonl and validation.jsonl (default: the bundled MT-Bench prompts)",
    )
    parser.add_argument("--json_out", type=Path, default=None, help="also write the figures to this JSON file")
    args, loop_args = parser.parse_known_args(argv)
    if min(args.batch_sizes) < 1 or args.interactions < 1 or args.max_new_tokens < 1 or args.eval_n < 1:
        parser.error("--batch_sizes, --interactions, --max_new_tokens and --eval_n must be positive")
    uneven = [b for b in args.batch_sizes if args.interactions % b]
    if uneven:
        multiple = args.interactions * uneven[0]
        parser.error(
            f"--interactions {args.interactions} is not a multiple of batch size {uneven[0]}: use e.g. {multiple}"
        )
    splits = ("train.jsonl", "validation.jsonl")
    if args.data_dir is not None and not all((args.data_dir / name).is_file() for name in splits):
        parser.error(
            f"--data_dir {args.data_dir} needs {' and '.join(splits)} (scripts/prepare_data_mtbench.sh writes them)"
        )
    return BenchSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        style=args.style,
        batch_sizes=tuple(args.batch_sizes),
        interactions=args.interactions,
        max_new_tokens=args.max_new_tokens,
        eval_n=args.eval_n,
        data_dir=args.data_dir,
        json_out=args.json_out,
        loop_args=tuple(loop_args),
    )


def loop_argv(settings: BenchSettings, data_dir: Path, batch_size: int, train_n: int, out_dir: Path) -> list[str]:
    """The eval_online_sdpo command line of one run: the CPU preset's learner, evaluation only at the end."""
    return [
        "--model", settings.model, "--device", settings.device, "--dtype", settings.dtype,
        "--user_backend", "rule", "--judge_backend", "rule", "--style", settings.style,
        "--use_lora", "--lora_r", "16", "--lora_alpha", "32", "--loss_mode", "simple_signal", "--lr", "1e-4",
        "--max_new_tokens", str(settings.max_new_tokens), "--eval_max_new_tokens", str(settings.max_new_tokens),
        "--interactions_per_step", str(batch_size), "--generation_batch_size", str(batch_size),
        "--train_jsonl", str(data_dir / "train.jsonl"), "--val_jsonl", str(data_dir / "validation.jsonl"),
        "--train_n", str(train_n), "--eval_n", str(settings.eval_n), "--eval_every", "0", "--seed", "0",
        "--run_name", RUN_NAME, "--out_dir", str(out_dir), *settings.loop_args,
    ]  # fmt: skip


def timed_run(argv: list[str]) -> RunTiming:
    """Wall seconds of one eval_online_sdpo.main call and its recorded phases; its output goes to <out_dir>.log."""
    out_dir = Path(argv[argv.index("--out_dir") + 1])
    log = out_dir.with_suffix(".log")
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        start, cpu_start = time.perf_counter(), time.process_time()
        code = eval_online_sdpo.main(argv)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if code != 0:
        raise BenchError(
            f"loop run {out_dir.name} failed (exit {code}); its log ends with:\n{log.read_text()[-LOG_TAIL_CHARS:]}"
        )
    train_n = int(argv[argv.index("--train_n") + 1])
    results = json.loads(next(out_dir.glob(f"{RUN_NAME}_[0-9]*.json")).read_text())
    if len(results["training_metrics"]) != train_n:
        recorded = len(results["training_metrics"])
        raise BenchError(f"loop run {out_dir.name} recorded {recorded} interactions, expected {train_n}")
    batch_size = int(argv[argv.index("--interactions_per_step") + 1])
    first_of_each_batch = results["training_metrics"][::batch_size]
    phases = {
        name: sum(record.get(field, 0.0) for record in first_of_each_batch) for name, field in PHASE_FIELDS.items()
    }
    return RunTiming(elapsed, cpu, phases)


def measure(settings: BenchSettings, work: Path) -> list[Measurement]:
    data_dir = settings.data_dir
    if data_dir is None:
        data_dir = work / "prompts"
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            if preprocess_mtbench.main(["--out_dir", str(data_dir)]) != 0:
                raise BenchError("the bundled MT-Bench prompts could not be prepared; pass --data_dir")
    runs = [(b, n) for b in settings.batch_sizes for n in (b, b + settings.interactions)]
    commands = {run: loop_argv(settings, data_dir, *run, work / f"b{run[0]}_n{run[1]}") for run in runs}
    for argv in commands.values():
        parse_arguments(argv)  # a bad forwarded flag stops here, before any model loads
    first = min(settings.batch_sizes)
    timed_run(loop_argv(settings, data_dir, first, first, work / "warmup"))
    timings = {run: timed_run(argv) for run, argv in commands.items()}
    return [
        measurement(b, (b, timings[(b, b)]), (b + settings.interactions, timings[(b, b + settings.interactions)]))
        for b in settings.batch_sizes
    ]


def loads(values) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def report(settings: BenchSettings, rows: list[Measurement], load_before, load_after) -> dict:
    base = rows[0]
    phase_names = [*PHASE_FIELDS, "other"]
    print(
        f"{'B':>4}{'short run':>16}{'long run':>16}{'interactions/s':>16}{'s/interaction':>15}{'CPU s/int.':>12}  "
        + "".join(f"{name + ' s':>12}" for name in phase_names)
    )
    for row in rows:
        short, long = f"{row.short_interactions} in {row.short_s:.1f}s", f"{row.long_interactions} in {row.long_s:.1f}s"
        rate = row.interactions_per_s
        phases = "".join(f"{row.phase_s_per_interaction[name]:>12.2f}" for name in phase_names)
        cpu_per_interaction = 1 / row.interactions_per_cpu_s
        print(
            f"{row.batch_size:>4}{short:>16}{long:>16}{rate:>16.3f}{1 / rate:>15.2f}"
            f"{cpu_per_interaction:>12.2f}  {phases}"
        )
    for row in rows[1:]:
        ratio = row.interactions_per_s / base.interactions_per_s
        cpu_ratio = row.interactions_per_cpu_s / base.interactions_per_cpu_s
        print(
            f"B={row.batch_size} vs B={base.batch_size}: {ratio:.2f}x interactions/s "
            f"({cpu_ratio:.2f}x interactions per CPU second)"
        )
    threads = torch.get_num_threads()
    print(
        f"torch threads {threads}; load average (1, 5, 15 min) before {loads(load_before)}, after {loads(load_after)}"
    )
    return {
        "settings": {
            name: str(value) if isinstance(value, Path) else value for name, value in asdict(settings).items()
        },
        "torch_threads": torch.get_num_threads(),
        "load_before": list(load_before),
        "load_after": list(load_after),
        "runs": [
            {
                **asdict(row),
                "interactions_per_s": row.interactions_per_s,
                "interactions_per_cpu_s": row.interactions_per_cpu_s,
                "ratio": row.interactions_per_s / base.interactions_per_s,
            }
            for row in rows
        ],
    }


def main(argv=None) -> int:
    settings = parse_settings(argv)
    # Configured here, the loop's own basicConfig is a no-op: its INFO lines stay quiet, warnings reach the terminal.
    logging.basicConfig(level=logging.WARNING)
    print(
        f"online loop on {settings.model} ({settings.device}, {settings.dtype}), {settings.max_new_tokens} new tokens, "
        f"{settings.interactions} measured interactions per B, eval_n {settings.eval_n}"
    )
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-online-loop-") as work:
            rows = measure(settings, Path(work))
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = report(settings, rows, load_before, os.getloadavg())
    if settings.json_out is not None:
        settings.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
