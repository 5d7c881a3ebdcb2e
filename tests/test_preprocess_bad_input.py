"""Bad input to every preprocessor: a non-zero exit, no traceback, and one ``error:`` line naming the file,
line or record and the problem, found before any output is written (in-process ``main``; the subprocess
exit path is tested in test_preprocess_scripts.py)."""

import importlib
import json
from pathlib import Path

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
        "empty.jsonl": b"",
        "garbage.jsonl": b'{"a": 1}\ngarbage\n',
        "fake.jsonl.gz": b"not gzip",
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
    ("wildfeedback", ["--dataset_path", "{tmp}/empty.jsonl"], "--dataset_path {tmp}/empty.jsonl is an empty file"),
    ("wildfeedback", ["--dataset_path", "{tmp}/garbage.jsonl"], "garbage.jsonl:2: not valid JSON"),
    ("wildchat", ["--dataset_path", "{tmp}/fake.jsonl.gz"], "fake.jsonl.gz: Not a gzipped file"),
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


FIXTURES = Path(__file__).parent / "fixtures" / "preprocess"

# (script, its output file, --dataset_path (relative to tmp) or extra flags, input files to create)
ZERO_ROWS = {
    "sharegpt garbage": (
        "sharegpt",
        "sharegpt_interactions.jsonl",
        ["--dataset_path", "{tmp}/in.json"],
        b"garbage %%%",
    ),
    "sharegpt empty file": ("sharegpt", "sharegpt_interactions.jsonl", ["--dataset_path", "{tmp}/in.json"], b""),
    "sharegpt fake gz": ("sharegpt", "sharegpt_interactions.jsonl", ["--dataset_path", "{tmp}/in.json.gz"], b"no gz"),
    "sharegpt no usable conversation": (
        "sharegpt",
        "sharegpt_interactions.jsonl",
        ["--dataset_path", "{tmp}/in.json"],
        b'[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}]',
    ),
    "wildchat other languages only": (
        "wildchat",
        "wildchat_interactions_v1.jsonl",
        ["--dataset_path", str(FIXTURES / "wildchat" / "train.jsonl"), "--languages", "klingon"],
        None,
    ),
    "helpsteer every prompt too long": (
        "helpsteer",
        "train.jsonl",
        [
            "--dataset_path",
            f"train={FIXTURES}/helpsteer2/train.jsonl",
            f"validation={FIXTURES}/helpsteer2/validation.jsonl",
            "--max_prompt_length",
            "1",
        ],
        None,
    ),
    "tldr every prompt too long": (
        "tldr_dataset",
        "validation.jsonl",
        [
            "--dataset_path",
            f"train={FIXTURES}/tldr/train.jsonl",
            f"validation={FIXTURES}/tldr/validation.jsonl",
            "--max_prompt_length",
            "1",
        ],
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(ZERO_ROWS))
def test_zero_usable_rows_fail_and_keep_the_good_output(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script, output_name, argv, content = ZERO_ROWS[case]
    argv = [part.format(tmp=tmp_path) for part in argv]
    if content is not None:
        Path(argv[argv.index("--dataset_path") + 1]).write_bytes(content)
    good = tmp_path / "out" / output_name
    good.parent.mkdir()
    good.write_text('{"kept": "an earlier good run"}\n')
    if script != "sharegpt":
        argv += ["--cache_dir", str(tmp_path / "cache")]
    code = importlib.import_module(f"auxiliary.preprocess_{script}").main([*argv, "--out_dir", str(good.parent)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert "no usable" in errors[0] and f"kept the existing {good}" in errors[0]
    assert good.read_text() == '{"kept": "an earlier good run"}\n'
    assert sorted(p.name for p in good.parent.iterdir()) == [output_name]
