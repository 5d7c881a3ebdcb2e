"""Chat backends: the API backends against local fake servers (real SDKs on the wire), the retry
policy, the local HF backend on a tiny model, the vLLM backend with a stand-in engine, TokenBudget."""

import re
import types

import pytest

from auxiliary.backends import (
    AnthropicBackend,
    BackendError,
    HFChatBackend,
    OpenAICompatibleBackend,
    RetryPolicy,
    TokenBudget,
    VLLMChatBackend,
    _share_fairly,
)
from auxiliary.generation import SamplingParams, encode_chat
from tests.fakes import FakeAnthropicServer, FakeLLM, FakeOpenAIServer, Reply, install_fake_vllm, last_user_text

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


class SleepRecorder:
    """Injected as RetryPolicy.sleep: records the pauses instead of waiting."""

    def __init__(self):
        self.pauses = []

    def __call__(self, seconds):
        self.pauses.append(seconds)


def no_wait_policy(max_attempts=8):
    recorder = SleepRecorder()
    return RetryPolicy(max_attempts=max_attempts, sleep=recorder), recorder


def conversation(text, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


# ---- RetryPolicy --------------------------------------------------------------------------------


def test_retry_delays_grow_exponentially_and_are_capped():
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.0)
    assert [policy.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_retry_jitter_only_shortens_and_retry_after_is_respected():
    import random

    policy = RetryPolicy(base_delay=4.0, max_delay=30.0, jitter=0.5)
    rng = random.Random(0)
    delays = [policy.delay(0, rng=rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays) and len(set(delays)) > 1
    assert policy.delay(0, retry_after=12.0, rng=rng) == 12.0
    assert policy.delay(0, retry_after=500.0, rng=rng) == 30.0


def test_retry_policy_validates():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


# ---- AnthropicBackend ---------------------------------------------------------------------------


def test_anthropic_success_forwards_system_and_sampling():
    with FakeAnthropicServer(api_key="sk-test") as server:
        backend = AnthropicBackend("claude-test", api_key="sk-test", base_url=server.base_url)
        sampling = SamplingParams(max_new_tokens=33, temperature=0.3)
        texts = backend.generate([conversation("hello", system="be brief"), conversation("bye")], sampling)
    assert sorted(texts) == ["echo: bye", "echo: hello"] and texts[0] == "echo: hello"
    by_text = {last_user_text(b): b for b in server.bodies}
    first, second = by_text["hello"], by_text["bye"]
    assert first["system"] == "be brief" and "system" not in second
    assert first["messages"] == [{"role": "user", "content": "hello"}]
    assert first["model"] == "claude-test" and first["max_tokens"] == 33 and first["temperature"] == 0.3
    assert "top_p" not in first and "top_k" not in first
    assert backend.name == "anthropic:claude-test"


def test_anthropic_sends_top_p_only_below_one():
    with FakeAnthropicServer() as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url)
        backend.generate([conversation("x")], SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=20))
    assert server.bodies[0]["top_p"] == 0.9 and server.bodies[0]["top_k"] == 20


def test_anthropic_results_keep_input_order_under_concurrency():
    with FakeAnthropicServer() as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, max_concurrency=4)
        texts = backend.generate([conversation(f"q{i}") for i in range(12)], GREEDY)
    assert texts == [f"echo: q{i}" for i in range(12)]


def test_anthropic_empty_reply_is_empty_string():
    with FakeAnthropicServer([Reply(text="")]) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url)
        assert backend.generate([conversation("x")], GREEDY) == [""]


def test_anthropic_429_then_success_is_retried_without_sdk_retries():
    policy, sleeps = no_wait_policy()
    replies = [Reply(status=429), Reply(status=529), Reply(text="finally")]
    with FakeAnthropicServer(replies) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, retry=policy)
        assert backend.generate([conversation("x")], GREEDY) == ["finally"]
    assert len(server.requests) == 3  # the SDK itself did not retry
    assert len(sleeps.pauses) == 2 and all(p > 0 for p in sleeps.pauses)


