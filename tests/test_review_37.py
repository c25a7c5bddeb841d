"""Review 37: trying to break ``llmshim.aio`` (``aio.py``, ``aio_pool.py``) as real users would.

Bugs found (each test fails without its fix):

1. A pooled function raising its own ``TimeoutError`` (``socket.timeout`` is one) reached the caller
   as ``TypeError: unsupported format string passed to NoneType.__format__`` with no pool timeout
   set, and as the pool's "did not finish within Xs (LLMSHIM_ASYNC_TIMEOUT)" (traceback dropped) with
   one: ``except asyncio.TimeoutError`` around the wait also caught the function's own error.
   test_a_timeout_error_raised_by_the_function_without_a_pool_timeout,
   test_a_timeout_error_raised_by_the_function_is_not_reported_as_the_pools.
   ``run_with_timeout`` had the same confusion: test_run_with_timeout_keeps_the_awaitables_own_timeout_error.
2. ``LLMSHIM_ASYNC_TIMEOUT`` did not cover waiting for a slot: with every thread stuck on a hung
   upstream (each keeps its slot), a caller beyond the bound waited for ever.
   test_the_pool_timeout_covers_waiting_for_a_slot.
3. ``batch`` without ``return_exceptions``: after one item failed and batch raised, the items still
   waiting for the semaphore started anyway (LLM calls made for a failed batch) while the loop ran on.
   test_batch_failure_does_not_start_the_remaining_items.
4. ``batch(max_concurrency=0)`` / ``gather_with_limit(limit=0)`` hung for ever (Semaphore(0)).
   test_a_concurrency_of_zero_is_refused_not_a_hang.
5. ``shutdown()`` left callers waiting for a slot waiting until a running call ended (for ever if it
   hangs; with ``LLMSHIM_ASYNC_QUEUE_SIZE=0`` every waiter): README promises them RuntimeError.
   test_shutdown_with_no_queue_gives_waiters_runtime_error_at_once.
6. ``LLMSHIM_ASYNC_ENABLED=false`` (and the nested inline path) ran the function in the caller's own
   context: a contextvar it set leaked back to the caller, unlike on a thread.
   test_disabled_pool_does_not_leak_context_changes_back.
7. ``run_sync`` inside a running loop (a notebook) deadlocked once the pool was full: a freed slot
   was handed to a task of the loop run_sync blocks, which cannot use it, while run_sync's own
   coroutine waited for a slot behind it.
   test_run_sync_in_a_loop_whose_task_waits_for_a_slot_does_not_deadlock, and for a pool of the
   program's own (its passed-over waiter is served when run_sync returns):
   test_a_programs_own_pool_serves_the_passed_over_waiter_after_run_sync.
8. Ctrl-C while ``run_sync`` blocked a running loop (Jupyter) was raised only when the whole
   coroutine had ended (leaving the ``with ThreadPoolExecutor`` joined its thread), for ever if it
   hangs; the coroutine was not cancelled.
   test_ctrl_c_in_a_loop_blocked_in_run_sync_interrupts_and_cancels_the_coroutine.
9. ``wrap(client).timeout = 5`` set the attribute on the proxy only: the client's methods (the
   ``_async`` ones included) went on reading the old value, while reading it back through the proxy
   showed the new one. test_setting_an_attribute_through_wrap_reaches_the_client.

By design (README), checked: nested ``run_sync`` runs inline with no pool timeout of its own; the
awaiting task still gets TimeoutError at the outer call's timeout
(test_nested_run_sync_is_bounded_by_the_outer_calls_timeout). ``gather_with_limit`` keeps
``asyncio.gather``'s rule (documented as such): after a failure the other awaitables run on.
``wrap`` adds ``_async`` to the object's own methods only: an SDK's resource is wrapped itself
(test_wrap_of_a_real_openai_client_with_install_and_priority).

The other tests held as written: cancellation (wait_for, TaskGroup, Ctrl-C under asyncio.run), the
bound under 1000 calls, BaseExceptions in the worker, context both ways, several loops and threads,
fork (from the main thread and from a pooled call), a call after shutdown().
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import llmshim
import llmshim.aio as aio
from llmshim.knobs import current_priority
from llmshim.testing import FakeLLMServer

pytestmark = pytest.mark.timeout(10)

_var: contextvars.ContextVar[str] = contextvars.ContextVar("review37", default="unset")


@pytest.fixture(autouse=True)
def _fresh_pool() -> Iterator[None]:
    aio.shutdown()
    yield
    aio.shutdown(wait=True)


def _pool(workers: int = 1, queue_size: int = 0, timeout: float | None = None) -> aio.AsyncPool:
    return aio.AsyncPool(workers=workers, queue_size=queue_size, timeout=timeout)


def _llmshim_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("llmshim-aio"))


# -- timeouts ------------------------------------------------------------------------------------------


def test_a_timeout_error_raised_by_the_function_without_a_pool_timeout() -> None:
    """socket.timeout is TimeoutError: a pooled function raising it must hand it back as is."""
    pool = _pool(timeout=None)

    def connect() -> None:
        raise TimeoutError("connect timed out")

    with pytest.raises(TimeoutError, match="connect timed out"):
        asyncio.run(pool.run(connect))
    pool.shutdown(wait=True)


def test_a_timeout_error_raised_by_the_function_is_not_reported_as_the_pools() -> None:
    pool = _pool(timeout=5)

    def connect() -> None:
        raise TimeoutError("connect timed out")

    with pytest.raises(TimeoutError, match="connect timed out") as caught:
        asyncio.run(pool.run(connect))
    assert "connect" in "".join(__import__("traceback").format_tb(caught.value.__traceback__))
    pool.shutdown(wait=True)


def test_run_with_timeout_keeps_the_awaitables_own_timeout_error() -> None:
    async def inner() -> None:
        raise TimeoutError("upstream read timed out")

    with pytest.raises(TimeoutError, match="upstream read timed out"):
        asyncio.run(aio.run_with_timeout(inner(), 5))


def test_the_pool_timeout_covers_waiting_for_a_slot() -> None:
    """Every thread stuck on a hung upstream: a new caller must still get TimeoutError in time."""
    pool = _pool(workers=1, queue_size=0, timeout=0.2)
    release = threading.Event()

    async def go() -> None:
        with pytest.raises(TimeoutError):
            await pool.run(release.wait, 10)  # times out, keeps running and holds the only slot
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.run(lambda: "late"), 3)
        assert loop.time() - start < 1.5
        assert pool.queue_depth == 0
        release.set()
        assert await pool.run(lambda: "next") == "next"

    asyncio.run(go())
    pool.shutdown(wait=True)


def test_nested_run_sync_is_bounded_by_the_outer_calls_timeout() -> None:
    """By design (README) the inner call runs inline without a pool timeout; the awaiting task still
    gets TimeoutError at the outer call's timeout."""
    p = aio.pool()
    p.timeout = 0.2
    release = threading.Event()

    def outer() -> bool:
        return aio.run_sync(aio.to_async(release.wait)(10))

    async def go() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError, match="LLMSHIM_ASYNC_TIMEOUT"):
            await aio.to_async(outer)()
        assert loop.time() - start < 1.5

    asyncio.run(go())
    release.set()


