"""The real ``google-genai`` SDK through llmshim, over real sockets to the bundled server.

Each scenario runs once without and once with llmshim: the SDK's parsed answer, the streamed
pieces in order and the bytes that reached the server must be identical, and the hook record names
the provider, operation, model and token counts. The SDK speaks httpx2 (its default when
installed), httpx (``GOOGLE_GENAI_HTTP_CLIENT=httpx``) and, for ``client.aio``, aiohttp (its default
when installed) or httpx2 (when a transport is given); every one of those paths is covered.
Then: a cache hit parses identically, spans are conformant, a ``?key=`` never reaches the cache
file, spans, stats, logs or hooks, keys scope entries, 503/429 are retried as Google's RetryInfo
asks, and ``countTokens`` is seen but neither cached nor rate-limited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from llmshim.testing import FakeLLMServer, Fault

genai = pytest.importorskip("google.genai")
from google.genai import errors, types  # noqa: E402

#: google-genai subclasses aiohttp.ClientSession for its async client, which aiohttp 3.14 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")

KEY = "AIzaSyTESTKEY-0123456789abcdef"
MODEL = "gemini-2.0-flash"
CONFIG = types.GenerateContentConfig(temperature=0, max_output_tokens=50, system_instruction="be brief")


@dataclasses.dataclass(frozen=True)
class Expect:
    library: str
    provider: str
    operation: str
    model: str
    stream: bool
    input_tokens: int | None
    output_tokens: int | None


def _client(server: FakeLLMServer, **options: Any) -> Any:
    return genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.url, **options))


def _vertex(server: FakeLLMServer) -> Any:
    return genai.Client(vertexai=True, api_key=KEY, http_options=types.HttpOptions(base_url=server.url))


def _dump(obj: Any) -> Any:
    """The SDK's parsed object; the server's Date header (a clock, not the answer) left out."""
    data = obj.model_dump(mode="json")
    headers = (data.get("sdk_http_response") or {}).get("headers") or {}
    for name in [name for name in headers if name.lower() == "date"]:  # aiohttp keeps the server's "Date"
        del headers[name]
    return data


def _generate(client: Any, text: str = "say something nice") -> Any:
    return _dump(client.models.generate_content(model=MODEL, contents=text, config=CONFIG))


def _stream(client: Any, text: str = "stream me please") -> Any:
    return [_dump(chunk) for chunk in client.models.generate_content_stream(model=MODEL, contents=text, config=CONFIG)]


def _embed(client: Any) -> Any:
    return _dump(client.models.embed_content(model="text-embedding-004", contents=["a b", "c"]))


def _count(client: Any) -> Any:
    return _dump(client.models.count_tokens(model=MODEL, contents="a b c"))


def _call_a_function(client: Any) -> Any:
    tool = types.Tool(function_declarations=[types.FunctionDeclaration(
        name="get_weather", description="weather", parameters_json_schema={"type": "object"})])
    return _dump(client.models.generate_content(model=MODEL, contents="weather in Oslo?",
                                                config=types.GenerateContentConfig(temperature=0, tools=[tool])))


async def _agenerate(aio: Any) -> Any:
    return _dump(await aio.models.generate_content(model=MODEL, contents="async hello", config=CONFIG))


async def _astream(aio: Any) -> Any:
    stream = await aio.models.generate_content_stream(model=MODEL, contents="async stream", config=CONFIG)
    return [_dump(chunk) async for chunk in stream]


Scenario = Callable[[FakeLLMServer, pytest.MonkeyPatch], Any]


def _sync(fn: Callable[[Any], Any], make: Callable[[FakeLLMServer], Any] = _client, backend: str = "") -> Scenario:
    """A call through a sync client (closed after), on the SDK's default backend or ``backend``."""
    def run(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> Any:
        if backend:
            monkeypatch.setenv("GOOGLE_GENAI_HTTP_CLIENT", backend)
        with make(server) as client:
            return fn(client)
    return run


def _async(coroutine: Callable[[Any], Any], **options: Any) -> Scenario:
    """A call through ``client.aio`` (closed after): aiohttp by default, httpx2 given a transport."""
    def run(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> Any:
        async def go() -> Any:
            async with _client(server, **options).aio as aio:
                return await coroutine(aio)
        return asyncio.run(go())
    return run


HTTPX2_ASYNC = {"async_client_args": {"transport": httpx2.AsyncHTTPTransport()}}
GENERATE = ("generate_content", MODEL)
SCENARIOS: dict[str, tuple[Scenario, Expect]] = {
    "httpx2-generate": (_sync(_generate), Expect("httpx2", "gcp.gemini", *GENERATE, False, 5, 4)),
    "httpx2-stream": (_sync(_stream), Expect("httpx2", "gcp.gemini", *GENERATE, True, 5, 4)),
    "httpx-generate": (_sync(_generate, backend="httpx"), Expect("httpx", "gcp.gemini", *GENERATE, False, 5, 4)),
    "httpx-stream": (_sync(_stream, backend="httpx"), Expect("httpx", "gcp.gemini", *GENERATE, True, 5, 4)),
    "aiohttp-generate": (_async(_agenerate), Expect("aiohttp", "gcp.gemini", *GENERATE, False, 4, 3)),
    "aiohttp-stream": (_async(_astream), Expect("aiohttp", "gcp.gemini", *GENERATE, True, 4, 3)),
    "httpx2-async-generate": (_async(_agenerate, **HTTPX2_ASYNC),
                              Expect("httpx2", "gcp.gemini", *GENERATE, False, 4, 3)),
    "httpx2-async-stream": (_async(_astream, **HTTPX2_ASYNC), Expect("httpx2", "gcp.gemini", *GENERATE, True, 4, 3)),
    "vertex-express-generate": (_sync(_generate, make=_vertex),
                                Expect("httpx2", "gcp.vertex_ai", *GENERATE, False, 5, 4)),
    "embed-batch": (_sync(_embed), Expect("httpx2", "gcp.gemini", "embeddings", "text-embedding-004", False, None,
                                          None)),
    "count-tokens": (_sync(_count), Expect("httpx2", "gcp.gemini", "count_tokens", MODEL, False, None, None)),
    "function-call": (_sync(_call_a_function), Expect("httpx2", "gcp.gemini", *GENERATE, False, 3, 1)),
}


def _once(server: FakeLLMServer, fn: Callable[..., Any], *args: Any, key: str = KEY) -> Any:
    with genai.Client(api_key=key, http_options=types.HttpOptions(base_url=server.url)) as client:
        return fn(client, *args)


def _without_headers(answer: Any) -> Any:
    items = answer if isinstance(answer, list) else [answer]
    return [{k: v for k, v in item.items() if k != "sdk_http_response"} for item in items]


def _wire(server: FakeLLMServer) -> list[tuple[str, str, tuple[tuple[str, str], ...], bytes]]:
    return [(r.method, r.path, r.headers, r.body) for r in server.received]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_identical_with_and_without_llmshim(name: str, server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch,
                                            records: list[llmshim.CallRecord]) -> None:
    fn, expect = SCENARIOS[name]
    without = fn(server, monkeypatch)
    wire_without = _wire(server)
    server.reset()
    llmshim.install()
    try:
        with_shim = fn(server, monkeypatch)
    finally:
        llmshim.uninstall()
    assert with_shim == without
    assert _wire(server) == wire_without, "llmshim changed what went on the wire"
    assert [r.event for r in records] == ["call_started", "call_completed"]
    done = records[-1]
    assert (done.library, done.provider, done.operation, done.model, done.stream) == (
        expect.library, expect.provider, expect.operation, expect.model, expect.stream)
    assert (done.input_tokens, done.output_tokens) == (expect.input_tokens, expect.output_tokens)
    assert done.status == 200 and done.outcome == "ok" and done.error_type is None
    assert KEY not in repr(done)


def test_an_error_is_raised_identically(server: FakeLLMServer, records: list[llmshim.CallRecord]) -> None:
    def fail() -> tuple[int, str | None, str]:
        server.inject(Fault(status=400, body="* GenerateContentRequest.contents: contents is not specified"))
        with pytest.raises(errors.ClientError) as raised:
            _once(server, _generate)
        return raised.value.code, raised.value.status, str(raised.value.message)

    without = fail()
    llmshim.install(retry_mode="llmshim")
    try:
        assert fail() == without == (400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not "
                                                              "specified")
    finally:
        llmshim.uninstall()
    assert records[-1].status == 400 and records[-1].outcome == "error"


# -- the cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["httpx2-generate", "httpx2-stream", "aiohttp-generate", "aiohttp-stream",
                                  "httpx-stream", "embed-batch"])
