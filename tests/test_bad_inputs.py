"""Bad input to the online loop, checkpoint evaluation and the oracle: one line saying what and where, a
non-zero exit, no traceback, nothing left behind that blocks a rerun, and no model loaded first."""

import gzip
import json
import shutil

import pytest

import eval_online_sdpo
from auxiliary import eval_checkpoints, eval_incontext_oracle
from sdpo.data.interaction_schema import interactions_from_row
from sdpo.utils import env_file


@pytest.fixture()
def files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    wrong_field = tmp_path / "wrong_field.jsonl"
    wrong_field.write_text('{"question": "no prompt field"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    found = {
        "good": good,
        "broken": broken,
        "latin1": latin1,
        "wrong_field": wrong_field,
        "a_file": a_file,
        "dir": tmp_path,
    }
    user, assistant = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    prompt_files = {
        "array": json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=1),
        "one_line_array": json.dumps([{"prompt": "a"}, {"prompt": "b"}]),
        "blank_prompt": '{"prompt": "a"}\n{"prompt": "  \\t "}\n',
        "ends_with_assistant": json.dumps({"messages": [user, assistant]}),
        "starts_with_assistant": json.dumps({"messages": [assistant, user]}),
        "unknown_role": json.dumps({"messages": [{"role": "bot", "content": "x"}, user]}),
    }
    for name, text in prompt_files.items():
        found[name] = tmp_path / f"{name}.jsonl"
        found[name].write_text(text + "\n")
    found["gzip"] = tmp_path / "gzip.jsonl"
    found["gzip"].write_bytes(gzip.compress(good.read_bytes()))
    found["float_batch_yaml"] = tmp_path / "float_batch.yaml"
    found["float_batch_yaml"].write_text("interactions_per_step: 2.5\n")
    # run folders to --resume: a truncated state, a state of the wrong shape, a results file of the wrong shape
    settings = {"run_name": "bad", "train_jsonl": str(good), "val_jsonl": str(good), "user_backend": "rule",
                "judge_backend": "rule", "style": "short", "model_name_or_path": "no-such-model-anywhere"}  # fmt: skip
    complete = json.dumps({"settings": settings, "index": 1, "eval_dir": "."})
    for name, state, results in (
        ("truncated_state", '{"settings": {"run_na', None),
        ("wrong_state", json.dumps({"settings": [], "index": "1", "eval_dir": "."}), None),
        ("wrong_results", complete, '{"meta": {}, "training_metrics": {"interaction": 1}, "eval_history": []}'),
        ("truncated_results", complete, '{"meta": {}, "training_met'),
        ("wrong_setting", json.dumps({"settings": {**settings, "train_n": "ten"}, "index": 1, "eval_dir": "."}), None),
    ):  # fmt: skip
        found[name] = tmp_path / name
        found[name].mkdir()
        (found[name] / "run_state.json").write_text(state)
        if results is not None:
            (found[name] / "bad_1.json").write_text(results)
    return found


def online(files, *extra, train=None, out=None):
    return [
        "--model",
        "no-such-model-anywhere",
        "--train_jsonl",
        str(train or files["good"]),
        "--val_jsonl",
        str(files["good"]),
        "--out_dir",
        str(out or files["dir"] / "run"),
        "--run_name",
        "bad",
        "--user_backend",
        "rule",
        "--judge_backend",
        "rule",
        "--style",
        "short",
        "--device",
        "cpu",
        *extra,
    ]


