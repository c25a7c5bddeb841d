"""Real recorded traffic (../shared/cassettes, vcrpy YAML from two public projects) replayed through
the real clients over a local socket, without and then with llmshim.

The local server answers each request with the recorded bytes and headers (gzip included),
matching by method and path in recorded order. For every LLM interaction the parsed result must be
identical with and without llmshim, and the model and token counts llmshim read must equal the
ones in the recorded response (read here independently, from the raw recording).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import threading
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
import requests
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from conftest import SHARED_CASSETTES
from llmshim.call import WireRequest
from llmshim.dialects import detect
from llmshim.testing import Answer, FakeLLMServer, Received
from llmshim.tokens import GENERATIONS

yaml = pytest.importorskip("yaml")

REPORT: dict[str, int] = {"cassettes": 0, "interactions": 0, "replays": 0, "identical": 0, "usage_checked": 0,
                          "spans_checked": 0, "cache_hits_identical": 0}

SPANS = InMemorySpanExporter()
TRACER_PROVIDER = TracerProvider()
TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(SPANS))


def _catalog() -> list[dict[str, Any]]:
    path = SHARED_CASSETTES / "catalog.json"
    if not path.exists():
        return []
    entries = json.loads(path.read_text())["cassettes"]
    return [e for e in entries if e["provider"] in ("openai", "ollama", "other")]


CATALOG = _catalog()
pytestmark = pytest.mark.skipif(not CATALOG, reason=f"recorded cassettes not found at {SHARED_CASSETTES}")


def _load(entry: dict[str, Any]) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load((SHARED_CASSETTES / entry["file"]).read_text(), Loader=loader)
    return list(data.get("interactions") or [])


def _body_bytes(body: Any) -> bytes:
    raw = body.get("string", b"") if isinstance(body, dict) else body
    if raw is None:
        return b""
    return raw if isinstance(raw, bytes) else raw.encode()


def _decoded(headers: dict[str, list[str]], data: bytes) -> bytes:
    encoding = (_header(headers, "content-encoding") or "").lower()
    if encoding == "gzip" and data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    return data


def _header(headers: dict[str, list[str]], name: str) -> str | None:
    for key, values in (headers or {}).items():
        if key.lower() == name.lower():
            return values[0] if isinstance(values, list) else str(values)
    return None


class Replayer:
    """Answers requests with recorded responses, by (method, path) in recorded order, thread-safe."""

    _SKIP = {"transfer-encoding", "content-length", "connection", "keep-alive"}

    def __init__(self, interactions: list[dict[str, Any]]) -> None:
        self._lock = threading.Lock()
        self._items = interactions
        self._used: set[int] = set()

    def pin(self, interaction: dict[str, Any]) -> None:
        """Serve ``interaction`` next for its (method, path): the one being replayed now."""
        with self._lock:
            self._used = {i for i, item in enumerate(self._items) if item is not interaction}

    def __call__(self, received: Received) -> Answer | None:
        path = urlsplit(received.path).path
        with self._lock:
            for index, item in enumerate(self._items):
                request = item["request"]
                if index in self._used or request["method"] != received.method:
                    continue
                if urlsplit(request["uri"]).path != path:
                    continue
                self._used.add(index)
                response = item["response"]
                headers = [(k, v) for k, values in (response.get("headers") or {}).items()
                           if k.lower() not in self._SKIP for v in (values if isinstance(values, list) else [values])]
                return Answer(int(response["status"]["code"]), headers, _body_bytes(response.get("body")))
        return Answer(599, [("Content-Type", "text/plain")], b"no recorded interaction left")


def _expected(interaction: dict[str, Any]) -> tuple[str | None, int | None, int | None]:
    """(model, input tokens, output tokens) read straight from the recorded response bytes."""
    response = interaction["response"]
    text = _decoded(response.get("headers") or {}, _body_bytes(response.get("body"))).decode("utf-8", "replace")
    objects: list[Any] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("data:"):
            line = line[5:].strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                objects.append(json.loads(line))
    if not objects:
        try:
            objects = [json.loads(text)]
        except ValueError:
            return None, None, None
    model = input_tokens = output_tokens = None
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        obj = obj.get("response", obj) if isinstance(obj.get("response"), dict) else obj
        model = obj.get("model", model)
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else obj
        for key in ("prompt_tokens", "input_tokens", "prompt_eval_count"):
            if isinstance(usage.get(key), int):
                input_tokens = usage[key]
        for key in ("completion_tokens", "output_tokens", "eval_count"):
            if isinstance(usage.get(key), int):
                output_tokens = usage[key]
    return model, input_tokens, output_tokens


def _body_error(interaction: dict[str, Any]) -> str | None:
    response = interaction["response"]
    text = _decoded(response.get("headers") or {}, _body_bytes(response.get("body")))
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    error = obj.get("error") if isinstance(obj, dict) and "choices" not in obj else None
    return str(error.get("code") or error.get("type")) if isinstance(error, dict) else None


_SDK_TYPES = {
    "chat/completions": (ChatCompletion, ChatCompletionChunk),
    "completions": (Completion, Completion),
    "embeddings": (CreateEmbeddingResponse, CreateEmbeddingResponse),
    "responses": (Response, ResponseStreamEvent),
}


def _via_openai_sdk(server: FakeLLMServer, path: str, body: dict[str, Any], endpoint: str) -> Any:
    cast_to, chunk_type = _SDK_TYPES[endpoint]
    with openai.OpenAI(base_url=server.url + "/", api_key="sk-replay", max_retries=0) as client:
        try:
            if body.get("stream"):
                stream = client.post(path.lstrip("/"), cast_to=cast_to, body=body, stream=True,
                                     stream_cls=openai.Stream[chunk_type])  # type: ignore[valid-type]
                return [event.model_dump(warnings=False) for event in stream]
            return client.post(path.lstrip("/"), cast_to=cast_to, body=body).model_dump(warnings=False)
        except openai.APIError as exc:
            return type(exc).__name__, str(exc)


def _via_requests(server: FakeLLMServer, path: str, raw: bytes) -> Any:
    with requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"},
                       stream=True, timeout=10) as response:
        return response.status_code, list(response.iter_content(chunk_size=None))


def _via_aiohttp(server: FakeLLMServer, path: str, raw: bytes) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as session, session.post(
                server.url + path, data=raw, headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.read()
    return asyncio.run(go())


def _llm_interactions(interactions: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, bytes, Any]]:
    found = []
    for item in interactions:
        request = item["request"]
        raw = _body_bytes(request.get("body"))
        parts = urlsplit(request["uri"])
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        wire = WireRequest(request["method"], "http://replay" + path, (), raw)
        recognised = detect(wire)
        if recognised is not None:
            found.append((item, path, raw, recognised[1]))
    return found


@pytest.mark.parametrize("entry", CATALOG, ids=[e["file"].rsplit("/", 1)[-1] for e in CATALOG])
def test_recorded_traffic_is_identical_and_read_correctly(
        entry: dict[str, Any], records: list[llmshim.CallRecord], tmp_path: Path) -> None:
    interactions = _load(entry)
    calls = _llm_interactions(interactions)
    if not calls:
        pytest.skip("no LLM interaction in this cassette (assistants/threads or third-party traffic)")
    replayer = Replayer(interactions)
    REPORT["cassettes"] += 1
    replays = 0
    with FakeLLMServer(responder=replayer) as server:
        for item, path, raw, info in calls:
            REPORT["interactions"] += 1
            body = json.loads(raw)
            clients: list[Any] = [lambda p=path, r=raw: _via_requests(server, p, r),
                                  lambda p=path, r=raw: _via_aiohttp(server, p, r)]
            if info.provider == "openai" and info.endpoint in _SDK_TYPES:
                clients.insert(0, lambda p=path, b=body, e=info.endpoint: _via_openai_sdk(server, p, b, e))
            for client in clients:
                replayer.pin(item)
                without = client()
                replayer.pin(item)
                records.clear()
                SPANS.clear()
                replays += 1  # a cache of its own: some cassettes ask the same question twice, differently answered
                llmshim.install(tracer_provider=TRACER_PROVIDER, cache="on",
                                cache_path=str(tmp_path / f"cache-{replays}.sqlite3"))
                try:
                    with_shim = client()
                    done_live = [r for r in records if r.event != "call_started"]
                    spans_live = list(SPANS.get_finished_spans())
                    received = len(server.received)
                    replayer.pin(item)
                    again = client()  # the same request: a hit if the first answer was storable
                    second = [r for r in records if r.event != "call_started"][len(done_live):]
                finally:
                    llmshim.uninstall()
                if second and second[0].cache_hit:
                    assert again == with_shim, f"{entry['file']} {path}: a cache hit parsed differently"
                    assert len(server.received) == received, "a cache hit reached the server"
                    REPORT["cache_hits_identical"] += 1
                records[:] = done_live
                SPANS.clear()
                for span in spans_live:
                    SPANS.export([span])
                REPORT["replays"] += 1
                assert with_shim == without, f"{entry['file']} {path}: parsed result changed under llmshim"
                REPORT["identical"] += 1
                done = [r for r in records if r.event != "call_started"]
                assert len(done) == 1, records
                (span,) = SPANS.get_finished_spans()
                span_attributes = dict(span.attributes or {})
                status = int(item["response"]["status"]["code"])
                if status >= 400:
                    assert done[0].event == "call_failed" and done[0].error_type == str(status)
                    assert span_attributes["error.type"] == str(status)
                    continue
                body_error = _body_error(item)
                if body_error is not None:  # a 2xx whose body is an error (Azure content filter)
                    assert done[0].event == "call_failed" and done[0].error_type == body_error
                    continue
                model, input_tokens, output_tokens = _expected(item)
                assert done[0].event == "call_completed", done[0]
                assert done[0].response_model == model
                if input_tokens is None and output_tokens is None and info.operation in GENERATIONS:
                    # no usage recorded (a stream sent without include_usage): llmshim's estimate, flagged
                    assert done[0].estimator is not None and span_attributes["llmshim.usage.estimator"]
                    assert done[0].input_tokens and done[0].output_tokens is not None
                    assert span_attributes["llmshim.usage.estimated.input_tokens"] == done[0].input_tokens
                else:
                    assert done[0].estimator is None and "llmshim.usage.estimator" not in span_attributes
                    assert (done[0].input_tokens, done[0].output_tokens) == (input_tokens, output_tokens)
                REPORT["usage_checked"] += 1
                assert span_attributes.get("gen_ai.response.model") == model
                assert span_attributes.get("gen_ai.usage.input_tokens") == input_tokens
                assert span_attributes.get("gen_ai.usage.output_tokens") == output_tokens
                assert span_attributes["gen_ai.provider.name"] == info.provider
                REPORT["spans_checked"] += 1


def test_replay_counts_are_reported() -> None:
    """Runs after the parametrised replays (same module, defined later): every replay was identical."""
    assert REPORT["replays"] == REPORT["identical"]
    if REPORT["cassettes"]:
        assert REPORT["interactions"] > 100 and REPORT["usage_checked"] > 200, REPORT
        assert REPORT["spans_checked"] == REPORT["usage_checked"]
        # Every successful, complete recorded answer (usage checked) came back from the cache identically.
        assert REPORT["cache_hits_identical"] >= REPORT["usage_checked"] - 5, REPORT
