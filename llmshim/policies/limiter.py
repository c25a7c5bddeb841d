"""The limiter: the lock, the pump that grants permits, its one timer, and the shared budget off-lock.

``pump`` grants every permit that is due now (in the order ``scheduler.Key`` decides) and
arranges ONE wake-up for the next (a ``threading.Timer``, or ``schedule`` in tests): no polling.
Sync callers wait on an Event, asyncio tasks on a future resolved thread-safely; a waiter that
gives up (queue timeout, task cancelled, Ctrl-C) leaves its queue at once (``withdraw``).

The lock guards plain values only and is never held across I/O. With a budget shared between
processes (``shared``: a SQLite file or Redis), the pass runs on the store thread
(``shared_budget.py``), asking the store with the lock released, and writes (a block after a
429, a give-back) are queued there too: no caller, event loop or finalizer ever waits on a store.
A waiter that left while the store was asked gets its permit returned to the store.

Keys are one per (server, credential, model): a process serving many users' own API keys makes
them without end. Past ``keep_keys`` keys, a new key first drops those at rest
(``scheduler.Key.at_rest``: a new key would behave the same), so the count stays within twice
what is live, at O(1) amortised. A key dropped while a call that holds it is still in flight is
taken back (or its successor used) when that call comes back to it (``_live``): a 429's block or
a server's limits are never lost with it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..clocks import monotonic
from ..store.limits_sqlite import MAX_BLOCK
from ..values import Limits
from . import shared_budget
from .scheduler import Key, Waiter

if TYPE_CHECKING:
    from ..dialects import ServerLimits
    from ..store.base import LimitStore

__all__ = ["KEEP_KEYS", "Limiter"]

#: Keys a limiter holds before it drops the ones at rest.
KEEP_KEYS = 1024

_LIMITERS: weakref.WeakSet[Limiter] = weakref.WeakSet()


def _reset_limiters_in_child() -> None:
    for limiter in list(_LIMITERS):
        limiter._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_limiters_in_child)


class Limiter:
    """All keys of one process. ``clock``, ``schedule`` and ``store_thread`` are injectable for tests."""

    def __init__(self, burst: float, clock: Callable[[], float] = monotonic,
                 schedule: Callable[[float, Callable[[], None]], None] | None = None, shared: LimitStore | None = None,
                 store_thread: shared_budget.StoreThread | None = None, keep_keys: int = KEEP_KEYS) -> None:
        self.burst = burst
        self.shared = shared
        self.clock = clock
        self._schedule = schedule or self._timer
        self._store = store_thread or shared_budget.STORE_THREAD
        self._lock = threading.RLock()  # guards plain values only: never held across store I/O
        self._keys: dict[tuple[str, Limits], Key] = {}
        self._keep_keys = self._sweep_at = keep_keys
        self._timer_at: float | None = None
        self._timer_obj: threading.Timer | None = None
        self._pump_queued = False
        self._pump_keys: set[Key] = set()  # keys a queued pass must look at (shared store)
        self._pump_all = False  # ... or every key (the timer's pass)
        self._impatient = False  # a waiter that will not wait was ever queued (LLMSHIM_QUEUE_TIMEOUT=0)
        _LIMITERS.add(self)

    def _after_fork_in_child(self) -> None:
        """A fork() child has none of the parent's waiting threads, timer, store thread or calls in
        flight, and the lock may have been held by a parent thread at the fork: start that state
        afresh (the rate budgets, a copy of the parent's, are kept)."""
        self._lock = threading.RLock()
        self._timer_at, self._timer_obj = None, None
        self._pump_queued, self._pump_keys, self._pump_all = False, set(), False
        for key in self._keys.values():
            key.in_flight = 0
            for queue in key.queues.values():
                queue.clear()

    def key(self, name: str, limits: Limits, concurrency: int | None = None) -> Key:
        with self._lock:
            found = self._keys.get((name, limits))
            if found is None:
                if len(self._keys) >= self._sweep_at:
                    self._drop_keys_at_rest()
                found = self._keys[(name, limits)] = Key(limits, self.burst, name, self.shared, concurrency)
            return found

    def count(self) -> int:
        """Keys held now."""
        with self._lock:
            return len(self._keys)

    def _drop_keys_at_rest(self) -> None:
        now = self.clock()
        self._keys = {ident: key for ident, key in self._keys.items() if not key.at_rest(now)}
        self._sweep_at = max(self._keep_keys, 2 * len(self._keys))

    def _live(self, key: Key) -> Key:
        """The key held for ``key``'s name now: ``key`` itself, taken back if it was dropped at rest,
        or the one made for its name since. Under the lock."""
        return self._keys.setdefault((key.name, key.limits), key)

    def enqueue(self, key: Key, waiter: Waiter) -> Key:
        """Queue ``waiter``; answer the key it waits on (the caller's, or its successor if it was
        dropped at rest meanwhile): use that one for the rest of the call."""
        with self._lock:
            key = self._live(key)
            key.queues[waiter.priority].append(waiter)
            self._impatient = self._impatient or waiter.impatient
        self.pump(key)
        return key

    def release(self, key: Key, status: int | None) -> None:
        with self._lock:
            key.release(status)
        self.pump(key)

    def withdraw(self, key: Key, waiter: Waiter) -> bool:
        """Remove a waiter that gives up; False if it was granted meanwhile (it then owns a permit)."""
        with self._lock:
            if waiter.granted:
                return False
            with contextlib.suppress(ValueError):
                key.queues[waiter.priority].remove(waiter)
            return True

    def learn(self, key: Key, said: ServerLimits) -> None:
        with self._lock:
            self._live(key).learn(said, self.clock())

    def block(self, key: Key, until: float, cap: float = MAX_BLOCK) -> None:
        """Pause the key for every caller until ``until``, at most ``cap`` seconds from now (a
        server's delay: ``MAX_BLOCK``; llama.cpp's loading wait: the queue timeout)."""
        until = min(until, self.clock() + cap)
        with self._lock:
            key = self._live(key)
            key.blocked_until = max(key.blocked_until, until)
        shared, name, seconds = key.shared, key.name, until - self.clock()
        if shared is not None:
            self._store.submit(lambda: shared_budget.write_block(shared, name, seconds))
        self.pump(key)

    def unblock(self, key: Key) -> None:
        """The server is ready again (its health watch ended)."""
        with self._lock:
            key.blocked_until = 0.0
            key.watching = False
        self.pump(key)

    def give_back(self, key: Key, tokens: float) -> None:
        """A call used ``tokens`` fewer than it reserved (negative: more)."""
        with self._lock:
            key = self._live(key)
            if key.tokens is None:
                return
            key.tokens.give_back(tokens)
            seconds = {"t": tokens / key.tokens.rate}
        shared, name = key.shared, key.name
        if shared is not None:
            self._store.submit(lambda: shared_budget.give_back(shared, name, seconds))
        self.pump(key)

    def close(self) -> None:
        """Release the shared store, on the store thread after what is queued for it."""
        close = getattr(self.shared, "close", None)
        if close is not None:
            self._store.submit(close, droppable=False)

    def held(self) -> tuple[int, int]:
        """(concurrency slots in flight, callers waiting) over every key: both 0 in an idle process."""
        with self._lock:
            return (sum(key.in_flight for key in self._keys.values()),
                    sum(len(queue) for key in self._keys.values() for queue in key.queues.values()))

    def pump(self, key: Key | None = None) -> None:
        """Grant every permit that is due now on ``key`` (what changed: a waiter came, a call
        ended, a block was set or lifted), or on every key (None: the timer's pass); arrange one
        wake-up for the next one. Keys are independent budgets, so a change on one key never makes
        another's waiter due: an acquire costs the same with 1 or 100 keys busy. With a shared
        store the pass runs on the store thread, queued once however often it is asked for."""
        if self.shared is None:
            with self._lock:  # no I/O in the pass: one hold for all of it
                self._pass(None if key is None else (key,))
            return
        with self._lock:
            if key is None:
                self._pump_all = True
            else:
                self._pump_keys.add(key)
            if self._pump_queued:
                return
            self._pump_queued = True
        self._store.submit(self._queued_pass, pump=True)

    def _queued_pass(self) -> None:
        with self._lock:
            self._pump_queued = False  # asked again from here on: one more pass
            keys = None if self._pump_all else tuple(self._pump_keys)
            self._pump_keys, self._pump_all = set(), False
        self._pass(keys)

    def _pass(self, only: tuple[Key, ...] | None = None) -> None:
        soonest: float | None = None
        store_up = True  # after one failure this pass asks the store no more (one busy timeout, not N)
        with self._lock:
            keys = list(self._keys.values()) if only is None else list(only)
        for key in keys:
            while True:
                with self._lock:
                    waiter = key.next_waiter()
                    if waiter is None or key.full():  # full: woken by a release, not by time
                        if self._impatient:
                            key.tell_impatient()
                        break
                    dims = key.store_dims(waiter)
                answer = None
                if key.shared is not None and store_up:  # store I/O: on the store thread, lock released
                    answer = shared_budget.ask(key.shared, key.name, dims, waiter.priority)
                    store_up = answer is not None
                with self._lock:
                    wait = key.try_take(self.clock(), waiter, answer) if key.first(waiter) else None
                    if wait is not None and wait <= 0:
                        key.granted(waiter)
                        waiter.wake()
                if answer == 0 and key.shared is not None and (wait is None or wait > 0):  # taken, not granted
                    shared_budget.give_back(key.shared, key.name,
                                            {d.name: min(d.cost, d.burst * d.rate) / d.rate for d in dims})
                if wait is None:  # it left while the store was asked
                    continue
                if wait > 0:
                    if self._impatient:  # else a scan of every waiter queued, for nothing, at each pass
                        with self._lock:
                            key.tell_impatient()
                    if wait != float("inf"):
                        soonest = wait if soonest is None else min(soonest, wait)
                    break
        if soonest is not None:
            with self._lock:
                due = self.clock() + soonest
                if self._timer_at is None or due < self._timer_at - 1e-4:
                    self._timer_at = due
                    self._schedule(soonest, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer_at = None
        self.pump()

    def _timer(self, delay: float, fn: Callable[[], None]) -> None:
        if self._timer_obj is not None:
            self._timer_obj.cancel()
        timer = threading.Timer(delay, fn)
        timer.daemon = True
        timer.start()
        self._timer_obj = timer
