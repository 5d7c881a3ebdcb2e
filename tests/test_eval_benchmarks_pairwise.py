"""AlpacaEval 2 and the Arena-Hard-style judgement through the real alpaca_eval annotator and the real
openai / anthropic clients, against the local fake servers: the verdicts map back to the right answer
whatever order the judge saw them in, and the LC GLM runs on a difficulty file in the Hub file's shape."""

import re

import pandas as pd
import pytest

pytest.importorskip("alpaca_eval")

from sdpo.chat.backends import AnthropicBackend, OpenAICompatibleBackend
from sdpo.evaluation import benchmarks_pairwise as pw
from tests.conftest import FIXTURES
from tests.fakes import FakeAnthropicServer, FakeOpenAIServer, Reply, last_user_text

DATA = FIXTURES / "benchmarks"
GOOD = "GOOD ANSWER"


def ae2_judge(body: dict) -> Reply:
    """Picks the AE-2 identifier (m / M) of the output that holds GOOD, else of the longer one."""
    text = last_user_text(body)
    first = re.search(r'"model_identifier": "m",\s*"output": """(.*?)"""', text, re.DOTALL).group(1)
    second = re.search(r'"model_identifier": "M",\s*"output": """(.*?)"""', text, re.DOTALL).group(1)
    first_wins = GOOD in first if (GOOD in first) != (GOOD in second) else len(first) > len(second)
    return Reply(text="m" if first_wins else "M")


def arena_judge(body: dict) -> Reply:
    text = last_user_text(body)
    answer_a = text.split("<|The Start of Assistant A's Answer|>")[1].split("<|The End of Assistant A's Answer|>")[0]
    answer_b = text.split("<|The Start of Assistant B's Answer|>")[1].split("<|The End of Assistant B's Answer|>")[0]
    verdict = "A>>B" if GOOD in answer_a else "B>A" if GOOD in answer_b else "A=B"
    return Reply(text=f"My own answer first... Comparing both. Final verdict:\n[[{verdict}]]")


