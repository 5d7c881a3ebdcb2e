"""Bad input to the online loop, checkpoint evaluation and the oracle: one line saying what and where, a
non-zero exit, no traceback, nothing left behind that blocks a rerun, and no model loaded first."""

import json

import pytest

import eval_online_sdpo
from auxiliary import eval_checkpoints, eval_incontext_oracle


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
    return {"good": good, "broken": broken, "latin1": latin1, "wrong_field": wrong_field, "a_file": a_file, "dir": tmp_path}


def online(files, *extra, train=None, out=None):
    return [
        "--model", "no-such-model-anywhere", "--train_jsonl", str(train or files["good"]), "--val_jsonl", str(files["good"]),
        "--out_dir", str(out or files["dir"] / "run"), "--run_name", "bad", "--user_backend", "rule", "--judge_backend", "rule",
        "--style", "short", "--device", "cpu", *extra,
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
    "rule user cannot check the style": (lambda f: online(f, "--style", "poetic"), 1, "rule-based user cannot check poetic"),
    "local user without a model": (lambda f: online(f, "--user_backend", "hf"), 1, "needs --user_model_name_or_path"),
    "openai without a server": (lambda f: online(f, "--user_backend", "openai", "--user_model_name_or_path", "m", "--openai_base_url", ""), 1, "needs --openai_base_url"),
    "vllm not installed": (lambda f: online(f, "--use_vllm"), 1, "--use_vllm needs vLLM"),
    "8-bit AdamW without bitsandbytes": (lambda f: online(f, "--optim", "adamw_8bit"), 2, "--optim adamw_8bit needs bitsandbytes"),
    "unloadable model": (lambda f: online(f), 1, "no-such-model-anywhere"),
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


@pytest.mark.parametrize(("name", "message"), [("broken", "broken.jsonl:2: not valid JSON"), ("latin1", "latin1.jsonl:2: not UTF-8 text"), ("wrong_field", "wrong_field.jsonl:1: no 'prompt' field")])
def test_online_bad_prompt_files_name_the_line(name, message, files, tiny_model_path, capsys):
    args = online(files, train=files[name], out=files["dir"] / name)
    args[1] = tiny_model_path
    assert eval_online_sdpo.main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    # The failed start leaves nothing that blocks a corrected rerun in the same folder.
    args[args.index("--train_jsonl") + 1] = str(files["good"])
    assert eval_online_sdpo.main([*args, "--train_n", "1", "--eval_n", "1", "--max_new_tokens", "4", "--eval_max_new_tokens", "4", "--dtype", "float32"]) == 0


def test_resume_without_a_complete_checkpoint_never_restarts_over_finished_work(files, tiny_model_path, capsys):
    out = files["dir"] / "run"
    args = online(files, "--train_n", "2", "--eval_n", "1", "--max_new_tokens", "4", "--eval_max_new_tokens", "4", "--dtype", "float32", out=out)
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


CHECKPOINT_CASES = {
    "missing checkpoint": (["--checkpoints", "{dir}/nope"], "checkpoint {dir}/nope: no such folder"),
    "file as checkpoint": (["--checkpoints", "{a_file}"], "not a folder"),
    "unknown style": (["--checkpoints", "{dir}", "--eval_styles", "pirate"], "unknown style 'pirate'"),
    "rule judge cannot check": (["--checkpoints", "{dir}", "--eval_styles", "poetic"], "rule-based judge cannot check poetic"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_evaluation_bad_input(case, files, tmp_path, capsys):
    extra, message = CHECKPOINT_CASES[case]
    fill = {"dir": tmp_path, "a_file": files["a_file"]}
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("")
    argv = [a.format(**fill) for a in extra] + ["--baseline_model", "no-such-model", "--val_jsonl", str(files["good"]), "--run_name", "r", "--judge_backend", "rule", "--out_dir", str(tmp_path / "eval")]
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
    "openai judge without a server": (["--judge_backend", "openai", "--openai_base_url", ""], "needs --openai_base_url"),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_oracle_bad_input(case, files, tmp_path, capsys):
    extra, message = ORACLE_CASES[case]
    argv = ["--model", "no-such-model", "--val_jsonl", str(files["good"]), "--judge_backend", "rule", "--eval_dir", str(tmp_path / "eval"), *extra]
    try:
        returned = eval_incontext_oracle.main(argv)
    except SystemExit as exited:
        returned = exited.code
    err = capsys.readouterr().err
    assert returned in (1, 2) and "Traceback" not in err and message in err, err
    assert not (tmp_path / "eval").exists()
