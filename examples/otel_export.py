"""Traces and metrics of every LLM call, exported: to the console, or over OTLP/HTTP to Jaeger,
Phoenix or any collector. The application code (``make_calls``) knows nothing of either.

    python examples/otel_export.py                    # console, against the bundled local server

    # Jaeger (UI on http://localhost:16686, OTLP/HTTP on 4318):
    docker run --rm -p 16686:16686 -p 4318:4318 jaegertracing/all-in-one
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 python examples/otel_export.py

    # Arize Phoenix (UI and OTLP/HTTP on http://localhost:6006):
    pip install arize-phoenix && phoenix serve
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:6006 python examples/otel_export.py

    # Or with no code at all, through the OpenTelemetry agent (llmshim registers an instrumentor):
    OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 \\
        opentelemetry-instrument python your_app.py

Set OPENAI_BASE_URL (and OPENAI_API_KEY) to trace calls to a real server instead of the bundled one.
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true adds prompts and answers to the spans.
"""

from __future__ import annotations

import contextlib
import os

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

import llmshim


def configure_opentelemetry() -> tuple[TracerProvider, MeterProvider]:
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "llmshim-example")})
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter: object = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        metric_exporter: object = OTLPMetricExporter(endpoint=endpoint.rstrip("/") + "/v1/metrics")
    else:
        span_exporter, metric_exporter = ConsoleSpanExporter(), ConsoleMetricExporter()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))  # type: ignore[arg-type]
    meter_provider = MeterProvider(resource=resource, metric_readers=[
        PeriodicExportingMetricReader(metric_exporter, export_interval_millis=60_000)])  # type: ignore[arg-type]
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


def make_calls(base_url: str) -> None:
    """Ordinary application code."""
    import openai

    tracer = trace.get_tracer("example-app")
    with tracer.start_as_current_span("answer a question"), openai.OpenAI(
            base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "sk-local")) as client:
        model = os.environ.get("MODEL", "gpt-4o-mini")
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}])
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to 3"}],
                                                stream=True, stream_options={"include_usage": True})
        for _ in stream:
            pass


if __name__ == "__main__":
    tracer_provider, meter_provider = configure_opentelemetry()
    llmshim.install()  # uses the global providers configured above
    with contextlib.ExitStack() as stack:
        url = os.environ.get("OPENAI_BASE_URL")
        if url is None:
            from llmshim.testing import FakeLLMServer

            url = stack.enter_context(FakeLLMServer(chunk_delay=0.01)).openai_base_url
        make_calls(url)
    tracer_provider.shutdown()
    meter_provider.shutdown()
