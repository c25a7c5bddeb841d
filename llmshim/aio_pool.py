"""``llmshim.aio``'s thread pool: slots counted across event loops and threads, the caller's
context copied into the thread, a call nobody awaits any more never started (``llmshim.aio``
holds the one shared pool and the wrappers built on it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .clocks import monotonic
from .wake import Wakeup

__all__ = ["AsyncPool"]

T = TypeVar("T")


class AsyncPool:
    """The thread pool and its slots. Slots are counted across event loops and threads."""

    def __init__(self, workers: int, queue_size: int, timeout: float | None, enabled: bool = True) -> None:
        self.workers, self.queue_size, self.timeout, self.enabled = workers, queue_size, timeout, enabled
        self.capacity = workers + queue_size
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                               thread_name_prefix="llmshim-aio")
        self._lock = threading.Lock()
        self._taken = 0
        self._waiting: list[Wakeup] = []  # callers waiting for a slot, first come first served
        self.active = 0  # calls running in a thread now (including ones whose caller timed out)
        self.peak_taken = 0
        self.closed = False
        self._instruments = _Instruments()
        _pools.add(self)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting) + max(0, self._taken - self.workers)

    async def _acquire(self, timeout: float | None, name: str) -> float:
        """Take a slot, waiting at most ``timeout`` seconds for one: the pool timeout is the call's,
        from its start. When every thread is stuck on a hung upstream (each keeping its slot), a
        caller beyond the bound would otherwise wait for ever, timeout or not."""
        start = monotonic()
        with self._lock:
            if self.closed:
                raise _shut_down(name)
            if self._taken < self.capacity and not any(self._servable(w) for w in self._waiting):
                self._taken += 1
                self.peak_taken = max(self.peak_taken, self._taken)
                return 0.0
            wakeup = Wakeup.for_task()
            self._waiting.append(wakeup)
        self._instruments.depth(1)
        try:
            woken = await wakeup.wait_async(timeout)
        except asyncio.CancelledError:
            with self._lock:
                if wakeup in self._waiting:
                    self._waiting.remove(wakeup)
                    raise
            self._release()  # the slot was handed over just as we were cancelled: pass it on
            raise
        finally:
            self._instruments.depth(-1)
        if not woken:
            with self._lock:
                if wakeup in self._waiting:
                    self._waiting.remove(wakeup)
                    raise WaitTimeout(f"{name} waited {timeout:g}s for a thread of llmshim.aio's pool "
                                      "(LLMSHIM_ASYNC_TIMEOUT) and never started")
            # handed a slot just as the time ran out: keep it, the remaining time (none) decides
        if self.closed:  # shutdown() woke us: there is no thread to run on
            self._release()
            raise _shut_down(name)
        return monotonic() - start

    def _release(self) -> None:
        """Hand the slot to the first waiter whose loop is still open (_taken unchanged), or free it.

        A waiter leaves ``_waiting`` only here (woken) or itself (cancelled, under the lock), so a
        slot is handed to exactly one waiter, and a waiter that was handed one passes it on.

        A waiter whose loop is blocked in ``run_sync`` is passed over (it stays first in line): a
        slot handed to it would sit there unused while the coroutine run_sync waits for, on its own
        loop, waits for a slot too: a deadlock once the pool is full."""
        with self._lock:
            if not self._hand_over():
                self._taken -= 1

    def _servable(self, wakeup: Wakeup) -> bool:
        return wakeup.loop not in blocked_loops

    def _hand_over(self) -> bool:
        """Under the lock: wake the first servable waiter whose loop is open; False if there is none."""
        i = 0
        while i < len(self._waiting):  # the first waiter, as a rule: no copy of a long queue
            wakeup = self._waiting[i]
            if not self._servable(wakeup):
                i += 1
                continue
            del self._waiting[i]
            if wakeup.wake():
                return True
        return False

    def serve_waiters(self) -> None:
        """Hand the free slots to the waiters passed over while their loop was blocked (``run_sync``
        calls this when it returns)."""
        with self._lock:
            while self._taken < self.capacity and self._hand_over():
                self._taken += 1
                self.peak_taken = max(self.peak_taken, self._taken)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in a pool thread once a slot is free. A call made from one of this pool's own
        threads (``run_sync`` inside a pooled function) runs inline instead: waiting there for a
        thread of the same pool deadlocks once every thread does it. Inline or not, ``fn`` runs in
        a copy of the caller's context: what it sets stays its own (as on a thread)."""
        if not self.enabled or getattr(_worker, "pool", None) is self:
            return contextvars.copy_context().run(fn, *args, **kwargs)
        name = str(getattr(fn, "__qualname__", fn))
        start = monotonic()
        waited = await self._acquire(self.timeout, name)
        self._instruments.wait(waited)
        context = contextvars.copy_context()
        try:
            job = self._executor.submit(self._call, context, fn, args, kwargs)
        except BaseException:
            self._release()
            raise
        job.add_done_callback(lambda _: self._release())  # the slot is freed when the thread is done
        # Giving up (cancelled, timed out) cancels ``waiting``, which cancels ``job`` if no thread has
        # started it: a call nobody awaits any more never starts. A started one runs to its end.
        waiting = asyncio.wrap_future(job)
        try:
            if self.timeout is None:
                return await waiting
            return await asyncio.wait_for(waiting, max(0.0, self.timeout - (monotonic() - start)))
        except asyncio.TimeoutError:
            # ``fn``'s own TimeoutError (socket.timeout is one) is its answer, traceback and all; only
            # the pool's deadline (``waiting`` cancelled by wait_for) is reported as the pool's.
            if self.timeout is None or (waiting.done() and not waiting.cancelled()):
                raise
            raise WaitTimeout(
                f"{name} did not finish within {self.timeout:g}s "
                "(LLMSHIM_ASYNC_TIMEOUT); if it had started it keeps running in its thread and holds its "
                "slot until it ends"
            ) from None
        except asyncio.CancelledError:
            if self.closed and job.cancelled() and not _cancel_requested():
                raise _shut_down(name) from None
            raise

    def _call(self, context: contextvars.Context, fn: Callable[..., T], args: Any, kwargs: Any) -> T:
        with self._lock:
            self.active += 1
        self._instruments.active(1)
        _worker.pool = self
        try:
            return context.run(fn, *args, **kwargs)
        finally:
            _worker.pool = None
            with self._lock:
                self.active -= 1
            self._instruments.active(-1)

    def shutdown(self, wait: bool = False) -> None:
        """Cancel the calls no thread has started (their callers get RuntimeError), then stop.

        Callers still waiting for a slot are woken now, each as if handed one (counted, and given
        back by ``_acquire``), and get RuntimeError: otherwise, with no queue, they would wait for
        the running calls to end, for ever if those hang."""
        with self._lock:
            self.closed = True
            waiting, self._waiting = self._waiting, []
            self._taken += sum(1 for wakeup in waiting if wakeup.wake())
        self._executor.shutdown(wait=wait, cancel_futures=True)


