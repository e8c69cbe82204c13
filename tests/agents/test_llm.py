"""The chat-model interface against local servers that speak the OpenAI and Anthropic wire formats,
through the real SDKs (retries off so failures are immediate)."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from agents.llm import (
    LLM,
    AnthropicChat,
    Completion,
    LLMError,
    LLMStream,
    OpenAIChat,
    Usage,
    estimate_cost_usd,
    get_llm,
)
from store.settings import Settings
from tests.agents.fake_llm_servers import ANTHROPIC_PATH, OPENAI_PATH, FakeLLMServer, Reply

KEY = "sk-test-123"
USER = [{"role": "user", "content": "What does binary search do?"}]
PROVIDERS = ["openai", "anthropic"]


@pytest.fixture(scope="module")
def server():
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer):
    server.reset()
    server.api_key = None
    yield server
    server.api_key = None


def make(provider: str, srv: FakeLLMServer, key: str = KEY, model: str | None = None) -> LLM:
    if provider == "openai":
        return OpenAIChat(key, model or "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=0)
    return AnthropicChat(key, model or "claude-sonnet-4-6", base_url=srv.anthropic_base_url, max_retries=0)


async def drain(stream: LLMStream) -> tuple[list[str], LLMError | None]:
    got: list[str] = []
    try:
        async for delta in stream:
            got.append(delta)
    except LLMError as exc:
        return got, exc
    return got, None


# -- happy paths -------------------------------------------------------------------------------------

async def test_openai_complete_sends_chat_completion_and_reports_usage(srv):
    srv.script(Reply("It halves the interval.", input_tokens=21, output_tokens=6, model="gpt-4o-mini-2024-07-18"))
    llm = make("openai", srv)
    out = await llm.complete(USER, system="You are a tutor.", max_tokens=100, temperature=0.1)

    assert out == Completion("It halves the interval.", Usage(21, 6), "gpt-4o-mini-2024-07-18", "openai",
                             out.latency_s)
    assert 0 < out.latency_s < 10
    req = srv.requests[-1]
    assert req.path == OPENAI_PATH
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body == {"model": "gpt-4o-mini", "max_tokens": 100, "temperature": 0.1,
                        "messages": [{"role": "system", "content": "You are a tutor."}, *USER]}


async def test_openai_stream_yields_deltas_then_usage_from_final_chunk(srv):
    reply = Reply("Binary search halves the search interval each step.", chunks=5, input_tokens=30,
                  output_tokens=11)
    srv.script(reply)
    stream = make("openai", srv).stream(USER, system="Be brief.", max_tokens=64)
    assert stream.completion is None and not srv.requests  # lazy: nothing sent before iteration

    deltas, err = await drain(stream)
    assert err is None
    assert deltas == reply.deltas() and len(deltas) == 5
    assert stream.completion is not None
    assert stream.completion.text == reply.text == stream.text
    assert stream.usage == Usage(30, 11)
    assert stream.completion.provider == "openai" and stream.completion.model == "gpt-4o-mini"
    assert stream.first_delta_s is not None and stream.first_delta_s <= stream.completion.latency_s
    body = srv.requests[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_tokens"] == 64


async def test_anthropic_complete_sends_messages_with_top_level_system(srv):
    srv.script(Reply("It halves the interval.", input_tokens=19, output_tokens=5,
                     model="claude-sonnet-4-5-20250929"))
    llm = make("anthropic", srv)
    out = await llm.complete(USER + [{"role": "assistant", "content": "Hm?"}, {"role": "user", "content": "Go"}],
                             system="You are a tutor.", max_tokens=200)

    assert out.text == "It halves the interval."
    assert out.usage == Usage(19, 5)
    assert (out.provider, out.model) == ("anthropic", "claude-sonnet-4-5-20250929")
    req = srv.requests[-1]
    assert req.path == ANTHROPIC_PATH
    # anthropic SDK 2.x sends the API key as a bearer token (1.x and older: x-api-key)
    assert KEY in (req.headers.get("x-api-key"), req.headers.get("authorization", "").removeprefix("Bearer "))
    assert req.headers.get("anthropic-version")
    assert req.body["system"] == "You are a tutor."
    assert req.body["model"] == "claude-sonnet-4-6" and req.body["max_tokens"] == 200
    assert req.body["temperature"] == 0.2
    assert [m["role"] for m in req.body["messages"]] == ["user", "assistant", "user"]


async def test_anthropic_stream_takes_usage_from_message_start_and_delta(srv):
    reply = Reply("Each step discards half of the remaining items.", chunks=4, input_tokens=40, output_tokens=9)
    srv.script(reply)
    stream = make("anthropic", srv).stream(USER, system="Be brief.")
    deltas, err = await drain(stream)

    assert err is None and deltas == reply.deltas()
    assert stream.completion is not None and stream.completion.text == reply.text
    assert stream.usage == Usage(40, 9)  # input from message_start, output from message_delta
    assert stream.completion.latency_s > 0
    body = srv.requests[-1].body
    assert body["stream"] is True and body["system"] == "Be brief."
    assert "system" not in {m["role"] for m in body["messages"]}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_providers_satisfy_the_interface(srv, provider):
    llm = make(provider, srv)
    assert isinstance(llm, LLM)
    assert llm.name == provider


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_closing_a_stream_early_stops_cleanly_and_the_client_stays_usable(srv, provider):
    srv.script(Reply("one two three four five six", chunks=6, delay_s=0.05), Reply("after"))
    llm = make(provider, srv)
    async with llm.stream(USER) as stream:
        first = await stream.__anext__()
    assert first and stream.completion is None
    await asyncio.to_thread(srv.wait_disconnects, 1)
    assert srv.disconnects == 1  # the upstream request really was closed, not left streaming
    assert (await llm.complete(USER)).text == "after"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_temperature_none_is_not_sent(srv, provider):
    await make(provider, srv).complete(USER, temperature=None)
    assert "temperature" not in srv.requests[-1].body


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_model_that_rejects_temperature_is_retried_without_it_and_remembered(srv, provider):
    srv.script(Reply(status=400), Reply("ok"))  # the 400 bodies blame temperature, as the real APIs do
    llm = make(provider, srv)
    assert (await llm.complete(USER)).text == "ok"
    stream = llm.stream(USER)
    await drain(stream)
    bodies = [r.body for r in srv.requests]
    assert [("temperature" in b) for b in bodies] == [True, False, False]
    assert stream.completion is not None


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_other_bad_requests_are_not_retried(srv, provider):
    srv.script(Reply(status=400, error_message="messages: roles must alternate"))
    with pytest.raises(LLMError) as info:
        await make(provider, srv).complete(USER)
    assert info.value.status == 400 and not info.value.retryable
    assert "roles must alternate" in info.value.message
    assert len(srv.requests) == 1


async def test_openai_max_tokens_field_follows_the_endpoint(srv, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert OpenAIChat(KEY, "gpt-5-mini").max_tokens_field == "max_completion_tokens"
    assert make("openai", srv).max_tokens_field == "max_tokens"  # type: ignore[attr-defined]
    llm = OpenAIChat(KEY, "gpt-5-mini", base_url=srv.openai_base_url, max_retries=0,
                     max_tokens_field="max_completion_tokens")
    await llm.complete(USER, max_tokens=77)
    body = srv.requests[-1].body
    assert body["max_completion_tokens"] == 77 and "max_tokens" not in body


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_bad_messages_are_rejected_before_any_request(srv, provider):
    llm = make(provider, srv)
    with pytest.raises(ValueError):
        await llm.complete([])
    with pytest.raises(ValueError):
        llm.stream([{"role": "system", "content": "hi"}])  # type: ignore[list-item]
    assert not srv.requests


# -- errors ------------------------------------------------------------------------------------------

ERROR_CASES = [("openai", 401, False), ("openai", 429, True), ("openai", 500, True),
               ("anthropic", 401, False), ("anthropic", 429, True), ("anthropic", 500, True),
               ("anthropic", 529, True)]


@pytest.mark.parametrize(("provider", "status", "retryable"), ERROR_CASES)
async def test_http_errors_map_to_llm_error(srv, provider, status, retryable):
    srv.script(Reply(status=status), Reply(status=status))
    llm = make(provider, srv)
    with pytest.raises(LLMError) as info:
        await llm.complete(USER)
    err = info.value
    assert type(err) is LLMError
    assert (err.status, err.retryable, err.provider) == (status, retryable, provider)
    assert f"HTTP {status}" in err.message and err.message.startswith(provider)

    stream = llm.stream(USER)
    deltas, serr = await drain(stream)  # fails before streaming: nothing yielded
    assert deltas == [] and serr is not None
    assert (serr.status, serr.retryable) == (status, retryable)
    assert len(srv.requests) == 2  # SDK retries are off


UNUSABLE = [("text/html", "<html><body>Sign in to the proxy</body></html>"),
            ("application/json", "{not json"),
            ("application/json", '{"choices": [{"index": 0}], "content": null, "usage": null}'),
            ("application/json", "[]")]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("raw", UNUSABLE)
async def test_a_reply_not_in_the_apis_shape_is_an_llm_error(srv, provider, raw):
    """A 200 that is not a completion (a proxy's login page, a field missing or null) is an LLMError that
    says so: callers fall back on it, where an AttributeError was a crash (a grade lost, a 500)."""
    srv.script(Reply(raw=raw))
    with pytest.raises(LLMError) as info:
        await make(provider, srv).complete(USER)
    assert "unusable reply" in info.value.message and not info.value.retryable


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_wrong_key_is_a_non_retryable_auth_error(srv, provider):
    srv.api_key = "sk-the-real-one"
    with pytest.raises(LLMError) as info:
        await make(provider, srv, key="sk-wrong").complete(USER)
    assert info.value.status == 401 and not info.value.retryable
    assert "authentication" in info.value.message
    assert (await make(provider, srv, key="sk-the-real-one").complete(USER)).text


MIDSTREAM_CASES = [("openai", "drop"), ("openai", "error"), ("openai", "truncate"),
                   ("anthropic", "drop"), ("anthropic", "error"), ("anthropic", "truncate")]


@pytest.mark.parametrize(("provider", "mode"), MIDSTREAM_CASES)
async def test_midstream_failure_raises_after_the_first_deltas(srv, provider, mode):
    reply = Reply("Binary search halves the interval.", chunks=4, midstream=mode, fail_after=2)
    srv.script(reply)
    stream = make(provider, srv).stream(USER)
    deltas, err = await drain(stream)

    assert deltas == reply.deltas()[:2]  # the caller keeps the partial answer
    assert stream.text == "".join(deltas)
    assert err is not None and type(err) is LLMError and err.retryable
    assert stream.completion is None
    if mode == "error" and provider == "anthropic":
        assert "overloaded_error" in err.message
    # what the provider reported before failing is kept for billing: Anthropic counts the input at the start,
    # OpenAI reports usage only in its last chunk
    assert stream.usage_so_far == (Usage(reply.input_tokens, 1) if provider == "anthropic" else Usage())


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_unreachable_server_is_a_retryable_connection_error(provider):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = (OpenAIChat(KEY, "m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=5)
           if provider == "openai" else
           AnthropicChat(KEY, "m", base_url=f"http://127.0.0.1:{port}", max_retries=0, timeout=5))
    with pytest.raises(LLMError) as info:
        await llm.complete(USER)
    assert info.value.retryable and info.value.status is None
    deltas, err = await drain(llm.stream(USER))
    assert deltas == [] and err is not None and err.retryable


# -- selection and cost ------------------------------------------------------------------------------

def test_get_llm_selection_rules(srv):
    assert get_llm(Settings()) is None
    assert get_llm(Settings(openai_api_key="k", llm_provider="extractive")) is None

    openai_key = get_llm(Settings(openai_api_key="k", anthropic_api_key="a"))
    assert isinstance(openai_key, OpenAIChat) and openai_key.model == "gpt-4o-mini"
    assert isinstance(get_llm(Settings(openai_base_url=srv.openai_base_url, openai_model="llama3")), OpenAIChat)

    claude = get_llm(Settings(anthropic_api_key="a"))
    assert isinstance(claude, AnthropicChat) and claude.model == "claude-sonnet-4-5"
    assert isinstance(get_llm(Settings(openai_api_key="k", anthropic_api_key="a", llm_provider="Anthropic")),
                      AnthropicChat)
    assert isinstance(get_llm(Settings(anthropic_api_key="a", openai_api_key="k", llm_provider="openai")),
                      OpenAIChat)

    with pytest.raises(LLMError):
        get_llm(Settings(anthropic_api_key="a", llm_provider="openai"))
    with pytest.raises(LLMError):
        get_llm(Settings(openai_api_key="k", llm_provider="anthropic"))
    with pytest.raises(ValueError):
        get_llm(Settings(llm_provider="gemini"))


def test_get_llm_caches_one_instance_per_settings():
    a = Settings(openai_api_key="k1")
    assert get_llm(a) is get_llm(Settings(openai_api_key="k1"))
    assert get_llm(a) is not get_llm(Settings(openai_api_key="k2"))


async def test_get_llm_instance_talks_to_a_self_hosted_server_without_a_key(srv):
    llm = get_llm(Settings(openai_base_url=srv.openai_base_url, openai_model="qwen2.5:7b"))
    assert llm is not None
    out = await llm.complete(USER)
    assert out.text == Reply().text and srv.requests[-1].body["model"] == "qwen2.5:7b"


def test_estimate_cost_usd():
    assert estimate_cost_usd("openai", "gpt-4o-mini", Usage(1_000_000, 1_000_000)) == pytest.approx(0.75)
    assert estimate_cost_usd("openai", "gpt-4o-mini-2024-07-18", Usage(2000, 500)) == pytest.approx(0.0006)
    assert estimate_cost_usd("anthropic", "claude-sonnet-4-5-20250929", Usage(1000, 1000)) == pytest.approx(0.018)
    assert estimate_cost_usd("openai", "gpt-4o", Usage(0, 0)) == 0
    assert estimate_cost_usd("openai", "llama3", Usage(10, 10)) is None
    assert estimate_cost_usd("anthropic", "gpt-4o-mini", Usage(10, 10)) is None
    assert estimate_cost_usd("openai", "gpt-4o-audio-preview", Usage(10, 10)) is None


def _sse(events: list[tuple[str | None, dict | str]]) -> str:
    out = []
    for name, data in events:
        body = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "") + f"data: {body}\n\n")
    return "".join(out)


def _openai_chunk(content: str | None, finish: str | None = None) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}


def _anthropic_events(stop_reason: str, *, usage: bool = True, delta: bool = True) -> list:
    message = {"id": "m1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6", "content": [],
               "stop_reason": None, **({"usage": {"input_tokens": 5, "output_tokens": 1}} if usage else {})}
    block_delta = {"type": "content_block_delta", "index": 0,
                   **({"delta": {"type": "text_delta", "text": "Half an ans"}} if delta else {})}
    return [("message_start", {"type": "message_start", "message": message}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", block_delta),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason},
                               **({"usage": {"output_tokens": 3}} if usage else {})}),
            ("message_stop", {"type": "message_stop"})]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_stream_not_in_the_apis_shape_is_an_llm_error(srv, provider):
    """A chunk without `choices`, a delta event without its `delta`: an AttributeError or TypeError from deep
    in the stream skipped every `except LLMError` (a 500 for the asker, the partial answer lost)."""
    if provider == "openai":
        body = _sse([(None, _openai_chunk("Hi")), (None, {"id": "c1", "object": "chat.completion.chunk",
                                                          "created": 1, "model": "gpt-4o-mini"}), (None, "[DONE]")])
    else:
        body = _sse(_anthropic_events("end_turn", delta=False))
    srv.script(Reply(raw=("text/event-stream", body)))
    _, err = await drain(make(provider, srv).stream(USER))
    assert err is not None and "unusable stream" in err.message and not err.retryable


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_reply_cut_at_the_length_limit_says_so(srv, provider):
    """finish_reason "length" / stop_reason "max_tokens": the reply is not what the model meant to end with."""
    if provider == "openai":
        whole = {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Half an ans"},
                              "finish_reason": "length"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
        streamed = _sse([(None, _openai_chunk("Half an ans")), (None, _openai_chunk(None, "length")), (None, "[DONE]")])
    else:
        whole = {"id": "m1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                 "content": [{"type": "text", "text": "Half an ans"}], "stop_reason": "max_tokens",
                 "usage": {"input_tokens": 5, "output_tokens": 3}}
        streamed = _sse(_anthropic_events("max_tokens"))
    srv.script(Reply(raw=("application/json", json.dumps(whole))))
    done = await make(provider, srv).complete(USER)
    assert done.text == "Half an ans" and done.truncated
    srv.script(Reply(raw=("text/event-stream", streamed)))
    stream = make(provider, srv).stream(USER)
    got, err = await drain(stream)
    assert err is None and "".join(got) == "Half an ans" and stream.completion and stream.completion.truncated
    srv.script(Reply(text="All of it."))
    assert not (await make(provider, srv).complete(USER)).truncated


async def test_an_anthropic_reply_without_usage_is_still_the_reply(srv):
    """Some Anthropic-compatible endpoints leave usage out: the reply was thrown away as unusable (every grade
    fell back to offline); it counts zero tokens instead, as OpenAI-compatible ones do."""
    whole = {"id": "m1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
             "content": [{"type": "text", "text": "Fine."}], "stop_reason": "end_turn"}
    srv.script(Reply(raw=("application/json", json.dumps(whole))))
    done = await make("anthropic", srv).complete(USER)
    assert (done.text, done.usage) == ("Fine.", Usage(0, 0))
    srv.script(Reply(raw=("text/event-stream", _sse(_anthropic_events("end_turn", usage=False)))))
    stream = make("anthropic", srv).stream(USER)
    got, err = await drain(stream)
    assert err is None and "".join(got) == "Half an ans" and stream.usage == Usage(0, 0)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_model_slower_than_the_timeout_is_a_retryable_error(srv, provider):
    """STUDYHALL_LLM_TIMEOUT_S bounds each request (a slow self-hosted model needs more than the default 60 s;
    a hung one must not hold a grade or a generation for minutes)."""
    settings = (Settings(openai_base_url=srv.openai_base_url, openai_api_key="sk-x", llm_timeout_s=1.0)
                if provider == "openai" else
                Settings(anthropic_api_key="sk-x", anthropic_base_url=srv.anthropic_base_url, llm_timeout_s=1.0))
    llm = get_llm(settings)
    llm._client = llm._client.with_options(max_retries=0)  # type: ignore[union-attr]
    srv.script(Reply(wait_s=3.0))
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(LLMError) as info:
        await llm.complete(USER)  # type: ignore[union-attr]
    assert info.value.retryable and asyncio.get_running_loop().time() - t0 < 2.5


# -- what real providers and compatible servers refuse or answer besides text ---------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_key_quoted_in_an_error_is_never_passed_on(srv, provider, monkeypatch):
    """A key read from a secret file ends with a newline: the HTTP library refuses the header and quotes it, key
    and all, and that text went into the grade's review reason, the turn's record and the logs."""
    secret = "sk-proj-SECRETKEY1234567"
    with pytest.raises(LLMError) as info:
        await make(provider, srv, key=secret + "\n").complete(USER)
    assert info.value.retryable and "SECRETKEY" not in info.value.message and "SECRETKEY" not in str(info.value)
    monkeypatch.setenv("OPENAI_API_KEY", secret + "\n")
    monkeypatch.setenv("ANTHROPIC_API_KEY", f"  {secret}\r\n")
    from store.settings import load_settings

    loaded = load_settings()
    assert loaded.openai_api_key == secret and loaded.anthropic_api_key == secret


async def test_errors_waiting_cannot_cure_are_not_retryable(srv):
    """An account out of credit answers 429 `insufficient_quota`; a server may say `x-should-retry: false`.
    Grading jobs retried those for hours."""
    srv.script(Reply(status=429, error_code="insufficient_quota", error_message="You exceeded your current quota"),
               Reply(status=500, headers={"x-should-retry": "false"}), Reply(status=429))
    for retryable in (False, False, True):
        with pytest.raises(LLMError) as info:
            await make("openai", srv).complete(USER)
        assert info.value.retryable is retryable, info.value.message
    # (Tester) the SDK's own retries (two by default) retried the out-of-credit 429 as a rate limit: one call now;
    # a plain 429 is still retried
    srv.script(Reply(status=429, error_code="insufficient_quota"), Reply(status=429), Reply(status=429), Reply())
    before = len(srv.requests)
    with pytest.raises(LLMError):
        await OpenAIChat(KEY, "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=2).complete(USER)
    assert len(srv.requests) - before == 1
    assert (await OpenAIChat(KEY, "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=2).complete(USER)).text
    assert len(srv.requests) - before == 4


async def test_a_refused_token_limit_field_is_swapped_for_the_other_once(srv):
    """OpenAI's reasoning models on hosts other than api.openai.com (Azure, regional hosts) refuse `max_tokens`;
    some compatible servers refuse `max_completion_tokens`. Every answer failed; now the other field is sent,
    from then on."""
    srv.refuse("max_tokens", error={
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                   "'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens",
        "code": "unsupported_parameter"})
    llm = make("openai", srv)
    assert (await llm.complete(USER, max_tokens=50)).text
    assert [("max_tokens" in r.body, r.body.get("max_completion_tokens")) for r in srv.requests] == [
        (True, None), (False, 50)]
    got, err = await drain(llm.stream(USER, max_tokens=60))
    assert err is None and srv.requests[-1].body.get("max_completion_tokens") == 60 and len(srv.requests) == 3
    srv.reset()
    srv.refuse("max_completion_tokens", error={  # a compatible server, worded as a validation error
        "message": "Unrecognized request argument supplied: max_completion_tokens", "type": "invalid_request_error",
        "param": None, "code": None})
    llm = OpenAIChat(KEY, "gpt-5-mini", base_url=srv.openai_base_url, max_retries=0,
                     max_tokens_field="max_completion_tokens")
    assert (await llm.complete(USER, max_tokens=40)).text and srv.requests[-1].body["max_tokens"] == 40


async def test_servers_that_refuse_stream_options_or_streaming_still_answer(srv):
    """Mistral answers 422 to `stream_options`; OpenAI answers 400 `param: stream` for a model an organization
    may not stream. Every tutor answer failed on them."""
    srv.refuse("stream_options", status=422, error={"detail": [{"type": "extra_forbidden", "loc": ["body",
               "stream_options"], "msg": "Extra inputs are not permitted", "input": {"include_usage": True}}]})
    llm = make("openai", srv)
    got, err = await drain(llm.stream(USER))
    assert err is None and "".join(got) == Reply().text
    got, err = await drain(llm.stream(USER))  # remembered: no refused request first
    assert err is None and [("stream_options" in r.body) for r in srv.requests] == [True, False, False]
    srv.reset()
    srv.refuse("stream", error={"message": "Your organization must be verified to stream this model.",
                                "type": "invalid_request_error", "param": "stream", "code": "unsupported_value"})
    stream = make("openai", srv).stream(USER)
    got, err = await drain(stream)
    assert err is None and "".join(got) == Reply().text and stream.usage == Usage(12, 7)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refusal_or_a_content_filter_is_no_answer(srv, provider):
    """Anthropic `stop_reason: refusal`, OpenAI `refusal` and `finish_reason: content_filter` were taken for a
    complete answer (an empty or partial one, cited as grounded)."""
    replies = ([Reply(refusal="I can't help with that."), Reply(finish="content_filter")] if provider == "openai"
               else [Reply(finish="refusal")])
    for reply in replies:
        for streamed in (False, True):
            srv.script(reply)
            llm = make(provider, srv)
            if streamed:
                _, err = await drain(llm.stream(USER))
            else:
                with pytest.raises(LLMError) as info:
                    await llm.complete(USER)
                err = info.value
            assert err is not None and not err.retryable and ("refused" in err.message or "filter" in err.message)
    if provider == "anthropic":  # the context window full: cut short, as at max_tokens
        srv.script(Reply(finish="model_context_window_exceeded"))
        assert (await make(provider, srv).complete(USER)).truncated


async def test_a_reasoning_model_gets_a_low_effort_and_room_to_reason(srv):
    """gpt-5 and the o-series spend `max_completion_tokens` on hidden reasoning first: an 80-token condense came
    back empty. A server that refuses `reasoning_effort` gets none from then on."""
    llm = OpenAIChat(KEY, "gpt-5-mini", base_url=srv.openai_base_url, max_retries=0,
                     max_tokens_field="max_completion_tokens")
    llm._reasoning = True  # as for api.openai.com, which this test cannot reach
    await llm.complete(USER, max_tokens=80)
    body = srv.requests[-1].body
    assert body["reasoning_effort"] == "low" and body["max_completion_tokens"] == 80 + 1024
    srv.refuse("reasoning_effort")
    assert (await llm.complete(USER)).text and "reasoning_effort" not in srv.requests[-1].body


async def test_a_reply_checks_reason_holding_a_nul_is_stored_without_it(srv):
    """(Tester) the helpful-reply check's model gave its `why` with a NUL: it could not be stored, the check failed
    on every try and never fell back to the offline one. Control and invisible format characters are dropped."""
    from types import SimpleNamespace

    from agents.helpful import _llm_check

    srv.script(Reply(text='{"helpful": false, "confidence": 0.9, "why": "wrong\\u0000 answer \\u202e here"}'))
    source = SimpleNamespace(video_title="Bitcoin", start=10.0, text="Each block names the one before it.")
    got = await _llm_check(make("openai", srv), "why chain blocks?", "they are random", [source])
    assert got.reason == "wrong answer here", got


async def test_an_error_quoting_the_configured_key_never_shows_it(srv):
    """(Tester) a provider error quoting the configured key was passed on whole when the key was not shaped like
    "sk-" and seven more characters ("sk-test", or a self-hosted server's token): every configured key is masked."""
    for key in ("sk-test", "a1b2c3d4e5f6", "tok9"):
        srv.script(Reply(status=400, error_message=f"the key {key} is not allowed here"))
        with pytest.raises(LLMError) as info:
            await make("openai", srv, key=key).complete(USER)
        assert key not in info.value.message and "***" in info.value.message, info.value.message
    # (review) a key that is a word is masked as a token of its own, not inside a model's name
    srv.script(Reply(status=404, error_message="model ollama/llama3 not found; key ollama refused"))
    with pytest.raises(LLMError) as info:
        await make("openai", srv, key="ollama").complete(USER)
    assert "ollama/llama3" in info.value.message and "key *** refused" in info.value.message, info.value.message


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_lone_surrogate_in_a_reply_is_dropped_and_a_split_pair_joined(srv, provider):
    """(Tester) a model's JSON may escape a character by halves, or send half of one ("\\ud83d"): a lone half is
    text no encoder takes, and the chapter title, tutor answer or condensed question holding it failed whole (the
    ingest on every attempt; the ask a 500, or a 400 blaming the learner's request)."""
    llm = make(provider, srv)
    srv.script(Reply(text="Signature title \ud83d and \udc00 done", chunks=1))
    got = await llm.complete(USER)
    assert got.text == "Signature title  and  done"
    got.text.encode()
    # streamed, a pair split over two deltas is joined; a half alone is dropped
    srv.script(Reply(text="smile \ud83d\ude00 ok \ud800!", chunks=14))  # (a delta a character)
    deltas, err = await drain(llm.stream(USER))
    assert err is None and "".join(deltas) == "smile \U0001F600 ok !", deltas
    "".join(deltas).encode()
    from agents.llm import storable

    assert storable("a\ud83d\ude00b") == "a\U0001F600b" and storable("x\udfff") == "x" and storable("plain") == "plain"