def test_alpaca_eval_2_maps_verdicts_back_through_alpaca_evals_shuffling(tmp_path):
    items = pw.load_alpaca_eval_set(DATA / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json")
    assert len(items) == 6 and items[2].index == 2 and items[0].baseline_generator == "gpt4_turbo"
    outputs = [f"{GOOD}: {item.instruction}" if i < 4 else "meh" for i, item in enumerate(items)]
    with FakeOpenAIServer(handler=ae2_judge) as server:
        judge = OpenAICompatibleBackend("judge-model", base_url=server.base_url)
        result = pw.alpaca_eval_2(items, outputs, "ours", judge, tmp_path)
        prompts = [last_user_text(body) for body in server.bodies]
    assert result["n"] == result["n_judged"] == 6
    assert result["win_rate"] == pytest.approx(100 * 4 / 6)
    assert result["judge"] == "openai:judge-model@" + server.base_url
    # alpaca_eval's own AE-2 prompt, with the outputs in both positions across the set (its shuffling)
    assert all("## Best Model Identifier" in prompt for prompt in prompts)
    assert len(prompts) == 6
    # offline, the LC GLM's Hub file is not there: the raw win rate stands, with the reason
    if result["length_controlled_winrate"] is None:
        assert "length-controlled GLM unavailable" in result["note"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-learn on alpaca_eval's GLM arguments
def test_lc_glm_runs_on_a_difficulty_file_in_the_hub_files_shape(tmp_path, monkeypatch):
    """AlpacaEval's ``df_gamed.csv`` (per-instruction difficulty and two gamed baselines), here for the six
    fixture instructions, placed in a Hub cache the way a download leaves it."""
    import alpaca_eval.constants

    snapshot = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    rows = [
        {
            "model": model,
            "index": index,
            "preference": preference,
            "std_delta_len": delta,
            "instruction_difficulty": 0.3 * index - 0.5,
            "not_gamed_baseline": False,
        }
        for model, delta, preference in (("gamed_verbose", 1.0, 0.9), ("gamed_concise", -1.0, 0.2))
        for index in range(6)
    ]
    pd.DataFrame(rows).to_csv(snapshot / "df_gamed.csv", index=False)
    monkeypatch.setattr(alpaca_eval.constants, "DEFAULT_CACHE_DIR", str(tmp_path / "hub"))
    items = pw.load_alpaca_eval_set(DATA / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json")
    outputs = [f"{GOOD}: {item.instruction}" if i % 2 == 0 else "meh" for i, item in enumerate(items)]
    with FakeOpenAIServer(handler=ae2_judge) as server:
        judge = OpenAICompatibleBackend("judge-model", base_url=server.base_url)
        result = pw.alpaca_eval_2(items, outputs, "ours", judge, tmp_path / "work")
    assert result["win_rate"] == pytest.approx(50.0)
    assert "note" not in result, result.get("note")
    assert 0 < result["length_controlled_winrate"] < 100


def test_arena_hard_style_judges_both_orders_through_claude(tmp_path, monkeypatch):
    items = pw.load_arena_hard_set(
        DATA / "arena_hard" / "question.jsonl",
        {"hard_prompt": DATA / "arena_hard" / "model_answer" / "o3-mini-2025-01-31.jsonl"},
    )
    hard = [item for item in items if item.category == "hard_prompt"]
    assert [item.uid for item in hard] == ["h1", "h2"] and hard[0].baseline_generator == "o3-mini-2025-01-31"
    assert hard[1].baseline_output.startswith("Assume sqrt(2)")
    outputs = [f"{GOOD}: proof", "same as baseline"]
    with FakeAnthropicServer(handler=arena_judge) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key-123456")
        judge = AnthropicBackend("claude-judge", base_url=server.url)
        result = pw.arena_hard_style(hard, outputs, "ours", judge, tmp_path, max_judge_tokens=64)
        bodies = server.bodies
    # item 1: the model wins in both orders; item 2: a tie in both orders
    assert result["games"] == result["games_judged"] == 4
    assert result["win_rate"] == pytest.approx(100 * (1 + 1 + 0.5 + 0.5) / 4)
    assert result["baseline"] == "o3-mini-2025-01-31" and result["judge"] == "anthropic:claude-judge"
    assert len(bodies) == 4 and all(body["max_tokens"] == 64 for body in bodies)
    assert all("verdict label" in body["system"] for body in bodies)  # our system prompt travelled as system=
    firsts = [last_user_text(b).split("<|The Start of Assistant A's Answer|>")[1].strip() for b in bodies]
    assert sum(first.startswith(GOOD) for first in firsts) == 1  # the good answer shown first once, second once


def test_verdict_parsers():
    assert pw.arena_verdict_parser("blah [[A>B]] then final [[B >> A]]") == [2]
    assert pw.arena_verdict_parser("no label") == [None]
    assert pw.arena_verdict_parser("[[A=B]]") == [1.5]
    assert pw.ae2_verdict_parser(" M\n") == [2] and pw.ae2_verdict_parser("m") == [1]
    assert pw.ae2_verdict_parser("Model M") == [None]


def test_bad_rows_name_file_and_field(tmp_path):
    bad = tmp_path / "ae.json"
    bad.write_text('[{"instruction": "x"}]')
    with pytest.raises(pw.DataError, match=r"ae.json: row 1: field 'output' must be a string"):
        pw.load_alpaca_eval_set(bad)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"uid": "z", "category": "hard_prompt", "prompt": "p"}\n')
    with pytest.raises(pw.DataError, match=r"q.jsonl:1: question z has no answer"):
        pw.load_arena_hard_set(
            questions, {"hard_prompt": DATA / "arena_hard" / "model_answer" / "o3-mini-2025-01-31.jsonl"}
        )
