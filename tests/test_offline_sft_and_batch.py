"""The offline launch's global batch (Table 5: 32 on the default launch, printed, a mismatch refused before
loading) and the SFT baseline (Table 4: TRL SFTTrainer on the logged replies, same CLI)."""

import json

import pytest

from offline_sdpo.main_offline_sdpo import UsageError, main, parse_arguments, run
from offline_sdpo.offline_sdpo_trainer import load_interactions
from offline_sdpo.sft_baseline import sft_dataset
from tests.conftest import FIXTURES
from tests.test_offline_sdpo import dry_run, flag

INTERACTIONS = FIXTURES / "offline" / "interactions.jsonl"
MISSING_MODEL = "/nonexistent/model"


def test_default_launch_gives_table_5s_global_batch_of_32(tmp_path):
    result, argv = dry_run("--dry-run", TRAIN_JSONL="data/x.jsonl", CPU="0")
    assert result.returncode == 0, result.stderr
    per_device, accumulation = (
        int(flag(argv, "--per_device_train_batch_size")),
        int(flag(argv, "--gradient_accumulation_steps")),
    )
    assert per_device * accumulation * int(flag(argv, "--num_processes")) == 32
    assert "global batch 4 x 2 x 4 processes = 32" in result.stdout
    config = parse_arguments(["--dataset_name", "d.jsonl"]).config
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 2)


def test_launcher_passes_method_and_global_batch(tmp_path):
    _, argv = dry_run("--dry-run", TRAIN_JSONL="t.jsonl", CPU="0", METHOD="sft", GLOBAL_BATCH="32")
    assert flag(argv, "--method") == "sft" and flag(argv, "--global_batch_size") == "32"
    assert flag(argv, "--run_name").startswith("sft-")


def test_global_batch_mismatch_is_one_line_before_the_model_loads(tmp_path, capsys):
    status = main(
        ["--dataset_name", str(INTERACTIONS), "--model_name_or_path", MISSING_MODEL, "--report_to", "none"]
        + ["--output_dir", str(tmp_path), "--global_batch_size", "32"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert err == (
        "error: --global_batch_size 32, but this launch gives 4 per device x 2 accumulation x 1 processes = 8: "
        "change --per_device_train_batch_size, --gradient_accumulation_steps or the number of processes (WORLD_SIZE)"
    )


def test_unknown_method_is_refused():
    with pytest.raises(UsageError, match="--method: invalid choice: .dpo."):
        parse_arguments(["--dataset_name", "d.jsonl", "--method", "dpo"])


def test_sft_rows_are_the_history_and_the_logged_reply():
    interactions, _ = load_interactions(INTERACTIONS)
    rows = sft_dataset(interactions)
    assert len(rows) == len(interactions)
    first = rows[0]
    assert first["prompt"] == [m.as_chat() for m in interactions[0].history]
    assert first["completion"] == [{"role": "assistant", "content": interactions[0].completion.text.rstrip()}]
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    assert interactions[0].user_response.text not in json.dumps(first)  # o is SDPO's, not SFT's


@pytest.mark.slow
def test_sft_baseline_trains_and_its_loss_falls(tiny_model_path, tmp_path, capsys):
    arguments = parse_arguments(
        ["--method", "sft", "--dataset_name", str(INTERACTIONS), "--model_name_or_path", tiny_model_path]
        + ["--output_dir", str(tmp_path), "--report_to", "none", "--per_device_train_batch_size", "4"]
        + ["--gradient_accumulation_steps", "1", "--global_batch_size", "4", "--max_steps", "8"]
        + ["--learning_rate", "3e-3", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]
        + ["--logging_steps", "1", "--save_steps", "100", "--seed", "3"]
    )
    summary = run(arguments)
    out = capsys.readouterr().out
    assert "method sft" in out and "global batch: 4 per device x 1 accumulation x 1 processes = 4" in out
    assert summary["method"] == "sft" and summary["global_step"] == 8 and summary["examples_seen_per_rank"] == [32]
    state = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses  # 12.3 -> 10.4 measured
    assert (tmp_path / "final_model" / "config.json").is_file()
