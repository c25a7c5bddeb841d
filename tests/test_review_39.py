"""Review 39: trying to break llmshim's OpenTelemetry GenAI conformance as a tracing backend sees it,
through the real SDK (InMemorySpanExporter + InMemoryMetricReader) and the bundled fake server.

Bugs found and fixed:

1. A stream that failed mid-way (the connection reset after some chunks: httpx ``ReadError``) ended
   its span with ``error.type=ReadError`` but status UNSET and no ``exception`` event: the tracker
   calls such a body ``aborted`` (with ``call.error`` set), and telemetry set status ERROR only for
   ``outcome == "error"``. Backends counting error rates by span status missed every cut stream,
   against the README ("on failure error.type with status ERROR"). Fixed in ``telemetry.finish``:
   status ERROR (and the scrubbed exception event when there is an exception) whenever the span
   carries ``error.type``; an early close by the user has no error.type and stays UNSET.
   Without the fix these fail: ``test_stream_cut_midway``, ``test_stream_cut_cleanly[close]`` and
   ``[truncated_chunk]``, ``test_async_stream_cut_midway``, ``test_stream_stalls_into_a_timeout``,
   ``test_requests_ollama_stream_cut``; ``test_user_closes_stream_early_is_not_an_error`` and
   ``test_stream_dropped_unread_is_not_an_error`` pin that an abandoned stream stays UNSET.

What held (no change): span name/kind/attributes for OpenAI chat (sync, stream), embeddings,
Responses (+stream), Ollama chat (+stream), Anthropic messages, Gemini generateContent (+SSE);
429/500, connection refused, clean cuts, errors inside a 200 (OpenAI JSON, Anthropic SSE event);
retried 429; cache hits (no gen_ai.usage.*, token.usage not double counted, also for 10 coalesced
identical calls); 20 threads and 20 asyncio tasks without cross-talk; user/agent parent spans;
no key in attributes, events, status or metric attributes (Gemini ``?key=``, requests' message);
instrument names, units, types, advised buckets; low-cardinality metric attributes.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmshim.testing import FakeLLMServer, Fault
from llmshim.testing.responses import Answer

KEY = "sk-review39-SECRETKEY-0123456789abcdef"
MSG: Any = [{"role": "user", "content": "PROMPT-TEXT-review39 hello there"}]
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
# What a GenAI metric point may carry: the conventions' low-cardinality set plus llmshim.cache.hit.
METRIC_KEYS = {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
               "server.address", "server.port", "error.type", "gen_ai.token.type", "llmshim.cache.hit"}


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> Sequence[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.instrumentation_scope.name == "llmshim"]

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = metric
        return found

    def points(self, name: str) -> list[Any]:
        metric = self.metrics().get(name)
        return list(metric.data.data_points) if metric else []


@pytest.fixture
def otel(installed: Any) -> Otel:
    setup = Otel()
    installed(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider, cache="off")
    return setup


@pytest.fixture
def otel_cached(installed: Any, tmp_path: Path) -> Otel:
    setup = Otel()
    installed(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider, cache="on",
              cache_path=str(tmp_path / "c.sqlite3"))
    return setup


def _client(server: FakeLLMServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)


def _one(otel: Otel) -> tuple[ReadableSpan, dict[str, Any]]:
    spans = otel.spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0], dict(spans[0].attributes or {})


def _common(span: ReadableSpan, attributes: dict[str, Any], operation: str, model: str, provider: str,
            server: FakeLLMServer) -> None:
    assert span.kind is SpanKind.CLIENT
    assert span.name == f"{operation} {model}"
    assert attributes["gen_ai.operation.name"] == operation
    assert attributes["gen_ai.provider.name"] == provider
    assert attributes["gen_ai.request.model"] == model
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == server.port
    assert span.status.status_code is not StatusCode.ERROR
    assert "error.type" not in attributes
    assert attributes["llmshim.outcome"] == "ok"


def _no_secret_anywhere(otel: Otel, *secrets: str) -> None:
    blobs: list[str] = []
    for span in otel.exporter.get_finished_spans():
        blobs.append(json.dumps(dict(span.attributes or {}), default=str))
        blobs.append(str(span.status.description))
        for event in span.events:
            blobs.append(json.dumps(dict(event.attributes or {}), default=str))
    for name in otel.metrics():
        for point in otel.points(name):
            blobs.append(json.dumps(dict(point.attributes or {}), default=str))
    text = "\n".join(blobs)
    for secret in secrets:
        assert secret not in text


def _check_metric_points(otel: Otel) -> None:
    for name in ("gen_ai.client.operation.duration", "gen_ai.client.token.usage",
                 "gen_ai.client.operation.time_to_first_chunk", "gen_ai.client.operation.time_per_output_chunk"):
        for point in otel.points(name):
            keys = set(point.attributes or {})
            assert keys <= METRIC_KEYS, (name, keys - METRIC_KEYS)
            values = json.dumps(dict(point.attributes or {}), default=str)
            assert "PROMPT-TEXT" not in values


# -- each dialect --------------------------------------------------------------------------------

def test_openai_chat_sync(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0.3, max_tokens=50)
    span, attributes = _one(otel)
    _common(span, attributes, "chat", "gpt-4o", "openai", server)
    assert attributes["gen_ai.response.id"] == reply.id
    assert attributes["gen_ai.response.model"] == reply.model
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    assert reply.usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert attributes["gen_ai.request.temperature"] == 0.3
    assert attributes["gen_ai.request.max_tokens"] == 50
    assert attributes["http.response.status_code"] == 200
    # no response id, prompt or key in metric attributes
    for point in otel.points("gen_ai.client.operation.duration") + otel.points("gen_ai.client.token.usage"):
        assert reply.id not in json.dumps(dict(point.attributes or {}))
    _check_metric_points(otel)
    _no_secret_anywhere(otel, KEY)


def test_openai_chat_stream(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                                     stream_options={"include_usage": True}))
    span, attributes = _one(otel)
    _common(span, attributes, "chat", "gpt-4o", "openai", server)
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.response.id"] == chunks[0].id
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attributes["gen_ai.response.time_to_first_chunk"] >= 0
    (first,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert first.count == 1
    metric = otel.metrics()["gen_ai.client.operation.time_to_first_chunk"]
    assert metric.unit == "s"
    per = otel.metrics()["gen_ai.client.operation.time_per_output_chunk"]
    assert per.unit == "s"
    assert sum(p.count for p in per.data.data_points) >= 1
    _check_metric_points(otel)
    _no_secret_anywhere(otel, KEY)


def test_embeddings(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        reply = client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"])
    span, attributes = _one(otel)
    _common(span, attributes, "embeddings", "text-embedding-3-small", "openai", server)
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert "gen_ai.usage.output_tokens" not in attributes
    types = {p.attributes["gen_ai.token.type"] for p in otel.points("gen_ai.client.token.usage")}
    assert types == {"input"}
    _check_metric_points(otel)


def test_responses(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        reply = client.responses.create(model="gpt-4.1", input="PROMPT-TEXT-review39")
    span, attributes = _one(otel)
    _common(span, attributes, "chat", "gpt-4.1", "openai", server)
    assert attributes["gen_ai.response.id"] == reply.id
    assert reply.usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == reply.usage.output_tokens
    assert attributes.get("gen_ai.response.finish_reasons")
    _check_metric_points(otel)


def test_ollama_chat(server: FakeLLMServer, otel: Otel) -> None:
    body = httpx.post(server.url + "/api/chat", json={"model": "llama3.2", "messages": MSG, "stream": False}).json()
    span, attributes = _one(otel)
    _common(span, attributes, "chat", "llama3.2", "ollama", server)
    assert attributes["gen_ai.usage.input_tokens"] == body["prompt_eval_count"]
    assert attributes["gen_ai.usage.output_tokens"] == body["eval_count"]
    assert attributes["gen_ai.response.model"] == body["model"]
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    _check_metric_points(otel)


def test_ollama_chat_stream(server: FakeLLMServer, otel: Otel) -> None:
    with httpx.stream("POST", server.url + "/api/chat",
                      json={"model": "llama3.2", "messages": MSG, "stream": True}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    span, attributes = _one(otel)
    _common(span, attributes, "chat", "llama3.2", "ollama", server)
    assert attributes["gen_ai.usage.output_tokens"] == lines[-1]["eval_count"]
    assert otel.points("gen_ai.client.operation.time_to_first_chunk")


def test_anthropic_messages(server: FakeLLMServer, otel: Otel) -> None:
    body = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                      json={"model": "claude-3-5-haiku-latest", "max_tokens": 64, "messages": MSG}).json()
    span, attributes = _one(otel)
    _common(span, attributes, "chat", "claude-3-5-haiku-latest", attributes["gen_ai.provider.name"], server)
    assert attributes["gen_ai.provider.name"] in ("anthropic",)
    assert attributes["gen_ai.response.id"] == body["id"]
    assert attributes["gen_ai.usage.input_tokens"] >= body["usage"]["input_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == body["usage"]["output_tokens"]
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert list(attributes["gen_ai.response.finish_reasons"])
    _check_metric_points(otel)
    _no_secret_anywhere(otel, KEY)


def test_gemini_generate_content(server: FakeLLMServer, otel: Otel) -> None:
    url = f"{server.url}/v1beta/models/gemini-2.0-flash:generateContent?key={KEY}"
    body = httpx.post(url, json={"contents": [{"role": "user", "parts": [{"text": "PROMPT-TEXT-review39"}]}]}).json()
    span, attributes = _one(otel)
    assert attributes["gen_ai.operation.name"] in ("generate_content", "chat")
    _common(span, attributes, attributes["gen_ai.operation.name"], "gemini-2.0-flash",
            attributes["gen_ai.provider.name"], server)
    assert attributes["gen_ai.usage.input_tokens"] == body["usageMetadata"]["promptTokenCount"]
    assert attributes["gen_ai.usage.output_tokens"] == body["usageMetadata"]["candidatesTokenCount"]
    _check_metric_points(otel)
    _no_secret_anywhere(otel, KEY)


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [429, 500])
def test_http_error(status: int, server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(status=status))
    with _client(server) as client, pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    span, attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == str(status)
    assert attributes["http.response.status_code"] == status
    assert attributes["llmshim.outcome"] == "error"
    assert "gen_ai.usage.input_tokens" not in attributes
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes["error.type"] == str(status)
    assert not otel.points("gen_ai.client.token.usage")
    _check_metric_points(otel)
    _no_secret_anywhere(otel, KEY)


def test_http_error_gemini_key_in_url(server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(status=400, body=f"API key not valid: {KEY}"))
    url = f"{server.url}/v1beta/models/gemini-2.0-flash:generateContent?key={KEY}"
    response = httpx.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert response.status_code == 400
    span, _attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR
    _no_secret_anywhere(otel, KEY)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused(otel: Otel) -> None:
    port = _closed_port()
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0) as client, \
            pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    span, attributes = _one(otel)
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"]
    assert attributes["server.port"] == port
    assert attributes["llmshim.outcome"] == "error"
    assert any(e.name == "exception" for e in span.events)
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes["error.type"] == attributes["error.type"]
    _no_secret_anywhere(otel, KEY)


def test_stream_cut_midway(server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(reset="after_chunks", after_chunks=2))
    with _client(server) as client, pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises
        for _chunk in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            pass
    span, attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR  # was UNSET beside error.type=ReadError (bug 1)
    assert attributes["error.type"]
    assert attributes["llmshim.outcome"] in ("error", "aborted")
    assert [e.name for e in span.events] == ["exception"]
    assert "gen_ai.response.finish_reasons" not in attributes or attributes["gen_ai.response.finish_reasons"]
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes.get("error.type") == attributes["error.type"]


def test_error_inside_200(server: FakeLLMServer, otel: Otel) -> None:
    message = f"upstream overloaded (key {KEY})"
    server.responder = lambda received: Answer(200, [("Content-Type", "application/json")],
                                               json.dumps({"error": {"message": message, "type": "server_error"}})
                                               .encode())
    body = httpx.post(server.openai_base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "gpt-4o", "messages": MSG}).json()
    assert "error" in body
    span, attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["llmshim.outcome"] == "error"
    assert attributes["error.type"]
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes.get("error.type") == attributes["error.type"]
    _no_secret_anywhere(otel, KEY)


def test_user_closes_stream_early_is_not_an_error(server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(chunk_delay=0.01))
    with _client(server) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        next(iter(stream))
        stream.close()
    span, attributes = _one(otel)
    assert attributes["llmshim.outcome"] == "aborted"
    assert "error.type" not in attributes
    assert span.status.status_code is StatusCode.UNSET
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert "error.type" not in point.attributes


def test_connection_refused_key_in_url_requests(otel: Otel) -> None:
    import requests

    port = _closed_port()
    url = f"http://127.0.0.1:{port}/v1beta/models/gemini-2.0-flash:generateContent?key={KEY}"
    with pytest.raises(requests.ConnectionError) as raised:
        requests.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, timeout=5)
    assert KEY in str(raised.value)  # the library's own message quotes the URL: llmshim must not
    span, _attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in span.events)
    _no_secret_anywhere(otel, KEY)


def test_anthropic_stream_error_event_inside_200(server: FakeLLMServer, otel: Otel) -> None:
    events = [("message_start", {"type": "message_start", "message": {
                  "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
                  "content": [], "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 0}}}),
              ("error", {"type": "error", "error": {"type": "overloaded_error", "message": f"Overloaded {KEY}"}})]
    chunks = [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]
    server.responder = lambda received: Answer(200, [("Content-Type", "text/event-stream")], b"", chunks)
    with httpx.stream("POST", server.url + "/v1/messages", headers={"x-api-key": KEY},
                      json={"model": "claude-3-5-haiku-latest", "max_tokens": 9, "messages": MSG,
                            "stream": True}) as response:
        response.read()
    span, attributes = _one(otel)
    assert attributes["error.type"] == "overloaded_error"
    assert span.status.status_code is StatusCode.ERROR
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes["error.type"] == "overloaded_error"
    _no_secret_anywhere(otel, KEY)


def test_retried_429_then_ok(server: FakeLLMServer, installed: Any) -> None:
    otel = Otel()
    installed(tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider, cache="off",
              retry_mode="llmshim", retry_max_delay="0.01")
    server.inject(Fault(status=429, headers={"retry-after-ms": "1"}))
    with _client(server) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert len(server.received) == 2
    span, attributes = _one(otel)
    assert attributes["llmshim.retry.count"] == 1
    assert "error.type" not in attributes and span.status.status_code is StatusCode.UNSET
    assert attributes["http.response.status_code"] == 200
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert "error.type" not in point.attributes


@pytest.mark.parametrize("cut", ["close", "truncated_chunk"])
def test_stream_cut_cleanly(cut: str, server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(cut=cut, after_chunks=2))  # type: ignore[arg-type]
    with _client(server) as client, pytest.raises(Exception):  # noqa: B017
        for _chunk in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            pass
    span, attributes = _one(otel)
    assert attributes["error.type"]
    assert span.status.status_code is StatusCode.ERROR
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes["error.type"] == attributes["error.type"]


def test_gemini_stream_key_in_url(server: FakeLLMServer, otel: Otel) -> None:
    url = f"{server.url}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key={KEY}"
    with httpx.stream("POST", url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}) as response:
        response.read()
    span, attributes = _one(otel)
    _common(span, attributes, "generate_content", "gemini-2.0-flash", "gcp.gemini", server)
    assert attributes["gen_ai.request.stream"] is True and attributes["gen_ai.usage.output_tokens"]
    _no_secret_anywhere(otel, KEY)


def test_no_content_by_default(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    span, attributes = _one(otel)
    assert "PROMPT-TEXT" not in json.dumps(attributes, default=str)
    assert not [e for e in span.events if e.name.startswith("gen_ai")]


def test_async_stream_cut_midway(server: FakeLLMServer, otel: Otel) -> None:
    import asyncio

    server.inject(Fault(reset="after_chunks", after_chunks=2))

    async def go() -> None:
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0) as client:
            async for _chunk in await client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
                pass

    with pytest.raises(openai.APIConnectionError):
        asyncio.run(go())
    span, attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR and attributes["error.type"]
    assert [e.name for e in span.events] == ["exception"]


def test_stream_stalls_into_a_timeout(server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(cut="stall", after_chunks=1))
    with openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0, timeout=0.3) as client, \
            pytest.raises(openai.APITimeoutError):
        for _chunk in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            pass
    span, attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == "ReadTimeout"


def test_requests_ollama_stream_cut(server: FakeLLMServer, otel: Otel) -> None:
    import requests

    server.inject(Fault(reset="after_chunks", after_chunks=2))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(server.url + "/api/chat", json={"model": "llama3.2", "messages": MSG},
                                 stream=True, timeout=5)
        for _line in response.iter_lines():
            pass
    span, attributes = _one(otel)
    assert span.status.status_code is StatusCode.ERROR and attributes["error.type"]


def test_stream_dropped_unread_is_not_an_error(server: FakeLLMServer, otel: Otel) -> None:
    import gc

    with _client(server) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        del stream
        gc.collect()
    span, attributes = _one(otel)
    assert attributes["llmshim.outcome"] == "aborted"
    assert "error.type" not in attributes and span.status.status_code is StatusCode.UNSET


# -- cache hits ----------------------------------------------------------------------------------

def test_cache_hit_span_and_no_double_counting(server: FakeLLMServer, otel_cached: Otel) -> None:
    otel = otel_cached
    with _client(server) as client:
        first = client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0)
        second = client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0)
    assert first.id == second.id
    assert len(server.received) == 1
    miss, hit = otel.spans()
    miss_attributes, hit_attributes = dict(miss.attributes or {}), dict(hit.attributes or {})
    assert miss_attributes["llmshim.cache.hit"] is False
    assert hit_attributes["llmshim.cache.hit"] is True
    assert hit.kind is SpanKind.CLIENT and hit.name == "chat gpt-4o"
    assert "gen_ai.usage.input_tokens" not in hit_attributes  # README: a hit is not spending
    assert "gen_ai.usage.output_tokens" not in hit_attributes
    assert hit_attributes["llmshim.cache.saved.input_tokens"] == miss_attributes["gen_ai.usage.input_tokens"]
    assert hit_attributes["llmshim.cache.saved.output_tokens"] == miss_attributes["gen_ai.usage.output_tokens"]
    assert hit_attributes["gen_ai.response.id"] == first.id
    assert hit.status.status_code is not StatusCode.ERROR
    tokens = otel.points("gen_ai.client.token.usage")
    assert {p.attributes["llmshim.cache.hit"] for p in tokens} == {False}
    assert sum(p.count for p in tokens) == 2  # input + output of the one paid call
    assert sum(p.sum for p in tokens) == first.usage.total_tokens if first.usage else False
    durations = otel.points("gen_ai.client.operation.duration")
    assert sorted(p.attributes["llmshim.cache.hit"] for p in durations) == [False, True]
    saved = otel.points("llmshim.cache.tokens_saved")
    assert sum(p.value for p in saved) == first.usage.total_tokens if first.usage else False


def test_cache_hit_stream(server: FakeLLMServer, otel_cached: Otel) -> None:
    otel = otel_cached
    with _client(server) as client:
        for _ in range(2):
            list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                                stream_options={"include_usage": True}))
    assert len(server.received) == 1
    _miss, hit = otel.spans()
    assert dict(hit.attributes or {})["llmshim.cache.hit"] is True
    assert "gen_ai.usage.output_tokens" not in dict(hit.attributes or {})
    tokens = otel.points("gen_ai.client.token.usage")
    assert sum(p.count for p in tokens) == 2


def test_coalesced_identical_calls_count_tokens_once(server: FakeLLMServer, otel_cached: Otel) -> None:
    otel = otel_cached
    server.inject(Fault(delay=0.2))
    barrier = threading.Barrier(10)

    def work() -> None:
        with _client(server) as client:
            barrier.wait()
            client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0)

    threads = [threading.Thread(target=work) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(server.received) == 1
    spans = otel.spans()
    assert len(spans) == 10
    paid = [s for s in spans if "gen_ai.usage.input_tokens" in (s.attributes or {})]
    assert len(paid) == 1
    tokens = otel.points("gen_ai.client.token.usage")
    assert sum(p.count for p in tokens) == 2


# -- concurrency ---------------------------------------------------------------------------------

def test_twenty_threads_no_cross_talk(server: FakeLLMServer, otel: Otel) -> None:
    barrier = threading.Barrier(20)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with _client(server) as client:
                barrier.wait()
                reply = client.chat.completions.create(model=f"model-{i}", messages=[
                    {"role": "user", "content": f"thread {i} " * (i + 1)}], temperature=i / 100)
                results[i] = reply.id
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    spans = otel.spans()
    assert len(spans) == 20
    for span in spans:
        attributes = dict(span.attributes or {})
        i = int(attributes["gen_ai.request.model"].split("-")[1])
        assert span.name == f"chat model-{i}"
        assert attributes["gen_ai.response.id"] == results[i]
        assert attributes["gen_ai.request.temperature"] == i / 100
        assert attributes["gen_ai.response.model"] == f"model-{i}"
        assert span.parent is None
    assert len({s.context.trace_id for s in spans}) == 20
    points = otel.points("gen_ai.client.operation.duration")
    assert len(points) == 20 and all(p.count == 1 for p in points)
    assert {p.attributes["gen_ai.request.model"] for p in points} == {f"model-{i}" for i in range(20)}


def test_twenty_async_tasks_no_cross_talk(server: FakeLLMServer, otel: Otel) -> None:
    import asyncio

    tracer = otel.tracer_provider.get_tracer("app")

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, int]:
        with tracer.start_as_current_span(f"task {i}") as parent:
            stream = await client.chat.completions.create(model=f"m-{i}", messages=MSG, stream=True)
            ident = ""
            async for chunk in stream:
                ident = chunk.id
                await asyncio.sleep(0)
            return i, ident, parent.get_span_context().span_id

    async def main() -> list[tuple[int, str, int]]:
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    results = {i: (ident, parent) for i, ident, parent in asyncio.run(main())}
    spans = otel.spans()
    assert len(spans) == 20
    for span in spans:
        attributes = dict(span.attributes or {})
        i = int(attributes["gen_ai.request.model"].split("-")[1])
        assert attributes["gen_ai.response.id"] == results[i][0]
        assert span.parent is not None and span.parent.span_id == results[i][1]
        assert attributes["llmshim.outcome"] == "ok"


# -- a user's parent span ------------------------------------------------------------------------

def test_users_parent_span(server: FakeLLMServer, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("agent run") as parent, _client(server) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
        assert trace.get_current_span() is parent  # llmshim's span is no longer current
    span, _attributes = _one(otel)
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id


def test_users_parent_span_stream_consumed_later(server: FakeLLMServer, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    with _client(server) as client:
        with tracer.start_as_current_span("agent run") as parent:
            stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
            assert trace.get_current_span() is parent
        assert not trace.get_current_span().is_recording()
        list(stream)
    span, _attributes = _one(otel)
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id


def test_agent_parent_span_gets_a_child(server: FakeLLMServer, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("invoke_agent helper", attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o"}) as parent, \
            _client(server) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    span, attributes = _one(otel)
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert attributes["gen_ai.operation.name"] == "chat"


# -- instruments ---------------------------------------------------------------------------------

def test_instrument_names_units_types_buckets(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                            stream_options={"include_usage": True}))
    metrics = otel.metrics()
    expected = {"gen_ai.client.operation.duration": ("s", DURATION_BUCKETS),
                "gen_ai.client.token.usage": ("{token}", TOKEN_BUCKETS)}
    for name, (unit, buckets) in expected.items():
        metric = metrics[name]
        assert metric.unit == unit
        points = list(metric.data.data_points)
        assert points and all(isinstance(p, HistogramDataPoint) for p in points)
        assert [float(b) for b in points[0].explicit_bounds] == [float(b) for b in buckets]
    for name in ("gen_ai.client.operation.time_to_first_chunk", "gen_ai.client.operation.time_per_output_chunk"):
        assert metrics[name].unit == "s"
        assert all(isinstance(p, HistogramDataPoint) for p in metrics[name].data.data_points)
    types = sorted(p.attributes["gen_ai.token.type"] for p in metrics["gen_ai.client.token.usage"].data.data_points)
    assert types == ["input", "output"]


def test_metric_cardinality_over_many_calls(server: FakeLLMServer, otel: Otel) -> None:
    with _client(server) as client:
        for i in range(5):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"q{i}"}])
    points = otel.points("gen_ai.client.operation.duration")
    assert len(points) == 1 and points[0].count == 5  # ids and prompts differ; the series does not
    assert len(otel.points("gen_ai.client.token.usage")) == 2


@pytest.fixture(autouse=True)
def _no_leftover_context() -> Iterator[None]:
    yield
    assert not trace.get_current_span().is_recording()