def test_anthropic_retry_after_header_sets_the_pause():
    policy, sleeps = no_wait_policy()
    with FakeAnthropicServer([Reply(status=429, headers={"retry-after": "7"}), Reply(text="ok")]) as server:
        AnthropicBackend("m", api_key="k", base_url=server.base_url, retry=policy).generate([conversation("x")], GREEDY)
    assert sleeps.pauses == [7.0]


def test_anthropic_401_fails_at_once_with_one_line():
    policy, sleeps = no_wait_policy()
    with FakeAnthropicServer(api_key="right-key") as server:
        backend = AnthropicBackend("m", api_key="wrong-key", base_url=server.base_url, retry=policy)
        with pytest.raises(BackendError) as caught:
            backend.generate([conversation("x")], GREEDY)
    message = str(caught.value)
    assert "\n" not in message
    assert "anthropic:m" in message and "401" in message and "authentication_error" in message
    assert "ANTHROPIC_API_KEY" in message and "1 attempt" in message
    assert len(server.requests) == 1 and sleeps.pauses == []


@pytest.mark.parametrize("status", [400, 403, 404])
def test_anthropic_client_errors_are_not_retried(status):
    policy, sleeps = no_wait_policy()
    with FakeAnthropicServer([Reply(status=status)] * 3) as server:
        backend = AnthropicBackend("claude-nope", api_key="k", base_url=server.base_url, retry=policy)
        with pytest.raises(BackendError, match=f"HTTP {status}"):
            backend.generate([conversation("x")], GREEDY)
    assert len(server.requests) == 1 and sleeps.pauses == []


def test_anthropic_persistent_500_gives_up_after_max_attempts():
    policy, sleeps = no_wait_policy(max_attempts=4)
    with FakeAnthropicServer(handler=lambda body: Reply(status=500, message="boom")) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, retry=policy)
        with pytest.raises(BackendError) as caught:
            backend.generate([conversation("x")], GREEDY)
    message = str(caught.value)
    assert "4 attempts" in message and "HTTP 500" in message and "boom" in message and "\n" not in message
    assert len(server.requests) == 4 and len(sleeps.pauses) == 3


def test_anthropic_overloaded_message_says_what_to_do():
    policy, _ = no_wait_policy(max_attempts=2)
    with FakeAnthropicServer(handler=lambda body: Reply(status=529)) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, retry=policy)
        with pytest.raises(BackendError, match="overloaded_error.*retry later or lower --max_concurrency"):
            backend.generate([conversation("x")], GREEDY)


def test_anthropic_timeout_is_retried_then_reported():
    policy, sleeps = no_wait_policy(max_attempts=2)
    with FakeAnthropicServer(handler=lambda body: Reply(text="late", delay=1.0)) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, timeout=0.2, retry=policy)
        with pytest.raises(BackendError, match=r"timeout.*--timeout"):
            backend.generate([conversation("x")], GREEDY)
    assert len(server.requests) == 2 and len(sleeps.pauses) == 1


def test_anthropic_timeout_then_success():
    policy, _ = no_wait_policy()
    with FakeAnthropicServer([Reply(text="late", delay=1.0), Reply(text="on time")]) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, timeout=0.2, retry=policy)
        assert backend.generate([conversation("x")], GREEDY) == ["on time"]


def test_anthropic_connection_refused_is_reported():
    policy, _ = no_wait_policy(max_attempts=2)
    with FakeAnthropicServer() as server:
        url = server.base_url
    backend = AnthropicBackend("m", api_key="k", base_url=url, retry=policy)  # server is gone
    with pytest.raises(BackendError, match="connection error.*reachable"):
        backend.generate([conversation("x")], GREEDY)


def test_anthropic_missing_key_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(BackendError) as caught:
        AnthropicBackend("m")
    assert "ANTHROPIC_API_KEY" in str(caught.value) and "\n" not in str(caught.value)


