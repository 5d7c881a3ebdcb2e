"""The signal analysis: cases-file validation, signals against independent forward passes, the
output schema and figures of a full run on a tiny model, skipped short answers, and the shell script."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from auxiliary import sdpo_signal_analysis as analysis
from auxiliary.generation import Generation, SamplingParams, encode_chat
from sdpo_core import (
    build_hindsight_messages,
    pad_contexts_and_completions,
    score_completions,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASE_KEYS = {
    "name", "tag", "raw_prompt", "unrelated_followup", "followup_message", "completion_text", "n_tokens",
    "completion_token_ids", "completion_tokens", "sig_unrel", "sig_follow", "attempts", "finished",
}
META_KEYS = {"model", "seed", "max_new_tokens", "temperature", "do_sample", "min_y_tokens", "cases_json", "hindsight_variant"}
HEATMAPS = ("unrelated.png", "followup.png", "stacked.png", "side_by_side.png")


def case_entry(case_id: str, tag: str, prompt: str, unrelated: str, feedback: str) -> dict:
    return dict(zip(analysis.CASE_FIELDS, (case_id, tag, prompt, unrelated, feedback)))


def small_cases_file(tmp_path, *, short_marker: str | None = None) -> Path:
    """Two prompt pairs; with ``short_marker``, the second pair's prompt contains it."""
    second_prompt = f"Describe a sunrise. {short_marker}" if short_marker else "Describe a sunrise."
    data = {
        "version": "1.2",
        "description": "test cases",
        "defaults": {
            "max_new_tokens": 8,
            "temperature": 1.0,
            "do_sample": True,
            "variant_suffix_pool": ["Be brief.", "Be long."],
        },
        "cases": [
            case_entry("mail_keep", "reinforce", "Write a short email.", "What is 3+4?", "Keep it casual."),
            case_entry("mail_formal", "constrain", "Write a short email.", "Is it sunny?", "Make it formal."),
            case_entry("sun_keep", "reinforce", second_prompt, "Who won?", "More colour words."),
            case_entry("sun_plain", "constrain", second_prompt, "How tall is it?", "No adjectives."),
        ],
    }
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def cli_args(model_path: str, cases_json: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", model_path, "--cases_json", str(cases_json), "--out_dir", str(out_dir), "--n_cases", "4", "--seed", "5",
        "--max_new_tokens", "10", "--min_y_tokens", "4", "--max_retries", "2", "--max_cols", "20", "--token_n", "6", *extra,
    ]


