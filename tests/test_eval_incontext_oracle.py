"""auxiliary/eval_incontext_oracle.py: baseline vs persona-prompted answers of one model, judged per style;
the oracle's rendered context really carries the persona; judge flags mapped onto the participants' flags;
scripts/eval_incontext_oracle.sh dry runs."""

import importlib.machinery
import json
import os
import sys

import pytest

from auxiliary import eval_incontext_oracle
from sdpo.chat import backends
from sdpo.personas.participants import build_participants
from sdpo.personas.rule_based_user import RuleBasedJudge
from sdpo.personas.style_judge import LLMStyleJudge
from sdpo.personas.user_simulator import get_persona
from tests.fakes import FakeLLM, install_fake_vllm
from tests.test_eval_checkpoints import METRIC_KEYS, dry_run_argv, values

STYLES = ["short", "no_emojis"]
PROMPTS = ["Why is the sky blue?", "Name three fruits.", "How do I boil an egg?", "What is a hash map?"]


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def cli(model, prompt_file, eval_dir, *extra):
    return [
        "--model",
        model,
        "--val_jsonl",
        str(prompt_file),
        "--eval_n",
        "3",
        "--styles",
        *STYLES,
        "--judge_backend",
        "rule",
        "--max_new_tokens",
        "8",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--eval_dir",
        str(eval_dir),
        *extra,
    ]


@pytest.mark.slow
def test_oracle_against_baseline_per_style(tiny_model_path, chat_tokenizer, prompt_file, tmp_path, monkeypatch):
    contexts = []
    real_generate = backends.generate

    def recording_generate(model, tokenizer, batch, sampling, **kwargs):
        contexts.extend(batch)
        return real_generate(model, tokenizer, batch, sampling, **kwargs)

    monkeypatch.setattr(backends, "generate", recording_generate)
    out = tmp_path / "eval"
    assert eval_incontext_oracle.main(cli(tiny_model_path, prompt_file, out)) == 0

    results = json.loads((out / "incontext_oracle_1.json").read_text())
    assert set(results) == {"meta", "results", "oracle_avg_lens", "oracle_gen_time_s"}
    meta = results["meta"]
    assert meta["method"] == "incontext_oracle" and meta["model"] == tiny_model_path and meta["styles"] == STYLES
    assert (
        meta["eval_n"] == 3
        and meta["seed"] == 1234
        and meta["judge_model"] == "rule-based"
        and meta["baseline_avg_completion_len"] > 0
    )
    assert list(results["results"]) == STYLES and list(results["oracle_avg_lens"]) == STYLES
    for metrics in results["results"].values():
        assert METRIC_KEYS <= set(metrics) and metrics["n"] == 3
        assert metrics["winrate_inc_ties"] == pytest.approx(100 * (metrics["wins_a"] + 0.5 * metrics["ties"]) / 3)

    # What the model was fed: 3 baseline contexts, then 3 per style whose system block is the persona prompt.
    rendered = [chat_tokenizer.decode(ids) for ids in contexts]
    assert len(rendered) == 3 * (1 + len(STYLES))
    assert not any("USER PROFILE" in text for text in rendered[:3])
    for position, style in enumerate(STYLES, start=1):
        system_block = f"<|im_start|>system\n{eval_incontext_oracle.oracle_system_prompt(style)}<|im_end|>"
        for text in rendered[3 * position : 3 * position + 3]:
            assert system_block in text and get_persona(style) in text
            assert text.index(system_block) < text.index("<|im_start|>user")
    other = STYLES[1] if STYLES[0] == "short" else STYLES[0]
    assert get_persona(other) not in rendered[3][: rendered[3].index("<|im_start|>user")]

    completions = json.loads((out / "incontext_oracle_completions_1.json").read_text())
    assert len(completions["prompts"]) == len(completions["baseline"]) == 3
    assert list(completions["oracle"]) == STYLES and all(len(a) == 3 for a in completions["oracle"].values())
    assert get_persona("short") in completions["oracle_system_prompts"]["short"]


