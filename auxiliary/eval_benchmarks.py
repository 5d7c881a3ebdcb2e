"""Evaluate a trained checkpoint and its base model on the paper's offline benchmarks (§4.1, Tables 2, 3,
4, 6) and write one table: rows = models, columns = benchmarks, the delta to the base, and the paper's
Qwen3-4B / Qwen3-8B numbers beside ours.

    python auxiliary/eval_benchmarks.py --model_name_or_path runs/offline/final_model --base_model Qwen/Qwen3-4B \\
        --tasks alpaca_eval,ifeval,arena_hard,mmlu_pro --model vllm --apply_chat_template \\
        --alpaca_eval_data data/alpaca_eval/alpaca_eval_gpt4_baseline.json \\
        --arena_hard_questions data/arena-hard-v2.0/question.jsonl \\
        --arena_hard_baseline data/arena-hard-v2.0/model_answer/o3-mini-2025-01-31.jsonl \\
        --judge_backend openai --judge_model gpt-4.1 --judge_base_url https://api.openai.com/v1 --output_dir runs/bench
    # CPU, offline, the bundled model and the test fixtures (a few items per task, about 10 minutes on 2 cores):
    python auxiliary/eval_benchmarks.py --model_name_or_path smollm2-135m-instruct --base_model none \\
        --tasks ifeval,mmlu_pro_biology,truthfulqa_mc1,hellaswag,commonsense_qa --limit 2 \\
        --data_dir tests/fixtures/benchmarks/lm_eval --gen_kwargs max_gen_toks=64 --output_dir runs/bench_cpu

``--tasks``: lm-eval task or group names (``ifeval``, ``mmlu_pro`` or one subject such as
``mmlu_pro_biology``, ``truthfulqa_mc1``, ``hellaswag``, ``commonsense_qa``, or any other lm-eval task,
reported in the JSON) and the pairwise benchmarks ``alpaca_eval`` (AlpacaEval 2 LC win rate) and
``arena_hard`` (hard prompts and creative writing, Arena-Hard style); ``table2`` and ``table6`` stand
for the paper's sets. ``--model hf|vllm``, ``--model_args``, ``--batch_size``, ``--limit``,
``--num_fewshot``, ``--gen_kwargs``, ``--apply_chat_template``, ``--fewshot_as_multiturn`` and
``--device`` mean what they mean to ``lm_eval``; ``--config run.yaml`` takes any flag as a YAML key. The
checkpoint is a model folder or a LoRA adapter folder (applied to the base its ``adapter_config.json`` names:
``peft=`` under HF, ``lora_local_path=`` under vLLM); ``--base_model`` defaults to that base for adapters,
``none`` skips the base row.

Judges (``--judge_backend``): ``anthropic`` (Claude; ANTHROPIC_API_KEY), ``openai`` (any
OpenAI-compatible server at ``--judge_base_url``; OPENAI_API_KEY when it needs one), ``vllm`` (an
in-process vLLM engine on ``--judge_model``) or ``hf`` (a local transformers model, for CPU runs). Every
judge call goes through ``sdpo.chat.backends`` (the
SDKs' retries). The paper's judges were GPT-4-Turbo (AlpacaEval) and GPT-4.1 (Arena-Hard): numbers
from another judge are comparable with each other, not with the paper's.

Checked before any model loads, one line each: unknown tasks, missing packages (lm-eval, alpaca-eval,
vLLM), missing keys, missing data files, unusable checkpoints. Outputs in ``--output_dir``:
``benchmark_table.json`` / ``.md`` (the table), ``results/<model>__<benchmark>.json`` (the harness's
output per model and benchmark, written as each finishes and reused by a rerun, so an interrupt loses
nothing finished) and ``answers/<model>__<benchmark>.jsonl`` (the pairwise answers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from auxiliary.eval_checkpoints import CheckpointError, inspect_checkpoint
from sdpo.chat.backends import BackendError
from sdpo.data.data_sources import DataError
from sdpo.evaluation.benchmarks import (
    BENCHMARKS,
    TABLE2_COLUMNS,
    TABLE6_COLUMNS,
    BenchmarkTable,
    lm_eval_column_value,
    paper_family,
)
from sdpo.models.model_loading import ModelLoadError, resolve_model_path
from sdpo.utils.command_line import ConfigParser, UsageError
from sdpo.utils.env_file import load_project_env
from sdpo.utils.file_io import write_json_atomic, write_jsonl_atomic

PAIRWISE = ("alpaca_eval", "arena_hard")
SETS = {
    "table2": ("alpaca_eval", "ifeval", "arena_hard", "mmlu_pro"),
    "table6": ("truthfulqa_mc1", "hellaswag", "commonsense_qa"),
}
JUDGE_BACKENDS = ("anthropic", "openai", "vllm", "hf")


@dataclass
class EvalBenchmarksArguments:
    """Flags of ``auxiliary/eval_benchmarks.py`` (lm-eval's names where lm-eval has the option)."""

    model_name_or_path: list[str] = field(
        default=None,
        metadata={"help": "The trained checkpoint(s): model folders, LoRA adapter folders or Hub ids (one row each)."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model to compare against (default: an adapter's base; 'none': no base row)."},
    )
    model_label: list[str] | None = field(
        default=None, metadata={"help": "Row labels of the checkpoints, in order (default: their folder names)."}
    )
    tasks: str = field(
        default="table2",
        metadata={"help": "Comma list: lm-eval tasks/groups, alpaca_eval, arena_hard, or table2 / table6."},
    )
    model: str = field(
        default="hf", metadata={"help": "lm-eval backend: hf (CPU or GPU) or vllm (GPU).", "choices": ["hf", "vllm"]}
    )
    model_args: str = field(
        default="", metadata={"help": "Extra lm-eval model_args, k=v,k=v (e.g. max_model_len=8192)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype for lm-eval and the answer generation."})
    device: str | None = field(default=None, metadata={"help": "lm-eval device (cpu, cuda, cuda:0)."})
    batch_size: str = field(default="1", metadata={"help": "lm-eval batch size (a number or auto)."})
    limit: float | None = field(
        default=None, metadata={"help": "Items per task (< 1: a fraction); also caps pairwise."}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "Override the tasks' few-shot count."})
    gen_kwargs: str | None = field(
        default=None, metadata={"help": "lm-eval generation overrides, e.g. max_gen_toks=64."}
    )
    apply_chat_template: bool = field(
        default=False, metadata={"help": "Render lm-eval prompts with the chat template."}
    )
    fewshot_as_multiturn: bool = field(default=False, metadata={"help": "Few-shot examples as chat turns."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Local copies of the tasks' Hub datasets: DIR/<owner>__<name>[/<config>]/<split>.jsonl."},
    )
    alpaca_eval_data: str | None = field(
        default=None, metadata={"help": "AlpacaEval set with reference outputs (instruction, output, generator)."}
    )
    arena_hard_questions: str | None = field(default=None, metadata={"help": "Arena-Hard v2 question.jsonl."})
    arena_hard_baseline: str | None = field(
        default=None,
        metadata={"help": "Arena-Hard hard-prompt baseline answers (v2: model_answer/o3-mini-2025-01-31.jsonl)."},
    )
    arena_hard_creative_baseline: str | None = field(
        default=None,
        metadata={
            "help": "Creative-writing baseline answers (v2: gemini-2.0-flash-001; default: --arena_hard_baseline)."
        },
    )
    max_new_tokens: int = field(default=2048, metadata={"help": "Answer budget for the pairwise benchmarks."})
    judge_backend: str = field(
        default="anthropic",
        metadata={
            "help": "Judge: anthropic | openai (any OpenAI-compatible server) | vllm (in-process engine) | hf "
            "(a local transformers model, e.g. on CPU).",
            "choices": list(JUDGE_BACKENDS),
        },
    )
    judge_model: str = field(default="claude-haiku-4-5-20251001", metadata={"help": "Judge model name."})
    judge_base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible judge server URL."})
    judge_max_tokens: int = field(default=2048, metadata={"help": "Token budget of an Arena-Hard judgement."})
    judge_max_concurrency: int = field(default=8, metadata={"help": "Concurrent judge requests (remote judges)."})
    output_dir: str = field(default="runs/benchmarks", metadata={"help": "Where the table and results go."})
    seed: int = field(default=1234, metadata={"help": "Seed of lm-eval and the answer generation."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("pass --model_name_or_path (the trained checkpoint)")
        if self.model_label and len(self.model_label) != len(self.model_name_or_path):
            raise ValueError("--model_label needs one label per --model_name_or_path")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"--limit must be > 0, got {self.limit}")
        if self.max_new_tokens < 1 or self.judge_max_tokens < 1:
            raise ValueError("--max_new_tokens and --judge_max_tokens must be >= 1")

    @property
    def task_list(self) -> list[str]:
        names = [name.strip() for name in self.tasks.split(",") if name.strip()]
        return list(dict.fromkeys(task for name in names for task in SETS.get(name, (name,))))


@dataclass(frozen=True)
class ModelUnderTest:
    """One row: the label, what lm-eval loads (``pretrained`` + optional adapter)."""

    label: str
    pretrained: str
    adapter: str | None = None


def parse_arguments(argv: list[str] | None = None) -> EvalBenchmarksArguments:
    """The flags (and ``--config run.yaml``); any problem is one ``UsageError`` line."""
    (arguments,) = ConfigParser(EvalBenchmarksArguments, description=__doc__).parse(argv)
    return arguments


# --------------------------------------------------------------------------------------------------
# Checks before any model loads
# --------------------------------------------------------------------------------------------------


def _default_label(given: str) -> str:
    path = Path(given)
    return f"{path.parent.name}/{path.name}" if path.name in ("final_model", "final_model_merged") else path.name


def models_under_test(arguments: EvalBenchmarksArguments) -> list[ModelUnderTest]:
    """The base (unless ``none``) first, then each checkpoint; adapters resolved to their base."""
    models = []
    for position, given in enumerate(arguments.model_name_or_path):
        adapter, pretrained = None, given
        if Path(given).expanduser().is_dir():
            try:
                checkpoint = inspect_checkpoint(given)
            except CheckpointError as error:
                raise UsageError(str(error)) from None
            if checkpoint.is_adapter:
                adapter, pretrained = str(checkpoint.path), checkpoint.base_model
        label = arguments.model_label[position] if arguments.model_label else _default_label(given)
        models.append(ModelUnderTest(label, pretrained, adapter))
    base = arguments.base_model
    if base is None:
        bases = {model.pretrained for model in models if model.adapter}
        full = [model.label for model in models if not model.adapter]
        if full or len(bases) != 1:
            raise UsageError(
                f"{', '.join(full) or 'the adapters'}: pass --base_model (the model the checkpoints were trained "
                "from) or --base_model none"
            )
        base = bases.pop()
    if base.lower() != "none":
        models.insert(0, ModelUnderTest(f"base {Path(base).name if Path(base).is_dir() else base}", base))
    return models


def nltk_punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def check_tasks(arguments: EvalBenchmarksArguments) -> tuple[list[str], list[str]]:
    """(lm-eval tasks, pairwise benchmarks); unknown names, packages, keys and files are one line each."""
    tasks = arguments.task_list
    pairwise = [task for task in tasks if task in PAIRWISE]
    lm_tasks = [task for task in tasks if task not in PAIRWISE]
    from sdpo.evaluation.benchmarks_lm_eval import missing_lm_eval_packages
    from sdpo.evaluation.benchmarks_pairwise import missing_pairwise_packages

    missing = (missing_lm_eval_packages(lm_tasks, arguments.model) if lm_tasks else []) + (
        missing_pairwise_packages() if pairwise else []
    )
    vllm_wanted = pairwise and "vllm" in (arguments.judge_backend, arguments.model)
    if vllm_wanted and "vllm" not in missing and not importlib.util.find_spec("vllm"):
        missing.append("vllm")
    if missing:
        raise UsageError(
            f"--tasks {','.join(tasks)} needs {', '.join(missing)}: pip install -r requirements-eval.txt"
            + (" -r requirements-vllm.txt" if "vllm" in missing else "")
        )
    if lm_tasks:
        from sdpo.evaluation.benchmarks_lm_eval import builtin_task_manager

        unknown = [t for t in lm_tasks if t not in builtin_task_manager().all_tasks]
        if unknown:
            raise UsageError(
                f"--tasks: {', '.join(unknown)} is neither an lm-eval task nor one of {', '.join(PAIRWISE)}"
            )
    needed = {
        "alpaca_eval": [("--alpaca_eval_data", arguments.alpaca_eval_data)],
        "arena_hard": [
            ("--arena_hard_questions", arguments.arena_hard_questions),
            ("--arena_hard_baseline", arguments.arena_hard_baseline),
            ("--arena_hard_creative_baseline", arguments.arena_hard_creative_baseline or arguments.arena_hard_baseline),
        ],
    }
    for task in pairwise:
        for flag, value in needed[task]:
            if not value:
                raise UsageError(f"--tasks {task} needs {flag} FILE (see the script docstring for where to get it)")
            if not Path(value).is_file():
                raise UsageError(f"{flag} {value}: no such file")
    if pairwise and arguments.judge_backend == "anthropic" and not os.environ.get("ANTHROPIC_API_KEY"):
        raise UsageError("--judge_backend anthropic needs ANTHROPIC_API_KEY (environment or .env)")
    if pairwise and arguments.judge_backend == "openai" and not arguments.judge_base_url:
        raise UsageError("--judge_backend openai needs --judge_base_url (the server's /v1 URL)")
    if arguments.data_dir and not Path(arguments.data_dir).is_dir():
        raise UsageError(f"--data_dir {arguments.data_dir}: no such folder")
    if any(task.startswith("ifeval") for task in lm_tasks) and not nltk_punkt_available():
        print(
            "note: NLTK's punkt_tab data is not installed (python -m nltk.downloader punkt_tab): IFEval's "
            "sentence-counting instructions cannot be checked without it",
            file=sys.stderr,
        )
    return lm_tasks, pairwise


def build_judge(arguments: EvalBenchmarksArguments):
    """The judge backend, checked with one cheap request (remote) before any model loads."""
    from sdpo.chat.backends import AnthropicBackend, OpenAICompatibleBackend, VLLMChatBackend

    if arguments.judge_backend == "anthropic":
        judge = AnthropicBackend(
            arguments.judge_model,
            max_concurrency=arguments.judge_max_concurrency,
            base_url=os.environ.get("ANTHROPIC_BASE_URL"),
        )
    elif arguments.judge_backend == "openai":
        judge = OpenAICompatibleBackend(
            arguments.judge_model, base_url=arguments.judge_base_url, max_concurrency=arguments.judge_max_concurrency
        )
    elif arguments.judge_backend == "hf":
        from sdpo.chat.policies import load_policy

        dtype = arguments.dtype if arguments.dtype != "auto" else "bfloat16"
        return load_policy(arguments.judge_model, dtype=dtype, device=arguments.device or "auto")
    else:
        from sdpo.models.model_loading import load_tokenizer
        from sdpo.models.vllm_engines import build_vllm_engine

        engine = build_vllm_engine(arguments.judge_model, gpu_memory_utilization=0.45)
        return VLLMChatBackend(
            engine, tokenizer=load_tokenizer(arguments.judge_model), name=f"vllm:{arguments.judge_model}"
        )
    judge.check()
    return judge


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def _cached(path: Path, compute) -> dict:
    """A finished result from an earlier (interrupted) run, else computed now and written at once."""
    if path.is_file():
        print(f"[eval_benchmarks] reusing {path}", flush=True)
        return json.loads(path.read_text(encoding="utf-8"))
    result = compute()
    write_json_atomic(path, result)
    return result


def _model_args(text: str) -> dict:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise UsageError(f"--model_args {text!r}: use key=value pairs separated by commas")
    return {key.strip(): value.strip() for key, value in pairs}


def run_lm_eval_tasks(arguments, model: ModelUnderTest, lm_tasks: list[str], output_dir: Path) -> dict:
    from sdpo.evaluation.benchmarks_lm_eval import LMEvalModel, run_lm_eval

    def compute() -> dict:
        return run_lm_eval(
            LMEvalModel(resolve_model_path(model.pretrained), model.adapter),
            lm_tasks,
            backend=arguments.model,
            dtype=arguments.dtype,
            device=arguments.device,
            batch_size=arguments.batch_size,
            limit=arguments.limit,
            num_fewshot=arguments.num_fewshot,
            gen_kwargs=arguments.gen_kwargs,
            apply_chat_template=arguments.apply_chat_template,
            fewshot_as_multiturn=arguments.fewshot_as_multiturn,
            data_dir=Path(arguments.data_dir) if arguments.data_dir else None,
            work_dir=output_dir / "work",
            model_args=_model_args(arguments.model_args),
            seed=arguments.seed,
        )

    return _cached(output_dir / "results" / f"{_slug(model.label)}__lm_eval_{_slug('-'.join(lm_tasks))}.json", compute)


def answer_generator(arguments, model: ModelUnderTest):
    """The evaluated model as a chat backend for the pairwise answers (HF, or vLLM with ``--model vllm``)."""
    if arguments.model == "vllm":
        from sdpo.chat.policies import VLLMAdapterPolicy
        from sdpo.models.model_loading import load_tokenizer
        from sdpo.models.vllm_engines import VLLMPolicyEngine

        tokenizer = load_tokenizer(model.adapter or model.pretrained)
        rank = json.loads((Path(model.adapter) / "adapter_config.json").read_text())["r"] if model.adapter else 1
        engine = VLLMPolicyEngine(
            resolve_model_path(model.pretrained),
            tokenizer,
            max_lora_rank=rank,
            gpu_memory_utilization=0.45,
            dtype=arguments.dtype if arguments.dtype != "auto" else "bfloat16",
            max_model_len=8192 + arguments.max_new_tokens,
            seed=arguments.seed,
        )
        policy = VLLMAdapterPolicy(engine, tokenizer, max_input_tokens=8192, name=f"vllm:{model.label}")
        if model.adapter:
            policy.use_adapter(model.adapter)
        return policy
    from sdpo.chat.policies import load_policy

    device = arguments.device or "auto"
    dtype = arguments.dtype if arguments.dtype != "auto" else "bfloat16"
    return load_policy(model.pretrained, adapter=model.adapter, dtype=dtype, device=device)


def run_pairwise(arguments, model: ModelUnderTest, pairwise: list[str], judge, output_dir: Path) -> dict:
    """Answers (generated once per benchmark and model, kept) and the judge's verdicts."""
    from sdpo.evaluation import benchmarks_pairwise as pw
    from sdpo.models.generation import SamplingParams

    sets = {}
    if "alpaca_eval" in pairwise:
        sets["alpaca_eval_lc"] = pw.load_alpaca_eval_set(Path(arguments.alpaca_eval_data))
    if "arena_hard" in pairwise:
        baselines = {
            "hard_prompt": Path(arguments.arena_hard_baseline),
            "creative_writing": Path(arguments.arena_hard_creative_baseline or arguments.arena_hard_baseline),
        }
        arena = pw.load_arena_hard_set(Path(arguments.arena_hard_questions), baselines)
        for column, category in pw.ARENA_CATEGORIES.items():
            sets[column] = [item for item in arena if item.category == category]
    if arguments.limit is not None:
        cap = int(arguments.limit) if arguments.limit >= 1 else None
        sets = {
            c: items[:cap] if cap else items[: max(1, int(len(items) * arguments.limit))] for c, items in sets.items()
        }
    generator = None
    results = {}
    for column, items in sets.items():
        result_path = output_dir / "results" / f"{_slug(model.label)}__{column}.json"
        if result_path.is_file():
            results[column] = _cached(result_path, dict)
            continue
        answers_path = output_dir / "answers" / f"{_slug(model.label)}__{column}.jsonl"
        if answers_path.is_file():
            outputs = [json.loads(line)["output"] for line in answers_path.read_text(encoding="utf-8").splitlines()]
        else:
            generator = generator or answer_generator(arguments, model)
            sampling = SamplingParams(max_new_tokens=arguments.max_new_tokens, temperature=0)
            outputs = pw.generate_answers(generator, items, sampling)
            write_jsonl_atomic(
                answers_path,
                ({"uid": i.uid, "instruction": i.instruction, "output": o} for i, o in zip(items, outputs)),
            )
        if column == "alpaca_eval_lc":
            verdicts = partial(pw.alpaca_eval_2, items, outputs, model.label, judge, output_dir / "work")
        else:
            verdicts = partial(
                pw.arena_hard_style, items, outputs, model.label, judge, output_dir / "work", arguments.judge_max_tokens
            )
        results[column] = _cached(result_path, verdicts)
    if generator is not None:
        from sdpo.chat.policies import release

        release(generator)
    return results


def table_values(lm_output: dict, pairwise: dict) -> tuple[dict, dict]:
    """(column → value as a fraction, column → details) for the table."""
    values, details = {}, {}
    results, counts = (
        lm_output.get("results", {}),
        {task: n.get("effective", 1) for task, n in lm_output.get("n-samples", {}).items()},
    )
    for column, benchmark in BENCHMARKS.items():
        if benchmark.harness == "lm_eval":
            value = lm_eval_column_value(benchmark, results, counts)
            if value is not None:
                values[column] = value
                details[column] = {
                    "tasks": sorted(
                        t for t in results if t == benchmark.lm_eval_task or t.startswith(benchmark.lm_eval_task + "_")
                    ),
                    "n": sum(counts.get(t, 0) for t in results if t.startswith(benchmark.lm_eval_task)),
                }
    for column, result in pairwise.items():
        key = "length_controlled_winrate" if column == "alpaca_eval_lc" else "win_rate"
        value = result.get(key)
        values[column] = None if value is None else value / 100
        details[column] = result
    return values, details


def run(arguments: EvalBenchmarksArguments) -> BenchmarkTable:
    models = models_under_test(arguments)
    lm_tasks, pairwise = check_tasks(arguments)
    output_dir = Path(arguments.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    judge = build_judge(arguments) if pairwise else None
    columns = [c for c in (*TABLE2_COLUMNS, *TABLE6_COLUMNS) if _column_requested(c, lm_tasks, pairwise)]
    table = BenchmarkTable(columns)
    rows = []
    for model in models:
        print(
            f"[eval_benchmarks] {model.label}: {model.pretrained}"
            + (f" + adapter {model.adapter}" if model.adapter else ""),
            flush=True,
        )
        lm_output = run_lm_eval_tasks(arguments, model, lm_tasks, output_dir) if lm_tasks else {}
        pair = run_pairwise(arguments, model, pairwise, judge, output_dir) if pairwise else {}
        values, details = table_values(lm_output, pair)
        rows.append(table.add_model(model.label, values, {**details, "lm_eval_results": lm_output.get("results", {})}))
    if models[0].label.startswith("base ") and len(rows) > 1:
        for trained in rows[1:]:
            table.add_delta(trained, rows[0])
    table.add_paper_rows(paper_family(models[0].pretrained))
    table.notes += _notes(arguments, lm_tasks, pairwise, judge) + _missing_value_notes(rows)
    json_path, md_path = table.write(output_dir)
    print(table.markdown())
    print(f"[eval_benchmarks] wrote {json_path} and {md_path}", flush=True)
    return table


def _column_requested(column: str, lm_tasks: list[str], pairwise: list[str]) -> bool:
    benchmark = BENCHMARKS[column]
    if benchmark.harness == "lm_eval":
        return any(t == benchmark.lm_eval_task or t.startswith(benchmark.lm_eval_task + "_") for t in lm_tasks)
    return ("alpaca_eval" if column == "alpaca_eval_lc" else "arena_hard") in pairwise


def _notes(arguments, lm_tasks, pairwise, judge) -> list[str]:
    notes = []
    if lm_tasks:
        notes.append(
            f"lm-eval {arguments.model} backend, tasks {', '.join(lm_tasks)}, limit {arguments.limit or 'none'}, "
            f"chat template {'on' if arguments.apply_chat_template else 'off'}"
            + (f", gen_kwargs {arguments.gen_kwargs}" if arguments.gen_kwargs else "")
            + (f", local data {arguments.data_dir}" if arguments.data_dir else "")
        )
    if pairwise:
        notes.append(f"pairwise judge {judge.name} (paper: GPT-4-Turbo for AlpacaEval, GPT-4.1 for Arena-Hard)")
    return notes


def _missing_value_notes(rows) -> list[str]:
    """Why a pairwise cell is empty: the judge's parseable verdicts, the raw win rate, the LC note."""
    notes = []
    for row in rows:
        for column in ("alpaca_eval_lc", "arena_hard_hard", "arena_hard_creative"):
            detail = row.details.get(column)
            if detail is None or column in row.values:
                continue
            if column == "alpaca_eval_lc":
                raw = "none" if detail.get("win_rate") is None else f"{detail['win_rate']:.1f}"
                text = f"{detail['n_judged']} of {detail['n']} pairs judged, raw win rate {raw}"
                text += f"; {detail['note']}" if detail.get("note") else ""
            else:
                text = f"the judge gave a parseable verdict in {detail['games_judged']} of {detail['games']} games"
            notes.append(f"{row.label}, {BENCHMARKS[column].title} empty: {text}")
    return notes


def main(argv: list[str] | None = None) -> int:
    load_project_env()
    try:
        arguments = parse_arguments(argv)
        run(arguments)
    except (UsageError, DataError, ModelLoadError, BackendError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
