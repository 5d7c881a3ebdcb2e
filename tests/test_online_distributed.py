"""Data-parallel online SDPO on real process groups (accelerate launch, DDP over gloo, 2 CPU processes).

* 2 processes give the same losses, gradient norms and weights as 1 process on the same global batches and seed
  (LoRA and full fine-tuning; uneven shares and a process with nothing to train on included).
* The online loop under 2 processes writes one results file; killed after its first step and resumed, it ends
  with what the uninterrupted run recorded.
* An FSDP/DeepSpeed launch and too small an interaction batch are one line each, before any model loads.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdpo.learner.distributed import accelerate_cpu_launch
from tests.conftest import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
# fp32 throughout; what differs between the runs is summation order (micro-batch composition, DDP's all-reduce)
# and DDP scoring with the model's own head instead of the chunked fp32 one: float rounding only. Measured here:
# losses and gradient norms within 1e-5 relative; weights within 0.42% (LoRA) and 0.23% (full) of the learning
# rate, with one weight of 256 at 2.1% after the teacher/scorer merge: a share of one Adam step per weight (Adam's
# division by sqrt(v) + 1e-6 magnifies rounding in near-zero gradients, so weights are compared in units of that
# step). Three steps move the largest weight by about 3 learning rates, 60 of those tolerances.
# The main process's 16th file-system commit point (tests/fault_injection.py): after step 1's checkpoint and the
# results naming it, before step 2's (run_state 2, baseline 2, results 6, checkpoint 3, results 6).
KILL_AT_COMMIT = 16
LOSS_TOLERANCE = {"rel": 1e-4, "abs": 1e-6}
WEIGHT_TOLERANCE_IN_LR = 0.05


def environment() -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return env


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, check=False, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=900, **kwargs
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, chat_tokenizer) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(chat_tokenizer).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_model_dir, tmp_path):
    results = {}
    for processes in (1, 2):
        out, checkpoints = tmp_path / f"world{processes}.pt", tmp_path / f"ckpt{processes}"
        args = (tiny_model_dir, str(out), str(checkpoints))
        command = (
            [sys.executable, str(WORKER), *args] if processes == 1 else accelerate_cpu_launch(2, str(WORKER), *args)
        )
        done = run(command)
        assert done.returncode == 0, done.stderr[-4000:]
        results[processes] = torch.load(out, weights_only=False)
        for mode in ("lora", "full"):
            assert (checkpoints / mode / "last" / "training_state.pt").is_file()
    one, two = results[1], results[2]
    for mode in ("lora", "full"):
        assert (one[mode]["world_size"], two[mode]["world_size"]) == (1, 2)
        assert [m["shares"] for m in two[mode]["metrics"]] == [[2, 2], [2, 1], [1, 0]]
        for step_one, step_two in zip(one[mode]["metrics"], two[mode]["metrics"]):
            assert step_two["loss"] == pytest.approx(step_one["loss"], **LOSS_TOLERANCE)
            assert step_two["grad_norm"] == pytest.approx(step_one["grad_norm"], **LOSS_TOLERANCE)
        assert one[mode]["weights"].keys() == two[mode]["weights"].keys()
        atol = WEIGHT_TOLERANCE_IN_LR * one[mode]["learning_rate"]
        for name, weight in one[mode]["weights"].items():
            torch.testing.assert_close(two[mode]["weights"][name], weight, atol=atol, rtol=0)
        # The steps must move the weights far beyond the tolerance, or the comparison shows nothing.
        moved = max(float((w - one[mode]["initial"][n]).abs().max()) for n, w in one[mode]["weights"].items())
        assert moved > 20 * atol


@pytest.mark.slow
def test_online_loop_on_two_processes_writes_one_results_file_and_resumes(tiny_model_dir, tmp_path, prompt_files):
    out_dir = tmp_path / "run"
    args = [
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--use_lora",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--lr",
        "1e-2",
        "--max_new_tokens",
        "16",
        "--eval_max_new_tokens",
        "16",
        "--user_backend",
        "rule",
        "--judge_backend",
        "rule",
        "--style",
        "no_punctuation",
        "--train_jsonl",
        str(prompt_files[0]),
        "--val_jsonl",
        str(prompt_files[1]),
        "--train_n",
        "6",
        "--eval_n",
        "3",
        "--eval_every",
        "4",
        "--interactions_per_step",
        "3",
        "--run_name",
        "ddp",
        "--out_dir",
        str(out_dir),
    ]
    done = run(accelerate_cpu_launch(2, "eval_online_sdpo.py", *args))
    assert done.returncode == 0, done.stderr[-4000:]
    results_files = sorted(out_dir.glob("ddp_[0-9]*.json"))
    assert [f.name for f in results_files] == ["ddp_1.json"], "one results file, written by the main process"
    results = json.loads(results_files[0].read_text())
    records = results["training_metrics"]
    assert [r["interaction"] for r in records] == list(range(1, 7))
    assert {r["step"] for r in records} == {1, 2}
    assert results["meta"]["world_size"] == 2
    assert [e["interaction"] for e in results["eval_history"]] == [6]
    completions = json.loads((out_dir / "ddp_completions_1.json").read_text())
    assert len(completions[-1]["current"]) == len(completions[-1]["baseline"]) == 3
    assert not list(out_dir.glob("*.tmp")) and (out_dir / "checkpoints" / "last" / "training_state.pt").is_file()

    # Resume of a finished run: nothing left to train, the results stay as they were.
    before = results_files[0].read_text()
    done = run(accelerate_cpu_launch(2, "eval_online_sdpo.py", "--resume", "--out_dir", str(out_dir)))
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(results_files[0].read_text())["training_metrics"] == json.loads(before)["training_metrics"]

    # The same run killed (SIGKILL of the main process) after its first step's checkpoint and results, then
    # resumed: it ends with what the uninterrupted run recorded (each process's sampling stream is per step).
    killed_dir = tmp_path / "killed"
    killed_args = [*args[:-1], str(killed_dir)]
    fault = ["tests/fault_injection.py", str(KILL_AT_COMMIT), "SIGKILL", "--", "eval_online_sdpo.py"]
    done = run(accelerate_cpu_launch(2, *fault, *killed_args))
    assert done.returncode != 0
    partial = json.loads((killed_dir / "ddp_1.json").read_text())
    assert [r["interaction"] for r in partial["training_metrics"]] == [1, 2, 3]
    assert partial["meta"]["resume_checkpoint_interactions"] == 3
    done = run(accelerate_cpu_launch(2, "eval_online_sdpo.py", "--resume", "--out_dir", str(killed_dir)))
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = json.loads((killed_dir / "ddp_1.json").read_text())
    compared = ("interaction", "step", "style", "loss", "grad_norm", "prompt", "response", "feedback")
    assert [{k: r[k] for k in compared} for r in resumed["training_metrics"]] == [
        {k: r[k] for k in compared} for r in results["training_metrics"]
    ]


def test_fsdp_launch_is_refused_on_cpu_before_any_model_loads(monkeypatch):
    from sdpo.learner.distributed import LaunchError, check_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError, match="asks for FSDP1.*fsdp_version: 2"):
        check_launch()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "TRUE")
    with pytest.raises(LaunchError, match="asks for DeepSpeed"):
        check_launch()


def test_shards_cover_the_batch_in_order(monkeypatch):
    from sdpo.learner.distributed import DataParallel

    items = list(range(7))
    shards = []
    for rank in range(3):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        shards.append(DataParallel().shard(items))
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize(
    "flags, wanted",
    [
        (["--interactions_per_step", "1"], "smaller than the 2 processes launched"),
        (["--interactions_per_step", "2", "--use_vllm"], "put the policy on a vLLM server"),
    ],
)
def test_what_two_processes_cannot_run_is_one_line(monkeypatch, prompt_files, tmp_path, flags, wanted):
    from sdpo.online.config import parse_arguments
    from sdpo.utils.command_line import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [
        "--train_jsonl",
        str(prompt_files[0]),
        "--val_jsonl",
        str(prompt_files[1]),
        "--run_name",
        "ddp",
        "--out_dir",
        str(tmp_path / "run"),
        *flags,
    ]
    with pytest.raises(UsageError, match=wanted):
        parse_arguments(argv)