@pytest.mark.slow
def test_a_local_hf_judge_model_judges_every_style(tiny_model_path, prompt_file, tmp_path):
    """--judge_backend hf --judge_model <path>: the participants' local-model judge (the random tiny model
    writes no verdict line, so every verdict is unparsed and counted)."""
    out = tmp_path / "eval"
    args = cli(
        tiny_model_path,
        prompt_file,
        out,
        "--judge_model",
        tiny_model_path,
        "--judge_device",
        "cpu",
        "--judge_dtype",
        "float32",
    )
    args[args.index("--judge_backend") + 1] = "hf"
    args[args.index("--eval_n") + 1] = "1"
    assert eval_incontext_oracle.main(args) == 0
    results = json.loads((out / "incontext_oracle_1.json").read_text())
    assert results["meta"]["judge_model"] == tiny_model_path and results["meta"]["judge_backend"] == "hf"
    assert [m["n_unparsed"] for m in results["results"].values()] == [2, 2]


def test_policy_on_a_vllm_engine_on_gen_gpu(tiny_model_path, chat_tokenizer, prompt_file, tmp_path, monkeypatch):
    """--use_vllm: one engine started on --gen_gpu; each pass (baseline, each style) is one engine call."""
    vllm = install_fake_vllm(monkeypatch)
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engines = []

    def start_engine(**kwargs):
        engine = FakeLLM(
            reply=lambda prompt: (
                "Plain answer." if "USER PROFILE" not in chat_tokenizer.decode(prompt["prompt_token_ids"]) else "Short."
            ),
            tokenizer=chat_tokenizer,
        )
        engine.kwargs, engine.visible_devices = kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")
        engines.append(engine)
        return engine

    vllm.LLM = start_engine
    out = tmp_path / "eval"
    assert eval_incontext_oracle.main(cli(tiny_model_path, prompt_file, out, "--use_vllm", "--gen_gpu", "3")) == 0
    (engine,) = engines
    assert engine.visible_devices == "3" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert engine.kwargs["model"] == tiny_model_path and engine.kwargs["tensor_parallel_size"] == 1
    assert [len(prompts) for _, prompts, _, _ in engine.calls] == [3, 3, 3]
    results = json.loads((out / "incontext_oracle_1.json").read_text())
    assert results["meta"]["use_vllm"] is True and results["meta"]["baseline_avg_completion_len"] == len(
        "Plain answer."
    )
    assert results["oracle_avg_lens"] == {style: len("Short.") for style in STYLES}


@pytest.mark.parametrize("backend", ["vllm", "hf", "openai", "anthropic", "rule"])
def test_judge_flags_are_the_participant_flags(backend, prompt_file):
    args, judges = eval_incontext_oracle.parse_arguments(
        [
            "--val_jsonl",
            str(prompt_file),
            "--judge_backend",
            backend,
            "--judge_gpu_start",
            "1",
            "--judge_tp",
            "2",
            "--openai_base_url",
            "http://h/v1",
        ]
    )
    mapped = eval_incontext_oracle.judge_config(args, judges)
    assert mapped.user_styles == ()  # no simulated user
    if backend in ("vllm", "hf"):  # a local judge model = the participants' user-model judge
        assert mapped.judge_backend == "user" and mapped.user_backend == backend
        assert mapped.user_model == "Qwen/Qwen3-32B"
        assert (mapped.user_vllm_gpu_start, mapped.user_vllm_tp) == (1, 2)
    else:
        assert mapped.judge_backend == backend
    if backend != "rule":  # a rule judge has no model
        assert mapped.judge_model == ("claude-haiku-4-5-20251001" if backend == "anthropic" else "Qwen/Qwen3-32B")
    assert mapped.openai_base_url == "http://h/v1"


def test_the_reference_judge_is_the_default(prompt_file):
    args, judges = eval_incontext_oracle.parse_arguments(["--val_jsonl", str(prompt_file)])
    mapped = eval_incontext_oracle.judge_config(args, judges)
    assert (mapped.user_backend, mapped.judge_backend, mapped.user_model) == ("vllm", "user", "Qwen/Qwen3-32B")


