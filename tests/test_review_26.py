"""Review 26 of llmshim.aio: a call given up on never starts, shutdown is not a cancellation, no
deadlock when pooled code calls run_sync, a forked child and interpreter exit behave, wrap()
supports ``with``, batch and gather_with_limit take what the hand-rolled helpers took."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmshim.aio as aio
from conftest import run_python
from llmshim.testing import FakeLLMServer


@pytest.fixture(autouse=True)
def _fresh_pool() -> Iterator[None]:
    aio.shutdown()
    yield
    aio.shutdown(wait=True)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_a_cancelled_call_no_thread_started_never_runs(timeout: float | None) -> None:
    pool = aio.AsyncPool(workers=1, queue_size=2, timeout=timeout)
    gate, ran = threading.Event(), []

    def first() -> None:
        gate.wait(30)
        ran.append("first")

    async def go() -> None:
        running = asyncio.create_task(pool.run(first))
        await _until(lambda: pool.active == 1)
        queued = asyncio.create_task(pool.run(ran.append, "queued"))
        await _until(lambda: pool.peak_taken == 2)  # submitted: waiting in the executor for the thread
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set()
        await running
        await pool.run(ran.append, "next")  # one thread, first in first out: "queued" would be before

    asyncio.run(go())
    pool.shutdown(wait=True)
    assert ran == ["first", "next"] and pool.queue_depth == 0 and pool._taken == 0


def test_a_timed_out_call_no_thread_started_never_runs() -> None:
    pool = aio.AsyncPool(workers=1, queue_size=1, timeout=0.05)
    gate, ran = threading.Event(), []

    def first() -> None:
        gate.wait(30)
        ran.append("first")

    async def go() -> None:
        running = asyncio.create_task(pool.run(first))
        await _until(lambda: pool.active == 1)
        with pytest.raises(TimeoutError, match="LLMSHIM_ASYNC_TIMEOUT"):
            await pool.run(ran.append, "queued")
        with pytest.raises(TimeoutError):
            await running  # the gate is still shut: the running one timed out too
        assert pool.active == 1  # and still holds its thread
        gate.set()
        await pool.run(ran.append, "next")  # one thread, first in first out: "queued" would be before

    asyncio.run(go())
    pool.shutdown(wait=True)
    assert ran == ["first", "next"] and pool._taken == 0 and pool.active == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="only Task.cancelling() (Python 3.11) tells a shutdown "
                    "from the caller's own cancellation; on 3.10 a queued caller gets CancelledError")
def test_shutdown_gives_a_queued_caller_an_error_not_a_cancellation() -> None:
    pool = aio.AsyncPool(workers=1, queue_size=1, timeout=None)
    gate = threading.Event()

    async def go() -> None:
        running = asyncio.create_task(pool.run(gate.wait, 30))
        await _until(lambda: pool.active == 1)
        queued = asyncio.create_task(pool.run(len, "never"))
        await _until(lambda: pool.peak_taken == 2)
        pool.shutdown()
        gate.set()
        with pytest.raises(RuntimeError, match="shut down"):
            await queued
        assert not queued.cancelled() and await running is True

    asyncio.run(go())
    assert pool._taken == 0


def test_run_sync_inside_every_pool_thread_does_not_deadlock() -> None:
    out = run_python(textwrap.dedent("""
        import asyncio, threading
        import llmshim.aio as aio
        pool = aio.AsyncPool(workers=2, queue_size=2, timeout=None)
        everyone_busy = threading.Barrier(2)

        def outer(i):
            everyone_busy.wait(30)  # both threads run an outer call: none is free for the inner one
            return aio.run_sync(pool.run(lambda: i * 10))

        async def go():
            return await asyncio.gather(*(pool.run(outer, i) for i in range(2)))

        print(asyncio.run(go()))
    """), timeout=60)
    assert out.strip() == "[0, 10]"


def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    out = run_python(textwrap.dedent("""
        import asyncio, os, signal
        import llmshim.aio as aio
        print(asyncio.run(aio.to_async(sum)([1, 2])), flush=True)  # the parent's threads exist now
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a child waiting for a parent's thread would hang: SIGALRM ends it
            print("child", asyncio.run(aio.to_async(sum)([3, 4])), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("status", status)
    """), timeout=60)
    assert out.split() == ["3", "child", "7", "status", "0"]


def test_interpreter_exit_cancels_calls_no_thread_started() -> None:
    out = run_python(textwrap.dedent("""
        import concurrent.futures.thread, threading
        gate = threading.Event()
        threading._register_atexit(gate.set)  # runs after llmshim's exit hook, before threads are joined
        import asyncio
        import llmshim.aio as aio

        def call(i):
            if i == 0:
                gate.wait(30)
            print("ran", i, flush=True)

        loop = asyncio.new_event_loop()
        for i in range(4):
            loop.create_task(aio.to_async(call)(i))
        loop.run_until_complete(asyncio.sleep(0))
        while aio.pool().active == 0:
            loop.run_until_complete(asyncio.sleep(0))
        print("main done", flush=True)
    """), env={"LLMSHIM_ASYNC_WORKERS": "1", "LLMSHIM_ASYNC_QUEUE_SIZE": "3"}, timeout=60)
    assert [line for line in out.splitlines() if line.startswith(("ran", "main"))] == ["main done", "ran 0"]


def test_wrap_supports_with_and_leaves_the_client_alone(server: FakeLLMServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test")
    create = client.chat.completions.create

    async def ask(aclient: Any) -> str:
        reply = await aio.to_async(aclient.chat.completions.create)(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        return str(reply.choices[0].message.content)

    with aio.wrap(client) as aclient:
        assert repr(aclient).startswith("llmshim.aio.wrap(") and asyncio.run(ask(aclient)) == "Echo: hi"
        assert not client.is_closed()
    assert client.is_closed() and client.chat.completions.create.__func__ is create.__func__
    assert not hasattr(client, "close_async")


def test_batch_awaits_what_a_sync_callable_hands_back_and_gather_with_limit_takes_a_list() -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert asyncio.run(aio.batch(lambda x: double(x), [1, 2, 3], progress=False)) == [2, 4, 6]

    async def listed() -> list[int]:
        return await aio.gather_with_limit([double(1), double(2)], limit=1)  # the hand-rolled form

    assert asyncio.run(listed()) == [2, 4]


def test_a_stream_made_in_a_pool_thread_is_read_in_another(server: FakeLLMServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test")

    async def go() -> str:
        stream = await aio.to_async(client.chat.completions.create)(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}], stream=True)
        chunks = await aio.to_async(list)(stream)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    assert asyncio.run(go()) == "Echo: hi there"


def test_loops_closed_with_waiters_and_loops_in_several_threads_leave_no_slot_taken() -> None:
    pool = aio.AsyncPool(workers=1, queue_size=0, timeout=None)
    gate = threading.Event()
    closed = asyncio.new_event_loop()
    holder = closed.create_task(pool.run(gate.wait, 30))
    waiter = closed.create_task(pool.run(len, "x"))
    closed.run_until_complete(_until(lambda: pool.queue_depth == 1))
    closed.close()  # the waiter's loop is gone: the slot must skip it, not hang on it
    gate.set()
    assert asyncio.run(pool.run(len, "ab")) == 2 and not waiter.done() and not holder.done()

    sums: list[int] = []

    def in_a_thread() -> None:
        async def go() -> list[int]:
            return await asyncio.gather(*(pool.run(lambda j=j: j) for j in range(30)))
        sums.append(sum(asyncio.run(go())))

    threads = [threading.Thread(target=in_a_thread) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.shutdown(wait=True)
    assert sums == [435, 435, 435] and pool._taken == 0 and pool.queue_depth == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(), max_size=40), st.integers(1, 6), st.sets(st.integers(0, 39)))
def test_batch_matches_gather_for_any_input(items: list[int], limit: int, failing: set[int]) -> None:
    def fn(x: int) -> int:
        if x % 40 in failing:
            raise ValueError(x)
        return x * 3

    async def both() -> tuple[list[Any], list[Any]]:
        ours = await aio.batch(fn, items, max_concurrency=limit, return_exceptions=True, progress=False)
        theirs = await asyncio.gather(*(aio.to_async(fn)(x) for x in items), return_exceptions=True)
        return ours, theirs

    ours, theirs = asyncio.run(both())
    assert [repr(r) for r in ours] == [repr(r) for r in theirs]
