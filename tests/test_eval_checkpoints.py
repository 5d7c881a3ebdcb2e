"""auxiliary/eval_checkpoints.py: a full checkpoint and a LoRA adapter (both written by
OnlineSDPOUpdater.save_checkpoint) against a baseline, per judged style; path validation before any work;
the vLLM adapter path on a fake engine; scripts/eval_checkpoints.sh dry runs."""

import importlib.machinery
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from auxiliary import eval_checkpoints
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import OnlineSDPOUpdater
from sdpo.models.generation import Generation, encode_chat
from sdpo.models.model_loading import load_model_and_tokenizer
from tests.fakes import install_fake_vllm

REPO = Path(__file__).resolve().parents[1]
STYLES = ["no_emojis", "short"]
METRIC_KEYS = {
    "n",
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
}
PROBE = [{"role": "user", "content": "Describe the sea."}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_path):
    """One trained step of full fine-tuning and of LoRA, saved by the updater; with each policy's logits on PROBE."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for kind, extra in (("full", {}), ("lora", {"use_lora": True, "lora_r": 4, "lora_alpha": 8})):
        config = OnlineSDPOConfig(
            model_name_or_path=tiny_model_path,
            device="cpu",
            torch_dtype="float32",
            learning_rate=1e-2,
            checkpoint_dir=str(root / kind),
            checkpoint_every_n_steps=0,
            **extra,
        )
        updater = OnlineSDPOUpdater(config)
        ids = updater.tokenizer(" Blue waves everywhere", add_special_tokens=False)["input_ids"] + [
            updater.tokenizer.eos_token_id
        ]
        updater.train_step(
            [{"role": "user", "content": "Name a colour."}],
            Generation(ids, "Blue waves everywhere", finished=True),
            "Shorter.",
        )
        with torch.no_grad():
            logits = updater.model(input_ids=torch.tensor([updater.encode_context(PROBE)])).logits
        made[kind] = (updater.save_checkpoint(), logits)
    return made


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "validation.jsonl"
    prompts = [
        "Why is the sky blue?",
        "Name three fruits.",
        "How do I boil an egg?",
        "What is a hash map?",
        "Write a haiku.",
    ]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def cli(paths, baseline, prompt_file, out_dir, *extra):
    return [
        "--checkpoints",
        *map(str, paths),
        "--baseline_model",
        baseline,
        "--val_jsonl",
        str(prompt_file),
        "--eval_styles",
        *STYLES,
        "--judge_backend",
        "rule",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--eval_max_new_tokens",
        "8",
        "--eval_n",
        "4",
        "--run_name",
        "ck",
        "--out_dir",
        str(out_dir),
        *extra,
    ]


@pytest.mark.slow
def test_full_and_adapter_checkpoints_are_judged_per_style(
    checkpoints, tiny_model_path, prompt_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(
        "ANTHROPIC_API_KEY", raising=False
    )  # a rule judge needs no key (no simulated user is built on Claude)
    full, lora = checkpoints["full"][0], checkpoints["lora"][0]
    out = tmp_path / "eval"
    written = []
    real_write = eval_checkpoints.write_json_atomic

    def recording_write(path, payload):
        if Path(path).name == "ck_1.json":
            written.append([entry["checkpoint"] for entry in payload["results"]])
        real_write(path, payload)

    monkeypatch.setattr(eval_checkpoints, "write_json_atomic", recording_write)
    assert eval_checkpoints.main(cli([full, lora], tiny_model_path, prompt_file, out)) == 0
    assert written == [[], [str(full)], [str(full), str(lora)]], "results must be rewritten after every checkpoint"

    results = json.loads((out / "ck_1.json").read_text())
    assert set(results) == {"meta", "results"}
    meta = results["meta"]
    assert meta["checkpoints"] == [str(full), str(lora)] and meta["baseline_model"] == tiny_model_path
    assert meta["eval_styles"] == STYLES and meta["eval_n"] == 4 and meta["seed"] == 424242
    assert meta["judge_model"] == "rule-based" and meta["use_vllm"] is False and meta["baseline_avg_completion_len"] > 0
    assert [e["kind"] for e in results["results"]] == ["full", "lora_adapter"]
    assert results["results"][1]["base_model"] == tiny_model_path and results["results"][0]["base_model"] is None
    for entry, path in zip(results["results"], [full, lora]):
        assert entry["checkpoint"] == str(path) and entry["checkpoint_name"] == path.name
        assert {"gen_time_s", "load_time_s", "avg_completion_len"} <= set(entry)
        assert list(entry["eval_styles"]) == STYLES
        for metrics in entry["eval_styles"].values():
            assert METRIC_KEYS <= set(metrics)
            assert metrics["n"] == 4 and metrics["wins_a"] + metrics["wins_b"] + metrics["ties"] == 4
            assert metrics["winrate_inc_ties"] == pytest.approx(100 * (metrics["wins_a"] + 0.5 * metrics["ties"]) / 4)
            assert metrics["n_unparsed"] == 0

    completions = json.loads((out / "ck_completions_1.json").read_text())
    assert len(completions["prompts"]) == len(completions["baseline"]) == 4
    assert [c["checkpoint"] for c in completions["checkpoints"]] == [str(full), str(lora)]
    assert all(len(c["completions"]) == 4 for c in completions["checkpoints"])

    table = [line for line in capsys.readouterr().out.splitlines() if "inc_ties=" in line and line.startswith("  ")]
    assert len(table) == 4 and table[0].startswith("  no_emojis" + " " * (40 - len("no_emojis")) + " winrate=")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_loaded_checkpoint_reproduces_the_trained_policy(checkpoints, tiny_model_path, prompt_file, kind):
    path, trained_logits = checkpoints[kind]
    args, _ = eval_checkpoints.parse_arguments(
        [
            "--checkpoints",
            str(path),
            "--baseline_model",
            "b",
            "--val_jsonl",
            str(prompt_file),
            "--run_name",
            "r",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    policy = eval_checkpoints.load_checkpoint_policy(eval_checkpoints.inspect_checkpoint(str(path)), args)
    model, tokenizer = policy.model, policy.tokenizer
    base, _ = load_model_and_tokenizer(tiny_model_path, dtype="float32", device="cpu")
    ids = torch.tensor([encode_chat(tokenizer, PROBE)])
    with torch.no_grad():
        logits, base_logits = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert (base_logits - trained_logits).abs().max() > 1e-3, "the training step should have moved the policy"
    torch.testing.assert_close(logits, trained_logits, atol=1e-5, rtol=1e-5)


def test_a_missing_checkpoint_fails_in_one_line_before_any_work(
    checkpoints, tiny_model_path, prompt_file, tmp_path, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the paths were checked")

    monkeypatch.setattr(eval_checkpoints, "load_tokenizer", no_loading)
    monkeypatch.setattr(eval_checkpoints, "load_policy", no_loading)
    missing = tmp_path / "run" / "checkpoints" / "step_9"
    out = tmp_path / "eval"
    assert eval_checkpoints.main(cli([checkpoints["full"][0], missing], tiny_model_path, prompt_file, out)) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: checkpoint {missing}: no such folder"]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--checkpoints", "{ckpt}", "{ckpt}/../{name}"],
            "error: --checkpoints {ckpt} and {ckpt}/../{name} are the same checkpoint; pass each once",
        ),
        (
            ["--checkpoints", "{ckpt}", "--run_name", "../../x"],
            "error: --run_name '../../x': use letters, digits, '.', '_' and '-' only (it names files inside --out_dir)",
        ),
        (
            ["--checkpoints", "{ckpt}", "--out_dir", "{prompts}/eval"],
            "error: --out_dir {prompts}/eval: {prompts} is a file; pass a folder",
        ),
        (
            ["--checkpoints", "{ckpt}", "--val_jsonl", "{ckpt}/none.jsonl"],
            "error: --val_jsonl {ckpt}/none.jsonl: no such file",
        ),
    ],
    ids=["same checkpoint twice", "run name outside out_dir", "out_dir below a file", "missing prompts"],
)
def test_bad_command_lines_fail_in_one_line_with_status_2_before_any_work(
    checkpoints, prompt_file, tmp_path, monkeypatch, capsys, extra, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the command line was checked")

    monkeypatch.setattr(eval_checkpoints, "load_tokenizer", no_loading)
    monkeypatch.setattr(eval_checkpoints, "load_policy", no_loading)
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoints["full"][0]
    fill = {"ckpt": ckpt, "name": ckpt.name, "prompts": prompt_file}
    argv = [
        "--baseline_model",
        "b",
        "--val_jsonl",
        str(prompt_file),
        "--run_name",
        "r",
        "--judge_backend",
        "rule",
        "--out_dir",
        "eval",
    ]
    assert eval_checkpoints.main(argv + [a.format(**fill) for a in extra]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message.format(**fill)]
    assert not (tmp_path / "eval").exists() and not (tmp_path.parent / "x_1.json").exists()


def test_a_yaml_config_holds_any_setting_and_the_command_line_wins(checkpoints, prompt_file, tmp_path):
    config = tmp_path / "ckpt.yaml"
    config.write_text(
        f"checkpoints: [{checkpoints['full'][0]}, {checkpoints['lora'][0]}]\nbaseline_model: b\nval_jsonl: "
        f"{prompt_file}\n"
        "run_name: from_yaml\neval_n: 7\njudge_backend: rule\njudge_tp: 2\neval_styles: [short, no_lists]\n"
    )
    args, judges = eval_checkpoints.parse_arguments(["--config", str(config), "--eval_n", "3"])
    assert (
        args.checkpoints == [str(checkpoints["full"][0]), str(checkpoints["lora"][0])] and args.run_name == "from_yaml"
    )
    assert args.eval_n == 3 and args.eval_styles == ["short", "no_lists"]
    assert judges.judge_backend == "rule" and judges.user_vllm_tp == 2  # judge_tp: the reference oracle's alias


def test_unusable_checkpoint_folders_are_named_with_the_reason(checkpoints, tmp_path):
    lora = checkpoints["lora"][0]
    run_dir = tmp_path / "run"
    shutil.copytree(lora, run_dir / "checkpoints" / "step_1")
    orphan = tmp_path / "orphan"
    shutil.copytree(lora, orphan)
    settings = json.loads((orphan / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "gone")
    (orphan / "adapter_config.json").write_text(json.dumps(settings))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    cases = {
        str(run_dir): "neither a model folder (config.json) nor a LoRA adapter (adapter_config.json); "
        "checkpoints inside it: checkpoints/step_1",
        str(orphan): f"its base model {tmp_path / 'gone'} (adapter_config.json) does not exist",
        str(weightless): "config.json but no model weights",
        str(lora / "adapter_config.json"): "not a folder",
    }
    with pytest.raises(eval_checkpoints.CheckpointError) as raised:
        eval_checkpoints.inspect_checkpoints(list(cases), use_vllm=False)
    lines = str(raised.value).splitlines()
    assert len(lines) == len(cases)
    for line, (path, reason) in zip(lines, cases.items()):
        assert line.startswith(f"checkpoint {path}: ") and reason in line
    with pytest.raises(eval_checkpoints.CheckpointError, match="is a full model: drop --use_vllm"):
        eval_checkpoints.inspect_checkpoints([str(checkpoints["full"][0])], use_vllm=True)


def test_styles_the_rule_judge_cannot_check_fail_before_any_work(
    checkpoints, tiny_model_path, prompt_file, tmp_path, capsys
):
    args = cli([checkpoints["full"][0]], tiny_model_path, prompt_file, tmp_path / "eval")
    args[args.index("--eval_styles") + 1] = "concise_casual_beginner"
    assert eval_checkpoints.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot check concise_casual_beginner" in err[0]


def test_vllm_engine_serves_every_adapter_and_the_baseline(
    checkpoints, tiny_model_path, chat_tokenizer, prompt_file, tmp_path, monkeypatch
):
    """--use_vllm: one engine on the adapters' base; the baseline without adapter, then each adapter in turn."""
    vllm = install_fake_vllm(monkeypatch)
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    engines = []

    class FakePolicyLLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls = kwargs, []
            engines.append(self)

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            self.calls.append((len(prompts), lora_request))
            output = types.SimpleNamespace(
                token_ids=chat_tokenizer(" Plain answer.", add_special_tokens=False)["input_ids"],
                finish_reason="length",
            )
            return [types.SimpleNamespace(outputs=[output]) for _ in prompts]

    vllm.LLM = FakePolicyLLM
    lora_module = types.ModuleType("vllm.lora.request")
    lora_module.LoRARequest = lambda name, id_, path: (id_, path)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_module)

    first = checkpoints["lora"][0]
    second = tmp_path / "step_2"
    shutil.copytree(first, second)
    out = tmp_path / "eval"
    assert eval_checkpoints.main(cli([first, second], tiny_model_path, prompt_file, out, "--use_vllm")) == 0
    (engine,) = engines
    assert (
        engine.kwargs["enable_lora"]
        and engine.kwargs["max_lora_rank"] == 4
        and engine.kwargs["model"] == tiny_model_path
    )
    assert engine.calls == [(4, None), (4, (1, str(first))), (4, (2, str(second)))]
    results = json.loads((out / "ck_1.json").read_text())
    assert results["meta"]["use_vllm"] is True and len(results["results"]) == 2
    assert results["results"][0]["avg_completion_len"] == len("Plain answer.")


