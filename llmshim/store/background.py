"""Store writes that must not block an event loop run on one background thread.

A SQLite write can wait up to the busy timeout while another process holds the write lock, and a
Redis write up to its socket timeout. A synchronous caller may pay that (it is its own thread);
an event loop must not: every other task would freeze with it. ``Writes.run(fn)`` therefore runs
``fn`` inline when the current thread runs no event loop (and nothing queued is still pending),
and otherwise queues it for one daemon thread, in order (a put before the counters it flushes,
the close after both). The queue is bounded: beyond ``limit`` pending writes a new one is
dropped and counted (``dropped``), since a cache write is only ever an optimisation. After
``fork()`` the child starts with an empty queue and no thread (the parent's is not there).

Reads across the network (a Redis lookup) must not block a loop either: ``read_off_loop(fn)``
runs them on a small pool of llmshim's own daemon threads, not the loop's default executor (a
program that fills that with its own blocking work, a thread-pool chat wrapper, would queue every
cache read behind it), and not a ``ThreadPoolExecutor`` at all (the interpreter waits at exit
for its threads and every read still queued for them).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextvars
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .. import trio_calls
from ..clocks import monotonic

__all__ = ["READERS", "Readers", "Writes", "drain", "on_event_loop", "read_off_loop"]

T = TypeVar("T")

log = logging.getLogger("llmshim")


def on_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop or a trio run right now (so it must
    not block). ``_get_running_loop`` (in ``asyncio.events.__all__``) answers None where
    ``get_running_loop`` raises: no exception on every cache write of a synchronous caller."""
    return asyncio._get_running_loop() is not None or trio_calls.running()


_ALL: weakref.WeakSet[Writes] = weakref.WeakSet()
_registered = False


class Writes:
    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.dropped = 0
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None
        self._busy = False
        global _registered
        if not _registered:  # registered after the stores' own exit flush, so it runs before it
            _registered = True
            atexit.register(drain)
        _ALL.add(self)

    def run(self, fn: Callable[[], None], *, droppable: bool = True) -> bool:
        """Run ``fn`` now, or queue it when this thread runs an event loop, or when writes queued
        before it have not all run: then it runs after them, in order (the close after the
        counters an event loop queued, not under them). False: dropped (full); a write that is
        not ``droppable`` (the close) is queued beyond the bound."""
        # Read without the lock, the queue first: the worker marks itself busy before it takes a
        # write, so an empty queue then "not busy" means every queued write has run (read the
        # other way round, "not busy" then "empty" can straddle the taking of the last one).
        if not (on_event_loop() or self._queue or self._busy):
            fn()
            return True
        return self.submit(fn, droppable=droppable)

    def submit(self, fn: Callable[[], None], *, droppable: bool = True) -> bool:
        with self._cond:
            if droppable and len(self._queue) >= self.limit:
                self.dropped += 1
                return False
            self._queue.append(fn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="llmshim-store-writes", daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has run (tests, shutdown); False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._queue:
                    self._cond.wait()
                self._busy = True  # before the pop: ``run`` reads both without the lock
                fn = self._queue.popleft()
            try:
                fn()
            except Exception:  # each write fails open on its own; this only keeps the thread alive
                log.warning("llmshim: a background store write failed", exc_info=True)

    def _after_fork_in_child(self) -> None:
        self._queue = collections.deque()
        self._cond = threading.Condition(threading.RLock())
        self._thread, self._busy = None, False


def drain(timeout: float = 5.0) -> bool:
    """Wait (at most ``timeout`` seconds in all) until every queued write of every cache has run:
    at exit, so that answers and counters queued by an event loop are not lost with the daemon
    thread, and for callers that must see the stores settled."""
    deadline = monotonic() + timeout
    return all(writes.idle(max(0.0, deadline - monotonic())) for writes in list(_ALL))


#: Threads reading a store across the network for event loops: each read is bounded by the
#: store's own timeout (``LLMSHIM_REDIS_TIMEOUT``), so a few are enough for many tasks.
READERS = 8


class Readers:
    """Up to ``size`` daemon threads running reads for event loops, made as they are needed.

    Not a ``ThreadPoolExecutor``: the interpreter joins its threads at exit, after running every
    read still queued, so a program ending while Redis is slow or frozen would wait a timeout or
    more (a slow Redis that never times out: the queued reads one after another) for reads nobody
    will use. Daemon threads end with the program, as the loop that awaited them does."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job that no submitted job has claimed yet

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """``fn``'s future; RuntimeError when no thread can be started (the interpreter is exiting)."""
        job: Future[T] = Future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._threads < self.size:
                threading.Thread(target=self._work, name=f"llmshim-store-reads_{self._threads}", daemon=True).start()
                self._threads += 1
            self._jobs.put((job, fn))
        return job

    def _work(self) -> None:
        while True:
            job, fn = self._jobs.get()
            if job.set_running_or_notify_cancel():  # False: its task was cancelled while it queued
                try:
                    result = fn()
                except BaseException as exc:  # handed to the awaiting task, as an executor would
                    job.set_exception(exc)
                else:
                    job.set_result(result)
            del job, fn
            with self._lock:
                self._idle += 1


_readers: Readers | None = None
_readers_lock = threading.Lock()


async def read_off_loop(fn: Callable[[], T]) -> T:
    """Await ``fn()`` run on llmshim's reader threads (made on first use), in a copy of the
    task's context, as ``asyncio.to_thread`` runs it (the synchronous path reads in the caller's
    context: a Redis instrumentation parents its span to the call's either way). A task cancelled
    while it waits gets its ``CancelledError`` at once; the read itself ends on its thread."""
    global _readers
    if _readers is None:
        with _readers_lock:
            if _readers is None:
                _readers = Readers(READERS)
    context = contextvars.copy_context()
    return await asyncio.wrap_future(_readers.submit(lambda: context.run(fn)))


def _reset_in_child() -> None:
    global _readers, _readers_lock
    _readers, _readers_lock = None, threading.Lock()  # the parent's threads are not in the child
    for writes in list(_ALL):
        writes._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
