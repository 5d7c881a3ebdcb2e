"""The signal analysis: cases-file validation, signals against independent forward passes, the
output schema and figures of a full run on a tiny model, skipped short answers, bad input reported in
one line before the model loads, and the shell script. The figures themselves: tests/test_plots.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from auxiliary import sdpo_signal_analysis as analysis
from sdpo.core import build_hindsight_messages, pad_contexts_and_completions, score_completions
from sdpo.evaluation.signal_plots import SIGNAL_HEATMAP_FILES
from sdpo.models.generation import Generation, SamplingParams, encode_chat

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASE_KEYS = {
    "name",
    "tag",
    "raw_prompt",
    "unrelated_followup",
    "followup_message",
    "completion_text",
    "n_tokens",
    "completion_token_ids",
    "completion_tokens",
    "sig_unrel",
    "sig_follow",
    "attempts",
    "finished",
}
META_KEYS = {
    "model",
    "seed",
    "max_new_tokens",
    "temperature",
    "do_sample",
    "min_y_tokens",
    "cases_json",
    "hindsight_variant",
}
HEATMAPS = ("unrelated.png", "followup.png", "stacked.png", "side_by_side.png")
assert SIGNAL_HEATMAP_FILES == HEATMAPS  # the file names users rely on


def case_entry(case_id: str, tag: str, prompt: str, unrelated: str, feedback: str) -> dict:
    return dict(zip(analysis.CASE_FIELDS, (case_id, tag, prompt, unrelated, feedback)))


def small_cases_file(tmp_path, *, short_marker: str | None = None, mark_both: bool = False) -> Path:
    """Two prompt pairs; with ``short_marker``, the second pair's prompt contains it (both with ``mark_both``)."""
    second_prompt = f"Describe a sunrise. {short_marker}" if short_marker else "Describe a sunrise."
    first_prompt = f"Write a short email. {short_marker}" if mark_both else "Write a short email."
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
            case_entry("mail_keep", "reinforce", first_prompt, "What is 3+4?", "Keep it casual."),
            case_entry("mail_formal", "constrain", first_prompt, "Is it sunny?", "Make it formal."),
            case_entry("sun_keep", "reinforce", second_prompt, "Who won?", "More colour words."),
            case_entry("sun_plain", "constrain", second_prompt, "How tall is it?", "No adjectives."),
        ],
    }
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def cli_args(model_path: str, cases_json: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--model",
        model_path,
        "--cases_json",
        str(cases_json),
        "--out_dir",
        str(out_dir),
        "--n_cases",
        "4",
        "--seed",
        "5",
        "--max_new_tokens",
        "10",
        "--min_y_tokens",
        "4",
        "--max_retries",
        "2",
        "--max_cols",
        "20",
        "--token_n",
        "6",
        *extra,
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
    assert "2 problem(s)" in message and "bad.json" in message and "\n" not in message


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


def test_unreadable_cases_file_fails_with_its_path_and_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "version": "1.2",\n  not json', encoding="utf-8")
    with pytest.raises(analysis.CaseFileError, match=r"broken.json:3: not valid JSON \(Expecting .* at column 3\)"):
        analysis.load_cases_file(broken)
    with pytest.raises(analysis.CaseFileError, match="does not exist"):
        analysis.load_cases_file(tmp_path / "missing.json")


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
    config = analysis.parse_args([])
    assert (config.model, config.cases_json, config.out_dir, config.n_cases, config.seed) == (
        "m",
        Path("c.json"),
        Path("o"),
        7,
        9,
    )
    assert analysis.parse_args(["--n_cases", "2"]).n_cases == 2
    for name in ("MODEL", "CASES_JSON", "OUT_DIR", "N_CASES", "SEED"):
        monkeypatch.delenv(name)
    config = analysis.parse_args([])
    figures = config.figures
    assert config.model == "Qwen/Qwen3-8B" and (
        config.n_cases,
        config.seed,
        figures.max_cols,
        figures.token_case_index,
    ) == (24, 123, 120, 1)
    assert config.cases_json == REPO_ROOT / "auxiliary" / "signal_analysis_cases.json"
    assert (figures.vmin, figures.vmax, figures.token_n, config.min_y_tokens, config.max_retries) == (-15, 3, 15, 80, 6)
    assert config.hindsight_variant == "online" and config.max_new_tokens is None and config.temperature is None
    assert config.output_files() == ["sdpo_signals.json", "summary.json", *HEATMAPS, "case1_tokens.png"]


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("variant", ["online", "offline_v1", "offline_assistant"])
def test_batched_signals_equal_differences_of_separate_scorer_calls(tiny_model, chat_tokenizer, variant):
    prompt, unrelated, feedback = "Write a haiku about rain.", "What time is it in Oslo?", "Too long, use fewer words."
    completion = chat_tokenizer("Grey clouds gather slow,\nsoft drops tap the window", add_special_tokens=False)[
        "input_ids"
    ]
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
        unpadded = independent_logprobs(tiny_model, teacher, completion) - independent_logprobs(
            tiny_model, student, completion
        )
        np.testing.assert_allclose(signal, unpadded.numpy(), atol=1e-4)
    assert np.abs(sig_follow - sig_unrel).max() > 1e-3  # the two follow-ups really give different contexts


def test_greedy_sampling_gets_one_attempt_and_short_answers_are_not_accepted(tiny_model, chat_tokenizer):
    context = encode_chat(chat_tokenizer, [{"role": "user", "content": "Hi"}])
    for sampling, expected_attempts in ((SamplingParams(3, temperature=0.0), 1), (SamplingParams(3), 3)):
        (answer,) = analysis.sample_long_answers(
            tiny_model, chat_tokenizer, [context], sampling, min_tokens=5, max_retries=2, batch_size=4
        )
        assert answer.attempts == expected_attempts and not answer.accepted and len(answer.generation.token_ids) == 3


def test_statistics():
    stats = analysis.signal_statistics(np.array([0.1, -0.1, 0.2]), np.array([-2.0, 1.0, -3.0]))
    assert stats["n_tokens"] == 3
    assert stats["mean_abs_unrel"] == pytest.approx(0.4 / 3) and stats["mean_unrel"] == pytest.approx(0.2 / 3)
    assert stats["mean_abs_follow"] == pytest.approx(2.0) and stats["mean_follow"] == pytest.approx(-4 / 3)
    assert stats["abs_ratio_unrel_to_follow"] == pytest.approx(0.4 / 6)
    assert stats["mean_abs_follow_minus_unrel"] == pytest.approx((2.1 + 1.1 + 3.2) / 3)
    assert stats["corr_unrel_follow"] == pytest.approx(np.corrcoef([0.1, -0.1, 0.2], [-2.0, 1.0, -3.0])[0, 1])
    assert np.isnan(analysis.signal_statistics(np.zeros(3), np.ones(3))["corr_unrel_follow"])


# ------------------------------------------------------------------ full runs on the tiny model


@pytest.mark.slow
def test_full_run_writes_the_schema_the_summary_and_every_figure(tiny_model_path, tmp_path, capsys):
    out_dir = tmp_path / "out"
    cases_json = small_cases_file(tmp_path)
    # float32: the signals are compared with a float32 recomputation (auto is bf16 on CPUs that compute it natively)
    argv = cli_args(tiny_model_path, cases_json, out_dir, "--token_case_index", "2", "--dtype", "float32")
    assert analysis.main(argv) == 0
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
    from sdpo.models.model_loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_path, dtype="float32", device="cpu")
    case = result["cases"][0]
    messages = [{"role": "user", "content": case["raw_prompt"]}]
    ids = case["completion_token_ids"]
    student = independent_logprobs(model, encode_chat(tokenizer, messages), ids)
    teacher_context = encode_chat(tokenizer, build_hindsight_messages(messages, case["followup_message"]))
    teacher = independent_logprobs(model, teacher_context, ids)
    np.testing.assert_allclose(case["sig_follow"], (teacher - student).numpy(), atol=1e-4)


