"""The paper's online experiments in the loop: batched interactions, persona schedules, the oracle line, and
crash safety (a fault injected at every kind of commit point, then --resume, equals an uninterrupted run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval_online_sdpo
from sdpo.personas.rule_based_user import RuleBasedUserSimulator
from tests.conftest import PROMPTS

REPO = Path(__file__).resolve().parents[1]


def experiment_args(model, train, val, out_dir, *extra):
    return [
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
        "6",
        "--eval_max_new_tokens",
        "6",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--user_backend",
        "rule",
        "--judge_backend",
        "rule",
        "--train_n",
        "4",
        "--eval_n",
        "2",
        "--eval_every",
        "2",
        "--interactions_per_step",
        "2",
        "--style_schedule",
        "short:2,no_lists:2",
        "--oracle",
        *extra,
    ]


@pytest.mark.slow
def test_batched_schedule_with_the_oracle(tmp_path, prompt_files, tiny_model_path, monkeypatch):
    asked = []
    real_feedback = RuleBasedUserSimulator.generate_feedback

    def recording_feedback(simulator, prompts, completions, rewards=None):
        asked.append((simulator.style, len(prompts)))
        return real_feedback(simulator, prompts, completions)

    monkeypatch.setattr(RuleBasedUserSimulator, "generate_feedback", recording_feedback)
    train, val = prompt_files
    out = tmp_path / "run"
    assert eval_online_sdpo.main(experiment_args(tiny_model_path, train, val, out)) == 0
    results = json.loads((out / "unit_1.json").read_text())

    records = results["training_metrics"]
    assert [r["interaction"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records] == [1, 1, 2, 2], "a batch of 2 over 4 interactions is 2 optimizer steps"
    assert [r["style"] for r in records] == ["short", "short", "no_lists", "no_lists"]
    assert asked == [("short", 2), ("no_lists", 2)], "one simulator call per batch, with the scheduled persona"
    assert records[0]["loss"] == records[1]["loss"] and records[0]["batch_size"] == 2

    meta = results["meta"]
    assert meta["judged_styles"] == ["short", "no_lists"] and meta["settings"]["interactions_per_step"] == 2
    assert meta["switch_points"] == [[2, "no_lists"]]
    assert [e["interaction"] for e in results["eval_history"]] == [2, 4]
    assert all(
        "winrate_inc_ties" in e and "winrate_inc_ties" in e["secondary_no_lists"] for e in results["eval_history"]
    )
    assert set(meta["oracle"]) == {"short", "no_lists"}
    assert all({"winrate_a", "se", "coverage", "n_effective"} <= set(m) for m in meta["oracle"].values())
    oracle_answers = json.loads((out / "oracle_completions.json").read_text())["completions"]
    assert set(oracle_answers) == {"short", "no_lists"} and all(len(a) == 2 for a in oracle_answers.values())
    assert (out / "winrate.png").stat().st_size > 0


def test_bad_schedules_fail_before_any_work(tmp_path, prompt_files, capsys):
    train, val = prompt_files
    for schedule, message in (
        ("short:2,pirate:3", "unknown style 'pirate'"),
        ("short", 'is not "style:N"'),
        ("short:0", "N >= 1"),
    ):
        returned = eval_online_sdpo.main(
            experiment_args("no-such-model", train, val, tmp_path / "x", "--style_schedule", schedule)
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert returned == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


# ---- crash safety: a fault at the k-th commit point (tests/fault_injection.py), then --resume


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.endswith("time_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _run(argv, env, check=True):
    result = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _results(out: Path) -> dict:
    return _without_timings(json.loads((out / "unit_1.json").read_text()))


@pytest.mark.slow
def test_faults_at_commit_points_then_resume_equal_an_uninterrupted_run(tmp_path, prompt_files, tiny_model_path):
    train, val = prompt_files
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    injector = [str(REPO / "tests" / "fault_injection.py")]
    reference = _run(
        [
            *injector,
            "0",
            "SIGKILL",
            "--",
            "eval_online_sdpo.py",
            *experiment_args(tiny_model_path, train, val, tmp_path / "ref"),
        ],
        env,
    )
    n_points = int(reference.stderr.rsplit("commit points: ", 1)[1].split()[0])
    expected = _results(tmp_path / "ref")
    # Every sixth commit point with SIGKILL, two with SIGINT (Ctrl-C: exit 130 with a one-line hint).
    faults = [(k, "SIGKILL") for k in range(1, n_points + 1, 6)] + [(k, "SIGINT") for k in (3, n_points // 2)]
    for k, signal_name in faults:
        out = tmp_path / f"{signal_name}_{k}"
        faulted = _run(
            [
                *injector,
                str(k),
                signal_name,
                "--",
                "eval_online_sdpo.py",
                *experiment_args(tiny_model_path, train, val, out),
            ],
            env,
            check=False,
        )
        assert faulted.returncode in (-9, 130, 0), faulted.stderr[-2000:]
        if signal_name == "SIGINT" and faulted.returncode == 130:
            assert "Traceback" not in faulted.stderr and "--resume" in faulted.stderr
        kept = _results(out)["training_metrics"] if (out / "unit_1.json").is_file() else []
        assert kept == expected["training_metrics"][: len(kept)], (
            f"fault {signal_name} at commit point {k} changed finished interactions"
        )
        if (out / "run_state.json").is_file():
            _run(["eval_online_sdpo.py", "--resume", "--out_dir", str(out)], env)
        else:  # stopped before the run existed: a plain restart
            _run(["eval_online_sdpo.py", *experiment_args(tiny_model_path, train, val, out)], env)
        resumed = _results(out)
        assert resumed["training_metrics"][: len(kept)] == kept, (
            f"--resume rewrote finished interactions (fault at {k})"
        )
        assert resumed == expected, (
            f"fault {signal_name} at commit point {k}: the resumed run differs from an uninterrupted one"
        )


@pytest.mark.slow
def test_conversational_prompt_files_and_the_tldr_system_prompt(
    tmp_path, prompt_files, tiny_model_path, chat_tokenizer, monkeypatch
):
    from sdpo.models import generation

    seen = []
    real_generate = generation.generate

    def recording_generate(model, tokenizer, contexts, sampling, **kwargs):
        seen.extend(chat_tokenizer.decode(c) for c in contexts)
        return real_generate(model, tokenizer, contexts, sampling, **kwargs)

    monkeypatch.setattr("sdpo.learner.updater.generate", recording_generate)
    _, val = prompt_files
    train = tmp_path / "chat.jsonl"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    train.write_text(
        "".join(json.dumps({"messages": [*history, {"role": "user", "content": p}]}) + "\n" for p in PROMPTS)
    )
    out = tmp_path / "run"
    args = experiment_args(tiny_model_path, train, val, out, "--system_prompt", "tldr")
    assert eval_online_sdpo.main(args) == 0
    records = json.loads((out / "unit_1.json").read_text())["training_metrics"]
    assert all(r["prompt"] in PROMPTS for r in records), "the simulated user reads the last user turn"
    training_contexts = [text for text in seen if "Hello!" in text]
    assert training_contexts and all(eval_online_sdpo.SYSTEM_PROMPTS["tldr"] in text for text in training_contexts)
    oracle_contexts = [text for text in seen if "USER PROFILE" in text]
    assert oracle_contexts and all(eval_online_sdpo.SYSTEM_PROMPTS["tldr"] in text for text in oracle_contexts)
