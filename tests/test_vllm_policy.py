"""auxiliary/vllm_engines.py against a fake engine with vLLM's call signatures (the real engine: test_vllm_real.py)."""

import os
import sys
import types

import pytest

from sdpo.models.generation import SamplingParams
from tests.fakes import install_fake_vllm


@pytest.fixture()
def fake_policy_vllm(monkeypatch, chat_tokenizer):
    """A vllm module whose LLM records generate calls and answers one finished + one truncated output."""
    vllm = install_fake_vllm(monkeypatch)
    eos = chat_tokenizer.eos_token_id

    class FakePolicyLLM:
        instances = []

        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.calls = []
            self.events = []  # generate / receive_policy_weights / reset_prefix_cache, in call order
            self.weights = {}
            FakePolicyLLM.instances.append(self)

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            from sdpo.models.vllm_weight_sync import unpack_weights

            # What vLLM's worker gets: msgpack keeps strings, lists and bytes (not tensors).
            (packed,) = args
            assert method == "receive_policy_weights" and self.kwargs["worker_extension_cls"]
            assert all(isinstance(raw, bytes) for *_, raw in packed)
            self.weights = dict(unpack_weights(packed))
            self.events.append("receive_policy_weights")
            return [len(packed)]

        def reset_prefix_cache(self):
            self.events.append("reset_prefix_cache")

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            self.calls.append((prompts, params, lora_request))
            self.events.append("generate")
            finished = types.SimpleNamespace(token_ids=[42, 43, eos], finish_reason="stop")
            truncated = types.SimpleNamespace(token_ids=[44, 45], finish_reason="length")
            outputs = [finished, truncated] * len(prompts)
            return [types.SimpleNamespace(outputs=[o]) for o in outputs[: len(prompts)]]

    vllm.LLM = FakePolicyLLM
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, id_, path: (name, id_, path)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    return FakePolicyLLM


def test_vllm_policy_engine_follows_the_adapter_and_keeps_exact_ids(fake_policy_vllm, chat_tokenizer, tmp_path):
    from sdpo.models.vllm_engines import VLLMPolicyEngine

    eos = chat_tokenizer.eos_token_id

    engine = VLLMPolicyEngine(
        "m", chat_tokenizer, max_lora_rank=8, gpu_memory_utilization=0.3, dtype="bfloat16", max_model_len=64
    )
    assert engine.llm.kwargs["enable_lora"] and engine.llm.kwargs["max_lora_rank"] == 8
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0)
    first = engine.generate([[1, 2], [3]], sampling, [eos])
    assert [g.token_ids for g in first] == [[42, 43, eos], [44, 45]] and [g.finished for g in first] == [True, False]
    assert (
        engine.llm.calls[0][0] == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
        and engine.llm.calls[0][2] is None
    )
    assert engine.llm.calls[0][1].top_k == -1 and engine.llm.calls[0][1].max_tokens == 5
    engine.load_adapter(tmp_path / "a")
    engine.load_adapter(tmp_path / "a")
    engine.generate([[1]], sampling, [eos])
    assert engine.llm.calls[-1][2] == ("adapter_v2", 2, str(tmp_path / "a"))


def test_updater_generates_with_vllm_and_publishes_each_update(fake_policy_vllm, tiny_model_path, tmp_path):
    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    config = OnlineSDPOConfig(
        model_name_or_path=tiny_model_path,
        device="cpu",
        torch_dtype="float32",
        use_vllm=True,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        max_new_tokens=8,
        checkpoint_dir=str(tmp_path),
        checkpoint_every_n_steps=0,
    )
    assert config.use_lora
    updater = OnlineSDPOUpdater(config)
    engine = fake_policy_vllm.instances[-1]
    messages = [{"role": "user", "content": "hi"}]
    response = updater.generate_response(messages)
    assert response.token_ids[:2] == [42, 43] and engine.calls[-1][2] is None
    assert engine.calls[-1][0] == [{"prompt_token_ids": updater.encode_context(messages)}]
    updater.train_step(messages, response, "Shorter.")
    assert (tmp_path / "_live_adapter" / "adapter_config.json").is_file()
    updater.generate_response(messages)
    assert engine.calls[-1][2][1] == 1