# -- cancellation --------------------------------------------------------------------------------------


def test_wait_for_cancelling_a_running_call_keeps_its_slot_then_frees_it() -> None:
    pool = _pool(workers=1, queue_size=0)
    started, release = threading.Event(), threading.Event()

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "done"

    async def go() -> str:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.run(blocking), 0.1)
        assert started.is_set() and pool.active == 1
        waiter = asyncio.create_task(pool.run(lambda: "after"))
        while pool.queue_depth == 0:
            await asyncio.sleep(0)
        assert not waiter.done()
        release.set()
        return await waiter

    assert asyncio.run(go()) == "after"
    pool.shutdown(wait=True)
    assert pool.active == 0


def test_taskgroup_cancel_never_starts_queued_calls() -> None:
    pool = _pool(workers=1, queue_size=5)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def blocking() -> None:
        started.set()
        release.wait(10)

    class Boom(Exception):
        pass

    async def go() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(pool.run(blocking))
            for i in range(20):
                tg.create_task(pool.run(ran.append, i))
            await asyncio.to_thread(started.wait, 10)
            raise Boom

    with pytest.raises(Exception) as caught:
        asyncio.run(go())
    assert type(caught.value).__name__ == "ExceptionGroup"
    release.set()
    pool.shutdown(wait=True)
    assert ran == [] and pool.active == 0
    assert pool._taken == 0 and pool.queue_depth == 0


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_in_asyncio_run_never_starts_the_queued_calls() -> None:
    pool = _pool(workers=1, queue_size=3)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def blocking() -> None:
        started.set()
        release.wait(10)

    async def go() -> None:
        tasks = [asyncio.create_task(pool.run(blocking))]
        tasks += [asyncio.create_task(pool.run(ran.append, i)) for i in range(10)]
        await asyncio.to_thread(started.wait, 5)
        while pool.queue_depth < 10:
            await asyncio.sleep(0)
        signal.raise_signal(signal.SIGINT)  # asyncio.run's handler cancels this task
        await asyncio.gather(*tasks)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(go())
    release.set()
    pool.shutdown(wait=True)
    assert ran == [] and pool._taken == 0 and pool.queue_depth == 0 and pool.active == 0


