"""The offline command line as users run it: TRL flag names and the reference's aliases, --config YAML,
--help as a file, a run on a TRL ``messages`` dataset, and bad input answered by one line before any
model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offline_sdpo.main_offline_sdpo import main, parse_arguments
from tests.conftest import FIXTURES

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "offline_sdpo" / "main_offline_sdpo.py"
INTERACTIONS = FIXTURES / "offline" / "interactions.jsonl"
MESSAGES = FIXTURES / "offline" / "messages.jsonl"
MISSING_MODEL = "/nonexistent/model"  # reaching the model would be a different error: every check must come first


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_help_works_run_as_a_file(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("--dataset_name", "--train_jsonl", "--model_name_or_path", "--base_model", "--use_peft", "--config"):
        assert name in result.stdout
    assert "--per_device_train_batch_size" in result.stdout and "--batch_size" in result.stdout
    assert "{wandb,trackio,tensorboard,none}" in result.stdout


def test_reference_names_are_aliases_of_the_trl_names(tmp_path):
    reference = parse_arguments(
        ["--train_jsonl", "d.jsonl", "--base_model", "m", "--batch_size", "3", "--grad_accum", "5", "--num_epochs", "1"]
        + ["--use_lora", "--no_gradient_checkpointing", "--wandb_project", "p", "--dtype", "float32"]
        + ["--warmup_ratio", "0.1", "--output_dir", str(tmp_path), "--report_to", "none"]
    )
    trl = parse_arguments(
        ["--dataset_name", "d.jsonl", "--model_name_or_path", "m", "--per_device_train_batch_size", "3"]
        + ["--gradient_accumulation_steps", "5", "--num_train_epochs", "1", "--use_peft", "--gradient_checkpointing"]
        + ["false", "--project", "p", "--compute_dtype", "float32", "--warmup_steps", "0.1"]
        + ["--output_dir", str(tmp_path), "--report_to", "none"]
    )
    assert reference.data == trl.data and reference.model == trl.model
    assert reference.config.to_dict() == trl.config.to_dict()
    config = trl.config
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.num_train_epochs) == (
        3,
        5,
        1,
    )
    assert config.activation_checkpointing is False and config.compute_dtype == "float32" and config.report_to == []
    assert trl.model.use_peft and trl.model.model_name_or_path == "m" and trl.data.dataset_name == "d.jsonl"
    kwargs = parse_arguments(["--dataset_name", "d.jsonl", "--chat_template_kwargs", '{"enable_thinking": true}'])
    assert kwargs.config.chat_template_kwargs == {"enable_thinking": True}


def test_defaults_follow_the_reference(tmp_path, monkeypatch):
    for name in ("OUTPUT_DIR", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    arguments = parse_arguments(["--dataset_name", "d.jsonl"])
    config = arguments.config
    assert arguments.model.model_name_or_path == "Qwen/Qwen3-4B"
    assert (config.learning_rate, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (
        2e-6,
        4,
        2,
    )
    assert (config.num_train_epochs, config.report_to, config.project) == (2.0, ["wandb"], "offline-sdpo")
    assert config.output_dir == "./local_checkpoints" and config.activation_checkpointing
    assert config.optim == "adamw_torch" and "no CUDA device" in config.optim_reason  # CPU machine


def test_yaml_config_sets_values_command_line_wins_and_old_names_work(tmp_path):
    config_file = write_yaml(
        tmp_path / "run.yaml",
        f"train_jsonl: {MESSAGES}\nmodel_name_or_path: m\nper_device_train_batch_size: 2\n"
        "learning_rate: 1.0e-4\nreport_to: [none]\nlora_target_modules: [q_proj, v_proj]\n"
        f"output_dir: {tmp_path / 'out'}\nenv:\n  SDPO_TEST_FROM_YAML: 'yes'\n",
    )
    arguments = parse_arguments(["--config", config_file, "--per_device_train_batch_size", "3"])
    assert arguments.data.dataset_name == str(MESSAGES)
    assert arguments.config.per_device_train_batch_size == 3 and arguments.config.learning_rate == 1e-4
    assert arguments.model.lora_target_modules == ["q_proj", "v_proj"] and arguments.config.report_to == []
    assert os.environ.pop("SDPO_TEST_FROM_YAML") == "yes"


@pytest.mark.slow
def test_yaml_config_run_on_a_messages_dataset(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    config_file = write_yaml(
        tmp_path / "run.yaml",
        f"dataset_name: {MESSAGES}\nmodel_name_or_path: {tiny_model_path}\noutput_dir: {out}\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\nmax_steps: 2\nlearning_rate: 1.0e-3\n"
        "compute_dtype: float32\nlogging_steps: 1\nsave_steps: 100\nreport_to: none\nseed: 3\n",
    )
    assert main(["--config", config_file]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["examples_seen_per_rank"] == [4]
    report = json.loads((out / "data_report.json").read_text())
    assert (report["rows_read"], report["rows_used"]) == (4, 4)  # 3 messages rows give 4 tuples
    assert (out / "final_model" / "config.json").is_file()
    assert "data: 4 of 4 tuples used" in capsys.readouterr().out


def bad_inputs(tmp):
    """(name, argv, expected message fragment) for every bad input; files are made in ``tmp``."""
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    (tmp / "latin1.jsonl").write_bytes(
        INTERACTIONS.read_bytes().splitlines(keepends=True)[0] + '{"prompt": "caf\xe9"}\n'.encode("latin-1")
    )
    (tmp / "bad_row.jsonl").write_text('{"id": 1, "conversations": 5}\n')
    good = ["--dataset_name", str(INTERACTIONS), "--model_name_or_path", MISSING_MODEL]
    good += ["--output_dir", str(tmp / "out"), "--report_to", "none"]
    data = good[:2]
    rest = good[2:]
    return [
        (
            "batch size 0",
            [*good, "--per_device_train_batch_size", "0"],
            "per_device_train_batch_size (--batch_size) must",
        ),
        ("old batch size 0", [*good, "--batch_size", "0"], "must be a whole number >= 1, got 0"),
        ("accumulation 0", [*good, "--grad_accum", "0"], "gradient_accumulation_steps (--grad_accum) must"),
        ("negative lr", [*good, "--learning_rate=-1e-5"], "learning_rate must be a finite number > 0, got -1e-05"),
        ("zero lr", [*good, "--learning_rate", "0"], "learning_rate must be a finite number > 0, got 0.0"),
        ("infinite lr", [*good, "--learning_rate", "inf"], "learning_rate must be a finite number > 0, got inf"),
        ("nan lr", [*good, "--learning_rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
        ("nan clip", [*good, "--max_grad_norm", "nan"], "max_grad_norm must be a finite number >= 0"),
        ("max_steps 0", [*good, "--max_steps", "0"], "max_steps must be >= 1"),
        ("lora rank 0", [*good, "--lora_r", "0"], "lora_r and lora_alpha must be >= 1"),
        ("template kwargs", [*good, "--chat_template_kwargs", "{x"], "chat_template_kwargs is not valid JSON"),
        ("not a number", [*good, "--learning_rate", "fast"], "invalid float value: 'fast'"),
        ("unknown variant", [*good, "--hindsight_variant", "x"], "invalid choice: 'x' (choose from"),
        ("unknown reporter", [*good, "--report_to", "mlflow"], "invalid choice: 'mlflow' (choose from"),
        ("unknown flag", [*good, "--frobnicate", "1"], "unrecognized arguments: --frobnicate 1"),
        ("no dataset", rest, "no training data: pass --dataset_name"),
        ("output is a file", [*data, "--output_dir", str(tmp / "a_file"), "--report_to", "none"], "is a file"),
        ("missing data file", ["--dataset_name", str(tmp / "none.jsonl"), *rest], "none.jsonl: no such file or folder"),
        ("folder as data", ["--dataset_name", str(tmp / "empty_dir"), *rest], "is a folder without a saved dataset"),
        (
            "not UTF-8",
            ["--dataset_name", str(tmp / "latin1.jsonl"), *rest],
            "latin1.jsonl:2: not UTF-8 text (byte 0xe9",
        ),
        ("row without x", ["--dataset_name", str(tmp / "bad_row.jsonl"), *rest], "bad_row.jsonl:1: field 'prompt' or"),
        ("missing Hub dataset", ["--dataset_name", "org/not-cached-anywhere", *rest], "HF_HUB_OFFLINE=1 is set"),
        (
            "partial checkpoint",
            [*good, "--resume_from_checkpoint", str(tmp / "empty_dir")],
            "empty_dir has no trainer_state.json, no weights, no optimizer state",
        ),
        ("checkpoint is a file", [*good, "--resume_from_checkpoint", str(tmp / "a_file")], "a_file is not a folder"),
        (
            "missing config",
            ["--config", str(tmp / "none.yaml")],
            "--config " + str(tmp / "none.yaml") + ": no such file",
        ),
        (
            "unknown YAML key",
            ["--config", write_yaml(tmp / "unknown.yaml", f"dataset_name: {INTERACTIONS}\nlearning_rte: 1\n")],
            "unknown.yaml: unknown key(s) learning_rte",
        ),
        ("YAML not a mapping", ["--config", write_yaml(tmp / "list.yaml", "- 1\n")], "must contain a YAML mapping"),
        ("YAML syntax", ["--config", write_yaml(tmp / "broken.yaml", "a: [1\n")], "broken.yaml: not valid YAML"),
        (
            "YAML bad value",
            ["--config", write_yaml(tmp / "zero.yaml", "per_device_train_batch_size: 0\n"), *good],
            "got 0",
        ),
    ]


def test_bad_inputs_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    cases = bad_inputs(tmp_path)
    failures = []
    for name, argv, expected in cases:
        code = main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if code == 0 or len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0]:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
        assert not (tmp_path / "out" / "final_model").exists()
    assert failures == [], "\n".join(failures)


@pytest.mark.slow
def test_bad_input_exit_status_and_stderr_of_the_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--train_jsonl", str(INTERACTIONS), "--batch_size", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: per_device_train_batch_size (--batch_size) must be a whole number >= 1, got 0"
    ]


@pytest.mark.parametrize("variable, kind", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_or_deepspeed_launched_on_cpu_is_refused_before_loading(tmp_path, capsys, monkeypatch, variable, kind):
    # What `accelerate launch --config_file accelerate_configs/fsdp.yaml` sets for the script on this CPU machine.
    monkeypatch.setenv(variable, "true")
    argv = ["--dataset_name", str(INTERACTIONS), "--model_name_or_path", MISSING_MODEL, "--report_to", "none"]
    assert main([*argv, "--output_dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: the accelerate config asks for {kind}, but this run is on CPU")
