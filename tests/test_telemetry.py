"""OpenTelemetry: one conformant GenAI span and the client metrics per call, for every library and
dialect, streaming-correct, through the real SDK with in-memory exporters."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import openai
import pytest
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode
from test_transparency import MSG, SCENARIOS

import llmshim
from conftest import run_python
from llmshim.policies.telemetry import DURATION_BUCKETS, TOKEN_BUCKETS
from llmshim.testing import FakeLLMServer, Fault


class Otel:
    def __init__(self, sampler: Sampler | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def install(self, **overrides: Any) -> None:
        llmshim.install(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **overrides)

    def spans(self) -> Sequence[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.instrumentation_scope.name == "llmshim"]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += list(metric.data.data_points)
        return found


@pytest.fixture
def otel(installed: Callable[..., object]) -> Otel:
    setup = Otel()
    installed(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider)
    return setup


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_one_conformant_span_and_metrics_per_call(name: str, server: FakeLLMServer, otel: Otel) -> None:
    fn, expect = SCENARIOS[name]
    fn(server)
    (span,) = otel.spans()
    attributes = dict(span.attributes or {})
    assert span.kind is SpanKind.CLIENT
    assert span.name == (f"{expect.operation} {expect.model}" if expect.model else expect.operation)
    assert attributes["gen_ai.operation.name"] == expect.operation
    assert attributes["gen_ai.provider.name"] == expect.provider
    assert attributes.get("gen_ai.request.model") == expect.model
    assert attributes["gen_ai.request.stream"] is expect.stream
    assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == server.port
    assert attributes["llmshim.client.library"] == expect.library
    assert attributes.get("gen_ai.usage.input_tokens") == expect.input_tokens
    assert attributes.get("gen_ai.usage.output_tokens") == expect.output_tokens
    assert attributes["llmshim.outcome"] == "ok" and "error.type" not in attributes
    assert span.status.status_code is StatusCode.UNSET
    if expect.operation != "embeddings":
        assert attributes["gen_ai.response.finish_reasons"] in (("stop",), ("length",))
    if expect.stream:
        assert 0 < attributes["gen_ai.response.time_to_first_chunk"] <= (span.end_time - span.start_time) / 1e9
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 1 and list(duration.explicit_bounds) == DURATION_BUCKETS
    assert duration.attributes["gen_ai.provider.name"] == expect.provider
    tokens = {p.attributes["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage")}
    if expect.input_tokens is not None:
        assert tokens["input"].sum == expect.input_tokens and list(tokens["input"].explicit_bounds) == TOKEN_BUCKETS
    if expect.output_tokens is not None:
        assert tokens["output"].sum == expect.output_tokens
    assert bool(otel.points("gen_ai.client.operation.time_to_first_chunk")) is expect.stream


def test_sampler_sees_operation_provider_model_and_server_at_start(server: FakeLLMServer) -> None:
    seen: list[dict[str, Any]] = []

    class Recording(Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                          attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
            seen.append(dict(attributes or {}))
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

        def get_description(self) -> str:
            return "recording"

    setup = Otel(sampler=Recording())
    setup.install()
    try:
        requests.post(server.url + "/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False,
                                                         "options": {"temperature": 0.3, "num_predict": 9}}, timeout=5)
    finally:
        llmshim.uninstall()
    assert seen == [{
        "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "ollama", "server.address": "127.0.0.1",
        "server.port": server.port, "gen_ai.request.stream": False, "llmshim.client.library": "requests",
        "gen_ai.request.model": "llama3.2", "gen_ai.request.temperature": 0.3, "gen_ai.request.max_tokens": 9}]


def test_stream_span_runs_to_the_last_chunk_with_chunk_metrics(server: FakeLLMServer, otel: Otel) -> None:
    server.chunk_delay = 0.05
    with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                                stream_options={"include_usage": True})
        chunks, arrived = [], []
        for chunk in stream:  # the span is open at the first chunk and ends after the last one
            arrived.append(time.time_ns())
            chunks.append(chunk)
    (span,) = otel.spans()
    assert span.start_time <= arrived[0] and span.end_time >= arrived[-1]  # not ended at the headers
    # the server waits 0.05 s between pieces: the span holds every wait (a busy machine only adds)
    assert (span.end_time - span.start_time) / 1e9 >= 0.05 * (len(chunks) - 1)
    (per_chunk,) = otel.points("gen_ai.client.operation.time_per_output_chunk")
    assert per_chunk.count >= len(chunks) - 1 and per_chunk.sum >= 0.04 * (len(chunks) - 1)


@pytest.mark.parametrize(("fault", "error_type"), [(Fault(status=500), "500"), (Fault(status=429), "429")])
def test_error_status_marks_the_span(server: FakeLLMServer, otel: Otel, fault: Fault, error_type: str) -> None:
    server.inject(fault)
    response = requests.post(server.url + "/api/chat", json={"model": "m", "messages": MSG, "stream": False},
                             timeout=5)
    assert response.status_code == int(error_type)
    (span,) = otel.spans()
    assert span.attributes["error.type"] == error_type and span.status.status_code is StatusCode.ERROR
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == error_type


def test_connection_error_marks_the_span(otel: Otel) -> None:
    with pytest.raises(openai.APIConnectionError), openai.OpenAI(
            base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    (span,) = otel.spans()
    assert span.attributes["error.type"] == "ConnectError"
    assert span.status.status_code is StatusCode.ERROR and "ConnectError" in (span.status.description or "")


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_early_close_and_garbage_collection_end_the_span_once(server: FakeLLMServer, otel: Otel) -> None:
    with httpx.Client() as client, client.stream("POST", server.url + "/api/chat",
                                                 json={"model": "m", "messages": MSG}) as response:
        next(response.iter_lines())
    response2 = requests.post(server.url + "/completion", json={"prompt": "x", "stream": True}, stream=True,
                              timeout=5)
    assert len(otel.spans()) == 1
    del response2
    gc.collect()
    spans = otel.spans()
    assert len(spans) == 2
    assert [s.attributes["llmshim.outcome"] for s in spans] == ["aborted", "aborted"]
    assert all("error.type" not in s.attributes for s in spans)  # a close is not an error


def test_reset_mid_stream_is_an_aborted_span_with_the_error(server: FakeLLMServer, otel: Otel) -> None:
    server.inject(Fault(reset="after_chunks", after_chunks=2))
    with pytest.raises(requests.exceptions.ChunkedEncodingError), requests.post(
            server.url + "/api/chat", json={"model": "m", "messages": MSG}, stream=True, timeout=5) as response:
        list(response.iter_lines())
    (span,) = otel.spans()
    assert span.attributes["llmshim.outcome"] == "aborted"
    assert span.attributes["error.type"] in ("ProtocolError", "InvalidChunkLength", "ChunkedEncodingError")


def test_span_is_a_child_of_the_app_span_and_parent_of_http_spans(server: FakeLLMServer, otel: Otel) -> None:
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

    tracer = otel.tracer_provider.get_tracer("app")
    HTTPX2ClientInstrumentor().instrument(tracer_provider=otel.tracer_provider)
    try:
        with tracer.start_as_current_span("handle request") as app_span, openai.OpenAI(
                base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
            client.chat.completions.create(model="gpt-4o", messages=MSG)
    finally:
        HTTPX2ClientInstrumentor().uninstrument()
    finished = {s.name: s for s in otel.exporter.get_finished_spans()}
    genai, http = finished["chat gpt-4o"], finished["POST"]
    assert genai.parent is not None and genai.parent.span_id == app_span.get_span_context().span_id
    assert http.parent is not None and http.parent.span_id == genai.context.span_id
    assert server.received[-1].header("traceparent") is not None  # propagated by the HTTP instrumentation


def test_parentage_survives_asyncio_tasks_and_thread_pools(server: FakeLLMServer, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    body = {"model": "m", "messages": MSG, "stream": False}

    def sync_call() -> None:
        requests.post(server.url + "/api/chat", json=body, timeout=5)

    async def async_calls() -> None:
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
            await asyncio.gather(*(asyncio.create_task(client.chat.completions.create(model="gpt-4o", messages=MSG))
                                   for _ in range(3)))

    with tracer.start_as_current_span("batch") as batch:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(contextvars.copy_context().run, sync_call) for _ in range(2)]:
                future.result()
        asyncio.run(async_calls())
    spans = otel.spans()
    assert len(spans) == 5
    assert {s.parent.span_id for s in spans if s.parent} == {batch.get_span_context().span_id}
    assert all(s.parent is not None for s in spans)


def test_content_is_not_captured_by_default(server: FakeLLMServer, otel: Otel) -> None:
    with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-secret-key", max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    (span,) = otel.spans()
    text = json.dumps(dict(span.attributes or {}))
    assert "gen_ai.input.messages" not in text and "say something nice" not in text
    assert "sk-secret-key" not in text and "Bearer" not in text


@pytest.mark.parametrize("mode", ["true", "SPAN_ONLY", "EVENT_ONLY"])
def test_content_capture_when_asked(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", mode)
    setup = Otel()
    setup.install()
    try:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-secret-key", max_retries=0) as client:
            stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
            answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        llmshim.uninstall()
    (span,) = setup.spans()
    where = dict(span.events[0].attributes or {}) if mode == "EVENT_ONLY" else dict(span.attributes or {})
    assert json.loads(where["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "say something nice"}]}]
    assert json.loads(where["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": answer}], "finish_reason": "stop"}]
    assert "sk-secret-key" not in json.dumps({**dict(span.attributes or {}), **where})


def test_a_failing_span_processor_never_reaches_the_call(server: FakeLLMServer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    class Broken(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            raise RuntimeError("exporter down")

    setup = Otel()
    setup.tracer_provider.add_span_processor(Broken())
    setup.install()
    try:
        with caplog.at_level(logging.WARNING, logger="llmshim"):
            response = requests.post(server.url + "/api/chat",
                                     json={"model": "m", "messages": MSG, "stream": False}, timeout=5)
    finally:
        llmshim.uninstall()
    assert response.json()["done"] is True
    assert any("OpenTelemetry failed while ending a span" in r.message for r in caplog.records)
    (errors,) = setup.points("llmshim.telemetry.errors")
    assert errors.value == 1
    assert setup.points("gen_ai.client.operation.duration")  # metrics still recorded


def test_telemetry_off_emits_nothing(server: FakeLLMServer) -> None:
    setup = Otel()
    setup.install(telemetry=False)
    try:
        requests.post(server.url + "/api/chat", json={"model": "m", "messages": MSG, "stream": False}, timeout=5)
    finally:
        llmshim.uninstall()
    assert setup.spans() == [] and setup.points("gen_ai.client.operation.duration") == []


def test_llmshim_metric_names_are_registered(server: FakeLLMServer, otel: Otel) -> None:
    requests.post(server.url + "/api/chat", json={"model": "m", "messages": MSG, "stream": False}, timeout=5)
    policy = llmshim.runtime.STATE.pipeline.policies[0]
    instruments = policy.instruments  # type: ignore[attr-defined]
    for counter in ("cache_hits", "cache_misses", "cache_errors", "retry_attempts"):
        getattr(instruments, counter).add(1)
    instruments.ratelimit_wait.record(0.5)
    names = {m.name for r in otel.reader.get_metrics_data().resource_metrics for s in r.scope_metrics
             for m in s.metrics}
    assert {"llmshim.cache.hits", "llmshim.cache.misses", "llmshim.cache.errors", "llmshim.retry.attempts",
            "llmshim.ratelimit.wait", "gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= names


def test_no_sdk_configured_means_no_tracer_is_made(server: FakeLLMServer) -> None:
    out = run_python(f"""
