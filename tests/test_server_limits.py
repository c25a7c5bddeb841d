"""Rate limits reach the server's real capacity (issue 12, item 7).

OpenAI's ``x-ratelimit-reset-requests`` is the time until the limit is whole again, not until the
next request fits. A server whose bucket is empty (another client drained it) answers
``remaining: 0, reset: 60s`` while it refills one request every 50 ms; reading that as a 60 s block
starves the caller. llmshim instead keeps its own bucket at or below what the server says remains,
and paces at the limit.
"""

from __future__ import annotations

import threading

import pytest
import requests
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
import llmshim.runtime
from llmshim.dialects.openai import OPENAI
from llmshim.gcra import Gcra
from llmshim.policies.scheduler import Key as _Key
from llmshim.testing import FakeLLMServer
from llmshim.values import Limits as RateLimits

BODY = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "stream": False}


def test_remaining_caps_what_the_bucket_offers_and_reset_is_not_a_block() -> None:
    key = _Key(RateLimits(rpm=1200), burst=10.0)
    assert key.requests is not None
    key.learn(OPENAI.server_limits({"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "0",
                             "x-ratelimit-reset-requests": "1m0s"}), now=100.0)
    assert key.blocked_until == 0.0
    assert key.requests.wait(100.0, 1.0) == pytest.approx(1 / 20)  # one refill interval, not 60 s
    key.learn(OPENAI.server_limits({"x-ratelimit-remaining-requests": "5"}), now=100.0)   # never loosens
    assert key.requests.wait(100.0, 1.0) == pytest.approx(1 / 20)


def test_at_most_offers_exactly_what_remains() -> None:
    bucket = Gcra(per_minute=600, burst_seconds=10.0)
    bucket.at_most(50.0, 3)
    for _ in range(3):
        assert bucket.wait(50.0, 1.0) == pytest.approx(0, abs=1e-9)
        bucket.take(50.0, 1.0)
    assert bucket.wait(50.0, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize("header", ["nan", "inf", "-1", "١٢", "", "lots"])
def test_unreadable_remaining_headers_are_ignored(header: str) -> None:
    key = _Key(RateLimits(rpm=600), burst=10.0)
    key.learn(OPENAI.server_limits({"x-ratelimit-remaining-requests": header, "x-ratelimit-limit-requests": header}),
              now=0.0)
    assert key.requests is not None and key.requests.wait(0.0, 1.0) == 0 and key.requests.rate == 10.0


def test_a_drained_server_bucket_is_used_at_its_full_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load-independent: what llmshim *planned* is asserted, not the elapsed time. Each call's
    queue wait (its span's ``llmshim.ratelimit.wait_s``) stays far below the server's 60 s reset,
    and the limiter ends pacing at the server's own rate, not blocked."""
    rpm, calls, threads = 1200, 60, 6
    monkeypatch.setenv("LLMSHIM_RPM", str(rpm * 10))  # llmshim alone would allow 10x: the server's answers rule
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "auto")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with FakeLLMServer(rpm_limit=rpm, rpm_style="bucket") as server:
        server.bucket_level = 0.0  # another client just emptied it: remaining 0, reset 60 s
        llmshim.install(tracer_provider=provider)
        statuses: list[int] = []
        lock = threading.Lock()

        def work(n: int) -> None:
            for _ in range(n):
                status = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=30).status_code
                with lock:
                    statuses.append(status)

        workers = [threading.Thread(target=work, args=(calls // threads,)) for _ in range(threads)]
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            limiter = llmshim.runtime.STATE.pipeline.policies[-1].limiter  # type: ignore[attr-defined]
            (key,) = limiter._keys.values()
            now = limiter.clock()
        finally:
            llmshim.uninstall()
    assert statuses == [200] * calls  # no 429 reached a caller
    assert key.requests.rate == pytest.approx(rpm / 60.0)  # learned from the server's limit header
    # Reset was not read as a block: the next request fits within a refill interval or so.
    assert key.blocked_until - now < 1.0 and key.requests.wait(now, 1.0) < 1.0
    waits = [float(span.attributes["llmshim.ratelimit.wait_s"]) for span in exporter.get_finished_spans()
             if span.attributes and "llmshim.ratelimit.wait_s" in span.attributes]
    assert len(waits) == calls
    # Reading reset as a block makes a wait of ~60 s; paced at 20 a second behind at most 5 other
    # threads, a wait is a few refill intervals (50 ms each).
    assert max(waits) < 10.0, max(waits)
