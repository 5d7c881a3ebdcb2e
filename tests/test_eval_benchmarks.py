"""eval_benchmarks: bad input is one line before any model loads; lm-eval runs its own tasks on local
files in the Hub schemas (generation with IFEval's checks, multiple choice, MMLU-Pro CoT few-shot); a
whole run on the bundled model writes the table; an adapter is evaluated beside its base with the delta."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("alpaca_eval")

from auxiliary.eval_benchmarks import main, parse_arguments
from sdpo.evaluation.benchmarks import BENCHMARKS, BenchmarkTable, paper_family
from sdpo.evaluation.benchmarks_lm_eval import write_local_task_configs
from tests.conftest import FIXTURES
from tests.fakes import FakeOpenAIServer, Reply

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = FIXTURES / "benchmarks"
LM_DATA = DATA / "lm_eval"


def one_error_line(capsys, argv) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0 and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    missing_model = str(tmp_path / "no-such-model")
    base = ["--model_name_or_path", "smollm2-135m-instruct", "--output_dir", str(tmp_path)]
    assert one_error_line(capsys, base + ["--tasks", "ifeval"]) == (
        "error: smollm2-135m-instruct: pass --base_model (the model the checkpoints were trained from) or "
        "--base_model none"
    )
    base += ["--base_model", "none"]
    assert "needs --alpaca_eval_data FILE" in one_error_line(capsys, base + ["--tasks", "alpaca_eval"])
    err = one_error_line(capsys, base + ["--tasks", "alpaca_eval", "--alpaca_eval_data", missing_model])
    assert err.endswith("no-such-model: no such file")
    ae = ["--tasks", "alpaca_eval", "--alpaca_eval_data", str(DATA / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json")]
    assert "needs ANTHROPIC_API_KEY" in one_error_line(capsys, base + ae)
    assert "needs --judge_base_url" in one_error_line(capsys, base + ae + ["--judge_backend", "openai"])
    assert "(see --help)" in one_error_line(capsys, base + ["--model", "sglang"])
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_error_line(capsys, ["--model_name_or_path", str(empty), "--output_dir", str(tmp_path)])
    assert "neither a model folder (config.json) nor a LoRA adapter" in err


@pytest.mark.slow
def test_unknown_task_is_one_line(tmp_path, capsys):
    argv = ["--model_name_or_path", "smollm2-135m-instruct", "--base_model", "none", "--tasks", "ifeval,ifevl"]
    err = one_error_line(capsys, argv + ["--output_dir", str(tmp_path)])
    assert err == "error: --tasks: ifevl is neither an lm-eval task nor one of alpaca_eval, arena_hard"


def test_table_sets_expand_and_paper_rows_follow_the_base_family():
    assert parse_arguments(["--model_name_or_path", "m", "--tasks", "table6,ifeval"]).task_list == [
        "truthfulqa_mc1",
        "hellaswag",
        "commonsense_qa",
        "ifeval",
    ]
    assert paper_family("Qwen/Qwen3-8B") == "Qwen3-8B" and paper_family("smollm2-135m-instruct") is None
    table = BenchmarkTable(["ifeval", "truthfulqa_mc1"])
    base = table.add_model("base", {"ifeval": 0.819, "truthfulqa_mc1": 0.366})
    trained = table.add_model("sdpo", {"ifeval": 0.832, "truthfulqa_mc1": 0.3647})
    table.add_delta(trained, base)
    table.add_paper_rows("Qwen3-8B")
    markdown = table.markdown()
    assert "| model | IFEval | TruthfulQA MC1 |" in markdown
    assert "| base | 81.9 | 0.3660 |" in markdown and "| Δ sdpo − base | +1.3 | -0.0013 |" in markdown
    assert "| paper Qwen3-8B (paper Tables 2, 6) | 83.9 | 0.3660 |" in markdown
    assert BENCHMARKS["ifeval"].metric == "prompt_level_loose_acc,none"


@pytest.mark.slow
def test_local_task_configs_keep_the_harness_prompts_and_read_the_local_files(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    written = write_local_task_configs(["ifeval", "hellaswag", "mmlu_pro_biology"], LM_DATA, tmp_path)
    assert written == {
        "ifeval": LM_DATA / "google__IFEval",
        "hellaswag": LM_DATA / "Rowan__hellaswag",
        "mmlu_pro_biology": LM_DATA / "TIGER-Lab__MMLU-Pro",
    }
    tasks = get_task_dict(["ifeval", "hellaswag", "mmlu_pro_biology"], TaskManager(include_path=str(tmp_path)))
    ifeval, hellaswag, mmlu = tasks["ifeval"], tasks["hellaswag"], tasks["mmlu_pro_biology"]
    assert ifeval.config.dataset_path == "json" and len(list(ifeval.test_docs())) == 3
    assert ifeval.doc_to_text(next(iter(ifeval.test_docs()))).startswith("Write a short note")
    assert ifeval.config.output_type == "generate_until" and hellaswag.config.output_type == "multiple_choice"
    assert hellaswag.config.training_split is None  # no local train file: switched off, not fetched
    doc = next(iter(hellaswag.validation_docs()))
    assert doc["query"] == "Making a sandwich: A man lays two slices of bread on a plate. He" and doc["gold"] == 0
    assert mmlu.config.num_fewshot == 5 and len(list(mmlu.fewshot_docs())) == 5


@pytest.mark.slow
def test_cpu_run_on_the_bundled_model_writes_the_table(tmp_path):
    """lm-eval on a generation task with IFEval's checks and a multiple-choice task, plus AlpacaEval 2 and the
    Arena-Hard-style judgement answered by the model and judged by a fake OpenAI-compatible server; run as the
    script, offline."""

    def judge(body):
        prompt = body["messages"][-1]["content"]
        return Reply(text="[[A=B]]" if "Assistant A" in prompt else "M")

    with FakeOpenAIServer(handler=judge) as server:
        argv = [
            sys.executable, str(REPO_ROOT / "auxiliary" / "eval_benchmarks.py"),
            "--model_name_or_path", "smollm2-135m-instruct", "--base_model", "none", "--model_label", "smollm2",
            "--tasks", "ifeval,commonsense_qa,alpaca_eval,arena_hard",
            "--limit", "2", "--data_dir", str(LM_DATA), "--gen_kwargs", "max_gen_toks=16", "--dtype", "float32",
            "--device", "cpu", "--max_new_tokens", "12",
            "--alpaca_eval_data", str(DATA / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json"),
            "--arena_hard_questions", str(DATA / "arena_hard" / "question.jsonl"),
            "--arena_hard_baseline", str(DATA / "arena_hard" / "model_answer" / "o3-mini-2025-01-31.jsonl"),
            "--judge_backend", "openai", "--judge_model", "judge", "--judge_base_url", server.base_url,
            "--output_dir", str(tmp_path),
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path)
        judged = len(server.bodies)
        # a rerun (after an interrupt, say) reuses every finished result: no answer and no verdict again
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path)
        assert rerun.returncode == 0 and len(server.bodies) == judged, rerun.stderr[-2000:]
        assert rerun.stdout.count("reusing") == 4
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "benchmark_table.json").read_text())
    assert [c["key"] for c in table["columns"]] == [
        "alpaca_eval_lc",
        "ifeval",
        "arena_hard_hard",
        "arena_hard_creative",
        "commonsense_qa",
    ]
    (row,) = table["rows"]
    assert row["label"] == "smollm2"
    assert 0 <= row["values"]["ifeval"] <= 100 and row["details"]["ifeval"]["n"] == 2
    assert 0 <= row["values"]["commonsense_qa"] <= 1 and row["details"]["commonsense_qa"]["n"] == 2
    lm = row["details"]["lm_eval_results"]
    assert {"prompt_level_loose_acc,none", "inst_level_strict_acc,none"} <= set(lm["ifeval"])
    assert row["values"]["arena_hard_hard"] == 50.0 and row["details"]["arena_hard_hard"]["games_judged"] == 4
    assert row["details"]["alpaca_eval_lc"]["win_rate"] is not None and row["details"]["alpaca_eval_lc"]["n"] == 2
    # AlpacaEval: alpaca_eval scores an answer identical to the reference as a draw without asking the judge
    # (SmolLM2 answers "The capital of France is Paris." word for word); Arena-Hard: 2 + 2 items in both orders
    references = json.loads((DATA / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json").read_text())
    ae_answers = [json.loads(line) for line in (tmp_path / "answers" / "smollm2__alpaca_eval_lc.jsonl").open()]
    differing = sum(answer["output"] != reference["output"] for answer, reference in zip(ae_answers, references))
    assert judged == differing + 4 + 4
    answers = (tmp_path / "answers" / "smollm2__arena_hard_creative.jsonl").read_text().splitlines()
    assert len(answers) == 2 and json.loads(answers[0])["uid"] == "c1"
    markdown = (tmp_path / "benchmark_table.md").read_text()
    assert (
        markdown.startswith("| model | AE2 LC | IFEval | AH-v2 Hard |") and "pairwise judge openai:judge@" in markdown
    )


@pytest.mark.slow
def test_adapter_is_evaluated_beside_its_base_with_the_delta(tiny_model_path, tmp_path):
    """A freshly initialised LoRA adapter (B = 0) computes exactly its base model: every delta is 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(adapter)
    status = main(
        ["--model_name_or_path", str(adapter), "--tasks", "truthfulqa_mc1,hellaswag", "--limit", "2"]
        + ["--data_dir", str(LM_DATA), "--dtype", "float32", "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    )
    assert status == 0
    table = json.loads((tmp_path / "out" / "benchmark_table.json").read_text())
    base, trained, delta = table["rows"]
    assert base["label"] == f"base {Path(tiny_model_path).name}" and trained["label"] == "adapter"
    assert delta["kind"] == "delta" and delta["values"] == {"truthfulqa_mc1": 0.0, "hellaswag": 0.0}
