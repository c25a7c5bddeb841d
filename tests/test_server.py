"""The bundled server itself, without llmshim: its faults and limits must really happen, or the
tests that rely on them prove nothing."""

from __future__ import annotations

import json
import time

import pytest
import requests

from llmshim.testing import FakeLLMServer, Fault

BODY = {"model": "m", "messages": [{"role": "user", "content": "a b"}]}


def test_rpm_limit_answers_429_with_retry_headers(server: FakeLLMServer) -> None:
    server.rpm_limit = 3
    statuses = [requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=5)
                for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert statuses[2].headers["x-ratelimit-remaining-requests"] == "0"
    limited = statuses[3]
    assert 0 < int(limited.headers["retry-after-ms"]) <= 60_000
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_fault_schedule_counts_and_paths(server: FakeLLMServer) -> None:
    server.inject(Fault(status=503, body="Loading model", path="/completion"), times=2)
    url = server.url + "/completion"
    codes = [requests.post(url, json={"prompt": "x"}, timeout=5).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    server.inject(Fault(status=500), times=None)
    assert all(requests.post(url, json={"prompt": "x"}, timeout=5).status_code == 500 for _ in range(3))


def test_reset_before_headers_is_a_connection_error(server: FakeLLMServer) -> None:
    server.inject(Fault(reset="before_headers"))
    with pytest.raises(requests.ConnectionError):
        requests.post(server.url + "/api/chat", json=BODY, timeout=5)


def test_reset_after_chunks_cuts_the_stream(server: FakeLLMServer) -> None:
    server.inject(Fault(reset="after_chunks", after_chunks=2))
    lines = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError), requests.post(
            server.url + "/api/chat", json=BODY, stream=True, timeout=5) as response:
        for line in response.iter_lines():
            lines.append(json.loads(line))
    assert len(lines) == 2 and all(not line["done"] for line in lines)


def test_slow_stream_pieces_arrive_spaced(server: FakeLLMServer) -> None:
    server.chunk_delay = 0.1
    arrivals = []
    start = time.perf_counter()
    with requests.post(server.url + "/api/generate", json={"model": "m", "prompt": "a b c"}, stream=True,
                       timeout=5) as response:
        for _ in response.iter_lines():
            arrivals.append(time.perf_counter() - start)
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] >= 0.35  # four gaps of ~0.1 s: pieces are flushed one by one
