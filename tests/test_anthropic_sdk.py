"""The real ``anthropic`` SDK over real sockets to the bundled server (issue 16, items 1, 3, 4).

Each scenario runs without and with llmshim: the parsed results and the bytes that reached the
server are identical; the second run of a cached scenario is a hit that parses to the same SDK
objects; the span is conformant. Then what the SDK and llmshim must agree on: who retries (the
SDK, when it sends ``x-stainless-retry-count``), what a 529 or a spend-limit 429 means, what the
``anthropic-ratelimit-*`` headers teach the limiter, and what scopes a cache entry (``x-api-key``,
``anthropic-version``, ``anthropic-beta``) without ever being written down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from llmshim.testing import Answer, FakeLLMServer, Fault

MODEL = "claude-haiku-4-5"
SYSTEM = "be brief"
MSG: list[Any] = [{"role": "user", "content": "say something nice"}]
TOOLS: list[Any] = [{"name": "get_weather", "description": "Weather in a city",
                     "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}]


@dataclasses.dataclass(frozen=True)
class Expect:
    operation: str
    stream: bool
    input_tokens: int | None
    output_tokens: int | None
    finish: tuple[str, ...]


Scenario = Callable[[FakeLLMServer], Any]
SCENARIOS: dict[str, tuple[Scenario, Expect]] = {}
CHAT = Expect("chat", False, 5, 4, ("stop",))  # "be brief" + "say something nice"; "Echo: say something nice"


def scenario(name: str, expect: Expect) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = (fn, expect)
        return fn
    return register


def _client(server: FakeLLMServer, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0, **options)


def _aclient(server: FakeLLMServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0)


@scenario("sync-create", CHAT)
def _(server: FakeLLMServer) -> Any:
    with _client(server) as client:
        return client.messages.create(model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG).model_dump()


@scenario("sync-create-stream", dataclasses.replace(CHAT, stream=True))
def _(server: FakeLLMServer) -> Any:
    with _client(server) as client:
        stream = client.messages.create(model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG, stream=True)
        return [event.model_dump() for event in stream]


@scenario("sync-messages-stream", dataclasses.replace(CHAT, stream=True))
def _(server: FakeLLMServer) -> Any:
    with _client(server) as client, client.messages.stream(
            model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG) as stream:
        return list(stream.text_stream), stream.get_final_message().model_dump()


@scenario("sync-tool-use", Expect("chat", False, 5, 4, ("tool_calls",)))
def _(server: FakeLLMServer) -> Any:
    with _client(server) as client:
        return client.messages.create(model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG, tools=TOOLS,
                                      tool_choice={"type": "any"}).model_dump()


@scenario("sync-max-tokens", Expect("chat", False, 5, 2, ("length",)))
def _(server: FakeLLMServer) -> Any:
    with _client(server) as client:
        return client.messages.create(model=MODEL, max_tokens=2, system=SYSTEM, messages=MSG).model_dump()


@scenario("async-create", CHAT)
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aclient(server) as client:
            return (await client.messages.create(model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG)).model_dump()
    return asyncio.run(go())


@scenario("async-create-stream", dataclasses.replace(CHAT, stream=True))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aclient(server) as client:
            stream = await client.messages.create(model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG,
                                                  stream=True)
            return [event.model_dump() async for event in stream]
    return asyncio.run(go())


@scenario("async-messages-stream-tool-use", Expect("chat", True, 5, 4, ("tool_calls",)))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aclient(server) as client, client.messages.stream(
                model=MODEL, max_tokens=64, system=SYSTEM, messages=MSG, tools=TOOLS,
                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
            events = [event.model_dump() async for event in stream]
            return events, (await stream.get_final_message()).model_dump()
    return asyncio.run(go())


@scenario("sync-count-tokens", Expect("count_tokens", False, None, None, ()))
def _(server: FakeLLMServer) -> Any:
    with _client(server) as client:
        return client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=MSG).model_dump()


def _wire(server: FakeLLMServer) -> list[tuple[str, str, tuple[tuple[str, str], ...], bytes]]:
    return [(r.method, r.path, r.headers, r.body) for r in server.received]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_identical_with_and_without_llmshim(name: str, server: FakeLLMServer,
                                            records: list[llmshim.CallRecord]) -> None:
    fn, expect = SCENARIOS[name]
    without = fn(server)
    wire_without = _wire(server)
    server.reset()
    llmshim.install()
    try:
        with_shim = fn(server)
    finally:
        llmshim.uninstall()
    assert with_shim == without
    assert _wire(server) == wire_without, "llmshim changed what went on the wire"
    assert [r.event for r in records] == ["call_started", "call_completed"]
    done = records[-1]
    assert (done.library, done.provider, done.operation, done.model, done.stream) == (
        "httpx2", "anthropic", expect.operation, MODEL, expect.stream)
    assert (done.input_tokens, done.output_tokens, done.finish_reasons) == (
        expect.input_tokens, expect.output_tokens, expect.finish)
    assert done.status == 200 and done.outcome == "ok" and done.error_type is None
    assert done.response_model == (MODEL if expect.operation == "chat" else None)


@pytest.mark.parametrize("name", sorted(n for n, (_, e) in SCENARIOS.items() if e.operation == "chat"))
def test_a_second_call_is_a_hit_that_parses_to_the_same_sdk_objects(
        name: str, server: FakeLLMServer, cached: Path, records: list[llmshim.CallRecord]) -> None:
    fn, expect = SCENARIOS[name]
    first = fn(server)
    second = fn(server)
    assert second == first and len(server.received) == 1
    done = [r for r in records if r.event == "call_completed"]
    assert [r.cache_hit for r in done] == [False, True]
    assert (done[1].saved_input_tokens, done[1].saved_output_tokens) == (expect.input_tokens, expect.output_tokens)


def test_count_tokens_is_never_cached_nor_held_by_the_rate_limit(server: FakeLLMServer, tmp_path: Path) -> None:
    llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"), rpm="1", queue_timeout="0.2")
    try:
        with _client(server) as client:
            counts = [client.messages.count_tokens(model=MODEL, messages=MSG).input_tokens for _ in range(3)]
            client.messages.create(model=MODEL, max_tokens=8, messages=MSG)  # the one permit of this minute
            with pytest.raises(anthropic.RateLimitError, match="llmshim rate limit"):
                client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "again"}])
            counts.append(client.messages.count_tokens(model=MODEL, messages=MSG).input_tokens)
    finally:
        llmshim.uninstall()
    assert counts == [3, 3, 3, 3]
    assert [r.path for r in server.received] == ["/v1/messages/count_tokens"] * 3 + ["/v1/messages",
                                                                                    "/v1/messages/count_tokens"]


# -- retries -------------------------------------------------------------------------------------

@pytest.fixture
def retrying(installed: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "auto")
    monkeypatch.setenv("LLMSHIM_RETRY_MAX_DELAY", "0.05")
    installed()


def test_the_sdks_own_retries_are_not_multiplied(server: FakeLLMServer, retrying: None) -> None:
    server.inject(Fault(status=529, headers={"retry-after-ms": "1"}), times=None)
    with pytest.raises(anthropic.OverloadedError), anthropic.Anthropic(
            base_url=server.url, api_key="k", max_retries=2) as client:
        client.messages.create(model=MODEL, max_tokens=8, messages=MSG)
    assert [r.header("x-stainless-retry-count") for r in server.received] == ["0", "1", "2"]  # not 3 x 3


def test_a_529_overloaded_is_retried_for_a_client_without_retries(server: FakeLLMServer, retrying: None) -> None:
    server.inject(Fault(status=529), times=2)
    body = {"model": MODEL, "max_tokens": 8, "messages": MSG}
    response = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": "k"})
    assert response.status_code == 200 and response.json()["type"] == "message"
    assert len(server.received) == 3 and llmshim.stats()["retries"] == 2


def test_a_spend_limit_429_is_not_retried_but_a_rate_limit_429_is(server: FakeLLMServer, retrying: None) -> None:
    spent = {"type": "error", "error": {"type": "rate_limit_error", "message": "spend limit reached",
                                        "details": {"error_code": "enforced_spend_limit_reached"}}}
    body = {"model": MODEL, "max_tokens": 8, "messages": MSG}
    server.inject(Fault(status=429, body=spent, headers={"retry-after": "0"}))
    assert httpx.post(server.url + "/v1/messages", json=body).status_code == 429
    assert len(server.received) == 1
    server.inject(Fault(status=429, headers={"retry-after": "0"}))
    assert httpx.post(server.url + "/v1/messages", json=body).status_code == 200
    assert len(server.received) == 3


# -- the limiter learns the server's own limits --------------------------------------------------

def test_the_limiter_tightens_to_the_anthropic_ratelimit_headers(server: FakeLLMServer) -> None:
    server.rpm_limit = 30  # anthropic-ratelimit-requests-limit: 30
    llmshim.install(rpm="6000", tpm="10000000")
    try:
        with _client(server) as client:
            client.messages.create(model=MODEL, max_tokens=8, messages=MSG)
        key = next(iter(llmshim.runtime.STATE.pipeline.policies[-1].limiter._keys.values()))  # type: ignore[attr-defined]
        assert key.requests.rate == pytest.approx(0.5)
        assert key.tokens.rate == pytest.approx(2_000_000 / 60)  # anthropic-ratelimit-tokens-limit
    finally:
        llmshim.uninstall()


def test_a_429_retry_after_blocks_the_key_for_every_caller(server: FakeLLMServer) -> None:
    llmshim.install(rpm="6000")
    try:
        server.inject(Fault(status=429, headers={"retry-after": "1"}))
        with _client(server) as client:
            with pytest.raises(anthropic.RateLimitError):
                client.messages.create(model=MODEL, max_tokens=8, messages=MSG)
            client.messages.create(model=MODEL, max_tokens=8, messages=MSG)
    finally:
        llmshim.uninstall()
    assert server.received[1].at - server.received[0].at >= 1.0  # held by llmshim, not sent to be refused


# -- cache keys: scoped by the key, split by the API version and betas, never storing the key ------

def test_the_api_key_scopes_and_the_version_and_betas_split_entries(server: FakeLLMServer, cached: Path) -> None:
    """anthropic 2.x sends its key as ``Authorization: Bearer``, earlier SDKs and raw HTTP as
    ``x-api-key``: both scope an entry, and neither is written to the cache file."""
    def ask(key: str, **headers: str) -> Any:
        with anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, default_headers=headers) as client:
            return client.messages.create(model=MODEL, max_tokens=8, messages=MSG).model_dump()

    def raw(key: str) -> Any:
        body = {"model": MODEL, "max_tokens": 8, "messages": MSG}
        return httpx.post(server.url + "/v1/messages", json=body,
                          headers={"x-api-key": key, "anthropic-version": "2023-06-01"}).json()

    alice, bob = "sk-ant-alice-0123456789", "sk-ant-bob-9876543210"
    ask(alice)
    ask(bob)
    assert len(server.received) == 2  # bob did not get alice's answer
    ask(alice)
    assert len(server.received) == 2  # alice's own hit
    ask(alice, **{"anthropic-version": "2023-01-01"})
    ask(alice, **{"anthropic-beta": "prompt-caching-2024-07-31"})
    assert len(server.received) == 4  # another API version, another beta: another answer
    ask(alice, **{"anthropic-beta": "prompt-caching-2024-07-31"})
    assert len(server.received) == 4
    assert raw(alice) == raw(alice) and len(server.received) == 5
    raw(bob)
    assert len(server.received) == 6
    assert [r.header("x-api-key") for r in server.received[4:]] == [alice, bob]
    llmshim.uninstall()
    data = b"".join(p.read_bytes() for p in cached.parent.iterdir() if p.name.startswith(cached.name))
    assert b"sk-ant-" not in data and b"alice" not in data and b"Bearer" not in data


# -- failures inside a 200, and spans ------------------------------------------------------------

def test_an_error_event_mid_stream_is_the_calls_error_and_never_cached(
        server: FakeLLMServer, cached: Path, records: list[llmshim.CallRecord]) -> None:
    def broken(received: Any) -> Answer:
        start = {"type": "message_start", "message": {
            "id": "msg_x", "type": "message", "role": "assistant", "model": MODEL, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}}
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        chunks = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (start, error)]
        return Answer(200, [("Content-Type", "text/event-stream")], chunks=chunks)

    server.responder = broken
    body = {"model": MODEL, "max_tokens": 8, "messages": MSG, "stream": True}
    with httpx.Client() as raw, raw.stream("POST", server.url + "/v1/messages", json=body) as response:
        assert b"overloaded_error" in response.read()  # read to its end: the call ended in the error event
    for _ in range(2):  # the SDK raises at the event, leaving the rest unread
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"), _client(server) as client:
            list(client.messages.create(model=MODEL, max_tokens=8, messages=MSG, stream=True))
    assert len(server.received) == 3
    done = [r for r in records if r.event != "call_started"]
    assert [r.error_type for r in done] == ["overloaded_error", "aborted", "aborted"]
    assert not any(r.cache_hit for r in done)


def _otel() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_one_conformant_span_with_usage_from_the_provider(server: FakeLLMServer) -> None:
    provider, exporter = _otel()
    llmshim.install(tracer_provider=provider)
    try:
        SCENARIOS["sync-messages-stream"][0](server)
    finally:
        llmshim.uninstall()
    (span,) = [s for s in exporter.get_finished_spans() if s.instrumentation_scope.name == "llmshim"]
    attributes = dict(span.attributes or {})
    assert span.name == f"chat {MODEL}"
    assert {k: attributes.get(k) for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                                           "gen_ai.request.max_tokens", "gen_ai.request.stream",
                                           "gen_ai.response.model", "gen_ai.response.finish_reasons",
                                           "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": MODEL,
        "gen_ai.request.max_tokens": 64, "gen_ai.request.stream": True, "gen_ai.response.model": MODEL,
        "gen_ai.response.finish_reasons": ("stop",), "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 4}
    assert str(attributes["gen_ai.response.id"]).startswith("msg_") and attributes["llmshim.outcome"] == "ok"


def test_the_sdks_own_span_is_the_one_span(server: FakeLLMServer) -> None:
    """anthropic 2.x traces its calls itself; llmshim then adds to that span instead of a second one."""
    provider, exporter = _otel()
    llmshim.install(tracer_provider=provider)
    try:
        with _client(server, open_telemetry={"tracer_provider": provider}) as client:
            client.messages.create(model=MODEL, max_tokens=8, messages=MSG)
    finally:
        llmshim.uninstall()
    spans = exporter.get_finished_spans()
    calls = [s for s in spans if (s.attributes or {}).get("gen_ai.operation.name") == "chat"]
    assert len(calls) == 1 and calls[0].instrumentation_scope.name != "llmshim"
    assert (calls[0].attributes or {}).get("llmshim.client.library") == "httpx2"


# -- the bundled server ----------------------------------------------------------------------------

def test_the_bundled_server_speaks_anthropics_errors_and_limits(server: FakeLLMServer) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": MSG}
    server.inject(Fault(status=529))
    overloaded = httpx.post(server.url + "/v1/messages", json=body)
    assert overloaded.status_code == 529 and overloaded.json()["error"]["type"] == "overloaded_error"
    assert overloaded.json()["type"] == "error" and overloaded.headers["request-id"]
    server.reset()  # a fresh window
    server.rpm_limit = 1
    ok = httpx.post(server.url + "/v1/messages", json=body)
    limited = httpx.post(server.url + "/v1/messages", json=body)
    assert ok.status_code == 200 and ok.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert ok.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert ok.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1 and "x-ratelimit-limit-requests" not in limited.headers


def test_the_server_cli_lists_the_anthropic_routes() -> None:
    from llmshim.testing.__main__ import ENDPOINTS

    assert "Anthropic  POST /v1/messages" in ENDPOINTS and "/v1/messages/count_tokens" in ENDPOINTS