SHORT_MARKER = "SHORT-ANSWER-CASE"


@pytest.fixture()
def cut_marked_answers(monkeypatch) -> list[int]:
    """Real generation, with answers to prompts containing ``SHORT_MARKER`` cut to 2 tokens; returns the
    number of contexts of each generate call."""
    real_generate = analysis.generate
    calls = []

    def generate_cutting_marked_prompts(model, tokenizer, contexts, sampling, **kwargs):
        calls.append(len(contexts))
        generations = real_generate(model, tokenizer, contexts, sampling, **kwargs)
        return [
            Generation(g.token_ids[:2], tokenizer.decode(g.token_ids[:2]), finished=False)
            if SHORT_MARKER in tokenizer.decode(context)
            else g
            for context, g in zip(contexts, generations)
        ]

    monkeypatch.setattr(analysis, "generate", generate_cutting_marked_prompts)
    return calls


@pytest.mark.slow
def test_a_case_that_stays_short_is_skipped_and_reported(tiny_model_path, tmp_path, capsys, cut_marked_answers):
    out_dir = tmp_path / "out"
    cases_json = small_cases_file(tmp_path, short_marker=SHORT_MARKER)
    assert analysis.main(cli_args(tiny_model_path, cases_json, out_dir, "--token_case_index", "9")) == 0
    console = capsys.readouterr().out

    result = json.loads((out_dir / "sdpo_signals.json").read_text())
    kept, skipped = result["cases"], result["skipped"]
    assert kept and skipped and len(kept) + len(skipped) == 4
    assert all(s["name"].startswith("sun_") for s in skipped) and all(c["name"].startswith("mail_") for c in kept)
    assert all(s["attempts"] == 3 and s["longest_n_tokens"] == 2 for s in skipped)  # 1 try + 2 retries
    assert cut_marked_answers == [4, len(skipped), len(skipped)]  # only the short cases are resampled
    for entry in skipped:
        assert f"skipped {entry['name']}" in console
    assert json.loads((out_dir / "summary.json").read_text())["skipped"] == skipped
    assert "--token_case_index 9 is outside" in console
    assert all((out_dir / name).is_file() for name in HEATMAPS) and not (out_dir / "case9_tokens.png").exists()