# -- bound ---------------------------------------------------------------------------------------------


def test_a_thousand_submissions_stay_within_the_bound_in_threads_and_slots() -> None:
    pool = _pool(workers=3, queue_size=7)
    threads: set[int] = set()
    gate = threading.Barrier(3)

    def work(i: int) -> int:
        if i < 3:
            gate.wait(5)  # the first three really run at once
        threads.add(threading.get_ident())
        return i

    async def go() -> list[int]:
        return await asyncio.gather(*(pool.run(work, i) for i in range(1000)))

    assert asyncio.run(go()) == list(range(1000))
    assert pool.peak_taken <= 10 and len(threads) == 3
    assert pool._taken == 0 and pool.queue_depth == 0 and pool.active == 0
    pool.shutdown(wait=True)


# -- exceptions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_base_exceptions_in_the_worker_reach_the_caller_and_free_the_slot(exc: BaseException) -> None:
    pool = _pool()

    def die() -> None:
        raise exc

    with pytest.raises(type(exc)):
        asyncio.run(pool.run(die))
    assert asyncio.run(pool.run(lambda: "alive")) == "alive"
    assert pool._taken == 0 and pool.active == 0
    pool.shutdown(wait=True)


def test_a_base_exception_subclass_keeps_its_type() -> None:
    class Stop(BaseException):
        pass

    def die() -> None:
        raise Stop("x")

    with pytest.raises(Stop):
        asyncio.run(aio.to_async(die)())
    assert aio.pool()._taken == 0


# -- contextvars ---------------------------------------------------------------------------------------


def test_context_goes_in_but_not_back_out_and_calls_do_not_share_it() -> None:
    barrier = threading.Barrier(2)

    def set_and_read(value: str) -> tuple[str, str]:
        seen = _var.get()
        _var.set(value)
        barrier.wait(5)  # both calls run at once: neither sees the other's value
        return seen, _var.get()

    async def go() -> Any:
        _var.set("caller")
        results = await asyncio.gather(aio.to_async(set_and_read)("a"), aio.to_async(set_and_read)("b"))
        return results, _var.get()

    results, after = asyncio.run(go())
    assert results == [("caller", "a"), ("caller", "b")] and after == "caller"


def test_disabled_pool_does_not_leak_context_changes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_ASYNC_ENABLED", "false")

    def set_it() -> None:
        _var.set("inside")

    async def go() -> str:
        _var.set("caller")
        await aio.to_async(set_it)()
        return _var.get()

    assert asyncio.run(go()) == "caller"


# -- run_sync ------------------------------------------------------------------------------------------