def test_anthropic_key_from_environment(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    with FakeAnthropicServer(api_key="env-key") as server:
        assert AnthropicBackend("m", base_url=server.base_url).generate([conversation("x")], GREEDY) == ["echo: x"]


def test_one_hard_failure_fails_the_batch():
    policy, _ = no_wait_policy()

    def handler(body):
        return Reply(status=401) if last_user_text(body) == "bad" else Reply(text="ok")

    with FakeAnthropicServer(handler=handler) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, max_concurrency=2, retry=policy)
        with pytest.raises(BackendError, match="401"):
            backend.generate([conversation("a"), conversation("bad"), conversation("c")], GREEDY)


def test_only_a_leading_system_message_is_accepted():
    with FakeAnthropicServer() as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url)
        late_system = [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]
        with pytest.raises(ValueError, match="leading system"):
            backend.generate([late_system], GREEDY)


# ---- OpenAICompatibleBackend --------------------------------------------------------------------


def test_openai_success_forwards_messages_and_sampling():
    with FakeOpenAIServer() as server:
        backend = OpenAICompatibleBackend(
            "qwen", base_url=server.base_url, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
        )
        sampling = SamplingParams(max_new_tokens=21, temperature=0.5, top_p=0.95, top_k=20)
        texts = backend.generate([conversation("hi", system="sys"), conversation("yo")], sampling)
    assert texts == ["echo: hi", "echo: yo"]
    body = next(b for b in server.bodies if last_user_text(b) == "hi")
    assert body["messages"] == conversation("hi", system="sys")
    assert body["model"] == "qwen" and body["max_tokens"] == 21
    assert body["temperature"] == 0.5 and body["top_p"] == 0.95 and body["top_k"] == 20
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_openai_429_then_success():
    policy, sleeps = no_wait_policy()
    with FakeOpenAIServer([Reply(status=429), Reply(text="done")]) as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url, retry=policy)
        assert backend.generate([conversation("x")], GREEDY) == ["done"]
    assert len(server.requests) == 2 and len(sleeps.pauses) == 1


def test_openai_401_fails_at_once():
    policy, sleeps = no_wait_policy()
    with FakeOpenAIServer(api_key="good") as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url, api_key="bad", retry=policy)
        with pytest.raises(BackendError) as caught:
            backend.generate([conversation("x")], GREEDY)
    assert "OPENAI_API_KEY" in str(caught.value) and "401" in str(caught.value) and "\n" not in str(caught.value)
    assert len(server.requests) == 1 and sleeps.pauses == []


def test_openai_persistent_500_and_timeout():
    policy, _ = no_wait_policy(max_attempts=3)
    with FakeOpenAIServer(handler=lambda body: Reply(status=500)) as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url, retry=policy)
        with pytest.raises(BackendError, match="3 attempts.*HTTP 500"):
            backend.generate([conversation("x")], GREEDY)
    assert len(server.requests) == 3
    with FakeOpenAIServer(handler=lambda body: Reply(text="late", delay=1.0)) as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url, timeout=0.2, retry=no_wait_policy(2)[0])
        with pytest.raises(BackendError, match="timeout"):
            backend.generate([conversation("x")], GREEDY)


def test_openai_empty_content_is_empty_string():
    with FakeOpenAIServer([Reply(text="")]) as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url)
        assert backend.generate([conversation("x")], GREEDY) == [""]


def test_empty_batch_makes_no_requests():
    with FakeOpenAIServer() as server:
        assert OpenAICompatibleBackend("m", base_url=server.base_url).generate([], GREEDY) == []
    assert server.requests == []


# ---- HFChatBackend ------------------------------------------------------------------------------


def test_hf_batched_equals_one_by_one_greedy(tiny_model, chat_tokenizer):
    backend = HFChatBackend(tiny_model, chat_tokenizer, batch_size=4)
    conversations = [
        conversation("Hi"),
        conversation("Explain how left padding keeps batched generation identical to single runs."),
        conversation("What is two plus two?", system="Answer in one word."),
        conversation("A much longer request " * 12),
    ]
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    batched = backend.generate(conversations, sampling)
    single = [backend.generate([c], sampling)[0] for c in conversations]
    assert batched == single
    assert all(isinstance(t, str) and t == t.strip() for t in batched)