@pytest.mark.parametrize(("backend", "judge_type"), [("rule", RuleBasedJudge), ("openai", LLMStyleJudge)])
def test_keyless_judges_build_without_an_anthropic_key(backend, judge_type, prompt_file, monkeypatch):
    """No simulated user is needed: the unused one is built on the judge's backend, so no Claude key is asked for."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    args, judges = eval_incontext_oracle.parse_arguments(
        [
            "--val_jsonl",
            str(prompt_file),
            "--judge_backend",
            backend,
            "--judge_model",
            "served",
            "--openai_base_url",
            "http://h/v1",
            "--styles",
            *STYLES,
        ]
    )
    participants = build_participants(eval_incontext_oracle.judge_config(args, judges))
    assert list(participants.judges) == STYLES and all(isinstance(j, judge_type) for j in participants.judges.values())


def test_unusable_settings_fail_in_one_line_before_any_work(prompt_file, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(eval_incontext_oracle, "load_tokenizer", no_loading)
    args = cli("any-model", prompt_file, tmp_path / "eval")
    args[args.index("--styles") + 1] = "concise_casual_beginner"
    assert eval_incontext_oracle.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rule-based judge cannot check concise_casual_beginner" in err[0]

    monkeypatch.setitem(sys.modules, "vllm", None)  # importlib.util.find_spec("vllm") is None: not installed
    assert eval_incontext_oracle.main(["--model", "any-model", "--val_jsonl", str(prompt_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--judge_backend vllm needs vLLM, which is not installed" in err[0]
    assert not (tmp_path / "eval").exists()


# ---- scripts/eval_incontext_oracle.sh


def test_script_default_is_the_reference_gpu_setup():
    argv = dry_run_argv("eval_incontext_oracle.sh", "--dry-run")
    assert argv[:2] == ["python", "auxiliary/eval_incontext_oracle.py"]
    assert values(argv, "--model") == "Qwen/Qwen3-8B" and values(argv, "--judge_model") == "Qwen/Qwen3-32B"
    assert values(argv, "--judge_backend") == "vllm" and "--use_vllm" in argv and "--styles" not in argv
    assert (values(argv, "--eval_n"), values(argv, "--seed")) == ("100", "1234")
    assert values(argv, "--val_jsonl").endswith("data/tldr_prompts_unique/validation.jsonl")
    assert values(argv, "--eval_dir") == "/tmp/sdpo-test/eval-incontext-oracle/rid"


def test_script_env_overrides_and_extra_arguments(tmp_path):
    env = {
        "MODEL": "Qwen/Qwen3-4B",
        "JUDGE_MODEL": "judge",
        "EVAL_N": "10",
        "STYLES": "no_emojis short",
        "DATA_DIR": "/d",
        "BASE_WORK": str(tmp_path / "work"),
    }
    argv = dry_run_argv(
        "eval_incontext_oracle.sh", "--max_new_tokens", "64", "--dry-run", "--run_name", "with space", env=env
    )
    assert (
        values(argv, "--model") == "Qwen/Qwen3-4B"
        and values(argv, "--judge_model") == "judge"
        and values(argv, "--eval_n") == "10"
    )
    assert (
        values(argv, "--styles", 2) == ["no_emojis", "short"] and values(argv, "--val_jsonl") == "/d/validation.jsonl"
    )
    assert argv[-4:] == ["--max_new_tokens", "64", "--run_name", "with space"]
    assert not (tmp_path / "work").exists(), "dry-run must create nothing"


def test_script_cpu_preset():
    argv = dry_run_argv("eval_incontext_oracle.sh", "--dry-run", env={"PRESET": "cpu"})
    assert values(argv, "--model") == "smollm2-135m-instruct" and values(argv, "--judge_backend") == "rule"
    assert values(argv, "--styles", 3) == ["short", "no_lists", "answer_directly_reduce_formatting"]
    assert values(argv, "--device") == "cpu" and values(argv, "--eval_n") == "16"
    assert values(argv, "--val_jsonl").endswith("data/mtbench_prompts/validation.jsonl")
    assert "--use_vllm" not in argv and "--judge_model" not in argv


@pytest.mark.parametrize("preset", ["", "cpu"])
def test_the_scripts_commands_parse(preset, prompt_file, tmp_path):
    """Both presets' command lines are valid settings (the GPU one keeps the reference's vLLM Qwen3-32B judge)."""
    env = {"PRESET": preset, "DATA_DIR": str(prompt_file.parent), "OUTPUT_DIR": str(tmp_path / "out")}
    argv = dry_run_argv("eval_incontext_oracle.sh", "--dry-run", env=env)
    args, judges = eval_incontext_oracle.parse_arguments(argv[2:])
    mapped = eval_incontext_oracle.judge_config(args, judges)
    if preset == "cpu":
        assert mapped.judge_backend == "rule" and args.device == "cpu"
    else:
        assert (mapped.user_backend, mapped.judge_backend, mapped.user_model) == ("vllm", "user", "Qwen/Qwen3-32B")
        assert args.use_vllm and args.model_name_or_path == "Qwen/Qwen3-8B"