def test_run_sync_inside_a_running_loop_keeps_context_and_exceptions() -> None:
    async def inner() -> str:
        if _var.get() == "boom":
            raise LookupError("inner")
        return _var.get()

    async def cell() -> str:  # a notebook cell: a loop is running
        _var.set("nb")
        got = aio.run_sync(inner())
        _var.set("boom")
        with pytest.raises(LookupError, match="inner"):
            aio.run_sync(inner())
        return got

    assert asyncio.run(cell()) == "nb"


def _blocked_in_result(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in a concurrent future's ``result()`` now: the Python frame says it
    is there, and the kernel that it sleeps (a signal landing just before the lock's system call is
    noted but interrupts nothing: the test would wait for the whole coroutine)."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code.co_name != "wait" or frame.f_back is None:
        return False
    if frame.f_back.f_code.co_name != "result":
        return False
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "S"
    except OSError:  # no /proc: the frame is all we can tell
        return True


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_in_a_loop_blocked_in_run_sync_interrupts_and_cancels_the_coroutine() -> None:
    """Jupyter's Ctrl-C is a KeyboardInterrupt in the blocked main thread: it must come at once and
    cancel the coroutine (it waited for the whole coroutine, joining run_sync's thread)."""
    started, cancelled = threading.Event(), threading.Event()

    async def long_running() -> None:
        started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    main = threading.main_thread()

    def press_ctrl_c() -> None:
        started.wait(5)
        seen = 0
        while seen < 3:  # asleep in run_sync's result() three looks running (not waiting for the GIL)
            seen = seen + 1 if _blocked_in_result(main) else 0
            threading.Event().wait(0.002)
        assert main.ident is not None
        signal.pthread_kill(main.ident, signal.SIGINT)

    async def cell() -> None:
        aio.run_sync(long_running())

    loop = asyncio.new_event_loop()  # a loop without asyncio.run's own SIGINT handler, as Jupyter's
    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        presser.join(5)
        loop.close()
    assert time.monotonic() - start < 2
    assert cancelled.wait(2)


def test_nested_run_sync_in_every_thread_does_not_deadlock() -> None:
    def outer(i: int) -> int:
        return aio.run_sync(aio.to_async(lambda: i * 10)())

    async def go() -> list[int]:
        n = aio.pool().workers * 2
        return await asyncio.gather(*(aio.to_async(outer)(i) for i in range(n)))

    got = asyncio.run(go())
    assert got == [i * 10 for i in range(len(got))]


def test_run_sync_in_a_loop_whose_task_waits_for_a_slot_does_not_deadlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook loop has a task queued for the full pool, then a cell blocks in run_sync on a
    coroutine that needs the pool too: the freed slot must go to the coroutine that can run."""
    monkeypatch.setenv("LLMSHIM_ASYNC_WORKERS", "1")
    monkeypatch.setenv("LLMSHIM_ASYNC_QUEUE_SIZE", "0")
    p = aio.pool()
    assert p.capacity == 1
    started, release = threading.Event(), threading.Event()

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "a"

    async def inner() -> str:
        release.set()  # the running call ends; its slot must not go to the blocked loop's task
        return await asyncio.wait_for(aio.to_async(lambda: "inner")(), 3)

    async def cell() -> list[str]:
        first = asyncio.create_task(aio.to_async(blocking)())
        await asyncio.to_thread(started.wait, 5)
        queued = asyncio.create_task(aio.to_async(lambda: "b")())
        while p.queue_depth == 0:
            await asyncio.sleep(0)
        got = aio.run_sync(inner())
        return [got, await first, await queued]

    assert asyncio.run(cell()) == ["inner", "a", "b"]
    assert p._taken == 0 and p.queue_depth == 0


def test_a_programs_own_pool_serves_the_passed_over_waiter_after_run_sync() -> None:
    """A waiter of a loop blocked in run_sync is passed over; once run_sync returns, a pool of the
    program's own (not the shared one) must hand it the slot that was freed meanwhile."""
    own = _pool(workers=1, queue_size=0)
    started, release = threading.Event(), threading.Event()

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "a"

    async def inner() -> None:
        release.set()
        while own.active or own._taken:  # the running call ended and its slot was freed, not handed
            await asyncio.sleep(0)

    async def cell() -> list[str]:
        first = asyncio.create_task(own.run(blocking))
        await asyncio.to_thread(started.wait, 5)
        queued = asyncio.create_task(own.run(lambda: "b"))
        while own.queue_depth == 0:
            await asyncio.sleep(0)
        aio.run_sync(asyncio.wait_for(inner(), 5))
        return [await first, await asyncio.wait_for(queued, 3)]

    assert asyncio.run(cell()) == ["a", "b"]
    own.shutdown(wait=True)


# -- batch and gather_with_limit -----------------------------------------------------------------------


def test_batch_empty_generator_and_order() -> None:
    assert asyncio.run(aio.batch(str, [], progress=False)) == []
    assert asyncio.run(aio.batch(str, iter(()), progress=False)) == []
    gate = threading.Barrier(4)

    def slow_first(i: int) -> int:
        if i < 4:
            gate.wait(5)
        return i

    assert asyncio.run(aio.batch(slow_first, (i for i in range(50)), max_concurrency=4,
                                 progress=False)) == list(range(50))


def test_batch_failure_does_not_start_the_remaining_items() -> None:
    """One item fails: batch raises, and the items not started yet are never called (each is a billed
    LLM call) even though the event loop keeps running."""
    called: list[int] = []
    first_failed = threading.Event()

    def call(i: int) -> int:
        called.append(i)
        if i == 0:
            first_failed.set()
            raise ValueError("item 0")
        return i

    async def go() -> None:
        with pytest.raises(ValueError, match="item 0"):
            await aio.batch(call, range(100), max_concurrency=1, progress=False)
        for _ in range(200):  # the loop keeps running, as a web server's does
            await asyncio.sleep(0)

    asyncio.run(go())
    assert called == [0]


def test_batch_cancelled_from_outside_stops() -> None:
    called: list[int] = []
    started, release = threading.Event(), threading.Event()

    def call(i: int) -> int:
        called.append(i)
        started.set()
        release.wait(5)
        return i

    async def go() -> None:
        task = asyncio.create_task(aio.batch(call, range(50), max_concurrency=2, progress=False))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(go())
    assert len(called) <= 2


@pytest.mark.parametrize("limit", [0, -1])
def test_a_concurrency_of_zero_is_refused_not_a_hang(limit: int) -> None:
    with pytest.raises(ValueError):
        asyncio.run(aio.batch(str, [1, 2], max_concurrency=limit, progress=False))

    async def one() -> int:
        return 1

    with pytest.raises(ValueError):  # and no "never awaited" warning for the refused coroutine
        asyncio.run(aio.gather_with_limit(one(), limit=limit))


# -- shutdown ------------------------------------------------------------------------------------------


def test_shutdown_while_calls_run_queue_and_wait() -> None:
    p = aio.pool()
    p2 = aio.AsyncPool(1, 1, None)
    started, release = threading.Event(), threading.Event()

    def blocking() -> str:
        started.set()
        release.wait(10)
        return "ran"

    async def go() -> list[Any]:
        running = asyncio.create_task(p2.run(blocking))
        await asyncio.to_thread(started.wait, 5)
        queued = asyncio.create_task(p2.run(lambda: "queued"))
        waiting = asyncio.create_task(p2.run(lambda: "waiting"))
        while p2.queue_depth < 2:
            await asyncio.sleep(0)
        p2.shutdown()
        results = await asyncio.gather(queued, waiting, return_exceptions=True)
        release.set()
        return [*results, await running]

    queued, waiting, running = asyncio.run(go())
    assert isinstance(queued, RuntimeError) and isinstance(waiting, RuntimeError) and running == "ran"
    assert p2._taken == 0
    p2.shutdown(wait=True)
    del p


def test_shutdown_with_no_queue_gives_waiters_runtime_error_at_once() -> None:
    p = _pool(workers=1, queue_size=0)
    started, release = threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(10)

    async def go() -> Any:
        running = asyncio.create_task(p.run(blocking))
        await asyncio.to_thread(started.wait, 5)
        waiting = asyncio.create_task(p.run(lambda: "waiting"))
        while p.queue_depth < 1:
            await asyncio.sleep(0)
        p.shutdown()
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), 2)
        except BaseException as exc:
            return exc
        finally:
            release.set()
            await running

    got = asyncio.run(go())
    assert isinstance(got, RuntimeError)
    assert p._taken == 0
    p.shutdown(wait=True)


