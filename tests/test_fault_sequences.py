"""Random sequences of faults end with an idle process (issue 12, "how to prove it").

Hypothesis draws sequences of what callers and servers do (normal calls, streams closed early or
dropped unread, identical calls in flight together, asyncio tasks cancelled while queued or
running, 429s with random and absurd delays, 500s retried, resets mid-stream), run with the
cache, retries, a rate limit and a concurrency limit on. After each sequence (and a garbage
collection for the dropped streams), the process holds no concurrency slot, no waiter, no
coalescing flight and no pending store write, and the next call is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.policies.cache import CachePolicy
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer, Fault

STEPS = st.sampled_from([
    "call", "stream_closed_early", "stream_dropped", "twins_in_flight", "task_cancelled_queued",
    "task_cancelled_running", "429_small", "429_absurd", "500_retried", "reset_mid_stream",
])


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def _body(n: int, stream: bool = True) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": f"q{n % 3}"}], "stream": stream}


def _step(step: str, server: FakeLLMServer, n: int) -> None:
    url = server.openai_base_url + "/chat/completions"
    with contextlib.suppress(requests.RequestException, httpx.HTTPError):
        if step == "call":
            requests.post(url, json=_body(n), timeout=5).close()
        elif step == "stream_closed_early":
            with requests.post(url, json=_body(n), stream=True, timeout=5) as response:
                next(response.iter_content(8), None)
        elif step == "stream_dropped":
            requests.post(url, json=_body(n), stream=True, timeout=5)  # neither read nor closed
        elif step == "twins_in_flight":
            first = requests.post(url, json=_body(n), stream=True, timeout=5)
            second = requests.post(url, json=_body(n), stream=True, timeout=5)
            second.close()
            first.close()
        elif step in ("task_cancelled_queued", "task_cancelled_running"):
            asyncio.run(_cancel(url, n, running=step.endswith("running")))
        elif step == "429_small":
            server.inject(Fault(status=429, headers={"retry-after-ms": str(n % 30)}))
            requests.post(url, json=_body(n, stream=False), timeout=5).close()
        elif step == "429_absurd":
            server.inject(Fault(status=429, headers={"retry-after": "inf"}))
            requests.post(url, json=_body(n, stream=False), timeout=5).close()
        elif step == "500_retried":
            server.inject(Fault(status=500))
            requests.post(url, json=_body(n, stream=False), timeout=5).close()
        elif step == "reset_mid_stream":
            server.inject(Fault(reset="after_chunks", after_chunks=1))
            requests.post(url, json=_body(n), timeout=5).close()


async def _cancel(url: str, n: int, running: bool) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        holder = await client.send(client.build_request("POST", url, json=_body(n + 1)), stream=True)
        task = asyncio.create_task(client.post(url, json=_body(n)))
        if running:
            await holder.aclose()  # the slot frees: the task is granted and runs
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task
        await holder.aclose()


# The sequences drop streams unread on purpose (as users do): their sockets are closed by the
# garbage collector, which warns about it; that warning is the users' business, not this test's.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(STEPS, min_size=1, max_size=8))
def test_any_sequence_of_faults_ends_with_an_idle_process(server: FakeLLMServer, tmp_path: Path,
                                                         steps: list[str]) -> None:
    server.reset()
    llmshim.install(cache="on", cache_path=str(tmp_path / "cache.sqlite3"), retry_mode="llmshim",
                    retry_max_delay="0.05", rpm="100000", max_concurrency="1", queue_timeout="0.3",
                    cache_coalesce_timeout="0.3")
    try:
        limiter = next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))
        cache = next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))
        for n, step in enumerate(steps):
            _step(step, server, n)
        gc.collect()  # dropped streams end here
        assert limiter.held() == (0, 0), steps
        # A flight lands once its entry is written; on an event loop that write is queued for the
        # background thread, which may not have run yet when asyncio.run() returns: wait for it first.
        assert cache.writes.idle(5), steps
        assert cache.flights.in_flight() == 0, steps
        server.reset()  # no fault left over; the key's 429 block (at most 60 s) is cleared below
        with limiter._lock:
            for key in limiter._keys.values():
                key.blocked_until = 0.0
        answer = requests.post(server.openai_base_url + "/chat/completions", json=_body(99, stream=False), timeout=5)
        assert answer.status_code == 200, (steps, answer.text)
        assert limiter.held() == (0, 0), steps
    finally:
        llmshim.uninstall()
