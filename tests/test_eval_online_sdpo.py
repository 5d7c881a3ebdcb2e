"""The online train/eval loop end to end: outputs, schemas, bad input, API failures, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import eval_online_sdpo
from tests.fakes import FakeAnthropicServer, Reply

REPO = Path(__file__).resolve().parents[1]


def base_args(model, train, val, out_dir, **extra):
    args = [
        "--model",
        model,
        "--train_jsonl",
        str(train),
        "--val_jsonl",
        str(val),
        "--out_dir",
        str(out_dir),
        "--run_name",
        "unit",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max_new_tokens",
        "8",
        "--eval_max_new_tokens",
        "8",
        "--lr",
        "1e-4",
        "--style",
        "no_emojis",
        "--seed",
        "7",
    ]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


def read_results(out_dir: Path) -> dict:
    return json.loads((out_dir / "unit_1.json").read_text())


@pytest.mark.slow
def test_embedded_model_two_interactions_and_one_evaluation(tmp_path, prompt_files):
    train, val = prompt_files
    out = tmp_path / "run"
    code = eval_online_sdpo.main(
        base_args(
            "smollm2-135m-instruct",
            train,
            val,
            out,
            user_backend="rule",
            judge_backend="rule",
            train_n=2,
            eval_n=3,
            eval_every=2,
            eval_styles="less_filler_praise_sycophancy",
            use_lora=True,
            lora_r=4,
            lora_alpha=8,
            dtype="auto",
        )
    )
    assert code == 0
    results = read_results(out)
    assert set(results) == {"meta", "eval_history", "training_metrics"}
    meta = results["meta"]
    settings = meta["settings"]
    assert (
        settings["model_name_or_path"] == "smollm2-135m-instruct"
        and meta["n_train_prompts"] == 2
        and meta["n_eval_prompts"] == 3
    )
    assert (
        meta["judge_label"] == "rule-based"
        and meta["user_label"] == "rule-based"
        and meta["judged_styles"] == ["no_emojis", "less_filler_praise_sycophancy"]
    )
    assert [m["interaction"] for m in results["training_metrics"]] == [1, 2]
    for metrics in results["training_metrics"]:
        assert {
            "kl_mean",
            "loss",
            "grad_norm",
            "policy_logp_mean",
            "gen_time_s",
            "sim_time_s",
            "prompt",
            "response",
            "feedback",
        } <= set(metrics)
    assert len(results["eval_history"]) == 1
    evaluation = results["eval_history"][0]
    assert evaluation["step"] == 2 and evaluation["n"] == 3
    assert {
        "wins_a",
        "wins_b",
        "ties",
        "coverage",
        "winrate_a",
        "se",
        "se_bootstrap",
        "n_effective",
        "winrate_inc_ties",
        "n_unparsed",
        "judge_time_s",
        "eval_gen_time_s",
    } <= set(evaluation)
    assert evaluation["secondary_less_filler_praise_sycophancy"]["n"] == 3
    completions = json.loads((out / "unit_completions_1.json").read_text())
    assert len(completions) == 1 and len(completions[0]["current"]) == len(completions[0]["baseline"]) == 3
    snapshot = [json.loads(line) for line in (out / "unit_completions.jsonl").read_text().splitlines()]
    assert len(snapshot) == 3 and set(snapshot[0]) == {"step", "prompt", "current", "baseline"}
    assert (out / "winrate.png").stat().st_size > 1000
    assert (out / "checkpoints" / "last" / "training_state.pt").is_file()


@pytest.mark.slow
def test_training_runs_and_results_are_written_each_interaction(tmp_path, prompt_files, tiny_model_path):
    train, val = prompt_files
    out = tmp_path / "run"
    assert (
        eval_online_sdpo.main(
            base_args(
                tiny_model_path,
                train,
                val,
                out,
                user_backend="rule",
                judge_backend="rule",
                train_n=3,
                eval_n=2,
                eval_every=0,
            )
        )
        == 0
    )
    results = read_results(out)
    assert len(results["training_metrics"]) == 3 and len(results["eval_history"]) == 1
    assert results["eval_history"][0]["interaction"] == 3


def test_bad_inputs_fail_with_one_clear_line(tmp_path, prompt_files, tiny_model_path, capsys):
    train, val = prompt_files
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    assert (
        eval_online_sdpo.main(
            base_args(tiny_model_path, broken, val, tmp_path / "a", user_backend="rule", judge_backend="rule")
        )
        == 1
    )
    assert "broken.jsonl:2" in capsys.readouterr().err

    returned = eval_online_sdpo.main(
        base_args(
            tiny_model_path, train, val, tmp_path / "b", user_backend="rule", judge_backend="rule", style="pirate"
        )
    )
    err = capsys.readouterr().err
    assert returned == 2 and "pirate" in err and "no_emojis" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists(), "an argument error must leave nothing behind"
    assert (
        eval_online_sdpo.main(
            base_args(
                tiny_model_path,
                train,
                val,
                tmp_path / "b",
                user_backend="rule",
                judge_backend="rule",
                train_n=1,
                eval_n=1,
            )
        )
        == 0
    )

    assert eval_online_sdpo.main(["--resume", "--out_dir", str(tmp_path / "nothing")]) == 1
    assert "--resume needs" in capsys.readouterr().err
    assert (
        eval_online_sdpo.main(
            base_args(tiny_model_path, train, val, tmp_path / "b", user_backend="rule", judge_backend="rule")
        )
        == 1
    )
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_fewer_prompts_than_requested_records_the_real_count(tmp_path, prompt_files, tiny_model_path, caplog):
    train, val = prompt_files
    out = tmp_path / "run"
    assert (
        eval_online_sdpo.main(
            base_args(tiny_model_path, train, val, out, user_backend="rule", judge_backend="rule", train_n=2, eval_n=50)
        )
        == 0
    )
    meta = read_results(out)["meta"]
    assert meta["n_eval_prompts"] == 3 and meta["settings"]["eval_n"] == 50
    assert "requested 50 prompts but only 3" in caplog.text


@pytest.mark.slow
def test_api_failure_stops_cleanly_and_resume_finishes_the_run(
    tmp_path, prompt_files, tiny_model_path, monkeypatch, capsys
):
    """The simulator's API fails (HTTP 500) on interaction 3: exit 1, nothing lost, --resume completes."""
    train, val = prompt_files
    out = tmp_path / "run"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    failing = [
        Reply(),
        Reply("Too long."),
        Reply("No emojis please."),
        Reply(status=500),
    ]  # the first answers the pre-flight check
    with FakeAnthropicServer(replies=failing, handler=lambda body: Reply(status=500)) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        args = base_args(
            tiny_model_path,
            train,
            val,
            out,
            judge_backend="rule",
            train_n=4,
            eval_n=2,
            eval_every=2,
            api_max_attempts=1,
        )
        assert eval_online_sdpo.main(args) == 1
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "--resume" in err
    before = read_results(out)["training_metrics"]
    assert [m["feedback"] for m in before] == ["Too long.", "No emojis please."]

    with FakeAnthropicServer(handler=lambda body: Reply("Fine.")) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        assert eval_online_sdpo.main(["--resume", "--out_dir", str(out)]) == 0
    after = read_results(out)
    assert [m["interaction"] for m in after["training_metrics"]] == [1, 2, 3, 4]
    assert after["training_metrics"][:2] == before
    assert [e["interaction"] for e in after["eval_history"]] == [2, 4]