# ---- scripts/eval_checkpoints.sh (helpers shared with tests/test_eval_incontext_oracle.py)

SCRIPT_ENV = {
    "CHECKPOINTS",
    "BASELINE_MODEL",
    "EVAL_STYLES",
    "USER_MODEL",
    "EVAL_N",
    "SEED",
    "DATA_DIR",
    "RUN_NAME",
    "OUTPUT_DIR",
    "PRESET",
    "USE_VLLM",
    "MODEL",
    "JUDGE_MODEL",
    "STYLES",
    "BASE_WORK",
    "SCRATCH",
}


def run_script(script, *args, env=None):
    environment = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    environment.update(TMPDIR="/tmp/sdpo-test", RUN_ID="rid", PYTHON="python", **(env or {}))
    return subprocess.run(
        [str(REPO / "scripts" / script), *args],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def dry_run_argv(script, *args, env=None) -> list[str]:
    result = run_script(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    command = [
        line for line in result.stdout.splitlines() if line.startswith("[dry-run] ") and "BASE_WORK=" not in line
    ]
    assert len(command) == 1, result.stdout
    return shlex.split(command[0][len("[dry-run] ") :])


def values(argv, name, count=1):
    start = argv.index(name) + 1
    return argv[start] if count == 1 else argv[start : start + count]


def test_script_requires_checkpoints_and_baseline():
    result = run_script("eval_checkpoints.sh", "--dry-run")
    assert result.returncode == 1 and "CHECKPOINTS is required" in result.stderr
    result = run_script("eval_checkpoints.sh", "--dry-run", env={"CHECKPOINTS": "a"})
    assert result.returncode == 1 and "BASELINE_MODEL is required" in result.stderr


def test_script_default_is_the_reference_gpu_setup():
    argv = dry_run_argv(
        "eval_checkpoints.sh",
        "--dry-run",
        env={"CHECKPOINTS": "/c/step_3 /c/step_6", "BASELINE_MODEL": "Qwen/Qwen3-8B"},
    )
    assert argv[:2] == ["python", "auxiliary/eval_checkpoints.py"]
    assert (
        values(argv, "--checkpoints", 2) == ["/c/step_3", "/c/step_6"]
        and values(argv, "--baseline_model") == "Qwen/Qwen3-8B"
    )
    assert values(argv, "--eval_styles", 3) == [
        "less_filler_praise_sycophancy",
        "no_emojis",
        "answer_directly_reduce_formatting",
    ]
    assert values(argv, "--user_model_name_or_path") == "Qwen/Qwen3-32B" and {
        "--judge_local",
        "--user_vllm",
        "--use_vllm",
    } <= set(argv)
    assert (values(argv, "--eval_n"), values(argv, "--seed")) == ("100", "424242")
    assert values(argv, "--val_jsonl").endswith("data/helpsteer_prompts/validation.jsonl")
    assert values(argv, "--out_dir") == "/tmp/sdpo-test/eval-checkpoints/rid"


def test_script_env_overrides_and_extra_arguments(tmp_path):
    env = {
        "CHECKPOINTS": "/a",
        "BASELINE_MODEL": "base",
        "EVAL_STYLES": "short",
        "USER_MODEL": "judge",
        "EVAL_N": "7",
        "SEED": "1234",
        "USE_VLLM": "0",
        "BASE_WORK": str(tmp_path / "work"),
    }
    argv = dry_run_argv(
        "eval_checkpoints.sh", "--eval_max_new_tokens", "64", "--dry-run", "--run_name", "with space", env=env
    )
    assert values(argv, "--eval_styles") == "short" and values(argv, "--user_model_name_or_path") == "judge"
    assert (values(argv, "--eval_n"), values(argv, "--seed")) == ("7", "1234") and "--use_vllm" not in argv
    assert argv[-4:] == ["--eval_max_new_tokens", "64", "--run_name", "with space"]
    assert not (tmp_path / "work").exists(), "dry-run must create nothing"


def test_script_cpu_preset():
    argv = dry_run_argv(
        "eval_checkpoints.sh", "--dry-run", env={"PRESET": "cpu", "CHECKPOINTS": "runs/x/checkpoints/step_8"}
    )
    assert values(argv, "--baseline_model") == "smollm2-135m-instruct" and values(argv, "--judge_backend") == "rule"
    assert values(argv, "--eval_styles", 3) == ["short", "no_lists", "answer_directly_reduce_formatting"]
    assert values(argv, "--device") == "cpu" and values(argv, "--eval_n") == "24"
    assert values(argv, "--val_jsonl").endswith("data/mtbench_prompts/validation.jsonl")
    assert not {"--use_vllm", "--user_vllm", "--judge_local"} & set(argv)


@pytest.mark.parametrize("preset", ["", "cpu"])
def test_the_scripts_commands_parse(preset, prompt_file, tmp_path):
    env = {
        "PRESET": preset,
        "CHECKPOINTS": "a b",
        "BASELINE_MODEL": "m",
        "DATA_DIR": str(prompt_file.parent),
        "OUTPUT_DIR": str(tmp_path),
    }
    argv = dry_run_argv("eval_checkpoints.sh", "--dry-run", env=env)
    args, judges = eval_checkpoints.parse_arguments(argv[2:])
    assert args.checkpoints == ["a", "b"] and args.baseline_model == "m"
    if preset == "cpu":
        assert judges.judge_backend == "rule"
    else:
        assert judges.judge_local and judges.user_vllm and judges.user_model_name_or_path == "Qwen/Qwen3-32B"
