"""Asking the budget shared between processes (a SQLite file, Redis) off every caller's thread.

A shared store is I/O that can wait: up to SQLite's busy timeout (2 s) while another process holds
the limits file's write lock, up to the Redis timeout while Redis is slow. So the limiter never
asks it on a caller's thread or under its lock (``policies/scheduler.py``): every store operation
of every limiter in this process runs on ONE daemon thread, ``llmshim-ratelimit-store``, in turn.

- An event loop, a sync caller and a finalizer only queue work here; none of them waits on a store.
- This process's connections to the limits file are opened, used and closed by that one thread,
  one at a time, so they never wait on each other. Several connections opening a fresh limits
  file at once is what answered "database is locked" at once, without the busy timeout (SQLite's
  switch to WAL does not wait): the failure that reverted the first attempt at moving store I/O
  out from under the lock (802581c). A finalizer that ends a call while that thread is inside a
  transaction (the garbage collector runs anywhere) only queues: nothing nests in a transaction.
- Pumps (deciding who goes next) run before writes (a block after a 429, a give-back of unused
  tokens), so a slow store delays answers by one take at most, not by a backlog of writes. Writes
  beyond ``WRITE_LIMIT`` pending are dropped: each is a refinement, the local budget still holds.

Every operation fails open: a take answers None (the limiter then uses this process's share of
the limit) and a write is skipped, with a warning (at most one a minute) and the ``store_errors``
stat. After ``fork()`` the child starts with an empty queue and no thread.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING

from ..clocks import monotonic, wall
from ..facts import store_failed as report_store_failure
from ..gcra import Dim

if TYPE_CHECKING:
    from ..store.base import LimitStore

__all__ = ["STORE_THREAD", "StoreThread", "ask", "give_back", "store_failed", "write_block"]

log = logging.getLogger("llmshim")
WRITE_LIMIT = 4096


class StoreThread:
    """One daemon thread running queued store work in turn: pumps first, then writes."""

    def __init__(self) -> None:
        self._after_fork_in_child()

    def _after_fork_in_child(self) -> None:
        self._pumps: collections.deque[Callable[[], None]] = collections.deque()
        self._writes: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition(threading.RLock())  # re-entrant: a finalizer may queue while we hold it
        self._thread: threading.Thread | None = None
        self._busy = False
        self.dropped = 0

    def submit(self, fn: Callable[[], None], *, pump: bool = False, droppable: bool = True) -> bool:
        """Queue ``fn``: a pump runs before every write; a droppable write is dropped (and
        counted, answer False) when ``WRITE_LIMIT`` writes are pending."""
        with self._cond:
            if not pump and droppable and len(self._writes) >= WRITE_LIMIT:
                self.dropped += 1
                return False
            (self._pumps if pump else self._writes).append(fn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="llmshim-ratelimit-store", daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    def current(self) -> bool:
        """Whether the calling thread is the store thread."""
        return self._thread is threading.current_thread()

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has run (tests, shutdown); False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pumps or self._writes or self._busy), timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not (self._pumps or self._writes):
                    self._cond.wait()
                fn = (self._pumps or self._writes).popleft()
                self._busy = True
            try:
                fn()
            except Exception:  # each operation fails open on its own; this only keeps the thread alive
                log.warning("llmshim: a rate-limit store operation failed", exc_info=True)


STORE_THREAD = StoreThread()
_THREADS: weakref.WeakSet[StoreThread] = weakref.WeakSet([STORE_THREAD])

def _reset_in_child() -> None:
    for thread in list(_THREADS):
        thread._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


_last_warning = [0.0]


def store_failed(exc: BaseException) -> None:
    report_store_failure("limits", "take")
    now = monotonic()
    if now - _last_warning[0] >= 60:
        _last_warning[0] = now
        log.warning(
            "llmshim: the shared rate-limit store failed (%s: %s); this process limits on its own until it "
            "recovers (warned once a minute)", type(exc).__name__, exc)


def ask(shared: LimitStore, name: str, dims: Iterable[Dim], level: str) -> float | None:
    """The machine-wide budget's answer: 0 (taken), seconds to wait (nothing taken), or None (the
    store failed: nothing known). Store I/O: only on the store thread."""
    try:
        return max(0.0, float(shared.try_take(name, wall(), [(d.name, d.rate, d.burst, d.cost) for d in dims],
                                              level)))
    except Exception as exc:  # sqlite3.Error, OSError, RedisError: the limiter falls back to its own buckets
        store_failed(exc)
        return None


def give_back(shared: LimitStore, name: str, seconds: Mapping[str, float]) -> None:
    """Return what was taken and not used (reconciled tokens, a permit its waiter left behind):
    seconds of each dimension's theoretical arrival time. Silent on failure, as before the split."""
    for dim, amount in seconds.items():
        with suppress(Exception):
            shared.give_back(name, dim, amount)


def write_block(shared: LimitStore, name: str, seconds: float) -> None:
    try:
        shared.block_for(name, seconds)
    except Exception as exc:
        store_failed(exc)