def test_a_cache_hit_parses_identically(name: str, server: FakeLLMServer, cached: Path,
                                        monkeypatch: pytest.MonkeyPatch, records: list[llmshim.CallRecord]) -> None:
    fn, _ = SCENARIOS[name]
    live, hit = fn(server, monkeypatch), fn(server, monkeypatch)
    assert len(server.received) == 1
    assert _without_headers(hit) == _without_headers(live)  # the hit's headers say it is one (x-llmshim-cache, age)
    assert [r.cache_hit for r in records if r.event == "call_completed"] == [False, True]


def test_count_tokens_is_never_cached_nor_rate_limited(server: FakeLLMServer, installed: Callable[..., object],
                                                      tmp_path: Path) -> None:
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"), rpm="1", queue_timeout="0.2")
    with _client(server) as client:
        counts = [client.models.count_tokens(model=MODEL, contents="a b c").total_tokens for _ in range(3)]
        assert counts == [3, 3, 3] and len(server.received) == 3  # all sent: no cache, no permit taken
        _generate(client, "the one generation this minute")  # the limiter is on: it grants one...
        with pytest.raises(errors.ClientError) as raised:
            _generate(client, "a second generation")  # ...and queues the next one beyond its timeout
    assert raised.value.code == 429 and len(server.received) == 4