# (arguments builder, exit code, text the one error line must contain)
ONLINE_CASES = {
    "run name leaves the run dir": (lambda f: online(f, "--run_name", "../x"), 2, "--run_name '../x'"),
    "infinite learning rate": (lambda f: online(f, "--lr", "inf"), 2, "--learning_rate must be a finite number > 0"),
    "negative learning rate": (lambda f: online(f, "--lr=-1e-5"), 2, "--learning_rate must be a finite number > 0"),
    "zero interactions": (lambda f: online(f, "--train_n", "0"), 2, "--train_n must be >= 1"),
    "zero batch": (lambda f: online(f, "--interactions_per_step", "0"), 2, "--interactions_per_step must be >= 1"),
    "unknown style": (lambda f: online(f, "--style", "pirate"), 2, "unknown style 'pirate'"),
    "unknown eval style": (lambda f: online(f, "--eval_styles", "no_lists", "pirate"), 2, "unknown style 'pirate'"),
    "bad schedule": (lambda f: online(f, "--style_schedule", "short:ten"), 2, 'is not "style:N"'),
    "prompt file missing": (lambda f: online(f, train=f["dir"] / "missing.jsonl"), 2, "missing.jsonl: no such file"),
    "folder as prompt file": (lambda f: online(f, train=f["dir"]), 2, "is a folder, not a file"),
    "output folder is a file": (lambda f: online(f, out=f["a_file"]), 2, "is a file; pass a folder"),
    "negative temperature": (lambda f: online(f, "--temperature=-1"), 2, "--temperature must be a finite number >= 0"),
    "rule user cannot check the style": (
        lambda f: online(f, "--style", "poetic"),
        1,
        "rule-based user cannot check poetic",
    ),
    "local user without a model": (lambda f: online(f, "--user_backend", "hf"), 1, "needs --user_model_name_or_path"),
    "openai without a server": (
        lambda f: online(f, "--user_backend", "openai", "--user_model_name_or_path", "m", "--openai_base_url", ""),
        1,
        "needs --openai_base_url",
    ),
    "vllm not installed": (lambda f: online(f, "--use_vllm"), 1, "--use_vllm needs vLLM"),
    "8-bit AdamW without bitsandbytes": (
        lambda f: online(f, "--optim", "adamw_8bit"),
        2,
        "--optim adamw_8bit needs bitsandbytes",
    ),
    "unloadable model": (lambda f: online(f), 1, "no-such-model-anywhere"),
    # found before any model loads (the model named cannot load: a check after loading would say so instead)
    "prompt file is a JSON array": (
        lambda f: online(f, train=f["array"]),
        1,
        "array.jsonl: a JSON array spread over lines; prompt files are JSON Lines",
    ),
    "prompt file is a one-line JSON array": (
        lambda f: online(f, train=f["one_line_array"]),
        1,
        "one_line_array.jsonl:1: expected a JSON object with a 'prompt' field, got a JSON array",
    ),
    "whitespace-only prompt": (
        lambda f: online(f, train=f["blank_prompt"]),
        1,
        "blank_prompt.jsonl:2: field 'prompt' is empty",
    ),
    "conversation ends with the assistant": (
        lambda f: online(f, train=f["ends_with_assistant"]),
        1,
        "ends_with_assistant.jsonl:1: field 'messages' must end with a non-empty user message",
    ),
    "conversation starts with the assistant": (
        lambda f: online(f, train=f["starts_with_assistant"]),
        1,
        "starts_with_assistant.jsonl:1: field 'messages' must start with a user message",
    ),
    "unknown role": (
        lambda f: online(f, train=f["unknown_role"]),
        1,
        "unknown_role.jsonl:1: field 'messages[0]' has speaker 'bot'",
    ),
    "gzip prompt file": (lambda f: online(f, train=f["gzip"]), 1, "gzip.jsonl: gzip-compressed; decompress it first"),
    "bad validation prompt file": (
        lambda f: [*online(f), "--val_jsonl", str(f["array"])],
        1,
        "array.jsonl: a JSON array",
    ),
    "missing local user model": (
        lambda f: online(f, "--user_backend", "hf", "--user_model_name_or_path", "./no/user"),
        1,
        "--user_model_name_or_path ./no/user: does not exist",
    ),
    "missing local judge model": (
        lambda f: online(
            f,
            "--user_backend",
            "hf",
            "--judge_backend",
            "user",
            "--user_model_name_or_path",
            "/no/judge",
            "--style",
            "poetic",
        ),
        1,
        "--user_model_name_or_path /no/judge: does not exist",
    ),
    "missing baseline model": (
        lambda f: online(f, "--baseline_model", "./no/baseline"),
        1,
        "--baseline_model ./no/baseline: does not exist",
    ),
    "missing local policy model": (
        lambda f: [*online(f), "--model", "/no/policy"],
        1,
        "--model_name_or_path /no/policy: does not exist",
    ),
    "batch larger than the training prompts": (
        lambda f: online(f, "--interactions_per_step", "8"),
        1,
        "--interactions_per_step 8 exceeds the 4 training interactions",
    ),
    "batch larger than --train_n": (
        lambda f: online(f, "--interactions_per_step", "3", "--train_n", "2"),
        1,
        "--interactions_per_step 3 exceeds the 2 training interactions",
    ),
    "float batch size in YAML": (
        lambda f: online(f, "--config", str(f["float_batch_yaml"])),
        2,
        "interactions_per_step must be a whole number, got 2.5",
    ),
    "output folder below a file": (lambda f: online(f, out=f["a_file"] / "run"), 2, "a_file is a file; pass a folder"),
    "output folder not writable": (
        lambda f: online(f, out="/sys/sdpo-bad-input-run"),
        1,
        "--out_dir /sys/sdpo-bad-input-run cannot be written",
    ),
    "resume a truncated run_state.json": (
        lambda f: ["--resume", "--out_dir", str(f["truncated_state"])],
        1,
        "run_state.json cannot be read (JSONDecodeError",
    ),
    "resume a run_state.json of the wrong shape": (
        lambda f: ["--resume", "--out_dir", str(f["wrong_state"])],
        1,
        "run_state.json: not the shape this run writes",
    ),
    "resume a results file of the wrong shape": (
        lambda f: ["--resume", "--out_dir", str(f["wrong_results"])],
        1,
        "bad_1.json: 'training_metrics' is not a list of records",
    ),
    "resume a truncated results file": (
        lambda f: ["--resume", "--out_dir", str(f["truncated_results"])],
        1,
        "bad_1.json cannot be read (JSONDecodeError",
    ),
    "resume a run_state.json with a setting of the wrong type": (
        lambda f: ["--resume", "--out_dir", str(f["wrong_setting"])],
        1,
        "run_state.json: the stored settings no longer hold",
    ),
    "new run over a truncated results file": (
        lambda f: online(f, out=f["truncated_results"]),
        1,
        "bad_1.json cannot be read",
    ),
}