# Event loops blocked in ``llmshim.aio.run_sync`` now: their waiters are passed over until it returns.
blocked_loops: set[asyncio.AbstractEventLoop] = set()
_pools: weakref.WeakSet[AsyncPool] = weakref.WeakSet()


@contextlib.contextmanager
def loop_blocked(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While ``loop`` is blocked (``run_sync``), pools pass its waiters over; then every pool, the
    shared one or a program's own, hands its free slots to them."""
    blocked_loops.add(loop)
    try:
        yield
    finally:
        blocked_loops.discard(loop)
        for pool in list(_pools):
            pool.serve_waiters()

_worker = threading.local()  # .pool: the AsyncPool whose thread this is, while it runs a call


WaitTimeout: type[TimeoutError]
if sys.version_info >= (3, 11):
    WaitTimeout = TimeoutError  # asyncio.TimeoutError is TimeoutError
else:  # pragma: no cover - Python 3.10: asyncio's own class; the error is both, however it is caught
    class _WaitTimeout(asyncio.TimeoutError, TimeoutError):
        pass

    WaitTimeout = _WaitTimeout


def _shut_down(name: str) -> RuntimeError:
    return RuntimeError(f"llmshim.aio was shut down before {name} started")


def _cancel_requested() -> bool:
    """Whether the current task was asked to cancel (unknowable before Python 3.11: assume so)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


class _Instruments:
    """llmshim.aio.queue.depth, llmshim.aio.active, llmshim.aio.wait, on the global meter provider."""

    def __init__(self) -> None:
        from opentelemetry import metrics

        meter = metrics.get_meter("llmshim.aio")
        self._depth = meter.create_up_down_counter("llmshim.aio.queue.depth", unit="{call}",
                                                   description="Calls waiting for a pool slot.")
        self._active = meter.create_up_down_counter("llmshim.aio.active", unit="{call}",
                                                    description="Calls running in pool threads.")
        self._wait = meter.create_histogram("llmshim.aio.wait", unit="s", description="Time waited for a slot.")

    def depth(self, delta: int) -> None:
        self._depth.add(delta)

    def active(self, delta: int) -> None:
        self._active.add(delta)

    def wait(self, seconds: float) -> None:
        self._wait.record(seconds)
