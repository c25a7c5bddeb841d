"""Single flight (request coalescing): identical requests in flight in one process make one
upstream call. The cache policy leads and follows through ``Flights``; waking goes through
``wake.py`` like every sleeper in llmshim.

The first caller of a key leads (goes upstream); identical callers that arrive while it is in
flight follow: they wait until it lands (its answer stored, or not), then look the cache up again.
A follower never waits without bound and never waits on itself:

- ``may_wait`` (pure) refuses a wait on a leader in the follower's own thread (a blocked thread
  cannot read the leader's body: opening the same stream twice before reading either, or the
  OpenAI SDK's "break out of the stream, ask again") or its own asyncio task; such a follower
  goes upstream at once, uncached. Once the leader's body has ended and only its store write is
  left (queued off an event loop), anyone may wait: the write makes progress on its own.
- A wait lasts at most ``timeout`` seconds (``LLMSHIM_CACHE_COALESCE_TIMEOUT``): a leader whose
  stream was dropped unread lands only when it is garbage-collected, so after the bound the
  follower goes upstream itself.
- Landing wakes every follower: one whose event loop has closed is skipped, not fatal to the rest.
- After ``fork()`` the child starts with no flights: the parent's leaders do not exist there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import weakref

from .wake import wake_task

__all__ = ["Flight", "Flights", "Owner", "may_wait", "owner"]


@dataclasses.dataclass(frozen=True, slots=True)
class Owner:
    """Who makes a call: its thread, and its asyncio task (None outside a running loop)."""

    thread: int
    task: int | None


def owner() -> Owner:
    task = None
    with contextlib.suppress(RuntimeError):
        current = asyncio.current_task()
        task = id(current) if current is not None else None
    return Owner(threading.get_ident(), task)


def may_wait(leader: Owner, follower: Owner) -> bool:
    """Whether ``follower`` may wait for ``leader``'s answer. A synchronous follower blocks its
    thread, so never on a leader of the same thread (whose body only that thread can read, sync or
    async); an asynchronous follower yields its loop, so only never on its own task."""
    if follower.task is None:
        return leader.thread != follower.thread
    return not (leader.thread == follower.thread and leader.task == follower.task)


class Flight:
    """One upstream call in progress, and the asynchronous followers to wake when it lands."""

    __slots__ = ("done", "leader", "waiters", "writing")

    def __init__(self, leader: Owner) -> None:
        self.leader = leader
        self.writing = False  # the leader's body has ended; only its store write is left
        self.done = threading.Event()
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def land(self) -> None:
        """Wake every follower. ``done`` is set first: a follower registering from now on sees it
        and wakes itself. The waiters are woken from a copy: a woken follower removes its own
        entry at once (from its loop's thread), which would make an iteration of the live list
        skip the next follower."""
        self.done.set()
        waiters, self.waiters = list(self.waiters), []
        for loop, future in waiters:
            wake_task(loop, future)  # False: that follower's loop has closed; the others still wake


_ALL: weakref.WeakSet[Flights] = weakref.WeakSet()


class Flights:
    """The flights of one cache, by key."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.RLock()  # a reply collected under it may land a flight in this thread
        self._flights: dict[str, Flight] = {}
        _ALL.add(self)

    def join(self, key: str) -> Flight | None:
        """None: the caller leads (it must ``land(key)`` when done). A flight: follow it."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                self._flights[key] = Flight(owner())
            return flight

    def land(self, key: str) -> None:
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is not None:
            flight.land()

    def writing(self, key: str) -> None:
        """The leader's body ended and its entry is being written (maybe on a background thread):
        from now on anyone may wait for the landing, the leader's own thread or task included."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.writing = True

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def wait(self, flight: Flight) -> bool:
        """Block until ``flight`` lands: True; False when it may not or did not land in time
        (the caller then goes upstream itself)."""
        if not (flight.writing or may_wait(flight.leader, owner())):
            return False
        return flight.done.wait(self.timeout)

    async def await_landing(self, flight: Flight) -> bool:
        """The asynchronous twin of ``wait``."""
        if not (flight.writing or may_wait(flight.leader, owner())):
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            flight.waiters.append(entry)
        if flight.done.is_set():
            wake_task(loop, future)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock, contextlib.suppress(ValueError):
                flight.waiters.remove(entry)
        return True

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._flights = {}


def _reset_in_child() -> None:
    for flights in list(_ALL):
        flights._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