def test_hf_truncates_from_the_left(tiny_model, chat_tokenizer):
    backend = HFChatBackend(tiny_model, chat_tokenizer, max_input_tokens=20)
    ids = backend.encode(conversation("word " * 100))
    full = encode_chat(chat_tokenizer, conversation("word " * 100))
    assert ids == full[-20:]


def test_hf_rejects_tokenizer_without_pad(tiny_model, chat_tokenizer):
    tokenizer = types.SimpleNamespace(pad_token_id=None)
    with pytest.raises(ValueError, match="pad token"):
        HFChatBackend(tiny_model, tokenizer)


def test_hf_from_pretrained_by_path(tiny_model_path):
    backend = HFChatBackend.from_pretrained(tiny_model_path, dtype="float32", device="cpu", batch_size=2)
    assert backend.name == f"hf:{tiny_model_path}"
    texts = backend.generate([conversation("a"), conversation("b")], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert len(texts) == 2


# ---- VLLMChatBackend ----------------------------------------------------------------------------


@pytest.fixture()
def fake_vllm(monkeypatch):
    install_fake_vllm(monkeypatch)


def test_vllm_chat_path_is_one_batched_call(fake_vllm):
    llm = FakeLLM()
    backend = VLLMChatBackend(llm)
    texts = backend.generate([conversation("a"), conversation("b")], SamplingParams(max_new_tokens=9, temperature=0.0))
    assert texts == ["reply", "reply"] and len(llm.calls) == 1
    kind, messages, params, template_kwargs = llm.calls[0]
    assert kind == "chat" and messages == [conversation("a"), conversation("b")]
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.0, 1.0, -1, 9)
    assert template_kwargs == {"enable_thinking": False}


def test_vllm_token_path_matches_hf_rendering(fake_vllm, chat_tokenizer):
    llm = FakeLLM()
    backend = VLLMChatBackend(llm, tokenizer=chat_tokenizer, max_input_tokens=16)
    backend.generate([conversation("hello " * 50)], SamplingParams(max_new_tokens=3, top_k=5))
    kind, prompts, params, _ = llm.calls[0]
    assert kind == "generate" and params.top_k == 5
    assert prompts == [{"prompt_token_ids": encode_chat(chat_tokenizer, conversation("hello " * 50))[-16:]}]


def test_vllm_needs_tokenizer_for_truncation():
    with pytest.raises(ValueError, match="tokenizer"):
        VLLMChatBackend(FakeLLM(), max_input_tokens=10)


# ---- TokenBudget --------------------------------------------------------------------------------


def test_share_fairly_gives_short_fields_everything():
    assert _share_fairly([10, 500, 1000], 400) == [10, 195, 195]
    assert _share_fairly([10, 20], 100) == [10, 20]
    assert sum(_share_fairly([300, 300, 300], 100)) <= 100


def test_token_budget_keeps_instructions_and_clips_long_fields(chat_tokenizer):
    def build(request, response):
        return [
            {"role": "system", "content": "PERSONA AND RULES"},
            {"role": "user", "content": f"Request:\n{request}\n\nResponse:\n{response}\n\nFINAL QUESTION"},
        ]

    budget = TokenBudget(chat_tokenizer, 200)
    short = budget.fit(build, ["short request", "short response"])
    assert short == build("short request", "short response")
    long_response = "start " + "filler " * 400 + "end"
    messages = budget.fit(build, ["short request", long_response])
    assert len(encode_chat(chat_tokenizer, messages)) <= 200
    text = messages[1]["content"]
    assert messages[0]["content"] == "PERSONA AND RULES"
    assert "short request" in text and "FINAL QUESTION" in text
    assert text.index("start") < text.index("tokens omitted") < text.rindex("end")
    assert re.search(r"\[\.\.\. \d+ tokens omitted \.\.\.\]", text)