# -- spans ----------------------------------------------------------------------------------------

@pytest.fixture
def spans(installed: Callable[..., object]) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    installed(tracer_provider=provider)
    yield exporter


def _llmshim_spans(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [dict(s.attributes or {}) | {"name": s.name} for s in exporter.get_finished_spans()
            if s.instrumentation_scope.name == "llmshim"]


def test_spans_are_conformant(server: FakeLLMServer, spans: InMemorySpanExporter) -> None:
    _once(server, _generate)
    _once(server, _stream)
    _async(_astream)(server, pytest.MonkeyPatch())
    _once(server, lambda client: client.models.generate_content(model=MODEL, contents="think", config=types.
          GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_budget=128), max_output_tokens=1)))
    whole, stream, astream, thinking = _llmshim_spans(spans)
    for span in (whole, stream, astream):
        assert span["name"] == f"generate_content {MODEL}"
        assert span["gen_ai.operation.name"] == "generate_content" and span["gen_ai.provider.name"] == "gcp.gemini"
        assert span["gen_ai.request.model"] == span["gen_ai.response.model"] == MODEL
        assert span["gen_ai.request.temperature"] == 0 and span["gen_ai.request.max_tokens"] == 50
        assert span["gen_ai.response.finish_reasons"] == ("stop",) and span["gen_ai.response.id"]
    assert (whole["gen_ai.usage.input_tokens"], whole["gen_ai.usage.output_tokens"]) == (5, 4)
    assert (stream["gen_ai.usage.input_tokens"], stream["gen_ai.usage.output_tokens"]) == (5, 4)
    assert stream["gen_ai.request.stream"] is True and whole["gen_ai.request.stream"] is False
    assert thinking["gen_ai.response.finish_reasons"] == ("max_tokens",)
    assert thinking["gen_ai.usage.output_tokens"] == 1 + 3  # the answer and the thinking, both billed as output
    assert KEY not in json.dumps([whole, stream, astream, thinking], default=str)


# -- the key in the URL -----------------------------------------------------------------------------

def _raw(server: FakeLLMServer, key: str, text: str = "hello there", stream: bool = False) -> bytes:
    action = "streamGenerateContent?alt=sse&" if stream else "generateContent?"
    url = f"{server.url}/v1beta/models/{MODEL}:{action}key={key}"
    with httpx.Client() as client:
        response = client.post(url, json={"contents": [{"role": "user", "parts": [{"text": text}]}],
                                          "generationConfig": {"temperature": 0}})
        return response.content


