"""What telemetry memoises to cost less per call (the span's name and start attributes, the metric
points' attribute sets, the resolved providers) never serves a call another call's values, and
stays bounded whatever model names a process sends."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import requests
from test_telemetry import Otel

from conftest import run_python
from llmshim.policies import telemetry
from llmshim.policies.span_attributes import metric_attribute_sets, span_start
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer, Fault


@pytest.fixture
def otel(installed: Callable[..., object]) -> Otel:
    setup = Otel()
    installed(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider)
    return setup


@pytest.fixture
def second_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def _metric_sets(otel: Otel, name: str) -> collections.Counter[str]:
    """Each point's attribute set (as sorted JSON) -> its count of measurements."""
    return collections.Counter({json.dumps(dict(p.attributes), sort_keys=True): p.count for p in otel.points(name)})


def _expected_metric(model: str, port: int, error: str | None = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                  "server.address": "127.0.0.1", "server.port": port,
                                  "gen_ai.request.model": model}
    if error is None:
        attributes["gen_ai.response.model"] = model
    else:
        attributes["error.type"] = error
    return {**attributes, "llmshim.cache.hit": False}


def test_calls_differing_in_one_value_each_get_their_own_attributes(
        server: FakeLLMServer, second_server: FakeLLMServer, otel: Otel) -> None:
    """Model, server, library, stream and outcome each change one value of the memo keys: every
    span and metric point carries its own call's values, never an earlier call's."""
    clients = {s.port: openai.OpenAI(base_url=s.openai_base_url, api_key="sk-test", max_retries=0)
               for s in (server, second_server)}
    msg: Any = [{"role": "user", "content": "hi"}]
    clients[server.port].chat.completions.create(model="model-a", messages=msg)
    clients[server.port].chat.completions.create(model="model-b", messages=msg)
    clients[second_server.port].chat.completions.create(model="model-a", messages=msg)
    server.inject(Fault(status=500))
    with pytest.raises(openai.InternalServerError):
        clients[server.port].chat.completions.create(model="model-a", messages=msg)
    list(clients[server.port].chat.completions.create(model="model-a", messages=msg, stream=True))
    requests.post(server.openai_base_url + "/chat/completions", json={"model": "model-a", "messages": msg},
                  timeout=10).raise_for_status()
    clients[server.port].chat.completions.create(model="model-a", messages=msg, temperature=0.5)

    spans = otel.spans()
    seen = [(dict(s.attributes or {}), s.name) for s in spans]
    assert [name for _, name in seen] == ["chat model-a", "chat model-b", "chat model-a", "chat model-a",
                                         "chat model-a", "chat model-a", "chat model-a"]
    ports = [a["server.port"] for a, _ in seen]
    assert ports == [server.port, server.port, second_server.port] + [server.port] * 4
    assert [a["gen_ai.request.model"] for a, _ in seen] == ["model-a", "model-b"] + ["model-a"] * 5
    assert [a.get("error.type") for a, _ in seen] == [None, None, None, "500", None, None, None]
    assert [a["gen_ai.request.stream"] for a, _ in seen] == [False] * 4 + [True, False, False]
    assert seen[5][0]["llmshim.client.library"] == "requests"
    assert {a["llmshim.client.library"] for i, (a, _) in enumerate(seen) if i != 5} != {"requests"}
    assert [a.get("gen_ai.request.temperature") for a, _ in seen] == [None] * 6 + [0.5]  # not kept in a memo

    durations = _metric_sets(otel, "gen_ai.client.operation.duration")
    assert durations == collections.Counter({
        json.dumps(_expected_metric("model-a", server.port), sort_keys=True): 4,  # plain, streamed, requests, temp
        json.dumps(_expected_metric("model-b", server.port), sort_keys=True): 1,
        json.dumps(_expected_metric("model-a", second_server.port), sort_keys=True): 1,
        json.dumps(_expected_metric("model-a", server.port, error="500"), sort_keys=True): 1,
    })
    tokens = _metric_sets(otel, "gen_ai.client.token.usage")
    for token_type in ("input", "output"):  # the error answer spent none; the stream reported none
        for model, port, calls in (("model-a", server.port, 3), ("model-b", server.port, 1),
                                   ("model-a", second_server.port, 1)):
            attributes = {**_expected_metric(model, port), "gen_ai.token.type": token_type}
            assert tokens[json.dumps(attributes, sort_keys=True)] == calls


