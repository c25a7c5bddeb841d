"""A call whose caller has gone while its synchronous chain still runs on another thread.

Under trio a call's policy chain runs on a worker thread (``trio_calls``); when the trio task is
cancelled it leaves at once and the worker is abandoned. A worker blocked in a wait that holds a
place others need (the rate limiter's queue: a place there, when its turn comes, takes a permit
from the budget) must leave that wait at once too, not at its turn. The task cancels the call's
``Cancellation``; the waits registered on it are woken, see ``cancelled`` and leave.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Abandoned", "Cancellation"]


class Abandoned(Exception):
    """Raised on an abandoned worker (never to a caller) instead of going on for a cancelled task."""


class Cancellation:
    """Set once, from any thread; wakes every waker registered and not yet removed."""

    __slots__ = ("_lock", "_wakers", "cancelled")

    def __init__(self) -> None:
        self.cancelled = False
        self._wakers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def wake_with(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` when cancelled (at once if already); returns how to unregister it."""
        with self._lock:
            if not self.cancelled:
                self._wakers.append(wake)
                return lambda: self._remove(wake)
        wake()
        return lambda: None

    def _remove(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._wakers:
                self._wakers.remove(wake)