@pytest.mark.slow
def test_when_every_case_is_too_short_the_run_reports_and_exits_1(
    tiny_model_path, tmp_path, capsys, cut_marked_answers
):
    out_dir = tmp_path / "out"
    cases_json = small_cases_file(tmp_path, short_marker=SHORT_MARKER, mark_both=True)
    assert analysis.main(cli_args(tiny_model_path, cases_json, out_dir)) == 1
    assert "no case reached 4 tokens" in capsys.readouterr().out
    result = json.loads((out_dir / "sdpo_signals.json").read_text())
    assert result["cases"] == [] and len(result["skipped"]) == 4
    assert not any(out_dir.glob("*.png"))


# ------------------------------------------------------------------ bad input: one line, exit 2, before the model loads


def _cases_with(tmp_path, edit) -> Path:
    data = json.loads(small_cases_file(tmp_path).read_text())
    edit(data)
    return _write(tmp_path, data)


def _write_bytes(tmp_path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _make_file(path: Path) -> Path:
    path.write_text("not a folder", encoding="utf-8")
    return path


def _make_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# (id, setup(tmp_path) -> {flag: value} overriding cli_args, extra argv, expected part of the error line)
BAD_INPUTS = [
    ("out_dir is a file", lambda t: {"--out_dir": _make_file(t / "out")}, [], "out is a file; pass a folder"),
    ("out_dir below a file", lambda t: {"--out_dir": _make_file(t / "f") / "out"}, [], "f is a file; pass a folder"),
    (
        "an output file name is a folder",
        lambda t: {"--out_dir": _make_folder(t / "out" / "summary.json").parent},
        [],
        "summary.json is a folder where an output file goes",
    ),
    ("cases file missing", lambda t: {"--cases_json": t / "nope.json"}, [], "nope.json does not exist"),
    (
        "cases file is a folder",
        lambda t: {"--cases_json": _make_folder(t / "cases")},
        [],
        "is a folder; pass the JSON file",
    ),
    (
        "cases file not UTF-8",
        lambda t: {"--cases_json": _write_bytes(t, "latin1.json", '{"version": "caf\xe9"}'.encode("latin-1"))},
        [],
        "latin1.json is not UTF-8 text (byte 0xe9 at offset 16)",
    ),
    (
        "cases file not JSON",
        lambda t: {"--cases_json": _write_bytes(t, "b.json", b"{\n\n  oops")},
        [],
        "b.json:3: not valid JSON",
    ),
    (
        "case field missing",
        lambda t: {"--cases_json": _cases_with(t, lambda d: d["cases"][2].pop("feedback_followup"))},
        [],
        "case 2 ('sun_keep'): missing field 'feedback_followup'",
    ),
    (
        "defaults field of the wrong type",
        lambda t: {"--cases_json": _cases_with(t, lambda d: d["defaults"].update(max_new_tokens="ten"))},
        [],
        "defaults: 'max_new_tokens' must be a positive integer, got 'ten'",
    ),
    ("max_new_tokens below min_y_tokens", lambda t: {"--max_new_tokens": 3}, [], "every case would be skipped"),
    ("temperature nan", lambda t: {}, ["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ("vmin -inf", lambda t: {}, ["--vmin=-inf"], "need finite --vmin < 0 < --vmax"),
    ("vmax below zero", lambda t: {}, ["--vmax", "-1"], "need finite --vmin < 0 < --vmax"),
    ("batch size 0", lambda t: {}, ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("token_case_index 0", lambda t: {}, ["--token_case_index", "0"], "--token_case_index must be >= 1, got 0"),
    ("negative seed", lambda t: {"--seed": -1}, [], "--seed must be in 0..2**32-1, got -1"),
    ("n_cases not a number", lambda t: {"--n_cases": "many"}, [], "argument --n_cases: invalid int value: 'many'"),
    (
        "unknown hindsight variant",
        lambda t: {},
        ["--hindsight_variant", "h9"],
        "argument --hindsight_variant: invalid choice",
    ),
    ("unknown device", lambda t: {}, ["--device", "tpu9"], "--device 'tpu9' is not a device"),
    pytest.param(
        "CUDA without a GPU",
        lambda t: {},
        ["--device", "cuda"],
        "no CUDA device is visible",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible"),
    ),
    ("model path missing", lambda t: {"--model": t / "no-model"}, [], "could not load model"),
]


def _main_exit_code(argv: list[str]) -> int:
    try:
        return analysis.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


@pytest.mark.parametrize("name, setup, extra, expected", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_one_line_exit_2_before_the_model_loads(
    tiny_model_path, tmp_path, capsys, name, setup, extra, expected
):
    argv = cli_args(tiny_model_path, small_cases_file(tmp_path), tmp_path / "out")
    for flag, value in setup(tmp_path).items():
        argv[argv.index(flag) + 1] = str(value)
    assert _main_exit_code(argv + extra) == 2  # an exception escaping main (a traceback) fails the test
    captured = capsys.readouterr()
    assert re.fullmatch(r"(\S+: )?error: [^\n]+\n", captured.err), captured.err  # one line; argparse's name the program
    assert expected in captured.err
    assert "model " not in captured.out  # printed only once a model has loaded
    assert not list(tmp_path.rglob("sdpo_signals.json")) and not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_the_script_file_reports_a_bad_out_dir_in_one_line_without_traceback(tmp_path):
    out_file = _make_file(tmp_path / "results")
    result = subprocess.run(
        [
            sys.executable,
            "auxiliary/sdpo_signal_analysis.py",
            "--out_dir",
            str(out_file),
            "--model",
            str(tmp_path / "none"),
        ],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: --out_dir {out_file} is a file; pass a folder\n"
    assert out_file.read_text() == "not a folder"


# ------------------------------------------------------------------ shell script


def test_script_dry_run_prints_the_command_and_creates_nothing(tmp_path):
    env = {
        **os.environ,
        "BASE_WORK": str(tmp_path),
        "MODEL": "my/model",
        "N_CASES": "3",
        "SEED": "7",
        "RUN_ID": "run1",
        "PYTHON": "python3",
    }
    for name in ("OUT_DIR", "CASES_JSON", "REPO_ROOT"):
        env.pop(name, None)
    result = subprocess.run(
        [
            str(REPO_ROOT / "scripts" / "run_signal_analysis.sh"),
            "--max_new_tokens",
            "64",
            "--dry-run",
            "--token_n",
            "9",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    command = next(line for line in result.stdout.splitlines() if line.startswith("[dry-run] python3"))
    expected = (
        f"[dry-run] python3 auxiliary/sdpo_signal_analysis.py --model my/model --cases_json "
        f"{REPO_ROOT}/auxiliary/signal_analysis_cases.json --out_dir {tmp_path}/signal-analysis/run1 "
        "--n_cases 3 --seed 7 --max_new_tokens 64 --token_n 9"
    )
    assert command == expected
    assert not (tmp_path / "signal-analysis").exists()
