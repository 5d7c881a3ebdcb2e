"""The paper's offline benchmark suite (§4.1, Tables 2, 3, 4, 6) and the table our evaluation writes.

A benchmark is a column: where its number comes from (an lm-eval task and metric, or a pairwise
judgement), how it is scaled for the table (percent like the paper's Table 2, or a fraction like its
Table 6), and the paper's numbers for Qwen3-4B / Qwen3-8B where the paper has them. ``BenchmarkTable``
holds one row per evaluated model, the delta of each trained model to its base, and the paper's rows
for the base model's family, and writes them as JSON and Markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.utils.file_io import replace_atomically, write_json_atomic


@dataclass(frozen=True)
class Benchmark:
    """One column. ``lm_eval_task`` / ``metric`` name lm-eval's result (metric with its filter, as lm-eval
    keys it); pairwise columns have no task. ``percent``: shown ×100 (the paper's Table 2 style)."""

    column: str
    title: str
    harness: str
    lm_eval_task: str | None = None
    metric: str | None = None
    percent: bool = True
    protocol: str = ""


BENCHMARKS = {
    b.column: b
    for b in (
        Benchmark(
            "alpaca_eval_lc",
            "AE2 LC",
            "alpaca_eval",
            protocol="AlpacaEval 2.0 length-controlled win rate vs gpt4_turbo (paper: weighted_alpaca_eval_gpt4_turbo)",
        ),
        Benchmark(
            "ifeval",
            "IFEval",
            "lm_eval",
            "ifeval",
            "prompt_level_loose_acc,none",
            protocol="IFEval prompt-level loose accuracy",
        ),
        Benchmark(
            "arena_hard_hard",
            "AH-v2 Hard",
            "arena_hard",
            protocol="Arena-Hard v2 hard prompts, win rate vs the baseline answers (paper: GPT-4.1 judge)",
        ),
        Benchmark(
            "arena_hard_creative",
            "AH-v2 Creative",
            "arena_hard",
            protocol="Arena-Hard v2 creative writing, win rate vs the baseline answers (paper: GPT-4.1 judge)",
        ),
        Benchmark(
            "mmlu_pro",
            "MMLU-Pro",
            "lm_eval",
            "mmlu_pro",
            "exact_match,custom-extract",
            protocol="MMLU-Pro CoT 5-shot exact match",
        ),
        Benchmark(
            "truthfulqa_mc1",
            "TruthfulQA MC1",
            "lm_eval",
            "truthfulqa_mc1",
            "acc,none",
            percent=False,
            protocol="TruthfulQA MC1 accuracy (Table 6)",
        ),
        Benchmark(
            "hellaswag", "HellaSwag", "lm_eval", "hellaswag", "acc,none", percent=False, protocol="HellaSwag acc"
        ),
        Benchmark(
            "commonsense_qa",
            "CSQA",
            "lm_eval",
            "commonsense_qa",
            "acc,none",
            percent=False,
            protocol="CommonsenseQA accuracy",
        ),
    )
}

TABLE2_COLUMNS = ("alpaca_eval_lc", "ifeval", "arena_hard_hard", "arena_hard_creative", "mmlu_pro")
TABLE6_COLUMNS = ("truthfulqa_mc1", "hellaswag", "commonsense_qa")


def _row(values: tuple, columns: tuple = TABLE2_COLUMNS) -> dict:
    return dict(zip(columns, values))


# The paper's numbers (paper.md §1.2). Rows per model family: (label, source, values by column).
PAPER_ROWS = {
    "Qwen3-4B": [
        ("paper Qwen3-4B", "Table 2", _row((37.9, 81.9, 9.0, 8.0, 58.1))),
        ("paper Qwen3-4B + SDPO (WildFeedback)", "Table 2", _row((46.1, 83.2, 7.8, 7.9, 58.0))),
        ("paper Qwen3-4B + SFT on y (WildFeedback)", "Table 4", _row((18.9, 73.2, 3.1, 2.6, 51.2))),
    ],
    "Qwen3-8B": [
        (
            "paper Qwen3-8B",
            "Tables 2, 6",
            {**_row((49.3, 83.9, 14.0, 13.7, 62.5)), **_row((0.366, 0.5717, 0.7846), TABLE6_COLUMNS)},
        ),
        (
            "paper Qwen3-8B + SDPO (WildFeedback)",
            "Tables 2, 6",
            {**_row((51.9, 85.0, 15.5, 16.2, 63.3)), **_row((0.3647, 0.5710, 0.7871), TABLE6_COLUMNS)},
        ),
        ("paper Qwen3-8B + SDPO (WildChat)", "Table 3", _row((50.7, 84.5, 13.4, 14.0, 62.4))),
    ],
}


def paper_family(model_name: str) -> str | None:
    """The paper's model family a base model belongs to (by name: ``Qwen/Qwen3-4B`` → ``Qwen3-4B``)."""
    lowered = model_name.lower()
    for family in PAPER_ROWS:
        if family.lower() in lowered:
            return family
    return None


def lm_eval_column_value(benchmark: Benchmark, results: dict, sample_counts: dict) -> float | None:
    """The column's value in an lm-eval ``results`` dict: the task itself, else the size-weighted mean of
    its subtasks that ran (e.g. ``mmlu_pro_biology`` alone stands for ``mmlu_pro``)."""
    metric = benchmark.metric
    if benchmark.lm_eval_task in results and metric in results[benchmark.lm_eval_task]:
        return float(results[benchmark.lm_eval_task][metric])
    parts = [
        (float(values[metric]), sample_counts.get(task, 1))
        for task, values in results.items()
        if task.startswith(benchmark.lm_eval_task + "_") and metric in values
    ]
    if not parts:
        return None
    return sum(value * count for value, count in parts) / sum(count for _, count in parts)


@dataclass
class TableRow:
    label: str
    kind: str  # "ours", "delta" or "paper"
    values: dict = field(default_factory=dict)  # column -> value in the table's scale
    source: str = ""
    details: dict = field(default_factory=dict)  # column -> harness output (n, stderr, judge, ...)


@dataclass
class BenchmarkTable:
    """Rows = models (ours, deltas to base, paper's), columns = benchmarks."""

    columns: list[str]
    rows: list[TableRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_model(self, label: str, raw_scores: dict, details: dict | None = None) -> TableRow:
        """``raw_scores``: column -> the harness's value (fraction); scaled here as the paper shows it."""
        values = {}
        for column, value in raw_scores.items():
            if value is not None:
                values[column] = value * 100 if BENCHMARKS[column].percent else value
        row = TableRow(label, "ours", values, details=details or {})
        self.rows.append(row)
        return row

    def add_delta(self, trained: TableRow, base: TableRow) -> None:
        deltas = {
            c: trained.values[c] - base.values[c] for c in self.columns if c in trained.values and c in base.values
        }
        self.rows.append(TableRow(f"Δ {trained.label} − {base.label}", "delta", deltas))

    def add_paper_rows(self, family: str | None) -> None:
        for label, source, values in PAPER_ROWS.get(family, []):
            shown = {column: value for column, value in values.items() if column in self.columns}
            if shown:
                self.rows.append(TableRow(label, "paper", shown, source=f"paper {source}"))

    def as_dict(self) -> dict:
        return {
            "columns": [
                {"key": c, "title": b.title, "protocol": b.protocol, "percent": b.percent}
                for c, b in ((c, BENCHMARKS[c]) for c in self.columns)
            ],
            "rows": [
                {"label": r.label, "kind": r.kind, "source": r.source, "values": r.values, "details": r.details}
                for r in self.rows
            ],
            "notes": self.notes,
        }

    def markdown(self) -> str:
        header = ["model", *(BENCHMARKS[c].title for c in self.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row.label + (f" ({row.source})" if row.source else "")]
            for column in self.columns:
                value = row.values.get(column)
                cells.append(format_value(value, BENCHMARKS[column].percent, signed=row.kind == "delta"))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, output_dir: Path, stem: str = "benchmark_table") -> tuple[Path, Path]:
        json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
        write_json_atomic(json_path, self.as_dict())
        markdown = self.markdown()
        replace_atomically(md_path, lambda handle: handle.write(markdown))
        return json_path, md_path


def format_value(value: float | None, percent: bool, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    digits = 1 if percent else 4
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
