"""The pre-flight learnability check (--preflight N): verdict lines, what it stores, and that it changes nothing
the run then does."""

import json
import math

import pytest

import eval_online_sdpo
from sdpo.evaluation.evaluation_helpers import compute_metrics
from sdpo.online.preflight import UNRELATED_FOLLOW_UP, signal_summary, verdict_line
from tests.test_style_baselines import switch_args, without_timings


def test_verdict_needs_the_teacher_two_standard_errors_above_even():
    strong = compute_metrics([0] * 70 + [1] * 30, seed=0, n_bootstrap=50)
    weak = compute_metrics([0] * 48 + [1] * 52, seed=0, n_bootstrap=50)
    undecided = compute_metrics([-1] * 8, seed=0, n_bootstrap=50)
    assert verdict_line("short", strong).endswith("70% ± 5 of 100 decided pairs: there is something to distill")
    assert "48% ± 5 of 100 decided pairs: nothing to distill at this size; expect no learning" in verdict_line(
        "short", weak
    )
    assert "decided none of 8" in verdict_line("short", undecided) and math.isnan(undecided["winrate_a"])


def test_signal_summary_pools_tokens():
    import numpy as np

    summary = signal_summary([np.array([-1.0, 1.0]), np.array([-2.0])], [np.array([0.5, 0.0]), np.array([0.1])])
    assert summary == {
        "n_tokens": 3, "mean_abs_relevant": round(4 / 3, 4), "mean_relevant": round(-2 / 3, 4),
        "mean_abs_unrelated": 0.2, "mean_unrelated": 0.2,
    }  # fmt: skip


@pytest.mark.slow
def test_preflight_reports_per_style_and_leaves_the_run_unchanged(tmp_path, prompt_files, tiny_model_path, capsys):
    train, val = prompt_files
    plain = tmp_path / "plain"
    checked = tmp_path / "checked"
    assert eval_online_sdpo.main(switch_args(tiny_model_path, train, val, plain)) == 0
    assert eval_online_sdpo.main([*switch_args(tiny_model_path, train, val, checked), "--preflight", "3"]) == 0
    out = capsys.readouterr().out
    results = json.loads((checked / "unit_1.json").read_text())
    preflight = results["meta"]["preflight"]
    assert set(preflight) == {"short", "no_lists"}
    for style, check in preflight.items():
        assert check["n"] == 3 and check["unrelated_follow_up"] == UNRELATED_FOLLOW_UP
        assert check["verdict"].startswith(f"[pre-flight {style}]") and check["verdict"] in out
        assert check["signals"]["n_tokens"] > 0 and len(check["examples"]) == 3
    # The check only generates and scores: training and evaluation are those of the run without it.
    reference = json.loads((plain / "unit_1.json").read_text())
    assert without_timings(results["training_metrics"]) == without_timings(reference["training_metrics"])
    assert without_timings(results["eval_history"]) == without_timings(reference["eval_history"])


@pytest.mark.slow
def test_preflight_only_trains_nothing_and_needs_a_count(tmp_path, prompt_files, tiny_model_path, capsys):
    train, val = prompt_files
    out = tmp_path / "run"
    assert eval_online_sdpo.main([*switch_args(tiny_model_path, train, val, out), "--preflight_only"]) == 2
    assert "--preflight_only needs --preflight N" in capsys.readouterr().err
    args = [*switch_args(tiny_model_path, train, val, out), "--preflight", "2", "--preflight_only"]
    assert eval_online_sdpo.main(args) == 0
    results = json.loads((out / "unit_1.json").read_text())
    assert results["training_metrics"] == [] and results["eval_history"] == []
    assert set(results["meta"]["preflight"]) == {"short", "no_lists"} and not (out / "checkpoints").exists()
    assert (out / "winrate.png").is_file(), "the plot draws the pre-flight lines"
