"""Chat backends: the API backends against local fake servers (the real SDKs on the wire, their own
retries counted in requests the server received), the pre-flight check, the local HF backend on a tiny
model, the vLLM backend with a stand-in engine, TokenBudget."""

import logging
import re
import sys
import types

import pytest

from auxiliary.claude_style_judge import ClaudeStyleJudge
from auxiliary.claude_user_simulator import ClaudeStyleUserSimulator
from sdpo.chat.backends import (
    AnthropicBackend,
    BackendError,
    HFChatBackend,
    OpenAICompatibleBackend,
    TokenBudget,
    VLLMChatBackend,
    _share_fairly,
)
from sdpo.models.generation import SamplingParams, encode_chat
from tests.fakes import (
    FakeAnthropicServer,
    FakeLLM,
    FakeOpenAIServer,
    Reply,
    install_fake_vllm,
    last_user_text,
)

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


def transient(status, **kwargs):
    """A failure the clients retry; ``retry-after-ms: 1`` makes them retry after a millisecond."""
    return Reply(status=status, headers={"retry-after-ms": "1"}, **kwargs)


def conversation(text, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def retry_counts(server):
    """The attempt number the client wrote on each request it sent (0 = first try)."""
    return [int(r["headers"]["x-stainless-retry-count"]) for r in server.requests]


def failure_of(backend, conversations=None):
    """The one-line message of the BackendError that ``generate`` raises."""
    with pytest.raises(BackendError) as caught:
        backend.generate(conversations or [conversation("x")], GREEDY)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- AnthropicBackend: requests -----------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_only_a_leading_system_message_is_accepted():
    with FakeAnthropicServer() as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url)
        late_system = [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]
        with pytest.raises(ValueError, match="leading system"):
            backend.generate([late_system], GREEDY)


def test_anthropic_missing_key_is_one_clear_line_before_any_request(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(BackendError) as caught:
        AnthropicBackend("m")
    assert str(caught.value) == "anthropic:m: no API key: set ANTHROPIC_API_KEY (environment or .env)"


def test_anthropic_key_and_url_from_environment(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    with FakeAnthropicServer(api_key="env-key") as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        assert AnthropicBackend("m").generate([conversation("x")], GREEDY) == ["echo: x"]


@pytest.mark.parametrize("keyword, value", [("max_concurrency", 0), ("max_retries", -1), ("timeout", 0.0)])
def test_remote_settings_are_validated(keyword, value):
    with pytest.raises(ValueError, match=keyword):
        AnthropicBackend("m", api_key="k", **{keyword: value})


# ---- AnthropicBackend: the client's retries, counted on the server ------------------------------


def test_transient_failures_are_retried_by_the_client_until_success():
    replies = [transient(429), transient(529), transient(500), Reply(text="finally")]
    with FakeAnthropicServer(replies) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url)
        assert backend.generate([conversation("x")], GREEDY) == ["finally"]
    assert retry_counts(server) == [0, 1, 2, 3]


def test_retry_after_header_is_honoured():
    """Without the header the first pause would be at most 0.5 s (the clients' initial backoff)."""
    with FakeAnthropicServer([Reply(status=429, headers={"retry-after": "0.8"}), Reply(text="ok")]) as server:
        AnthropicBackend("m", api_key="k", base_url=server.base_url).generate([conversation("x")], GREEDY)
    first, second = server.requests
    assert second["time"] - first["time"] >= 0.8


@pytest.mark.parametrize(
    "status, expected",
    [
        (400, "HTTP 400 invalid_request_error: scripted failure. The request was rejected"),
        (403, "HTTP 403 permission_error: scripted failure. The key may not use model 'm'"),
        (404, "HTTP 404 not_found_error: scripted failure. Check the model name 'm'"),
    ],
)
def test_client_errors_fail_after_exactly_one_request(status, expected):
    with FakeAnthropicServer(handler=lambda body: Reply(status=status)) as server:
        message = failure_of(AnthropicBackend("m", api_key="k", base_url=server.base_url))
    assert message.startswith(f"anthropic:m: request failed after 1 attempt: {expected}")
    assert message.endswith("A run stopped by this can be continued with --resume.")
    assert len(server.requests) == 1


def test_rejected_key_fails_after_exactly_one_request():
    with FakeAnthropicServer(api_key="right-key") as server:
        message = failure_of(AnthropicBackend("m", api_key="wrong-key", base_url=server.base_url))
    assert "after 1 attempt: HTTP 401 authentication_error: invalid x-api-key" in message
    assert "The key was rejected: check ANTHROPIC_API_KEY." in message
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "status, hint",
    [
        (529, "overloaded_error: boom. The API is overloaded: retry later or lower --api_max_concurrency."),
        (429, "rate_limit_error: boom. Rate limited: lower --api_max_concurrency or retry later."),
        (500, "api_error: boom. Server-side error: retry later."),
    ],
)
def test_persistent_transient_failure_gives_up_after_max_retries(status, hint):
    with FakeAnthropicServer(handler=lambda body: transient(status, message="boom")) as server:
        message = failure_of(AnthropicBackend("m", api_key="k", base_url=server.base_url, max_retries=3))
    assert f"request failed after 4 attempts: HTTP {status} {hint}" in message and "--resume" in message
    assert retry_counts(server) == [0, 1, 2, 3]