@pytest.mark.parametrize("case", sorted(ONLINE_CASES))
def test_online_bad_input(case, files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build, code, message = ONLINE_CASES[case]
    try:
        returned = eval_online_sdpo.main(build(files))
    except SystemExit as exited:
        returned = exited.code
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert returned == code, err[-2000:]
    assert "Traceback" not in err and len(error_lines) == 1 and message in error_lines[0], err[-2000:]


def test_online_binary_env_file_is_one_line(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(env_file, "REPOSITORY_ROOT", tmp_path)
    (tmp_path / ".env").write_bytes(gzip.compress(b"OPENAI_API_KEY=x\n"))
    assert eval_online_sdpo.main(online(files)) == 2
    err = capsys.readouterr().err
    assert (
        err.count("error") == 1
        and ".env: not UTF-8 text (byte 0x8b at offset 1); write it as NAME=value lines" in err
        and "Traceback" not in err
    )


def test_a_completion_labelled_user_is_refused():
    row = {"prompt": [{"role": "user", "content": "Hi"}], "completion": {"role": "user", "content": "Hello"},
           "user_response": {"role": "user", "content": "Shorter."}}  # fmt: skip
    with pytest.raises(ValueError, match="field 'completion' must be an assistant message"):
        interactions_from_row(row)
    row["completion"] = {"content": "Hello"}  # no speaker: the field says who speaks
    assert interactions_from_row(row)[0].completion.role == "assistant"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", "broken.jsonl:2: not valid JSON"),
        ("latin1", "latin1.jsonl:2: not UTF-8 text"),
        ("wrong_field", "wrong_field.jsonl:1: no 'prompt' field"),
    ],
)
@pytest.mark.slow
def test_online_bad_prompt_files_name_the_line(name, message, files, tiny_model_path, capsys):
    args = online(files, train=files[name], out=files["dir"] / name)
    args[1] = tiny_model_path
    assert eval_online_sdpo.main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    # The failed start leaves nothing that blocks a corrected rerun in the same folder.
    args[args.index("--train_jsonl") + 1] = str(files["good"])
    assert (
        eval_online_sdpo.main(
            [
                *args,
                "--train_n",
                "1",
                "--eval_n",
                "1",
                "--max_new_tokens",
                "4",
                "--eval_max_new_tokens",
                "4",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_resume_without_a_complete_checkpoint_never_restarts_over_finished_work(files, tiny_model_path, capsys):
    out = files["dir"] / "run"
    args = online(
        files,
        "--train_n",
        "2",
        "--eval_n",
        "1",
        "--max_new_tokens",
        "4",
        "--eval_max_new_tokens",
        "4",
        "--dtype",
        "float32",
        out=out,
    )
    args[1] = tiny_model_path
    assert eval_online_sdpo.main(args) == 0
    results = (out / "bad_1.json").read_text()
    (out / "checkpoints" / "last" / "training_state.pt").unlink()  # a partial checkpoint
    assert eval_online_sdpo.main(["--resume", "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "checkpoints/last is missing or incomplete, so the 2 finished interactions" in err and "Traceback" not in err
    assert (out / "bad_1.json").read_text() == results, "the finished interactions must stay untouched"
    assert eval_online_sdpo.main(args) == 1
    assert "already holds a run" in capsys.readouterr().err


def folder_bytes(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_copied_run_folder_resumes_in_the_copy_and_leaves_the_original_untouched(files, tiny_model_path, monkeypatch):
    original, copy = files["dir"] / "original", files["dir"] / "copy"
    args = online(files, "--train_n", "4", "--eval_n", "1", "--eval_every", "2", "--resume_every", "2",
    "--max_new_tokens", "4", "--eval_max_new_tokens", "4", "--dtype", "float32", out=original)  # fmt: skip
    args[1] = tiny_model_path
    record_evaluation = eval_online_sdpo.OnlineRun.record_evaluation
    evaluations = []

    def interrupted_at_the_second_evaluation(self, *arguments):
        evaluations.append(arguments[-1])
        if len(evaluations) == 2:
            raise KeyboardInterrupt
        record_evaluation(self, *arguments)

    with monkeypatch.context() as patch:
        patch.setattr(eval_online_sdpo.OnlineRun, "record_evaluation", interrupted_at_the_second_evaluation)
        assert eval_online_sdpo.main(args) == 130
    shutil.copytree(original, copy)
    before = folder_bytes(original)
    assert json.loads((copy / "run_state.json").read_text())["eval_dir"] == ".", "files are found from --out_dir"

    assert eval_online_sdpo.main(["--resume", "--out_dir", str(copy)]) == 0
    assert folder_bytes(original) == before, "resuming the copy must not touch the original"
    resumed = json.loads((copy / "bad_1.json").read_text())
    assert [m["interaction"] for m in resumed["training_metrics"]] == [1, 2, 3, 4]
    assert [e["interaction"] for e in resumed["eval_history"]] == [2, 4]
    assert eval_online_sdpo.main(["--resume", "--out_dir", str(original)]) == 0, "the original still resumes"
    untimed = [{k: v for k, v in m.items() if not k.endswith("time_s")} for m in resumed["training_metrics"]]
    original_records = json.loads((original / "bad_1.json").read_text())["training_metrics"]
    assert [{k: v for k, v in m.items() if not k.endswith("time_s")} for m in original_records] == untimed


CHECKPOINT_CASES = {
    "missing checkpoint": (["--checkpoints", "{dir}/nope"], "checkpoint {dir}/nope: no such folder"),
    "file as checkpoint": (["--checkpoints", "{a_file}"], "not a folder"),
    "unknown style": (["--checkpoints", "{dir}", "--eval_styles", "pirate"], "unknown style 'pirate'"),
    "rule judge cannot check": (
        ["--checkpoints", "{dir}", "--eval_styles", "poetic"],
        "rule-based judge cannot check poetic",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_evaluation_bad_input(case, files, tmp_path, capsys):
    extra, message = CHECKPOINT_CASES[case]
    fill = {"dir": tmp_path, "a_file": files["a_file"]}
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("")
    argv = [a.format(**fill) for a in extra] + [
        "--baseline_model",
        "no-such-model",
        "--val_jsonl",
        str(files["good"]),
        "--run_name",
        "r",
        "--judge_backend",
        "rule",
        "--out_dir",
        str(tmp_path / "eval"),
    ]
    try:
        returned = eval_checkpoints.main(argv)
    except SystemExit as exited:
        returned = exited.code
    err = capsys.readouterr().err
    assert returned in (1, 2) and "Traceback" not in err and message.format(**fill) in err, err
    assert not (tmp_path / "eval").exists()


ORACLE_CASES = {
    "unknown style": (["--styles", "pirate"], "unknown style 'pirate'"),
    "rule judge cannot check": (["--styles", "poetic"], "rule-based judge cannot check poetic"),
    "openai judge without a server": (
        ["--judge_backend", "openai", "--openai_base_url", ""],
        "needs --openai_base_url",
    ),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_oracle_bad_input(case, files, tmp_path, capsys):
    extra, message = ORACLE_CASES[case]
    argv = [
        "--model",
        "no-such-model",
        "--val_jsonl",
        str(files["good"]),
        "--judge_backend",
        "rule",
        "--eval_dir",
        str(tmp_path / "eval"),
        *extra,
    ]
    try:
        returned = eval_incontext_oracle.main(argv)
    except SystemExit as exited:
        returned = exited.code
    err = capsys.readouterr().err
    assert returned in (1, 2) and "Traceback" not in err and message in err, err
    assert not (tmp_path / "eval").exists()
