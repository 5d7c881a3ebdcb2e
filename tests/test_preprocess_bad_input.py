"""Bad input to every preprocessor: a non-zero exit, no traceback, and one ``error:`` line naming the file,
line or record and the problem, found before any output is written (in-process ``main``; the subprocess
exit path is tested in test_preprocess_scripts.py)."""

import importlib
import json

import pytest

SCRIPTS = ["helpsteer", "tldr_dataset", "wildfeedback", "wildchat", "sharegpt", "mtbench"]


def make_inputs(tmp):
    """Bad input files in ``tmp``, by name."""
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    files = {
        "latin1.json": b'[{"id": "a", "conversations": [{"from": "human", "value": "caf\xe9"}]}]',
        "latin1.jsonl": b'{"question_id": 1, "category": "c", "turns": ["ok"]}\n{"turns": ["caf\xe9"]}\n',
        "int_conversations.json": json.dumps([{"id": "x", "conversations": 5}]).encode(),
        "string_messages.jsonl": json.dumps({"conversations": ["hi", "yo"]}).encode() + b"\n",
        "int_conversation.jsonl": json.dumps({"conversation": 3, "language": "English"}).encode() + b"\n",
        "no_turns.jsonl": json.dumps({"question_id": 1, "category": "c"}).encode() + b"\n",
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)


CASES = [
    # every script: the output folder is a file
    *[(script, ["--out_dir", "{tmp}/a_file"], "--out_dir {tmp}/a_file is a file") for script in SCRIPTS],
    ("helpsteer", ["--max_prompt_length", "0"], "--max_prompt_length: must be a whole number >= 1, got 0"),
    ("helpsteer", ["--dataset_path", "{tmp}/missing"], "--dataset_path {tmp}/missing does not exist"),
    ("helpsteer", ["--dataset_path", "{tmp}/empty_dir"], "is a folder without a saved dataset"),
    ("helpsteer", ["--length_unit", "tokens"], "--length_unit tokens needs --tokenizer"),
    ("tldr_dataset", ["--max_prompt_length", "-5"], "must be a whole number >= 1, got -5"),
    ("tldr_dataset", ["--print_examples", "-1"], "must be a whole number >= 0 (0: no cap), got -1"),
    (
        "tldr_dataset",
        ["--dataset_path", "train={tmp}/latin1.jsonl", "validation={tmp}/latin1.jsonl"],
        "latin1.jsonl:2:",
    ),
    ("wildfeedback", ["--dataset_path", "{tmp}/string_messages.jsonl"], "row 0: message 0 must be an object"),
    ("wildfeedback", ["--dataset_path", "{tmp}/latin1.json"], "latin1.json:1: not UTF-8 text (byte 0xe9"),
    ("wildfeedback", ["--max_history_messages", "0"], "--max_history_messages: must be a whole number >= 1"),
    ("wildchat", ["--dataset_path", "{tmp}/int_conversation.jsonl"], "row 0: the conversation must be a list"),
    ("wildchat", ["--max_conversations", "0"], "--max_conversations: must be a whole number >= 1, got 0"),
    ("wildchat", ["--seed", "x"], "--seed: invalid int value: 'x'"),
    ("sharegpt", ["--dataset_path", "{tmp}/int_conversations.json"], "conversation 0 (id 'x'): the conversation must"),
    ("sharegpt", ["--dataset_path", "{tmp}/latin1.json"], "latin1.json:1: not UTF-8 text (byte 0xe9 at column 63)"),
    ("sharegpt", ["--dataset_path", "{tmp}/empty_dir"], "empty_dir is a folder; pass a ShareGPT-format JSON"),
    ("sharegpt", ["--dataset_path", "{tmp}/missing.json"], "missing.json is missing"),
    ("sharegpt", ["--max_interactions", "-1"], "--max_interactions: must be a whole number >= 0"),
    ("mtbench", ["--dataset_path", "{tmp}/latin1.jsonl"], "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"),
    ("mtbench", ["--dataset_path", "{tmp}/no_turns.jsonl"], "no_turns.jsonl:1: not an MT-Bench question"),
    ("mtbench", ["--dataset_path", "{tmp}/empty_dir"], "empty_dir is a folder; pass an MT-Bench question.jsonl"),
    ("mtbench", ["--train_fraction", "nan"], "--train_fraction must be between 0 and 1, got nan"),
]


@pytest.mark.parametrize("script, argv, expected", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, capsys, monkeypatch, script, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_inputs(tmp_path)
    out_dir = tmp_path / "out"
    argv = [part.format(tmp=tmp_path) for part in argv]
    if "--out_dir" not in argv:
        argv += ["--out_dir", str(out_dir)]
    if script in ("helpsteer", "tldr_dataset", "wildfeedback", "wildchat"):
        argv += ["--cache_dir", str(tmp_path / "cache")]
    main = importlib.import_module(f"auxiliary.preprocess_{script}").main
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejected a value
        code = exit_.code
    err = capsys.readouterr().err
    # datasets may draw its progress bars on stderr before the error; the error itself is one line
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert expected.format(tmp=tmp_path) in errors[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())