def test_no_retries_means_one_attempt():
    with FakeAnthropicServer(handler=lambda body: transient(500)) as server:
        message = failure_of(AnthropicBackend("m", api_key="k", base_url=server.base_url, max_retries=0))
    assert "after 1 attempt: HTTP 500" in message and len(server.requests) == 1


def test_timeout_is_retried_then_reported():
    with FakeAnthropicServer(handler=lambda body: Reply(text="late", delay=1.0)) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, timeout=0.2, max_retries=1)
        message = failure_of(backend)
    assert "request failed after 2 attempts: no reply within 0.2s. Retry later" in message
    assert retry_counts(server) == [0, 1]


def test_timeout_then_success():
    with FakeAnthropicServer([Reply(text="late", delay=1.0), Reply(text="on time")]) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, timeout=0.2)
        assert backend.generate([conversation("x")], GREEDY) == ["on time"]
    assert retry_counts(server) == [0, 1]


def test_unreachable_endpoint_is_retried_then_reported():
    with FakeAnthropicServer() as server:
        url = server.base_url
    backend = AnthropicBackend("m", api_key="k", base_url=url, max_retries=1)  # the server is gone
    message = failure_of(backend)
    assert f"after 2 attempts: cannot connect to {url}" in message and "Check the base URL" in message


def test_a_failure_stops_the_requests_not_yet_sent():
    def handler(body):
        return Reply(status=401) if last_user_text(body) == "bad" else Reply(text="ok")

    with FakeAnthropicServer(handler=handler) as server:
        backend = AnthropicBackend("m", api_key="k", base_url=server.base_url, max_concurrency=1)
        message = failure_of(backend, [conversation("bad"), conversation("a"), conversation("c")])
    assert "HTTP 401" in message and len(server.requests) == 1


# ---- the pre-flight check -----------------------------------------------------------------------


def test_anthropic_check_asks_the_models_api_once():
    with FakeAnthropicServer(models=["claude-x"]) as server:
        AnthropicBackend("claude-x", api_key="k", base_url=server.base_url).check()
    assert [(r["method"], r["path"]) for r in server.requests] == [("GET", "/v1/models/claude-x")]


@pytest.mark.parametrize(
    "server_kwargs, expected",
    [
        ({"api_key": "other"}, "HTTP 401 authentication_error: invalid x-api-key. The key was rejected"),
        ({"models": ["claude-x"]}, "HTTP 404 not_found_error: model: claude-typo. Check the model name 'claude-typo'"),
        ({"replies": [Reply(status=403)]}, "HTTP 403 permission_error: scripted failure. The key may not use model"),
    ],
)
def test_anthropic_check_finds_bad_key_and_model_in_one_request(server_kwargs, expected):
    with FakeAnthropicServer(**server_kwargs) as server:
        backend = AnthropicBackend("claude-typo", api_key="k", base_url=server.base_url)
        with pytest.raises(BackendError) as caught:
            backend.check()
    assert str(caught.value).startswith(f"anthropic:claude-typo: pre-flight check failed: {expected}")
    assert "--resume" not in str(caught.value) and "\n" not in str(caught.value)
    assert len(server.requests) == 1


def test_anthropic_check_rejects_a_retired_model():
    with FakeAnthropicServer(retired_models=("claude-old",)) as server:
        backend = AnthropicBackend("claude-old", api_key="k", base_url=server.base_url)
        with pytest.raises(BackendError, match="model 'claude-old' is retired"):
            backend.check()


def test_check_reports_an_unreachable_endpoint():
    with FakeAnthropicServer() as server:
        url = server.base_url
    with pytest.raises(BackendError, match=f"pre-flight check failed: cannot connect to {url}"):
        AnthropicBackend("m", api_key="k", base_url=url).check()


def test_check_lets_a_busy_api_pass_after_one_retry(caplog):
    with FakeAnthropicServer([transient(529), transient(529)]) as server, caplog.at_level(logging.WARNING):
        AnthropicBackend("m", api_key="k", base_url=server.base_url).check()
    assert len(server.requests) == 2 and "HTTP 529 overloaded_error" in caplog.text


def test_claude_simulator_and_judge_expose_the_check():
    with FakeAnthropicServer(api_key="right") as server:
        for participant in (ClaudeStyleUserSimulator, ClaudeStyleJudge):
            backend = participant("no_emojis", api_key="wrong", base_url=server.base_url, max_retries=2).backend
            assert backend.max_retries == 2
            with pytest.raises(BackendError, match="401"):
                backend.check()
    assert len(server.requests) == 2


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


def test_openai_transient_failures_then_success():
    with FakeOpenAIServer([transient(429), transient(503), Reply(text="done")]) as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url)
        assert backend.generate([conversation("x")], GREEDY) == ["done"]
    assert retry_counts(server) == [0, 1, 2]


