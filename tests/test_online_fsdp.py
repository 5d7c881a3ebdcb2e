"""FSDP2 (``--parallelism fsdp2``: torch ``fully_shard``) for the online learner and loop, on 2 CPU processes (gloo).

* 2 sharded processes give the same losses, gradient norms, weights and greedy answers as 1 process on the same
  global batches and seed (LoRA and full fine-tuning, the live teacher); the EMA and trust-region teachers train as
  under DDP.
* In bf16 autocast the first step's loss and gradient norm are one process's (the head in fp32 inside the sharded
  root's forward).
* An FSDP2 checkpoint (full tensors, written by the main process) resumes under FSDP2 to what the uninterrupted run
  does, and loads in one process.
* The online loop under FSDP2 writes one results file and resumes.
* How to ask for it (learner setting, accelerate config, script) and what is refused (FSDP1, DeepSpeed) are one
  line each, before any model loads.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sdpo.learner.distributed import LaunchError, accelerate_cpu_launch, check_launch
from sdpo.models.model_loading import concrete_dtype
from tests.test_online_distributed import (  # noqa: F401 (tiny_model_dir: the fixture)
    LOSS_TOLERANCE,
    WEIGHT_TOLERANCE_IN_LR,
    WORKER,
    run,
    tiny_model_dir,
)
from tests.test_scripts import REPO, dry_run, flag

# FSDP2 changes the summation order once more than DDP (gradients reduce-scattered into shards, the norm summed
# over shards), and nothing else: all-gathers carry the stored fp32 weights and the head runs in fp32 as in one
# process. Measured: the same orders as DDP (losses 1e-5 relative, weights within 2.1% of a learning rate for
# LoRA, 0.13% for full fine-tuning), so the DDP test's tolerances hold; see tests/test_online_distributed.py.
# Resuming from a checkpoint reproduces the continued run exactly here (0 difference); compared at the default
# float32 tolerance of assert_close.


def train_in(
    processes: int, tmp_path, model_dir: str, parallelism: str, teacher: str = "live", dtype: str = "float32"
) -> dict:
    name = f"{parallelism}-{processes}-{teacher}-{dtype}"
    out, checkpoints = tmp_path / f"{name}.pt", tmp_path / f"ckpt-{name}"
    args = (model_dir, str(out), str(checkpoints), parallelism, teacher, dtype)
    command = (
        accelerate_cpu_launch(processes, str(WORKER), *args) if processes > 1 else [sys.executable, str(WORKER), *args]
    )
    done = run(command)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False) | {"checkpoints": checkpoints}


def assert_weights_close(one: dict, two: dict, learning_rate: float) -> None:
    assert one.keys() == two.keys()
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, atol=WEIGHT_TOLERANCE_IN_LR * learning_rate, rtol=0)


@pytest.mark.slow
def test_fsdp2_two_processes_train_like_one_and_resume(tiny_model_dir, tmp_path):  # noqa: F811
    one = train_in(1, tmp_path, tiny_model_dir, "auto")
    two = train_in(2, tmp_path, tiny_model_dir, "fsdp2")
    for mode in ("lora", "full"):
        single, sharded = one[mode], two[mode]
        assert (single["sharded"], sharded["sharded"], sharded["world_size"]) == (False, True, 2)
        assert [m["shares"] for m in sharded["metrics"]] == [[2, 2], [2, 1], [1, 0]]
        for step_one, step_two in zip(single["metrics"], sharded["metrics"]):
            assert step_two["loss"] == pytest.approx(step_one["loss"], **LOSS_TOLERANCE)
            assert step_two["grad_norm"] == pytest.approx(step_one["grad_norm"], **LOSS_TOLERANCE)
        learning_rate = single["learning_rate"]
        assert_weights_close(single["weights"], sharded["weights"], learning_rate)
        moved = max(float((w - single["initial"][n]).abs().max()) for n, w in single["weights"].items())
        assert moved > 20 * WEIGHT_TOLERANCE_IN_LR * learning_rate
        # Generation reads the full weights (the twin refreshed from the shards): the same greedy answer.
        assert sharded["answer"] == single["answer"]
        # Resumed from the FSDP2 checkpoint, the next step is the one the run took without stopping.
        continued, resumed = sharded["continued"], sharded["resumed"]
        assert resumed["step"] == 4
        assert resumed["loss"] == pytest.approx(continued["loss"], rel=1e-6)
        for name, weight in continued["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], weight)
        assert_weights_close(single["continued"]["weights"], continued["weights"], learning_rate)

    # The FSDP2 checkpoint is the single-process format: the same files and optimizer layout, and it loads in one
    # process (here, the test's).
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    for mode in ("lora", "full"):
        files = {p.name for p in (one["checkpoints"] / mode / "last").iterdir()}
        assert {p.name for p in (two["checkpoints"] / mode / "last").iterdir()} == files
        states = [
            torch.load(run_["checkpoints"] / mode / "last" / "training_state.pt", weights_only=False)
            for run_ in (one, two)
        ]
        single_state, sharded_state = (s["optimizer_state_dict"] for s in states)
        assert sharded_state["param_groups"] == single_state["param_groups"]
        assert sharded_state["state"].keys() == single_state["state"].keys()
        for index, moments in single_state["state"].items():
            assert {k: v.shape for k, v in sharded_state["state"][index].items()} == {
                k: v.shape for k, v in moments.items()
            }
        learner = OnlineSDPOUpdater(
            OnlineSDPOConfig(**states[1]["config"]), resume_from=two["checkpoints"] / mode / "last"
        )
        assert learner.step == 3 and not learner.sharded
        trained = {n: p.detach() for n, p in learner.model.named_parameters() if p.requires_grad}
        for name, weight in two[mode]["weights"].items():
            torch.testing.assert_close(trained[name], weight)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["ema", "trust_region"])
def test_fsdp2_teachers_train_as_under_ddp(tiny_model_dir, tmp_path, teacher):  # noqa: F811
    # Against DDP on the same 2 processes (the same arithmetic but for the reduction): the EMA adapter is sharded
    # with the student, the EMA copy and the base copy (full fine-tuning) are whole and synchronised from the shards.
    ddp = train_in(2, tmp_path, tiny_model_dir, "ddp", teacher)
    sharded = train_in(2, tmp_path, tiny_model_dir, "fsdp2", teacher)
    for mode in ("lora", "full"):
        assert (ddp[mode]["sharded"], sharded[mode]["sharded"]) == (False, True)
        for step_ddp, step_fsdp in zip(ddp[mode]["metrics"], sharded[mode]["metrics"]):
            assert step_fsdp["loss"] == pytest.approx(step_ddp["loss"], **LOSS_TOLERANCE)
            assert step_fsdp["grad_norm"] == pytest.approx(step_ddp["grad_norm"], **LOSS_TOLERANCE)
        assert_weights_close(ddp[mode]["weights"], sharded[mode]["weights"], ddp[mode]["learning_rate"])
        # The teacher's state (the EMA weights) round-trips through the FSDP2 checkpoint.
        resumed, continued = sharded[mode]["resumed"], sharded[mode]["continued"]
        assert resumed["loss"] == pytest.approx(continued["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(concrete_dtype("auto", "cpu") != "bfloat16", reason="bf16 is emulated on this CPU (~100x slower)")
def test_fsdp2_in_bf16_scores_like_one_process(tiny_model_dir, tmp_path):  # noqa: F811
    # bf16 autocast over fp32 trainable weights (LoRA's frozen base stored in bf16): the all-gathers carry the weights
    # as stored and the head runs in fp32, so the first step (same weights in both runs) differs by summation order
    # and bf16 rounding of the differently batched activations only. Measured: losses 2e-5 relative (LoRA) and 0
    # (full), gradient norms 7e-4 and 4e-4 (DDP, with its bf16 head: losses 7e-4 and 1.4e-3). Later steps are not
    # compared: at these learning rates Adam magnifies bf16 rounding into whole steps, as it does under DDP.
    one = train_in(1, tmp_path, tiny_model_dir, "auto", dtype="bfloat16")
    two = train_in(2, tmp_path, tiny_model_dir, "fsdp2", dtype="bfloat16")
    for mode in ("lora", "full"):
        first_one, first_two = one[mode]["metrics"][0], two[mode]["metrics"][0]
        assert first_two["loss"] == pytest.approx(first_one["loss"], rel=2e-4)
        assert first_two["grad_norm"] == pytest.approx(first_one["grad_norm"], rel=3e-3)


@pytest.mark.slow
def test_online_loop_under_fsdp2_writes_one_results_file(tiny_model_dir, tmp_path, prompt_files):  # noqa: F811
    out_dir = tmp_path / "run"
    args = [
        "--model", tiny_model_dir, "--device", "cpu", "--dtype", "float32", "--use_lora", "--lora_r", "8",
        "--lora_alpha", "16", "--lr", "1e-2", "--max_new_tokens", "16", "--eval_max_new_tokens", "16",
        "--user_backend", "rule", "--judge_backend", "rule", "--style", "no_punctuation",
        "--train_jsonl", str(prompt_files[0]), "--val_jsonl", str(prompt_files[1]), "--train_n", "6", "--eval_n", "3",
        "--eval_every", "4", "--interactions_per_step", "3", "--run_name", "fsdp", "--out_dir", str(out_dir),
        "--parallelism", "fsdp2", "--save_checkpoints",
    ]  # fmt: skip
    done = run(accelerate_cpu_launch(2, "eval_online_sdpo.py", *args))
    assert done.returncode == 0, done.stderr[-4000:]
    assert [f.name for f in out_dir.glob("fsdp_[0-9]*.json")] == ["fsdp_1.json"]
    results = json.loads((out_dir / "fsdp_1.json").read_text())
    assert [r["interaction"] for r in results["training_metrics"]] == list(range(1, 7))
    assert {r["step"] for r in results["training_metrics"]} == {1, 2}
    assert results["meta"]["world_size"] == 2
    assert [e["interaction"] for e in results["eval_history"]] == [6]
    completions = json.loads((out_dir / "fsdp_completions_1.json").read_text())
    assert len(completions[-1]["current"]) == len(completions[-1]["baseline"]) == 3
    assert (out_dir / "checkpoints" / "last" / "adapter_model.safetensors").is_file()

    # The finished run resumed (from its FSDP2 checkpoint): nothing left to train, the records stay.
    done = run(accelerate_cpu_launch(2, "eval_online_sdpo.py", "--resume", "--out_dir", str(out_dir)))
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = json.loads((out_dir / "fsdp_1.json").read_text())
    assert resumed["training_metrics"] == results["training_metrics"]


@pytest.mark.parametrize(
    "env, parallelism, wanted",
    [
        ({}, "auto", "ddp"),
        ({}, "fsdp2", "fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "auto", "fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2", "fsdp2"),
    ],
)
def test_parallelism_follows_the_setting_or_the_accelerate_config(monkeypatch, env, parallelism, wanted):
    from sdpo.learner.config import OnlineSDPOConfig

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert check_launch(OnlineSDPOConfig(device="cpu", parallelism=parallelism)) == wanted


@pytest.mark.parametrize(
    "env, parallelism, wanted",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "auto", "asks for FSDP1 .*use an FSDP2 config .* or --parallelism fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp2", "asks for FSDP1"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "fsdp2", "asks for DeepSpeed, which the online loop does not run"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "ddp", "asks for FSDP2 but --parallelism is ddp"),
    ],
)
def test_what_the_online_loop_cannot_shard_is_one_line(monkeypatch, prompt_files, tmp_path, env, parallelism, wanted):
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.online.config import parse_arguments
    from sdpo.utils.command_line import UsageError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["--train_jsonl", str(prompt_files[0]), "--val_jsonl", str(prompt_files[1]), "--run_name", "fsdp"]
    argv += ["--out_dir", str(tmp_path)]
    with pytest.raises(UsageError, match=wanted) as raised:
        parse_arguments([*argv, "--parallelism", parallelism])
    assert "\n" not in str(raised.value)
    with pytest.raises(LaunchError, match=wanted):
        check_launch(OnlineSDPOConfig(device="cpu", parallelism=parallelism))


def test_unknown_parallelism_is_refused():
    from sdpo.learner.config import OnlineSDPOConfig

    with pytest.raises(ValueError, match="unknown parallelism 'zero3': use auto, ddp or fsdp2"):
        OnlineSDPOConfig(device="cpu", parallelism="zero3")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"PARALLELISM": "fsdp2"}, "fsdp2"),
        ({"ACCELERATE_CONFIG": "accelerate_configs/fsdp.yaml"}, "fsdp2"),
        ({}, None),
    ],
)
def test_script_launches_fsdp2_on_cpu_processes(env, expected):
    argv, _ = dry_run("eval_online_sdpo.sh", "--dry-run", env={"WORLD_SIZE": "2", "PRESET": "cpu", **env})
    launcher = argv.index("accelerate.commands.launch")
    assert (
        argv[launcher + 1 : launcher + 3] == ["--multi_gpu", "--num_processes"] and flag(argv, "--num_processes") == "2"
    )
    assert "--config_file" not in argv  # on CPU processes the learner shards; accelerate's FSDP plugin is not used
    assert (flag(argv, "--parallelism") if "--parallelism" in argv else None) == expected
    # FSDP2 on CPU processes: glibc hands each freed gathered layer back to the OS (bench/fsdp_memory.py).
    assert ("MALLOC_MMAP_THRESHOLD_=65536" in argv) == (expected == "fsdp2")


@pytest.mark.parametrize(
    "config, wanted",
    [
        ("distributed_type: DEEPSPEED\n", "asks for DeepSpeed, which the online loop does not run: use "),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n", "asks for FSDP1, .*set fsdp_version: 2"),
        ("distributed_type: FSDP\n", "asks for FSDP1"),
    ],
)
def test_script_refuses_deepspeed_and_fsdp1_in_one_line(tmp_path, config, wanted):
    path = tmp_path / "accelerate.yaml"
    path.write_text(config)
    environment = {**os.environ, "WORLD_SIZE": "2", "PRESET": "cpu", "ACCELERATE_CONFIG": str(path), "RUN_ID": "r"}
    done = subprocess.run(
        [str(REPO / "scripts" / "eval_online_sdpo.sh"), "--dry-run"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and re.search(wanted, done.stderr), done.stderr
