"""bench/online_loop.py: settings checked before any run, each run's command is one the loop accepts, and a tiny
end-to-end run reports both batch sizes."""

import json

import pytest

from bench import online_loop
from sdpo.online.config import parse_arguments


def test_settings_defaults_and_forwarded_loop_arguments():
    settings = online_loop.parse_settings(["--loss_mode", "full_distillation", "--interactions", "24"])
    assert settings.batch_sizes == (1, 8) and settings.interactions == 24 and settings.model == "smollm2-135m-instruct"
    assert settings.loop_args == ("--loss_mode", "full_distillation")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--interactions", "12"], "not a multiple of batch size 8"),
        (["--batch_sizes", "0", "2"], "must be positive"),
        (["--data_dir", "/nonexistent"], "needs train.jsonl and validation.jsonl"),
    ],
)
def test_bad_settings_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        online_loop.parse_settings(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_each_run_is_a_command_the_loop_accepts(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "hi"}\n')
    settings = online_loop.parse_settings(["--batch_sizes", "1", "4", "--interactions", "8", "--temperature", "0.7"])
    argv = online_loop.loop_argv(settings, tmp_path, 4, 12, tmp_path / "run")
    arguments = parse_arguments(argv)
    run, participants = arguments.run, arguments.participants
    assert (run.interactions_per_step, run.train_n, run.eval_every, arguments.learner.temperature) == (4, 12, 0, 0.7)
    assert (participants.user_backend, participants.judge_backend, run.out_dir) == (
        "rule",
        "rule",
        str(tmp_path / "run"),
    )


def test_phases_per_interaction_are_the_long_run_minus_the_short_run():
    short = online_loop.RunTiming(wall_s=10.0, cpu_s=9.0, phases={"generation": 2.0, "user": 0.5, "update": 1.0})
    long = online_loop.RunTiming(wall_s=26.0, cpu_s=21.0, phases={"generation": 10.0, "user": 2.5, "update": 5.0})
    row = online_loop.measurement(8, (8, short), (16, long))
    assert row.interactions_per_s == 0.5 and row.interactions_per_cpu_s == 8 / 12
    assert row.phase_s_per_interaction == {"generation": 1.0, "user": 0.25, "update": 0.5, "other": 0.25}


def test_a_bad_forwarded_flag_stops_before_any_model_loads(capsys):
    assert online_loop.main(["--no_such_flag"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_end_to_end_reports_both_batch_sizes(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--model",
        tiny_model_path,
        "--dtype",
        "float32",
        "--batch_sizes",
        "1",
        "2",
        "--interactions",
        "2",
        "--max_new_tokens",
        "4",
        "--json_out",
        str(out),
    ]
    assert online_loop.main(argv) == 0
    summary = json.loads(out.read_text())
    assert [(r["batch_size"], r["short_interactions"], r["long_interactions"]) for r in summary["runs"]] == [
        (1, 1, 3),
        (2, 2, 4),
    ]
    assert summary["torch_threads"] >= 1 and len(summary["load_before"]) == len(summary["load_after"]) == 3
    for run in summary["runs"]:
        assert set(run["phase_s_per_interaction"]) == {"generation", "user", "update", "other"}
        assert isinstance(run["cpu_s"], float)  # a difference of two runs: on a 4-token tiny run it can be < 0
    printed = capsys.readouterr().out
    assert "interactions/s" in printed and "load average" in printed and "torch threads" in printed
    assert "interactions per CPU second" in printed
