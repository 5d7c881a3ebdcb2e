"""Collapse diagnostics (sdpo.evaluation.diagnostics) and their panel under the win-rate curve."""

import pytest
import torch

from sdpo.core import pad_contexts_and_completions
from sdpo.evaluation.diagnostics import collapse_diagnostics, distinct_n
from sdpo.evaluation.plots import plot_winrate
from tests.test_online_sdpo_updater import FOLLOW_UP, MESSAGES, fixed_response, make_updater

ANSWERS = ["The sky is blue.", "The sky is grey today.", "Blue."]


def test_distinct_n_by_hand():
    # unigrams: the sky is blue. the sky is grey today. blue. → 10 words, 6 distinct ("blue." and the/sky/is twice)
    assert distinct_n(ANSWERS, 1) == pytest.approx(6 / 10)
    # bigrams: (the sky)(sky is)(is blue.) + (the sky)(sky is)(is grey)(grey today.) → 7, 5 distinct
    assert distinct_n(ANSWERS, 2) == pytest.approx(5 / 7)
    assert distinct_n(["one"], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_diagnostics_of_a_lora_policy_before_and_after_training(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path, use_lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-2)
    conversations = [MESSAGES] * len(ANSWERS)
    before = collapse_diagnostics(updater, conversations, ANSWERS)
    assert before["base_logratio_mean"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: the policy is the base
    tokenizer = updater.tokenizer
    completions = tokenizer([a + tokenizer.eos_token for a in ANSWERS], add_special_tokens=False)["input_ids"]
    batch = pad_contexts_and_completions(
        [updater.encode_context(MESSAGES)] * len(ANSWERS), completions, tokenizer.pad_token_id
    )
    with torch.no_grad():
        keep = batch.completion_width + 1
        logits = (
            updater.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
            )
            .logits[:, -keep:-1]
            .float()
        )
        logprobs = logits.log_softmax(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    mask = batch.completion_mask
    assert before["policy_entropy_mean"] == pytest.approx(float((entropy * mask).sum() / mask.sum()), rel=1e-4)
    assert before["answer_tokens_mean"] == pytest.approx(float(mask.sum()) / len(ANSWERS))
    assert before["distinct_2"] == pytest.approx(distinct_n(ANSWERS, 2))
    for _ in range(3):
        updater.train_step(MESSAGES, fixed_response(updater), FOLLOW_UP)
    after = collapse_diagnostics(updater, conversations, ANSWERS)
    assert after["base_logratio_mean"] != pytest.approx(0.0, abs=1e-4)
    assert updater.model.training  # evaluation mode only while scoring


def test_full_model_live_teacher_reports_no_kl_estimate(tiny_model_path, tmp_path):
    updater = make_updater(tiny_model_path, tmp_path)
    stats = collapse_diagnostics(updater, [MESSAGES], ["Blue."])
    assert "base_logratio_mean" not in stats and stats["policy_entropy_mean"] > 0
    base = make_updater(tiny_model_path, tmp_path / "base", teacher="base")
    assert collapse_diagnostics(base, [MESSAGES], ["Blue."])["base_logratio_mean"] == pytest.approx(0.0, abs=1e-6)


def test_diagnostics_panel_appears_under_the_win_rate_curve(tmp_path):
    history = [
        {"interaction": i, "winrate_a": 50 + i, "se": 3.0, "coverage": 0.9, "n_effective": 20, "n": 20}
        for i in (0, 8, 16)
    ]
    plain = plot_winrate(history, tmp_path / "plain.png", styles=["no_emojis"])
    with_diagnostics = [
        {
            **entry,
            "policy_entropy_mean": 2.0 - i / 20,
            "distinct_2": 0.8,
            "base_logratio_mean": i / 100,
            "answer_tokens_mean": 40,
        }
        for i, entry in zip((0, 8, 16), history)
    ]
    figure = plot_winrate(with_diagnostics, tmp_path / "diag.png", styles=["no_emojis"])
    assert len(plain.axes) == 2 and len(figure.axes) == 4  # win rate, coverage, diagnostics and its length twin
    labels = {line.get_label() for line in figure.axes[2].get_lines()}
    assert {"policy entropy (nats/token)", "distinct-2"} <= labels
    assert (tmp_path / "diag.png").is_file()