def test_a_call_after_shutdown_gets_a_new_pool() -> None:
    first = aio.pool()
    assert asyncio.run(aio.to_async(lambda: 1)()) == 1
    aio.shutdown(wait=True)
    assert asyncio.run(aio.to_async(lambda: 2)()) == 2
    assert aio.pool() is not first
    with pytest.raises(RuntimeError, match="shut down"):  # a pool kept from before refuses, clearly
        asyncio.run(first.run(lambda: 3))
    assert first._taken == 0


# -- several loops and threads -------------------------------------------------------------------------


def test_several_threads_each_with_its_own_loop_share_the_bound() -> None:
    pool = _pool(workers=2, queue_size=2)
    errors: list[BaseException] = []
    results: list[list[int]] = []

    async def many(k: int) -> list[int]:
        return await asyncio.gather(*(pool.run(lambda i=i: k * 1000 + i) for i in range(200)))

    def in_thread(k: int) -> None:
        try:
            results.append(asyncio.run(asyncio.wait_for(many(k), 8)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(9)
    assert not errors and len(results) == 6
    assert sorted(r[0] // 1000 for r in results) == list(range(6))
    assert pool.peak_taken <= 4 and pool._taken == 0
    pool.shutdown(wait=True)


# -- fork ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_the_pool_works_in_a_forked_child() -> None:
    started, release = threading.Event(), threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(10)

    async def parent() -> None:
        running = asyncio.create_task(aio.to_async(blocking)())
        await asyncio.to_thread(started.wait, 5)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ok = asyncio.run(asyncio.wait_for(aio.to_async(lambda: os.getpid())(), 5))
                code = 0 if ok == os.getpid() else 2
            finally:
                os._exit(code)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        release.set()
        await running
        assert os.waitstatus_to_exitcode(status) == 0

    asyncio.run(parent())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_child_forked_from_a_pooled_function_has_a_working_pool() -> None:
    """multiprocessing's fork from inside a pooled call: the child's only thread was a pool thread."""
    def fork_and_use() -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                got = asyncio.run(asyncio.wait_for(aio.to_async(threading.current_thread)(), 5))
                code = 0 if got is not threading.current_thread() else 2  # on a thread, not inline
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert asyncio.run(aio.to_async(fork_and_use)()) == 0


# -- the real SDK and install() ------------------------------------------------------------------------


def test_setting_an_attribute_through_wrap_reaches_the_client() -> None:
    class Client:
        def __init__(self) -> None:
            self.timeout = 60.0

        def chat(self) -> float:
            return self.timeout

    client = Client()
    aclient = aio.wrap(client)
    aclient.timeout = 5.0  # as one does with an SDK client: it must not stay on the proxy alone
    assert client.timeout == 5.0 and asyncio.run(aclient.chat_async()) == 5.0
    del aclient.timeout
    assert not hasattr(client, "timeout")


def test_wrap_of_a_real_openai_client_with_install_and_priority(
        installed: Callable[..., object], records: list[llmshim.CallRecord]) -> None:
    import openai

    installed()
    seen: list[str | None] = []
    with FakeLLMServer() as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        completions = aio.wrap(client.chat.completions)

        def ask(prompt: str) -> str:
            seen.append(current_priority())
            answer = client.chat.completions.create(model="gpt-4o-mini",
                                                    messages=[{"role": "user", "content": prompt}])
            return answer.choices[0].message.content or ""

        async def go() -> list[str]:
            with llmshim.priority("high"):
                direct = await completions.create_async(model="gpt-4o-mini",
                                                        messages=[{"role": "user", "content": "x"}])
                more = await aio.batch(ask, ["a", "b", "c"], progress=False)
            return [direct.choices[0].message.content or "", *more]

        answers = asyncio.run(go())
        client.close()
    assert len(answers) == 4 and all(answers)
    assert seen == ["high"] * 3
    assert len(records) >= 4