def independent_logprobs(model, context_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log π(y_t | context, y_<t) from one unpadded forward pass over context ⊕ y (no sdpo_core code)."""
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + completion_ids])).logits[0].float()
    predictions = logits[len(context_ids) - 1 : -1]
    return torch.log_softmax(predictions, dim=-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


# ------------------------------------------------------------------ cases file


def test_shipped_cases_file_is_valid_and_pairs_every_prompt():
    data = analysis.load_cases_file(analysis.DEFAULT_CASES_JSON)
    cases = data["cases"]
    assert len(cases) >= 14 and len(data["defaults"]["variant_suffix_pool"]) >= 3
    tags_by_prompt: dict[str, list[str]] = {}
    for case in cases:
        tags_by_prompt.setdefault(case["raw_prompt"], []).append(case["tag"])
        assert case["unrelated_followup"] != case["feedback_followup"]
    assert all(sorted(tags) == ["constrain", "reinforce"] for tags in tags_by_prompt.values())
    assert len(tags_by_prompt) >= 7


def _write(tmp_path, data) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_missing_case_field_names_the_case_and_the_field(tmp_path):
    data = json.loads(small_cases_file(tmp_path).read_text())
    del data["cases"][2]["feedback_followup"]
    del data["cases"][3]["id"]
    with pytest.raises(analysis.CaseFileError) as error:
        analysis.load_cases_file(_write(tmp_path, data))
    message = str(error.value)
    assert "case 2 ('sun_keep'): missing field 'feedback_followup'" in message
    assert "case 3 (no id): missing field 'id'" in message
    assert "2 problem(s)" in message and "bad.json" in message


def test_wrong_top_level_keys_and_defaults_are_reported(tmp_path):
    data = json.loads(small_cases_file(tmp_path).read_text())
    data["prompts"] = data.pop("cases")
    data["defaults"]["temperature"] = -1
    del data["defaults"]["do_sample"]
    message = "\n".join(analysis.validate_cases(data))
    assert "missing top-level key 'cases'" in message
    assert "unknown top-level key 'prompts'" in message
    assert "defaults: missing field 'do_sample'" in message
    assert "'temperature' must be a number >= 0" in message
    assert analysis.validate_cases([1, 2]) and "top level must be an object" in analysis.validate_cases([1, 2])[0]


def test_bad_tag_empty_field_and_duplicate_id_are_reported(tmp_path):
    data = json.loads(small_cases_file(tmp_path).read_text())
    data["cases"][1]["tag"] = "polite"
    data["cases"][0]["unrelated_followup"] = "  "
    data["cases"][3]["id"] = "mail_keep"
    data["cases"][2]["polarity"] = "+"
    problems = analysis.validate_cases(data)
    assert "case 1 ('mail_formal'): tag 'polite' is not one of reinforce, constrain" in problems
    assert "case 0 ('mail_keep'): field 'unrelated_followup' must be a non-empty string" in problems
    assert "case 3 ('mail_keep'): duplicate id" in problems
    assert any(p.startswith("case 2 ('sun_keep'): unknown field 'polarity'") for p in problems)


def test_unreadable_cases_file_fails_with_its_path(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(analysis.CaseFileError, match="broken.json is not valid JSON"):
        analysis.load_cases_file(broken)
    with pytest.raises(analysis.CaseFileError, match="does not exist"):
        analysis.load_cases_file(tmp_path / "missing.json")
    assert analysis.main(["--cases_json", str(broken), "--model", "unused"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_case_sampling_is_seeded_with_replacement_and_appends_a_suffix(tmp_path):
    data = analysis.load_cases_file(small_cases_file(tmp_path))
    first = analysis.sample_cases(data["cases"], data["defaults"]["variant_suffix_pool"], 12, seed=3)
    assert first == analysis.sample_cases(data["cases"], data["defaults"]["variant_suffix_pool"], 12, seed=3)
    assert first != analysis.sample_cases(data["cases"], data["defaults"]["variant_suffix_pool"], 12, seed=4)
    assert [c.name[-4:] for c in first] == [f"_v{i:02d}" for i in range(12)]
    by_id = {c["id"]: c for c in data["cases"]}
    for case in first:
        base = by_id[case.name[:-4]]
        assert case.tag == base["tag"] and case.feedback_followup == base["feedback_followup"]
        assert case.prompt in (f"{base['raw_prompt']} Be brief.", f"{base['raw_prompt']} Be long.")
    assert len({c.name[:-4] for c in first}) < 12  # drawn with replacement


def test_env_vars_are_the_cli_fallbacks(monkeypatch):
    for name, value in {"MODEL": "m", "CASES_JSON": "c.json", "OUT_DIR": "o", "N_CASES": "7", "SEED": "9"}.items():
        monkeypatch.setenv(name, value)
    args = analysis.parse_args([])
    assert (args.model, args.cases_json, args.out_dir, args.n_cases, args.seed) == ("m", "c.json", "o", 7, 9)
    assert analysis.parse_args(["--n_cases", "2"]).n_cases == 2
    for name in ("MODEL", "CASES_JSON", "OUT_DIR", "N_CASES", "SEED"):
        monkeypatch.delenv(name)
    args = analysis.parse_args([])
    assert args.model == "Qwen/Qwen3-8B" and (args.n_cases, args.seed, args.max_cols, args.token_case_index) == (24, 123, 120, 1)
    assert Path(args.cases_json) == REPO_ROOT / "auxiliary" / "signal_analysis_cases.json"
    assert (args.vmin, args.vmax, args.token_n, args.min_y_tokens, args.max_retries) == (-15, 3, 15, 80, 6)
    assert args.hindsight_variant == "online"


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("variant", ["online", "offline_v1", "offline_assistant"])
def test_batched_signals_equal_differences_of_separate_scorer_calls(tiny_model, chat_tokenizer, variant):
    prompt, unrelated, feedback = "Write a haiku about rain.", "What time is it in Oslo?", "Too long, use fewer words."
    completion = chat_tokenizer("Grey clouds gather slow,\nsoft drops tap the window", add_special_tokens=False)["input_ids"]
    sig_unrel, sig_follow = analysis.score_case_signals(
        tiny_model, chat_tokenizer, prompt, completion, unrelated, feedback, hindsight_variant=variant
    )
    assert sig_unrel.dtype == np.float32 and sig_unrel.shape == sig_follow.shape == (len(completion),)

    messages = [{"role": "user", "content": prompt}]
    student = encode_chat(chat_tokenizer, messages)

    def scored_alone(context):
        batch = pad_contexts_and_completions([context], [completion], chat_tokenizer.pad_token_id)
        with torch.no_grad():
            return score_completions(tiny_model, batch).logprobs[0]

    for signal, follow_up in ((sig_unrel, unrelated), (sig_follow, feedback)):
        teacher = encode_chat(chat_tokenizer, build_hindsight_messages(messages, follow_up, variant=variant))
        expected = scored_alone(teacher) - scored_alone(student)
        np.testing.assert_allclose(signal, expected.numpy(), atol=1e-4)
        unpadded = independent_logprobs(tiny_model, teacher, completion) - independent_logprobs(tiny_model, student, completion)
        np.testing.assert_allclose(signal, unpadded.numpy(), atol=1e-4)
    assert np.abs(sig_follow - sig_unrel).max() > 1e-3  # the two follow-ups really give different contexts


def test_greedy_sampling_gets_one_attempt_and_short_answers_are_not_accepted(tiny_model, chat_tokenizer):
    context = encode_chat(chat_tokenizer, [{"role": "user", "content": "Hi"}])
    for sampling, expected_attempts in ((SamplingParams(3, temperature=0.0), 1), (SamplingParams(3), 3)):
        (answer,) = analysis.sample_long_answers(
            tiny_model, chat_tokenizer, [context], sampling, min_tokens=5, max_retries=2, batch_size=4
        )
        assert answer.attempts == expected_attempts and not answer.accepted and len(answer.generation.token_ids) == 3


def test_statistics_and_matrix_helpers():
    stats = analysis.signal_statistics(np.array([0.1, -0.1, 0.2]), np.array([-2.0, 1.0, -3.0]))
    assert stats["n_tokens"] == 3
    assert stats["mean_abs_unrel"] == pytest.approx(0.4 / 3) and stats["mean_unrel"] == pytest.approx(0.2 / 3)
    assert stats["mean_abs_follow"] == pytest.approx(2.0) and stats["mean_follow"] == pytest.approx(-4 / 3)
    assert stats["abs_ratio_unrel_to_follow"] == pytest.approx(0.4 / 6)
    assert stats["mean_abs_follow_minus_unrel"] == pytest.approx((2.1 + 1.1 + 3.2) / 3)
    assert stats["corr_unrel_follow"] == pytest.approx(np.corrcoef([0.1, -0.1, 0.2], [-2.0, 1.0, -3.0])[0, 1])
    assert np.isnan(analysis.signal_statistics(np.zeros(3), np.ones(3))["corr_unrel_follow"])
    matrix = analysis.signal_matrix([[-20.0, 5.0, 1.0], [0.5]], max_cols=2, vmin=-15, vmax=3)
    np.testing.assert_array_equal(matrix[0], [-15.0, 3.0])
    assert matrix[1, 0] == 0.5 and np.isnan(matrix[1, 1])


def test_token_display_text_glyphs():
    assert analysis.token_display_text("\n\n") == (0, "⏎⏎")
    assert analysis.token_display_text("\t") == (0, "⇥")
    assert analysis.token_display_text("   ") == (0, "␠")
    assert analysis.token_display_text("  ", space_glyph="␣") == (0, "␣")
    assert analysis.token_display_text("") == (0, "∅")
    assert analysis.token_display_text("  Hello") == (2, "Hello")
    assert analysis.token_display_text("\n world") == (0, "⏎ world")


# ------------------------------------------------------------------ full runs on the tiny model


def test_full_run_writes_the_schema_the_summary_and_every_figure(tiny_model_path, tmp_path, capsys):
    out_dir = tmp_path / "out"
    cases_json = small_cases_file(tmp_path)
    assert analysis.main(cli_args(tiny_model_path, cases_json, out_dir, "--token_case_index", "2")) == 0
    console = capsys.readouterr().out
    assert "all cases (pooled tokens)" in console and "ratio" in console

    result = json.loads((out_dir / "sdpo_signals.json").read_text())
    assert set(result) == {"meta", "cases", "skipped"} and result["skipped"] == []
    assert META_KEYS <= set(result["meta"])
    assert result["meta"]["hindsight_variant"] == "online" and result["meta"]["min_y_tokens"] == 4
    assert result["meta"]["max_new_tokens"] == 10 and result["meta"]["do_sample"] is True
    assert len(result["cases"]) == 4
    for case in result["cases"]:
        assert set(case) == CASE_KEYS
        n = case["n_tokens"]
        assert 4 <= n <= 10
        lengths = [len(case[key]) for key in ("completion_token_ids", "completion_tokens", "sig_unrel", "sig_follow")]
        assert lengths == [n] * 4
        assert all(np.isfinite(case["sig_unrel"])) and all(np.isfinite(case["sig_follow"]))

    summary = json.loads((out_dir / "summary.json").read_text())
    assert {"per_case", "overall", "by_tag", "skipped"} <= set(summary) and len(summary["per_case"]) == 4
    pooled = np.concatenate([case["sig_unrel"] for case in result["cases"]])
    assert summary["overall"]["mean_abs_unrel"] == pytest.approx(np.abs(pooled).mean(), rel=1e-5)

    for name in (*HEATMAPS, "case2_tokens.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name

    # The stored signals match unpadded forward passes of the saved model on the stored ids.
    from auxiliary.model_loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_path, dtype="float32", device="cpu")
    case = result["cases"][0]
    messages = [{"role": "user", "content": case["raw_prompt"]}]
    ids = case["completion_token_ids"]
    student = independent_logprobs(model, encode_chat(tokenizer, messages), ids)
    teacher_context = encode_chat(tokenizer, build_hindsight_messages(messages, case["followup_message"]))
    teacher = independent_logprobs(model, teacher_context, ids)
    np.testing.assert_allclose(case["sig_follow"], (teacher - student).numpy(), atol=1e-4)


def test_a_case_that_stays_short_is_skipped_and_reported(tiny_model_path, tmp_path, capsys, monkeypatch):
    marker = "SHORT-ANSWER-CASE"
    real_generate = analysis.generate
    calls = []

    def generate_cutting_marked_prompts(model, tokenizer, contexts, sampling, **kwargs):
        calls.append(len(contexts))
        generations = real_generate(model, tokenizer, contexts, sampling, **kwargs)
        return [
            Generation(g.token_ids[:2], tokenizer.decode(g.token_ids[:2]), finished=False)
            if marker in tokenizer.decode(context) else g
            for context, g in zip(contexts, generations)
        ]

    monkeypatch.setattr(analysis, "generate", generate_cutting_marked_prompts)
    out_dir = tmp_path / "out"
    cases_json = small_cases_file(tmp_path, short_marker=marker)
    assert analysis.main(cli_args(tiny_model_path, cases_json, out_dir, "--token_case_index", "9")) == 0
    console = capsys.readouterr().out

    result = json.loads((out_dir / "sdpo_signals.json").read_text())
    kept, skipped = result["cases"], result["skipped"]
    assert kept and skipped and len(kept) + len(skipped) == 4
    assert all(s["name"].startswith("sun_") for s in skipped) and all(c["name"].startswith("mail_") for c in kept)
    assert all(s["attempts"] == 3 and s["longest_n_tokens"] == 2 for s in skipped)  # 1 try + 2 retries
    assert calls == [4, len(skipped), len(skipped)]  # only the short cases are resampled
    for entry in skipped:
        assert f"skipped {entry['name']}" in console
    assert json.loads((out_dir / "summary.json").read_text())["skipped"] == skipped
    assert "--token_case_index 9 is outside" in console
    assert all((out_dir / name).is_file() for name in HEATMAPS) and not (out_dir / "case9_tokens.png").exists()


def test_when_every_case_is_too_short_the_run_reports_and_exits_1(tiny_model_path, tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = cli_args(tiny_model_path, small_cases_file(tmp_path), out_dir)
    args[args.index("--max_new_tokens") + 1] = "3"
    assert analysis.main(args) == 1
    console = capsys.readouterr().out
    assert "every case will be skipped" in console and "no case reached 4 tokens" in console
    result = json.loads((out_dir / "sdpo_signals.json").read_text())
    assert result["cases"] == [] and len(result["skipped"]) == 4
    assert not any(out_dir.glob("*.png"))


# ------------------------------------------------------------------ shell script


def test_script_dry_run_prints_the_command_and_creates_nothing(tmp_path):
    env = {
        **os.environ, "BASE_WORK": str(tmp_path), "MODEL": "my/model", "N_CASES": "3", "SEED": "7", "RUN_ID": "run1",
        "PYTHON": "python3",
    }
    for name in ("OUT_DIR", "CASES_JSON", "REPO_ROOT"):
        env.pop(name, None)
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "run_signal_analysis.sh"), "--max_new_tokens", "64", "--dry-run", "--token_n", "9"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    command = next(line for line in result.stdout.splitlines() if line.startswith("[dry-run] python3"))
    expected = (
        f"[dry-run] python3 auxiliary/sdpo_signal_analysis.py --model my/model --cases_json "
        f"{REPO_ROOT}/auxiliary/signal_analysis_cases.json --out_dir {tmp_path}/signal-analysis/run1 "
        "--n_cases 3 --seed 7 --max_new_tokens 64 --token_n 9"
    )
    assert command == expected
    assert not (tmp_path / "signal-analysis").exists()