def test_a_query_key_is_never_stored_traced_counted_or_logged(
        server: FakeLLMServer, installed: Callable[..., object], tmp_path: Path,
        caplog: pytest.LogCaptureFixture, records: list[llmshim.CallRecord]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stats_file = tmp_path / "stats.json"
    caplog.set_level(logging.DEBUG, logger="llmshim")
    installed(cache="on", cache_path=str(tmp_path / "cache.sqlite3"), tracer_provider=provider,
              stats_file=str(stats_file), rpm="1000")
    answers = [_raw(server, KEY), _raw(server, KEY), _raw(server, KEY, stream=True), _raw(server, KEY, stream=True)]
    assert answers[0] == answers[1] and answers[2] == answers[3] and len(server.received) == 2  # two hits
    assert all(KEY in r.path for r in server.received)  # the key did reach the server
    llmshim.uninstall()  # closes the cache and writes the stats file

    stored = b"".join(path.read_bytes() for path in tmp_path.glob("cache.sqlite3*"))
    assert b"generateContent" in stored or b"Echo" in stored  # the entries are there...
    assert KEY.encode() not in stored and b"key=" not in stored  # ...the key is not
    attributes = json.dumps(_llmshim_spans(exporter), default=str)
    assert MODEL in attributes and KEY not in attributes
    assert stats_file.exists() and KEY not in stats_file.read_text()
    assert KEY not in json.dumps(llmshim.stats(), default=str)
    assert KEY not in repr(records) and all("?" not in r.url for r in records)
    assert KEY not in caplog.text


def test_each_key_has_its_own_entries(server: FakeLLMServer, installed: Callable[..., object], tmp_path: Path) -> None:
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    one, two = _raw(server, "AIzaKEYONE-123456"), _raw(server, "AIzaKEYTWO-123456")
    assert _raw(server, "AIzaKEYONE-123456") == one and one == two  # the same answer, kept once per key
    assert [r.path.rsplit("=", 1)[1] for r in server.received] == ["AIzaKEYONE-123456", "AIzaKEYTWO-123456"]
    installed(cache="on", cache_path=str(tmp_path / "shared.sqlite3"), cache_scope="shared")
    server.reset()
    _raw(server, "AIzaKEYONE-123456"), _raw(server, "AIzaKEYTWO-123456")
    assert len(server.received) == 1  # shared scope: the key in the URL no longer splits the entry


def test_header_keys_scope_entries_too(server: FakeLLMServer, cached: Path) -> None:
    for key in ("AIzaHEADERONE-1234", "AIzaHEADERTWO-1234", "AIzaHEADERONE-1234"):
        _once(server, _generate, "scoped", key=key)
    assert [r.header("x-goog-api-key") for r in server.received] == ["AIzaHEADERONE-1234", "AIzaHEADERTWO-1234"]


# -- retries ----------------------------------------------------------------------------------------

def _retry_info(delay: str) -> bytes:
    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
    return json.dumps({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                                 "status": "RESOURCE_EXHAUSTED", "details": [info]}}).encode()


@pytest.mark.parametrize("name", ["httpx2-generate", "aiohttp-generate", "httpx2-stream"])
def test_503_and_429_are_retried(name: str, server: FakeLLMServer, installed: Callable[..., object],
                                 monkeypatch: pytest.MonkeyPatch, records: list[llmshim.CallRecord]) -> None:
    fn, _ = SCENARIOS[name]
    expected = fn(server, monkeypatch)
    server.reset()
    installed(retry_mode="llmshim", retry_max_attempts="3", retry_max_delay="0.05")
    server.inject(Fault(status=503))
    server.inject(Fault(status=429, body=_retry_info("0s")))
    assert _without_headers(fn(server, monkeypatch)) == _without_headers(expected)  # x-request-id counts requests
    assert len(server.received) == 3
    assert records[-1].status == 200 and llmshim.stats()["retries"] == 2


def test_retry_info_longer_than_the_cap_hands_the_429_back(server: FakeLLMServer, installed: Callable[..., object],
                                                          records: list[llmshim.CallRecord]) -> None:
    """The delay is read from the body: 30 s is more than the 5 s cap, so the caller gets the 429 at
    once (without the body's say, a 0-5 s backoff would have retried it)."""
    installed(retry_mode="llmshim", retry_max_attempts="3", retry_max_delay="5")
    server.inject(Fault(status=429, body=_retry_info("30s")))
    with pytest.raises(errors.ClientError) as raised:
        _once(server, _generate)
    assert raised.value.code == 429 and len(server.received) == 1


def test_a_per_day_quota_is_not_retried(server: FakeLLMServer, installed: Callable[..., object]) -> None:
    installed(retry_mode="llmshim", retry_max_attempts="3", retry_max_delay="0.05")
    body = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0s"}]}}
    server.inject(Fault(status=429, body=body), times=None)
    with pytest.raises(errors.ClientError):
        _once(server, _generate)
    assert len(server.received) == 1


def test_the_bundled_rpm_limit_speaks_googles_429(server: FakeLLMServer) -> None:
    server.rpm_limit = 1
    _once(server, _generate)
    with pytest.raises(errors.ClientError) as raised:
        _once(server, _generate)
    assert raised.value.code == 429 and raised.value.status == "RESOURCE_EXHAUSTED"
    details = raised.value.details["error"]["details"]
    assert details[0]["@type"].endswith("RetryInfo") and details[0]["retryDelay"].endswith("s")
