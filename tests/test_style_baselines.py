"""--style_baseline introduced (paper Fig. 6): a style entering the schedule is judged against the policy of its
introduction, from then on; earlier styles keep their own baselines; --eval_at_start adds the point at 0; and a
kill around the switch followed by --resume equals an uninterrupted run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval_online_sdpo
from sdpo.evaluation.evaluation_helpers import judge_against_baseline
from sdpo.personas.rule_based_user import RuleBasedJudge

REPO = Path(__file__).resolve().parents[1]


# fmt: off
def switch_args(model, train, val, out_dir, *extra):
    return [
        "--model", model, "--train_jsonl", str(train), "--val_jsonl", str(val), "--out_dir", str(out_dir),
        "--run_name", "unit", "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "6",
        "--eval_max_new_tokens", "6", "--lr", "1e-3", "--seed", "3",
        "--user_backend", "rule", "--judge_backend", "rule",
        "--train_n", "6", "--eval_n", "2", "--eval_every", "0", "--interactions_per_step", "2",
        "--style_schedule", "short:4,no_lists:4", "--style_baseline", "introduced", "--eval_at_start", *extra,
    ]
# fmt: on


def without_timings(value):
    """``value`` without timings, NaN as None (as the results file stores it)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith("time_s")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_a_style_introduced_later_is_judged_against_the_policy_at_its_introduction(
    tmp_path, prompt_files, tiny_model_path, monkeypatch
):
    judged = []  # (style, baseline answers) of every judging, in order
    real_judge_every_style = eval_online_sdpo.judge_every_style

    def recording(judges, prompts, completions, baseline, **kwargs):
        judged.extend((style, list(baseline)) for style in judges)
        return real_judge_every_style(judges, prompts, completions, baseline, **kwargs)

    monkeypatch.setattr(eval_online_sdpo, "judge_every_style", recording)
    train, val = prompt_files
    out = tmp_path / "run"
    assert eval_online_sdpo.main(switch_args(tiny_model_path, train, val, out)) == 0
    results = json.loads((out / "unit_1.json").read_text())
    history = results["eval_history"]
    # 0: --eval_at_start; 4: no_lists enters (its first point); 6: the end (the fixture has 6 prompts).
    assert [e["interaction"] for e in history] == [0, 4, 6]
    assert "secondary_no_lists" not in history[0] and all("secondary_no_lists" in e for e in history[1:])
    baselines = results["meta"]["style_baselines"]
    assert baselines["short"] == {"style": "short", "interaction": 0, "step": 0, "file": "baseline_completions.json"}
    assert baselines["no_lists"] == {
        "style": "no_lists",
        "interaction": 4,
        "step": 2,
        "file": "baseline_completions_no_lists.json",
    }
    base = json.loads((out / "baseline_completions.json").read_text())["completions"]
    taken = json.loads((out / baselines["no_lists"]["file"]).read_text())
    assert taken["interaction"] == 4 and len(taken["completions"]) == 2
    # The policy after 2 updates answers differently from the untrained one (lr 1e-3 on a tiny model).
    assert taken["completions"] != base
    assert judged == [
        ("short", base),  # interaction 0
        ("short", base),
        ("no_lists", taken["completions"]),  # interaction 4
        ("short", base),
        ("no_lists", taken["completions"]),  # interaction 6
    ]
    # The stored metrics are those of the judge against that baseline.
    completions = {c["interaction"]: c["current"] for c in json.loads((out / "unit_completions_1.json").read_text())}
    mine = judge_against_baseline(
        RuleBasedJudge("no_lists"), taken["prompts"], completions[4], taken["completions"], seed=3
    )
    stored = history[1]["secondary_no_lists"]
    assert without_timings(mine) == without_timings(stored)


@pytest.mark.slow
def test_base_is_the_default_and_judges_every_style_from_the_start(tmp_path, prompt_files, tiny_model_path):
    train, val = prompt_files
    out = tmp_path / "run"
    args = switch_args(tiny_model_path, train, val, out)
    args[args.index("--style_baseline") + 1] = "base"
    assert eval_online_sdpo.main(args) == 0
    results = json.loads((out / "unit_1.json").read_text())
    assert [e["interaction"] for e in results["eval_history"]] == [0, 6]
    assert all("secondary_no_lists" in e for e in results["eval_history"])
    assert {r["interaction"] for r in results["meta"]["style_baselines"].values()} == {0}
    assert not (out / "baseline_completions_no_lists.json").exists()


def comparable(results: dict) -> dict:
    """``results`` without the settings that differ between a run and its resumed copy by construction."""
    settings = {k: v for k, v in results["meta"]["settings"].items() if k not in ("out_dir", "resume")}
    return {**results, "meta": {**results["meta"], "settings": settings}}


def _run(argv, env, check=True):
    result = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_kill_at_the_switch_then_resume_equals_an_uninterrupted_run(tmp_path, prompt_files, tiny_model_path):
    train, val = prompt_files
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    injector = [str(REPO / "tests" / "fault_injection.py")]
    log = tmp_path / "commit_points.txt"
    reference_args = switch_args(tiny_model_path, train, val, tmp_path / "ref")
    _run([*injector, "0", "SIGKILL", "--", "eval_online_sdpo.py", *reference_args], {**env, "FAULT_LOG": str(log)})
    expected = without_timings(json.loads((tmp_path / "ref" / "unit_1.json").read_text()))
    points = log.read_text().splitlines()
    # The switch: from the write of no_lists' baseline to the checkpoint that covers it (the next rename of a
    # checkpoint folder after it), every commit point.
    first = next(i for i, path in enumerate(points) if "baseline_completions_no_lists" in path)
    last = next(
        i for i in range(first, len(points)) if "checkpoints" in points[i] and "training_state" not in points[i]
    )
    # 1-based commit points: the baseline's fsync and rename, the next write, the checkpoint's rename and just after.
    for k in sorted({first + 1, first + 2, first + 3, last + 1, last + 2}):
        out = tmp_path / f"kill_{k}"
        args = switch_args(tiny_model_path, train, val, out)
        faulted = _run([*injector, str(k), "SIGKILL", "--", "eval_online_sdpo.py", *args], env, check=False)
        assert faulted.returncode in (-9, 0), faulted.stderr[-2000:]
        _run(["eval_online_sdpo.py", "--resume", "--out_dir", str(out)], env)
        resumed = without_timings(json.loads((out / "unit_1.json").read_text()))
        assert comparable(resumed) == comparable(expected), (
            f"kill at commit point {k} ({points[k - 1]}): the resumed run differs"
        )