import requests, llmshim
from llmshim.runtime import STATE
llmshim.install()
requests.post({server.url!r} + "/api/chat", json={{"model": "m", "messages": [], "stream": False}}, timeout=5)
policy = STATE.pipeline.policies[0].telemetry
print(type(policy).__name__, policy._tracer is None, policy._instruments is None)
""")
    assert out.split() == ["Telemetry", "True", "True"]


def test_opentelemetry_instrument_traces_an_unmodified_app(server: FakeLLMServer, tmp_path: Any) -> None:
    import os
    import shutil
    import subprocess
    import sys

    app = tmp_path / "app.py"
    app.write_text("import sys, openai\n"
                   "with openai.OpenAI(base_url=sys.argv[1], api_key='sk-app-secret', max_retries=0) as c:\n"
                   "    c.chat.completions.create(model='gpt-4o', messages=[{'role': 'user', 'content': 'hi'}])\n")
    agent = shutil.which("opentelemetry-instrument")
    assert agent is not None, "opentelemetry-instrument not on PATH (opentelemetry-instrumentation)"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none",
           "OTEL_LOGS_EXPORTER": "none"}
    done = subprocess.run([agent, sys.executable, str(app), server.openai_base_url], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    spans = [json.loads(chunk) for chunk in done.stdout.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    # One GenAI span for the call: llmshim's, or, when opentelemetry-instrument also loaded a GenAI
    # instrumentation of the SDK (openllmetry is in the test extra), that one, carrying llmshim's attributes.
    genai = [s for s in spans if "gen_ai.operation.name" in s["attributes"]]
    assert len(genai) == 1 and genai[0]["attributes"]["gen_ai.usage.output_tokens"] == 2
    assert genai[0]["attributes"]["llmshim.client.library"]
    assert "sk-app-secret" not in done.stdout


def test_spans_and_metrics_reach_an_otlp_http_receiver(server: FakeLLMServer) -> None:
    """The real OTLP/HTTP exporters send to a local receiver, which decodes the protobuf."""
    import gzip as gzip_module
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    received: dict[str, list[Any]] = {"/v1/traces": [], "/v1/metrics": []}

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip_module.decompress(raw)
            message = ExportTraceServiceRequest() if self.path == "/v1/traces" else ExportMetricsServiceRequest()
            message.ParseFromString(raw)
            received[self.path].append(message)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces")))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint + "/v1/metrics"),
                                           export_interval_millis=60_000)
    meter_provider = MeterProvider(metric_readers=[reader])
    llmshim.install(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-otlp-secret", max_retries=0) as client:
            client.chat.completions.create(model="gpt-4o", messages=MSG)
    finally:
        llmshim.uninstall()
        tracer_provider.shutdown()
        meter_provider.shutdown()
        receiver.shutdown()
        receiver.server_close()
    spans = [span for request in received["/v1/traces"] for rs in request.resource_spans
             for ss in rs.scope_spans if ss.scope.name == "llmshim" for span in ss.spans]
    assert [span.name for span in spans] == ["chat gpt-4o"]
    attributes = {a.key: a.value for a in spans[0].attributes}
    assert attributes["gen_ai.usage.input_tokens"].int_value == 5
    assert attributes["gen_ai.response.model"].string_value == "gpt-4o"
    metric_names = {m.name for request in received["/v1/metrics"] for rm in request.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= metric_names
    assert b"sk-otlp-secret" not in b"".join(r.SerializeToString() for r in received["/v1/traces"])


def test_stats_count_calls_outcomes_tokens_and_latency(server: FakeLLMServer, shim: None, tmp_path: Any) -> None:
    from llmshim.policies.stats import STATS

    llmshim.stats(reset=True)
    STATS.write_to(str(tmp_path / "stats.json"))
    try:
        body = {"model": "llama3.2", "messages": MSG, "stream": False}
        for _ in range(3):
            requests.post(server.url + "/api/chat", json=body, timeout=5)
        server.inject(Fault(status=500))
        requests.post(server.url + "/api/chat", json=body, timeout=5)
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
            client.embeddings.create(model="e", input="a b")
        snapshot = llmshim.stats()
        STATS.write()
        assert (snapshot["total_calls"], snapshot["completed"], snapshot["failed"]) == (5, 4, 1)
        assert snapshot["input_tokens"] == 3 * 5 + 2 and snapshot["output_tokens"] == 3 * 4
        assert 0 < snapshot["average_latency_s"] < 1
        assert snapshot["by_model"]["ollama/llama3.2"] == {"calls": 4, "input_tokens": 15, "output_tokens": 12,
                                                       "tokens_saved": 0, "estimated_tokens": 0, "cost_usd": None,
                                                           "saved_cost_usd": None}
        assert json.loads((tmp_path / "stats.json").read_text())["total_calls"] == 5
        assert llmshim.stats(reset=True)["total_calls"] == 5 and llmshim.stats()["total_calls"] == 0
    finally:
        STATS.write_to(None)


def test_cli_stats_prints_a_snapshot(tmp_path: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"total_calls": 7, "completed": 6, "failed": 1, "pid": 1,
                                "by_model": {"openai/gpt-4o": {"calls": 7, "input_tokens": 3, "output_tokens": 4}}}))
    done = subprocess.run([sys.executable, "-m", "llmshim", "stats", "--file", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert "total_calls        7" in done.stdout and "openai/gpt-4o" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "llmshim", "stats", "--file", str(tmp_path / "none.json")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "LLMSHIM_STATS_FILE" in missing.stderr


def test_llmshim_span_attribute_names_are_pinned_and_carried(server: FakeLLMServer, otel: Otel) -> None:
    from llmshim.pipeline import Policy  # noqa: F401  (the seam other policies implement)
    from llmshim.policies.telemetry import LLMSHIM_ATTRIBUTES

    assert sorted(LLMSHIM_ATTRIBUTES) == [
        "llmshim.cache.age_s", "llmshim.cache.bypass", "llmshim.cache.hit", "llmshim.cache.saved.cost_usd",
        "llmshim.cache.saved.input_tokens", "llmshim.cache.saved.output_tokens", "llmshim.client.library",
        "llmshim.cost.usd", "llmshim.outcome",
        "llmshim.priority", "llmshim.ratelimit.wait_s", "llmshim.retry.count",
        "llmshim.usage.estimated.input_tokens", "llmshim.usage.estimated.output_tokens", "llmshim.usage.estimator"]

    class Marks:  # stands in for a later policy that records its own attributes on the call
        def handle(self, call: Any, next: Any) -> Any:
            call.facts.priority = "high"
            return next(call)

        async def ahandle(self, call: Any, anext: Any) -> Any:
            return await anext(call)

    from llmshim.policies.observer import ObserverPolicy

    llmshim.runtime.STATE.pipeline.insert(Marks(), after=ObserverPolicy)
    requests.post(server.url + "/api/chat", json={"model": "m", "messages": MSG, "stream": False}, timeout=5)
    (span,) = otel.spans()
    assert span.attributes["llmshim.priority"] == "high"