def test_full_fine_tuning_pushes_the_updated_weights_before_the_next_generation(
    fake_policy_vllm, tiny_model_path, tmp_path
):
    """Without LoRA the engine has no adapters: after each update it gets every weight (engine dtype, host
    memory) once, before its next generation, then drops its prefix cache; nothing is written to disk."""
    import torch

    from sdpo.learner.config import OnlineSDPOConfig
    from sdpo.learner.updater import OnlineSDPOUpdater

    config = OnlineSDPOConfig(
        model_name_or_path=tiny_model_path,
        device="cpu",
        torch_dtype="bfloat16",
        use_vllm=True,
        learning_rate=1e-2,
        max_new_tokens=8,
        checkpoint_dir=str(tmp_path),
        checkpoint_every_n_steps=0,
    )
    assert not config.use_lora
    updater = OnlineSDPOUpdater(config)
    engine = fake_policy_vllm.instances[-1]
    assert "enable_lora" not in engine.kwargs
    messages = [{"role": "user", "content": "hi"}]
    response = updater.generate_response(messages)
    updater.train_step(messages, response, "Shorter.")
    updater.train_step(messages, response, "Shorter still.")
    assert engine.events == ["generate"], "weights are pushed when the engine next generates, not at each update"
    updater.generate_response(messages)
    assert engine.events == ["generate", "receive_policy_weights", "reset_prefix_cache", "generate"]
    trained = updater.model.state_dict()
    assert engine.weights.keys() == trained.keys()
    for name, tensor in engine.weights.items():
        assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
        assert torch.equal(tensor, trained[name].to(torch.bfloat16)), name
    assert updater.vllm_engine.weights_version == 2 and engine.calls[-1][2] is None
    assert not list(tmp_path.iterdir())


def test_colocated_memory_share_fits_beside_training_or_names_the_flag():
    from sdpo.models.vllm_engines import COLOCATED_HEADROOM_SHARE, colocated_memory_share

    gib = 1 << 30
    # 80 GiB card, 8B policy in bf16 loaded (16 GiB), 8-bit Adam to come (16 GiB), engine weights 16 GiB.
    fits = dict(
        total_bytes=80 * gib, free_bytes=64 * gib, training_bytes_to_come=16 * gib, engine_weight_bytes=16 * gib
    )
    share = colocated_memory_share(**fits, requested=None)
    assert share == pytest.approx((64 - 16) / 80 - COLOCATED_HEADROOM_SHARE)
    assert colocated_memory_share(**fits, requested=0.3) == 0.3
    with pytest.raises(ValueError, match=r"--vllm_gpu_memory_utilization 0.9 asks .* lower it to at most 0.55"):
        colocated_memory_share(**fits, requested=0.9)
    # fp32 master weights and fp32 Adam moments of 8B: the optimizer state alone exceeds what is free.
    crowded = dict(fits, free_bytes=48 * gib, training_bytes_to_come=64 * gib)
    with pytest.raises(ValueError, match=r"needs 16\.5 GiB beside training, but only 0\.0 GiB fit .*--use_lora"):
        colocated_memory_share(**crowded, requested=None)


def test_engines_resolve_the_bundled_alias_and_get_the_gpus_asked_for(
    fake_policy_vllm, bundled_model_path, monkeypatch
):
    from sdpo.models.vllm_engines import build_vllm_engine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    seen = []
    fake_policy_vllm.__init__ = lambda self, **kwargs: seen.append((kwargs, os.environ["CUDA_VISIBLE_DEVICES"]))
    build_vllm_engine("smollm2-135m-instruct", tensor_parallel_size=2, gpu_start=1, max_model_len=64)
    assert seen == [
        (
            {
                "model": bundled_model_path,
                "tensor_parallel_size": 2,
                "gpu_memory_utilization": 0.9,
                "max_model_len": 64,
            },
            "5,6",
        )
    ]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"
    with pytest.raises(ValueError, match="exceeds the visible GPUs"):
        build_vllm_engine("smollm2-135m-instruct", tensor_parallel_size=2, gpu_start=2)


def test_policy_engine_without_sleep_mode_never_sleeps(fake_policy_vllm, chat_tokenizer):
    from sdpo.models.vllm_engines import VLLMPolicyEngine, shutdown_engine

    engine = VLLMPolicyEngine(
        "m", chat_tokenizer, max_lora_rank=8, gpu_memory_utilization=0.3, dtype="float32", max_model_len=64
    )
    assert not engine.sleeps and "enable_sleep_mode" not in engine.llm.kwargs
    engine.generate([[1]], SamplingParams(max_new_tokens=2), [chat_tokenizer.eos_token_id])
    shutdown_engine(engine.llm)
    engine.close()


def test_require_vllm_names_the_option_and_the_install_command(monkeypatch):
    from sdpo.models.vllm_engines import VLLMUnavailableError, require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail like a missing package
    require_vllm([])
    with pytest.raises(VLLMUnavailableError) as error:
        require_vllm(["--use_vllm", "--user_vllm"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("--use_vllm, --user_vllm needs vLLM, which is not installed")
    assert "requirements-vllm.txt" in message and "--vllm-cpu" in message