@pytest.mark.slow
def test_killed_run_resumed_keeps_all_finished_interactions(tmp_path, prompt_files, tiny_model_path):
    """SIGKILL while the simulator is answering interaction 3; --resume keeps interactions 1-2 unchanged."""
    train, val = prompt_files
    out = tmp_path / "run"
    third_request = threading.Event()

    def slow_third(body):
        third_request.set()
        return Reply("never delivered", delay=60)

    env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "eval_online_sdpo.py")] + base_args(
        tiny_model_path, train, val, out, judge_backend="rule", train_n=4, eval_n=2, eval_every=0
    )
    with FakeAnthropicServer(
        replies=[Reply(), Reply("Shorter."), Reply("Plainer.")], handler=slow_third
    ) as server:  # Reply(): the pre-flight check
        env["ANTHROPIC_BASE_URL"] = server.base_url
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert third_request.wait(timeout=240), "the run never reached interaction 3"
            time.sleep(0.5)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    before = read_results(out)["training_metrics"]
    assert [m["interaction"] for m in before] == [1, 2]

    with FakeAnthropicServer(handler=lambda body: Reply("Good.")) as server:
        env["ANTHROPIC_BASE_URL"] = server.base_url
        resumed = subprocess.run(
            command[:2] + ["--resume", "--out_dir", str(out)], env=env, capture_output=True, text=True, timeout=300
        )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = read_results(out)
    assert [m["interaction"] for m in after["training_metrics"]] == [1, 2, 3, 4]
    assert after["training_metrics"][:2] == before
    assert [m["feedback"] for m in after["training_metrics"]] == ["Shorter.", "Plainer.", "Good.", "Good."]
    assert [m["step"] for m in after["training_metrics"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_wandb_offline_logs_training_and_evaluation(tmp_path, prompt_files, tiny_model_path, monkeypatch):
    """A real offline wandb run in the run directory; every training and evaluation metric is logged."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = []
    real_log = wandb.Run.log  # wandb.init rebinds the module-level wandb.log to the run's method

    def recording_log(run, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", recording_log)
    train, val = prompt_files
    out = tmp_path / "run"
    args = base_args(
        tiny_model_path,
        train,
        val,
        out,
        user_backend="rule",
        judge_backend="rule",
        train_n=2,
        eval_n=2,
        eval_every=2,
        wandb=True,
    )
    assert eval_online_sdpo.main(args) == 0
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    train_steps = [step for step, data in logged if "train/loss" in data]
    eval_steps = [step for step, data in logged if "eval/winrate_inc_ties" in data]
    assert train_steps == [1, 2] and eval_steps == [2]
