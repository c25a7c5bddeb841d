"""A cache hit is not spending (issue 14 item 1): tokens count as spent only when the provider
produced them; a hit reports what it saved, under llmshim's own names, and every metric point says
whether it was a hit. Real OpenTelemetry SDK readers, real clients, the bundled server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from llmshim.testing import FakeLLMServer

BODY = {"model": "m", "messages": [{"role": "user", "content": "say something short"}], "stream": False}


class Readers:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [point for resource in (data.resource_metrics if data else ()) for scope in resource.scope_metrics
                for metric in scope.metrics if metric.name == name for point in metric.data.data_points]

    def spans(self) -> list[dict[str, Any]]:
        return [dict(s.attributes or {}) for s in self.exporter.get_finished_spans()
                if s.instrumentation_scope.name == "llmshim"]


@pytest.fixture
def readers(tmp_path: Path) -> Iterator[Readers]:
    setup = Readers()
    llmshim.install(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider, cache="on",
                    cache_path=str(tmp_path / "c.sqlite3"))
    try:
        yield setup
    finally:
        llmshim.uninstall()


def _by_type(points: list[Any]) -> dict[str, float]:
    """Sum of a token metric's points per gen_ai.token.type."""
    out: dict[str, float] = {}
    for point in points:
        kind = point.attributes["gen_ai.token.type"]
        out[kind] = out.get(kind, 0) + point.sum if hasattr(point, "count") else out.get(kind, 0) + point.value
    return out


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", BODY),
    ("/api/chat", BODY),
    ("/v1/chat/completions", {**BODY, "stream": True, "stream_options": {"include_usage": True}}),
])
def test_five_identical_calls_spend_once_and_save_four_times(server: FakeLLMServer, readers: Readers,
                                                             records: list[llmshim.CallRecord], path: str,
                                                             body: dict[str, Any]) -> None:
    for _ in range(5):
        requests.post(server.url + path, json=body, timeout=10).content  # noqa: B018 - read the body
    assert len(server.received) == 1
    done = [r for r in records if r.event == "call_completed"]
    paid = done[0]
    assert [r.cache_hit for r in done] == [False, True, True, True, True]
    assert paid.input_tokens and paid.output_tokens  # the provider's count, for the one paid call
    assert all(r.input_tokens is None and r.output_tokens is None for r in done[1:])
    assert all((r.saved_input_tokens, r.saved_output_tokens) == (paid.input_tokens, paid.output_tokens)
               for r in done[1:])

    spent = _by_type(readers.points("gen_ai.client.token.usage"))
    assert spent == {"input": paid.input_tokens, "output": paid.output_tokens}  # one call, not five
    saved = _by_type(readers.points("llmshim.cache.tokens_saved"))
    assert saved == {"input": 4 * paid.input_tokens, "output": 4 * paid.output_tokens}

    spans = readers.spans()
    assert len(spans) == 5
    assert spans[0]["gen_ai.usage.input_tokens"] == paid.input_tokens and not spans[0]["llmshim.cache.hit"]
    for hit in spans[1:]:
        assert not any(name.startswith("gen_ai.usage.") for name in hit)  # nothing for a backend to bill
        assert hit["llmshim.cache.saved.input_tokens"] == paid.input_tokens
        assert hit["llmshim.cache.saved.output_tokens"] == paid.output_tokens

    durations = readers.points("gen_ai.client.operation.duration")
    assert sorted((p.attributes["llmshim.cache.hit"], p.count) for p in durations) == [(False, 1), (True, 4)]

    stats = llmshim.stats()
    assert (stats["input_tokens"], stats["output_tokens"]) == (paid.input_tokens, paid.output_tokens)
    assert stats["tokens_saved"] == 4 * (paid.input_tokens + paid.output_tokens)
    (model,) = stats["by_model"].values()
    assert (model["calls"], model["input_tokens"], model["tokens_saved"]) == (
        5, paid.input_tokens, stats["tokens_saved"])


def test_without_the_cache_every_point_says_it_was_not_a_hit(server: FakeLLMServer) -> None:
    setup = Readers()
    llmshim.install(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider, cache="off")
    try:
        requests.post(server.url + "/api/chat", json=BODY, timeout=10).content  # noqa: B018
    finally:
        llmshim.uninstall()
    for name in ("gen_ai.client.operation.duration", "gen_ai.client.token.usage"):
        assert {p.attributes["llmshim.cache.hit"] for p in setup.points(name)} == {False}
    assert setup.points("llmshim.cache.tokens_saved") == []
    (span,) = setup.spans()
    assert "gen_ai.usage.input_tokens" in span and "llmshim.cache.hit" not in span  # not consulted


def test_a_corrupt_stored_usage_saves_nothing_and_breaks_nothing(server: FakeLLMServer, readers: Readers,
                                                                 tmp_path: Path) -> None:
    import sqlite3

    requests.post(server.url + "/api/chat", json=BODY, timeout=10).content  # noqa: B018
    llmshim.uninstall()  # flush, then corrupt the stored usage as an older or foreign writer might
    conn = sqlite3.connect(tmp_path / "c.sqlite3")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(entries)")]
    assert "meta" in columns
    conn.execute("""UPDATE entries SET meta = json_set(meta, '$.usage.input_tokens', 'lots',
                                                       '$.usage.output_tokens', json('true'))""")
    conn.commit()
    conn.close()
    llmshim.install(tracer_provider=readers.tracer_provider, meter_provider=readers.meter_provider, cache="on",
                    cache_path=str(tmp_path / "c.sqlite3"))
    before = llmshim.stats()["tokens_saved"]
    answer = requests.post(server.url + "/api/chat", json=BODY, timeout=10)
    assert answer.headers.get("x-llmshim-cache") == "hit" and answer.json()["message"]
    assert llmshim.stats()["tokens_saved"] == before
