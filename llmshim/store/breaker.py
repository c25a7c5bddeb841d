"""A circuit breaker: stop asking a store that does not answer, then probe it now and then.

A dead or black-holed Redis costs every operation its full timeout. After ``threshold`` slow
failures in a row (each cost at least ``slow`` seconds) the breaker *opens*: operations are
refused at once (the caller falls back locally, as for any store error) until the cooldown ends.
Then it is *half-open*: exactly one probe is let through (the Redis stores send it as a PING on
a thread of its own, so no call waits for it); its success closes the breaker, its failure opens
it again with the cooldown doubled (up to ``ceiling``). Redis is used again at most ``ceiling``
seconds (plus one probe) after it answers.

A failure that cost almost nothing (a refused connection: Redis' host is up, the server is not)
is not counted: asking again costs nothing either, and Redis is used the moment it is back.

Pure: the clock is an argument, nothing here blocks, sleeps or does I/O; the caller holds a lock
around each method. A probe whose outcome never comes back (its thread died, the process forked)
expires after its ``lease``, and the next caller probes instead; the Redis stores make the lease
outlast the probe's own timeouts, so that probes never pile up behind a silent Redis.
"""

from __future__ import annotations

import dataclasses

__all__ = ["LEASE", "Breaker"]

LEASE = 4.0  # seconds a probe is out, at least


@dataclasses.dataclass
class Breaker:
    threshold: int = 3  # failures in a row that open the breaker
    base: float = 0.5  # the first cooldown, seconds
    ceiling: float = 4.0  # the longest cooldown, seconds
    lease: float = LEASE  # how long a probe is out before another may go: longer than a probe can take
    slow: float = 0.005  # a failure that cost less than this does not count
    failures: int = 0
    cooldown: float = 0.0  # the current cooldown; 0 while closed
    open_until: float | None = None  # set while open or half-open
    probing_since: float | None = None  # set while a probe is out

    def state(self, now: float) -> str:
        """``closed``, ``open`` (refusing) or ``half-open`` (the cooldown is over, or a probe is out)."""
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until else "half-open"

    def allow(self, now: float) -> bool:
        """May this operation go to the store? True while closed, and for the one probe when half-open."""
        if self.open_until is None:
            return True
        if now < self.open_until:
            return False
        if self.probing_since is not None and now - self.probing_since < self.lease:
            return False  # a probe is out: everyone else keeps falling back
        self.probing_since = now
        return True

    def succeeded(self) -> bool:
        """The store answered. Returns True when this closed an open breaker (it recovered)."""
        recovered = self.open_until is not None
        self.failures, self.cooldown, self.open_until, self.probing_since = 0, 0.0, None, None
        return recovered

    def failed(self, now: float, cost: float = float("inf")) -> bool:
        """The store did not answer, after ``cost`` seconds. Returns True when this opened (or
        re-opened) the breaker."""
        if cost < self.slow:
            if self.probing_since is not None:
                self.succeeded()  # the probe failed at once: asking is cheap again
            return False
        if self.open_until is None:
            self.failures += 1
            if self.failures < self.threshold:
                return False
            self.cooldown = self.base
        elif self.probing_since is None:
            return False  # an operation begun before the breaker opened: the cooldown stands
        else:
            self.cooldown = min(self.ceiling, max(self.base, self.cooldown * 2))
        self.open_until, self.probing_since = now + self.cooldown, None
        return True