@pytest.mark.parametrize("status", [400, 401, 403])
def test_openai_client_errors_fail_after_exactly_one_request(status):
    with FakeOpenAIServer(handler=lambda body: Reply(status=status)) as server:
        message = failure_of(OpenAICompatibleBackend("m", base_url=server.base_url))
    assert f"request failed after 1 attempt: HTTP {status}" in message and len(server.requests) == 1
    assert status != 401 or "check OPENAI_API_KEY" in message


def test_openai_persistent_500_and_timeout():
    with FakeOpenAIServer(handler=lambda body: transient(500)) as server:
        message = failure_of(OpenAICompatibleBackend("m", base_url=server.base_url, max_retries=2))
    assert "after 3 attempts: HTTP 500 server_error" in message and retry_counts(server) == [0, 1, 2]
    with FakeOpenAIServer(handler=lambda body: Reply(text="late", delay=1.0)) as server:
        message = failure_of(OpenAICompatibleBackend("m", base_url=server.base_url, timeout=0.2, max_retries=1))
    assert "after 2 attempts: no reply within 0.2s" in message and len(server.requests) == 2


def test_openai_empty_content_is_empty_string():
    with FakeOpenAIServer([Reply(text="")]) as server:
        backend = OpenAICompatibleBackend("m", base_url=server.base_url)
        assert backend.generate([conversation("x")], GREEDY) == [""]


def test_empty_batch_makes_no_requests():
    with FakeOpenAIServer() as server:
        assert OpenAICompatibleBackend("m", base_url=server.base_url).generate([], GREEDY) == []
    assert server.requests == []


def test_openai_check_lists_the_served_models():
    with FakeOpenAIServer(models=["Qwen/Qwen3-8B", "other"]) as server:
        OpenAICompatibleBackend("Qwen/Qwen3-8B", base_url=server.base_url).check()
        with pytest.raises(BackendError) as caught:
            OpenAICompatibleBackend("qwen3", base_url=server.base_url).check()
    assert str(caught.value).endswith(
        "the server does not serve model 'qwen3'; it serves Qwen/Qwen3-8B, other: pass one of these names"
    )
    assert [(r["method"], r["path"]) for r in server.requests] == [("GET", "/v1/models")] * 2


def test_openai_check_finds_a_bad_key_and_a_base_url_without_v1():
    with FakeOpenAIServer(api_key="good") as server:
        with pytest.raises(BackendError, match="pre-flight check failed: HTTP 401.*check OPENAI_API_KEY"):
            OpenAICompatibleBackend("m", base_url=server.base_url, api_key="bad").check()
        with pytest.raises(BackendError, match="pre-flight check failed: HTTP 404.*base URL"):
            OpenAICompatibleBackend("m", base_url=server.url, api_key="good").check()
    assert len(server.requests) == 1  # the route-less request never reached the API


# ---- HFChatBackend ------------------------------------------------------------------------------


@pytest.mark.slow
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
    llm = FakeLLM(tokenizer=chat_tokenizer)
    backend = VLLMChatBackend(llm, tokenizer=chat_tokenizer, max_input_tokens=16)
    backend.generate([conversation("hello " * 50)], SamplingParams(max_new_tokens=3, top_k=5))
    kind, prompts, params, _ = llm.calls[0]
    assert kind == "generate" and params.top_k == 5
    assert prompts == [{"prompt_token_ids": encode_chat(chat_tokenizer, conversation("hello " * 50))[-16:]}]


def test_vllm_token_path_returns_the_text_of_the_sampled_ids_and_swaps_adapters(
    fake_vllm, chat_tokenizer, tmp_path, monkeypatch
):
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, id_, path: (id_, path)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    llm = FakeLLM(reply=lambda prompt: " Blue, mostly. ", tokenizer=chat_tokenizer)
    backend = VLLMChatBackend(llm, tokenizer=chat_tokenizer)
    sampling = SamplingParams(max_new_tokens=8)
    assert backend.generate([conversation("sky?")], sampling) == ["Blue, mostly."]
    backend.use_adapter(tmp_path / "a")
    backend.generate([conversation("sky?")], sampling)
    backend.use_adapter(tmp_path / "a")  # the same folder: no reload
    backend.use_adapter(tmp_path / "b")
    backend.generate([conversation("sky?")], sampling)
    assert [call[3] for call in llm.calls] == [None, (1, str(tmp_path / "a")), (2, str(tmp_path / "b"))]


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


def test_openai_several_servers_take_requests_in_turn_and_are_all_checked():
    with FakeOpenAIServer(models=["m"]) as first, FakeOpenAIServer(models=["other"]) as second:
        backend = OpenAICompatibleBackend("m", base_url=f"{first.base_url}, {second.base_url}", max_concurrency=1)
        texts = backend.generate([conversation(f"q{i}") for i in range(4)], SamplingParams(max_new_tokens=4))
        assert texts == [f"echo: q{i}" for i in range(4)]
        with pytest.raises(BackendError, match=f"server at {re.escape(second.base_url)}/? does not serve model 'm'"):
            backend.check()
    sent = [[last_user_text(b) for b in server.bodies] for server in (first, second)]
    assert sent == [["q0", "q2"], ["q1", "q3"]]
    assert [r["path"] for r in second.requests][-1] == "/v1/models"
