"""llmshim.aio: context reaches the threads, the bound holds, timeouts and cancellation behave,
results come back in order, exceptions keep their type and traceback."""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import requests

import llmshim
import llmshim.aio as aio
from llmshim.knobs import _priority
from llmshim.testing import FakeLLMServer


@pytest.fixture(autouse=True)
def _fresh_pool() -> Iterator[None]:
    aio.shutdown()
    yield
    aio.shutdown(wait=True)


def test_context_reaches_the_worker_thread() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")

    def inside() -> tuple[str | None, Any, str]:
        return _priority.get(), trace.get_current_span().get_span_context().span_id, threading.current_thread().name

    async def go() -> Any:
        with llmshim.priority("high"), tracer.start_as_current_span("parent") as span:
            got = await aio.to_async(inside)()
            return got, span.get_span_context().span_id

    (level, span_id, thread), parent_id = asyncio.run(go())
    assert level == "high" and span_id == parent_id and thread.startswith("llmshim-aio")


def test_queue_bound_makes_the_next_caller_wait() -> None:
    pool = aio.AsyncPool(workers=1, queue_size=1, timeout=None)
    release = threading.Event()
    started = threading.Event()

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "done"

    async def go() -> Any:
        first = asyncio.create_task(pool.run(blocking))
        second = asyncio.create_task(pool.run(blocking))
        third = asyncio.create_task(pool.run(blocking))
        await asyncio.to_thread(started.wait, 10)
        while pool.queue_depth < 2:  # the second holds the queue slot, the third waits for one
            await asyncio.sleep(0)
        assert not third.done() and pool.peak_taken == 2
        release.set()
        return await asyncio.gather(first, second, third)

    assert asyncio.run(go()) == ["done", "done", "done"]
    pool.shutdown(wait=True)


def test_ten_thousand_submitted_never_exceed_the_bound() -> None:
    pool = aio.AsyncPool(workers=4, queue_size=16, timeout=None)

    async def go() -> list[int]:
        return await asyncio.gather(*(pool.run(lambda i=i: i * 2) for i in range(10_000)))

    results = asyncio.run(go())
    assert results == [i * 2 for i in range(10_000)]
    assert pool.peak_taken <= 20  # running + queued, never more: memory stays flat
    pool.shutdown(wait=True)


def test_timeout_is_prompt_and_the_pool_recovers() -> None:
    pool = aio.AsyncPool(workers=1, queue_size=0, timeout=0.1)
    release = threading.Event()

    async def go() -> Any:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError, match="keeps running in its thread"):
            await pool.run(release.wait, 10)
        assert loop.time() - start < 0.5
        assert pool.active == 1  # the thread still runs and holds the only slot
        release.set()
        return await pool.run(lambda: "recovered")

    assert asyncio.run(go()) == "recovered"
    assert pool.active == 0
    pool.shutdown(wait=True)


def test_cancelling_a_waiting_task_frees_its_place() -> None:
    pool = aio.AsyncPool(workers=1, queue_size=0, timeout=None)
    release = threading.Event()

    async def go() -> Any:
        holder = asyncio.create_task(pool.run(release.wait, 10))
        while pool.active == 0:
            await asyncio.sleep(0)
        waiter = asyncio.create_task(pool.run(lambda: "never"))
        while pool.queue_depth == 0:
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.queue_depth == 0
        release.set()
        await holder
        return await pool.run(lambda: "next")

    assert asyncio.run(go()) == "next"
    pool.shutdown(wait=True)


def test_exceptions_keep_type_and_traceback() -> None:
    def broken() -> None:
        raise KeyError("missing thing")

    async def go() -> None:
        await aio.to_async(broken)()

    with pytest.raises(KeyError, match="missing thing") as caught:
        asyncio.run(go())
    assert "broken" in "".join(traceback.format_tb(caught.value.__traceback__))


def test_run_sync_with_and_without_a_running_loop() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert aio.run_sync(answer()) == 42

    async def inside_a_loop() -> int:
        return aio.run_sync(answer())  # e.g. sync library code called from a notebook cell

    assert asyncio.run(inside_a_loop()) == 42


def test_batch_keeps_order_and_can_return_exceptions() -> None:
    def square(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x * x

    results = asyncio.run(aio.batch(square, range(6), max_concurrency=2, return_exceptions=True, progress=False))
    assert results[:3] == [0, 1, 4] and isinstance(results[3], ValueError) and results[4:] == [16, 25]
    with pytest.raises(ValueError, match="three"):
        asyncio.run(aio.batch(square, range(6), progress=False))


def test_gather_with_limit_and_run_with_timeout() -> None:
    running = [0]
    peak = [0]

    async def one(i: int) -> int:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0)
        running[0] -= 1
        return i

    assert asyncio.run(aio.gather_with_limit(*(one(i) for i in range(10)), limit=3)) == list(range(10))
    assert peak[0] <= 3
    with pytest.raises(TimeoutError):
        asyncio.run(aio.run_with_timeout(asyncio.Event().wait(), 0.05))


def test_wrap_adds_async_methods_and_leaves_the_object_alone(server: FakeLLMServer) -> None:
    class LocalClient:
        def __init__(self, url: str) -> None:
            self.url = url

        def chat(self, prompt: str) -> str:
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": False}
            return str(requests.post(self.url + "/api/chat", json=body, timeout=5).json()["message"]["content"])

    client = LocalClient(server.url)
    wrapped = aio.wrap(client)
    assert not hasattr(client, "chat_async") and wrapped.url == server.url and "chat_async" in dir(wrapped)

    async def go() -> list[str]:
        return await asyncio.gather(*(wrapped.chat_async(f"q{i}") for i in range(5)))

    assert asyncio.run(go()) == [f"Echo: q{i}" for i in range(5)]


def test_disabled_runs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_ASYNC_ENABLED", "false")
    aio.shutdown()

    async def go() -> str:
        return await aio.to_async(lambda: threading.current_thread().name)()

    assert asyncio.run(go()) == threading.current_thread().name
