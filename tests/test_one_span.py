"""One GenAI span per LLM call (issue 14 item 5): with a framework's own GenAI instrumentation on
(openllmetry's OpenAI instrumentation, real, installed by the test extra), llmshim adds its own
attributes to that span instead of starting a second one, and does not record the GenAI metrics a
second time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from conftest import run_python
from llmshim.policies.telemetry import is_genai_span_for
from llmshim.testing import FakeLLMServer

MSG: Any = [{"role": "user", "content": "hello there"}]


SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")  # openllmetry's own import warns about pydantic; not ours
import openai
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.openai import OpenAIInstrumentor
import llmshim

exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
meter_provider = MeterProvider(metric_readers=[reader])
OpenAIInstrumentor().instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
llmshim.install(tracer_provider=tracer_provider, meter_provider=meter_provider, cache="on",
                cache_path=sys.argv[3])
client = openai.OpenAI(base_url=sys.argv[1], api_key="k", max_retries=0)
messages = [{"role": "user", "content": "hello there"}]
for _ in range(2):
    if sys.argv[2] == "stream":
        for _chunk in client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True):
            pass
    else:
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
llmshim.uninstall()
spans = [{"scope": s.instrumentation_scope.name, "attributes": dict(s.attributes or {})}
         for s in exporter.get_finished_spans()]
metrics = sorted({m.name for r in reader.get_metrics_data().resource_metrics for sm in r.scope_metrics
                  for m in sm.metrics if sm.scope.name == "llmshim"})
print(json.dumps({"spans": spans, "metrics": metrics}, default=str))
"""


@pytest.mark.parametrize("stream", [False, True])
def test_one_genai_span_per_call_under_openllmetry(server: FakeLLMServer, tmp_path: Path, stream: bool) -> None:
    """In a fresh interpreter, as an application runs: openllmetry instrumented once, llmshim installed."""
    import json

    out = json.loads(run_python(SCRIPT.replace("sys.argv[1]", repr(server.openai_base_url))
                                .replace("sys.argv[2]", repr("stream" if stream else "whole"))
                                .replace("sys.argv[3]", repr(str(tmp_path / "c.sqlite3")))))
    spans = [s for s in out["spans"] if "gen_ai.operation.name" in s["attributes"]]
    assert len(spans) == 2  # one per call: openllmetry's, not a second one from llmshim
    assert all(s["scope"] != "llmshim" for s in spans)
    live, hit = (s["attributes"] for s in spans)
    assert live["llmshim.cache.hit"] is False and hit["llmshim.cache.hit"] is True
    if not stream:  # a stream without include_usage carries no usage; its span is ended by openllmetry
        assert hit["llmshim.cache.saved.output_tokens"] > 0  # before llmshim hears the body end
        assert live["llmshim.outcome"] == hit["llmshim.outcome"] == "ok"
    assert len(server.received) == 1
    assert "gen_ai.client.token.usage" not in out["metrics"]  # openllmetry records the GenAI metrics
    assert "gen_ai.client.operation.duration" not in out["metrics"]
    assert {"llmshim.cache.hits", "llmshim.cache.misses"} <= set(out["metrics"])


def test_without_a_framework_llmshim_makes_the_one_span(server: FakeLLMServer) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    llmshim.install(tracer_provider=tracer_provider)
    try:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k") as client:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    finally:
        llmshim.uninstall()
    (span,) = [s for s in exporter.get_finished_spans() if "gen_ai.operation.name" in (s.attributes or {})]
    assert span.instrumentation_scope.name == "llmshim"


def test_a_parent_that_wraps_many_calls_is_not_taken_for_the_call() -> None:
    tracer = TracerProvider().get_tracer("framework")
    cases = [
        ({"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}, "chat", "m", True),
        ({"gen_ai.operation.name": "chat", "gen_ai.request.model": "other"}, "chat", "m", False),
        ({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "a"}, "chat", "m", False),
        ({"gen_ai.operation.name": "execute_tool"}, "chat", "m", False),
        ({"gen_ai.system": "openai", "gen_ai.request.model": "m"}, "chat", "m", True),
        ({"openinference.span.kind": "LLM", "llm.model_name": "m"}, "chat", "m", True),
        ({"openinference.span.kind": "CHAIN"}, "chat", "m", False),
        ({"http.request.method": "POST"}, "chat", "m", False),
        ({"gen_ai.operation.name": "embeddings"}, "embeddings", None, True),
    ]
    for attributes, operation, model, expected in cases:
        with tracer.start_as_current_span("framework", attributes=attributes) as span:
            assert is_genai_span_for(span, operation, model) is expected, attributes
    assert is_genai_span_for(trace.INVALID_SPAN, "chat", "m") is False
