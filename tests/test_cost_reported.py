"""Cost in US dollars where it is reported (issue 14 item 2): on the CallRecord, the span, the
metric, ``stats()`` (spent and saved, by provider/model); None, never a made-up zero, for a local
server or an unknown model. Prices come from genai-prices (the ``cost`` extra, in the test extra)."""

from __future__ import annotations

import importlib.util
import json
from decimal import Decimal

import pytest
import requests
import responses
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from llmshim.call import Call, Reply, ResponseInfo, Usage, WireRequest
from llmshim.cost import price
from llmshim.dialects import detect
from llmshim.policies.observer import ObserverPolicy
from llmshim.policies.stats import Stats
from llmshim.tap import Tap
from llmshim.testing import FakeLLMServer

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}


def _readers() -> tuple[InMemorySpanExporter, InMemoryMetricReader, TracerProvider, MeterProvider]:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, reader, tracer_provider, MeterProvider(metric_readers=[reader])


@responses.activate
@pytest.mark.skipif(importlib.util.find_spec("genai_prices") is None,
                    reason="genai-prices (the `cost` extra) installs on Python >= 3.11 only")
def test_a_paid_openai_call_carries_its_price_everywhere(records: list[llmshim.CallRecord]) -> None:
    expected = price("openai", "gpt-4o-mini-2024-07-18", 1000, 500)
    assert expected is not None and expected > 0
    responses.add(responses.POST, "https://api.openai.com/v1/chat/completions", json=ANSWER)
    exporter, reader, tracer_provider, meter_provider = _readers()
    llmshim.install(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        requests.post("https://api.openai.com/v1/chat/completions", json=CHAT, timeout=5,
                      headers={"authorization": "Bearer sk-test"}).json()
    finally:
        llmshim.uninstall()
    (done,) = [r for r in records if r.event == "call_completed"]
    assert done.cost_usd == float(expected) and done.saved_cost_usd is None
    (span,) = [s for s in exporter.get_finished_spans() if s.instrumentation_scope.name == "llmshim"]
    assert (span.attributes or {})["llmshim.cost.usd"] == float(expected)
    points = [p for r in reader.get_metrics_data().resource_metrics for sm in r.scope_metrics for m in sm.metrics
              if m.name == "llmshim.cost" for p in m.data.data_points]
    assert [p.value for p in points] == [float(expected)]
    stats = llmshim.stats()
    assert stats["cost_usd"] == float(expected) and stats["saved_cost_usd"] is None
    assert stats["by_model"]["openai/gpt-4o-mini"]["cost_usd"] == float(expected)


def test_a_local_server_has_no_cost_never_zero(server: FakeLLMServer, records: list[llmshim.CallRecord]) -> None:
    llmshim.install()
    try:
        requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).json()
    finally:
        llmshim.uninstall()
    (done,) = [r for r in records if r.event == "call_completed"]
    assert done.cost_usd is None and done.saved_cost_usd is None
    stats = llmshim.stats()
    assert stats["cost_usd"] is None and json.dumps(stats)  # the snapshot stays JSON


def _ended_call(url: str, hit: bool) -> tuple[Call, Reply]:
    wire = WireRequest("POST", url, (("content-type", "application/json"),), json.dumps(CHAT).encode())
    found = detect(wire)
    assert found is not None
    call = Call(request=wire, info=found[1], library="test", dialect=found[0])
    call.facts.cache_hit = hit
    reply = Reply(200, {"content-type": "application/json"}, Tap(), None)
    return call, reply


@pytest.mark.skipif(importlib.util.find_spec("genai_prices") is None,
                    reason="genai-prices (the `cost` extra) installs on Python >= 3.11 only")
def test_a_hit_reports_the_price_it_saved_not_one_it_paid() -> None:
    stats = Stats()
    observer = ObserverPolicy(None, stats)
    call, reply = _ended_call("https://api.openai.com/v1/chat/completions", hit=True)

    def inner(call: Call) -> Reply:
        return reply

    observer.handle(call, inner)
    call.outcome, call.response = "ok", ResponseInfo(model="gpt-4o-mini-2024-07-18",
                                                     usage=Usage(input_tokens=1000, output_tokens=500), done=True)
    reply.tap.release()
    reply.tap.complete()
    expected = price("openai", "gpt-4o-mini-2024-07-18", 1000, 500)
    assert isinstance(expected, Decimal)
    assert call.facts.saved_cost_usd == float(expected) and call.facts.cost_usd is None
    snapshot = stats.snapshot()
    assert snapshot["saved_cost_usd"] == float(expected) and snapshot["cost_usd"] is None


def test_an_unknown_model_at_a_known_provider_has_no_price() -> None:
    assert price("openai", "no-such-model-xyz", 1000, 500) is None
