"""Who goes next under a limit: per-key queues by priority, GCRA buckets, concurrency slots.

Pure parts, tested with a fake clock (``tests/test_scheduler.py``):

- ``Key``: one (origin, credential scope, model) with its buckets (``gcra.Gcra``: requests and
  tokens per minute), a 429 block, an AIMD concurrency capacity for local servers, and one queue
  per priority class. ``next_waiter`` picks the oldest waiter of the highest waiting class —
  first-come-first-served within a class whatever its size — unless a lower class is owed its
  share: while it waits, a class gets every Nth grant (``SHARE_EVERY``), so it never starves.
- ``Key.try_take``: a waiter's permits now, or the seconds to wait (``inf``: until a slot frees).

The acting part, ``Limiter`` (its lock, the timer, the pump and fork safety), is in ``limiter.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
from typing import TYPE_CHECKING

from ..gcra import Dim, Gcra, take
from ..knobs import PRIORITIES
from ..values import Limits

if TYPE_CHECKING:
    from ..dialects import ServerLimits
    from ..store.base import LimitStore

__all__ = ["RELEARN_AFTER", "SHARE_EVERY", "Key", "Waiter"]

#: A waiting class gets one grant in this many while higher classes are being served.
SHARE_EVERY = {"high": 4, "normal": 10, "low": 20}

#: Seconds of quiet after which a limit learned from a server's headers may be forgotten with its
#: key (the next answer teaches it again).
RELEARN_AFTER = 600.0


@dataclasses.dataclass(eq=False)
class Waiter:
    priority: str
    requests: float
    tokens: float
    enqueued: float
    granted: bool = False
    holds_slot: bool = False
    event: threading.Event | None = None
    future: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
    # A caller that will not wait (LLMSHIM_QUEUE_TIMEOUT=0) is woken by the first pass that looks at
    # it, granted or not: with a shared budget that pass runs on the store thread, after the enqueue.
    impatient: bool = False

    def wake(self, granted: bool = True) -> None:
        self.granted = self.granted or granted
        if self.event is not None:
            self.event.set()
        if self.future is not None:
            loop, future = self.future
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody is left to wake
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Key:
    def __init__(self, limits: Limits, burst: float, name: str = "", shared: LimitStore | None = None,
                 concurrency: int | None = None) -> None:
        self.name, self.shared, self.limits = name, shared, limits
        # Local servers: at most ``capacity`` calls in flight; halved on 503, regrown by one per
        # ``capacity`` successes (AIMD), never above the configured maximum.
        self.max_concurrency = concurrency
        self.capacity = float(concurrency) if concurrency else None
        self.in_flight = 0
        self.requests = Gcra(limits.rpm, burst) if limits.rpm else None
        self.tokens = Gcra(limits.tpm, burst) if limits.tpm else None
        self.queues: dict[str, collections.deque[Waiter]] = {p: collections.deque() for p in PRIORITIES}
        self.passed_over = dict.fromkeys(PRIORITIES, 0)
        self.blocked_until = 0.0
        self.watching = False  # a health watch holds the key (a server loading its model)
        self.active_at = 0.0  # the last grant or server answer learned from (limiter clock)

    def at_rest(self, now: float) -> bool:
        """Whether a new key would behave the same from ``now``: nobody queued, no slot held, no
        block or health watch, every bucket whole again, the concurrency capacity whole, and no
        limit learned from the server within ``RELEARN_AFTER`` seconds. The limiter drops such keys
        when it holds many (one per credential and model adds up in a multi-tenant process)."""
        if self.in_flight or self.watching or self.blocked_until > now or any(self.queues.values()):
            return False
        if self.capacity is not None and self.max_concurrency is not None and self.capacity < self.max_concurrency:
            return False
        for bucket, per_minute in ((self.requests, self.limits.rpm), (self.tokens, self.limits.tpm)):
            if bucket is None:
                continue
            if bucket.tat > now:
                return False
            if per_minute and bucket.rate != per_minute / 60.0 and now - self.active_at < RELEARN_AFTER:
                return False
        return True

    def full(self) -> bool:
        """Every concurrency slot is taken: the next grant waits for a release, not for time."""
        return self.capacity is not None and self.in_flight >= max(1, int(self.capacity))

    def dims(self, waiter: Waiter, share: float = 1.0) -> list[tuple[Gcra, Dim]]:
        """The buckets a waiter draws on, with its cost in each (times ``share``: this process's
        share when the shared budget is away)."""
        out = []
        if self.requests is not None:
            out.append((self.requests, self.requests.dim("r", waiter.requests * share)))
        if self.tokens is not None:
            out.append((self.tokens, self.tokens.dim("t", waiter.tokens * share)))
        return out

    def store_dims(self, waiter: Waiter) -> list[Dim]:
        """What the shared budget is asked for (a zero token cost is not asked)."""
        return [dim for _, dim in self.dims(waiter) if dim.name == "r" or dim.cost]

    def try_take(self, now: float, waiter: Waiter, shared_wait: float | None = None) -> float:
        """Take the waiter's permits and answer 0, or take nothing and answer the seconds to wait
        (``inf``: until a call in flight ends). With a shared store its answer (``shared_wait``,
        asked beforehand without the lock) decides; if it failed (None), this process's own
        buckets do, at its share of the limit."""
        if self.full():
            return float("inf")
        if self.shared is not None and shared_wait is not None:
            wait = max(shared_wait, self.blocked_until - now)
        else:
            share = max(1, int(getattr(self.shared, "instances", 1))) if self.shared is not None else 1
            buckets = self.dims(waiter, share)
            wait, news = take({dim.name: bucket.tat for bucket, dim in buckets}, self.blocked_until, now,
                              (dim for _, dim in buckets))
            if wait <= 0:
                for bucket, dim in buckets:
                    bucket.tat = news[dim.name]
        if wait <= 0:
            self.active_at = now
            if self.capacity is not None:
                self.in_flight += 1
                waiter.holds_slot = True
        return wait

    def release(self, outcome_status: int | None) -> None:
        """A call holding a concurrency slot ended; adapt the capacity to what the server said."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.capacity is None or self.max_concurrency is None:
            return
        if outcome_status == 503:
            self.capacity = max(1.0, self.capacity / 2)
        elif outcome_status is not None and outcome_status < 500:
            self.capacity = min(float(self.max_concurrency), self.capacity + 1.0 / self.capacity)

    def learn(self, said: ServerLimits, now: float) -> None:
        """Never offer more than the server says it has: tighten to its limits (per minute) and to
        what remains of them. OpenAI's ``reset`` is the time until the limit is whole again, not
        until the next request fits, so it is not a block: with ``remaining: 0`` the next request
        fits one refill interval later, as the bucket's own pacing gives."""
        self.active_at = now
        for bucket, limit, remaining in ((self.requests, said.requests_limit, said.requests_remaining),
                                         (self.tokens, said.tokens_limit, said.tokens_remaining)):
            if bucket is None:
                continue
            if limit is not None and 0 < limit / 60.0 < bucket.rate:
                bucket.tat = max(bucket.tat, 0.0)
                bucket.tighten(limit)
            if remaining is not None:
                bucket.at_most(now, remaining)

    def next_waiter(self) -> Waiter | None:
        """Highest waiting class, unless a lower waiting class is owed its share."""
        waiting = [p for p in PRIORITIES if self.queues[p]]
        if not waiting:
            return None
        top = waiting[0]
        for lower in reversed(waiting[1:]):
            if self.passed_over[lower] >= SHARE_EVERY.get(lower, 10) - 1:
                return self.queues[lower][0]
        return self.queues[top][0]

    def tell_impatient(self) -> None:
        """Nobody more is granted now: wake the waiters that will not wait, so they leave at once."""
        for queue in self.queues.values():
            for waiter in queue:
                if waiter.impatient:
                    waiter.wake(granted=False)

    def first(self, waiter: Waiter) -> bool:
        """Whether ``waiter`` still heads its class's queue (it may have left meanwhile)."""
        queue = self.queues[waiter.priority]
        return bool(queue) and queue[0] is waiter

    def granted(self, waiter: Waiter) -> None:
        self.queues[waiter.priority].popleft()
        self.passed_over[waiter.priority] = 0
        for name, queue in self.queues.items():
            if queue and name != waiter.priority:
                self.passed_over[name] += 1