def test_memos_stay_bounded_under_a_stream_of_new_model_names(
        server: FakeLLMServer, otel: Otel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MEMO_LIMIT", 4)
    session = requests.Session()
    models = [f"model-{i}" for i in range(13)]
    for model in models:
        session.post(server.openai_base_url + "/chat/completions",
                     json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    policy = STATE.pipeline.policies[0].telemetry  # type: ignore[attr-defined]
    assert 0 < len(policy._starts) <= 4 and 0 < len(policy._metric_sets) <= 4
    assert [s.name for s in otel.spans()] == [f"chat {m}" for m in models]
    assert [dict(s.attributes or {})["gen_ai.response.model"] for s in otel.spans()] == models
    durations = _metric_sets(otel, "gen_ai.client.operation.duration")
    assert durations == collections.Counter(
        {json.dumps(_expected_metric(m, server.port), sort_keys=True): 1 for m in models})


def test_memo_builds_once_per_key_and_empties_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MEMO_LIMIT", 3)
    built: list[tuple[int, int]] = []

    def build(a: int, b: int) -> str:
        built.append((a, b))
        return f"{a}+{b}"

    memo: dict[tuple[int, int], str] = {}
    assert [telemetry._memo(memo, (1, 2), build) for _ in range(3)] == ["1+2"] * 3
    assert built == [(1, 2)]
    for key in ((1, 3), (1, 4), (1, 5), (1, 6)):
        assert telemetry._memo(memo, key, build) == f"{key[0]}+{key[1]}"
        assert len(memo) <= 3
    assert (1, 2) not in memo and telemetry._memo(memo, (1, 2), build) == "1+2"
    assert built[-1] == (1, 2)


def test_memoised_sets_are_fresh_per_key_and_never_alias() -> None:
    """The pure builders: two keys differing in one value give sets differing in that value only;
    the token sets are their own dicts (one is never another's view)."""
    base, inputs, outputs = metric_attribute_sets("chat", "openai", "h", 1, "m", "m", None, False)
    other = metric_attribute_sets("chat", "openai", "h", 1, "m", "m", "500", False)[0]
    assert {k: v for k, v in other.items() if k != "error.type"} == base and other["error.type"] == "500"
    assert inputs == {**base, "gen_ai.token.type": "input"} and outputs == {**base, "gen_ai.token.type": "output"}
    assert base is not inputs and "gen_ai.token.type" not in base
    assert metric_attribute_sets("chat", "openai", "h", None, None, None, None, True)[0] == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "server.address": "h",
        "llmshim.cache.hit": True}
    assert span_start("embeddings", "openai", "h", None, None, False, "httpx") == ("embeddings", {
        "gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "openai", "server.address": "h",
        "gen_ai.request.stream": False, "llmshim.client.library": "httpx"})


def test_an_sdk_configured_after_the_first_call_is_picked_up(server: FakeLLMServer) -> None:
    """The providers are remembered by identity: a global SDK set after calls already ran (with
    none) is what the next call reports to."""
    out = run_python(f"""
import requests, llmshim
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
llmshim.install(cache="off", retry_mode="off")
def call():
    requests.post({server.openai_base_url!r} + "/chat/completions",
                  json={{"model": "m", "messages": [{{"role": "user", "content": "hi"}}]}}, timeout=10)
call(); call()
exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
call()
points = [p for r in reader.get_metrics_data().resource_metrics for s in r.scope_metrics for m in s.metrics
          if m.name == "gen_ai.client.operation.duration" for p in m.data.data_points]
print(len(exporter.get_finished_spans()), sum(p.count for p in points))
""")
    assert out.split() == ["1", "1"]
