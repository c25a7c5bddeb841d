"""The rate arithmetic, once: the generic cell rate algorithm (GCRA) as pure functions.

One float of state per dimension (requests, tokens) of a key: its *theoretical arrival time*
(``tat``), the moment the bucket would be empty again if nothing more were taken. A cost fits
now when taking it would not push ``tat`` more than ``burst`` seconds ahead of now; otherwise the
answer is how long to wait until it would. A cost bigger than the whole burst is charged as one
whole burst (it passes alone, on an idle bucket, rather than never).

``take`` is the step every budget uses: the in-memory bucket of one process (``Gcra`` below and
the scheduler in ``policies/scheduler.py``), the SQLite file shared by the processes of one
machine (``store/limits.py``), and, in Lua, the Redis script shared by many machines
(``store/redis.py``). ``tests/test_gcra_table.py`` runs one table of cases against all three.

Across processes there is no shared queue, so a lower priority class keeps a ``reserve`` of the
burst free for higher ones; within a process the scheduler orders waiters itself (reserve 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

__all__ = ["Dim", "Gcra", "at_most", "charged", "gcra_take", "take"]


#: Seconds beyond the burst a ``tat`` may lie ahead before it counts as written before the clock
#: went back. Not just float rounding (~1e-7 s on epoch seconds): processes sharing a budget may
#: use different bursts for a moment (one has learned a server's lower limit, whose burst stretches
#: to one request's interval, up to a minute), and one's full bucket must not look stale to the
#: other. A smaller step back is waited out, at most about this long.
STEP_MARGIN = 60.0


def charged(cost: float, rate: float, burst: float) -> float:
    """What taking ``cost`` really charges: at most one whole burst. A give-back is measured
    against this, not the cost asked for, or returning a big reservation would erase the charges
    of every other call (and a reservation above the burst would free more than it took)."""
    return min(cost, burst * rate)


def gcra_take(tat: float, now: float, rate: float, burst: float, cost: float,
              reserve: float = 0.0) -> tuple[float, float]:
    """One dimension: (the ``tat`` after taking ``cost``, seconds to wait before it fits; 0: now).

    ``rate`` per second, ``burst`` seconds of tolerance, ``reserve`` the share of the burst kept
    free (0 to 1). Taking is the caller's choice: it stores the new ``tat`` only if every
    dimension's wait is 0."""
    cost = charged(cost, rate, burst)
    if tat > now + burst + STEP_MARGIN:
        # A take that fits leaves tat at most ``burst`` ahead of its now, so one further ahead
        # means the clock went back since (a shared store keeps wall-clock times: an NTP step, a VM
        # resumed): forgotten, as after a quiet spell, not hours of waiting for the clock.
        tat = now
    new_tat = max(tat, now) + cost / rate
    # The reserve narrows the tolerance, but one call always fits an idle bucket.
    tolerance = max(burst * (1.0 - reserve), cost / rate)
    return new_tat, max(0.0, new_tat - tolerance - now)


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dimension of a take: its name (``r``, ``t``), rate per second, burst seconds, cost."""

    name: str
    rate: float
    burst: float
    cost: float


def take(tats: Mapping[str, float], blocked_until: float, now: float, dims: Iterable[Dim],
         reserve: float = 0.0, max_block: float = float("inf")) -> tuple[float, dict[str, float]]:
    """Every dimension at once: (seconds to wait, the new ``tat`` per dimension). Pure.

    Wait 0 means all fit: store the new tats. Otherwise store nothing and come back after the
    wait. A block (after a 429) adds its remaining time. The stores never write one more than
    ``max_block`` seconds ahead, so one further ahead is stale (the clock went back since): it is
    over, or every take would wait ``max_block`` again until the clock caught up; a server that
    still refuses says so with its next 429."""
    left = blocked_until - now
    wait = left if 0.0 < left <= max_block else 0.0
    news: dict[str, float] = {}
    for dim in dims:
        news[dim.name], dim_wait = gcra_take(tats.get(dim.name, 0.0), now, dim.rate, dim.burst, dim.cost, reserve)
        wait = max(wait, dim_wait)
    return wait, news


def at_most(tat: float, now: float, rate: float, burst: float, available: float) -> float:
    """The ``tat`` that offers at most ``available`` units now (then the usual pace): never loosens."""
    return max(tat, now + burst - max(0.0, available) / rate)


class Gcra:
    """One dimension of one key in this process: ``rate`` per second, ``burst`` seconds of tolerance."""

    __slots__ = ("burst", "rate", "tat")

    def __init__(self, per_minute: float, burst_seconds: float) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(burst_seconds, 1.0 / self.rate)  # at least one unit always fits an idle bucket
        self.tat = 0.0

    def wait(self, now: float, cost: float) -> float:
        """Seconds until ``cost`` fits (0: now). Pure: does not take it."""
        return gcra_take(self.tat, now, self.rate, self.burst, cost)[1]

    def take(self, now: float, cost: float) -> None:
        self.tat = gcra_take(self.tat, now, self.rate, self.burst, cost)[0]

    def give_back(self, cost: float) -> None:
        self.tat -= cost / self.rate

    def tighten(self, per_minute: float) -> None:
        """Slow to ``per_minute`` (a server's own lower limit), keeping one unit fitting an idle
        bucket: a burst shorter than one unit's interval would charge each unit as a whole burst,
        one per burst however slow the rate (3 a minute came out as 6 with a 10 s burst)."""
        self.rate = per_minute / 60.0
        self.burst = max(self.burst, 1.0 / self.rate)

    def charged(self, cost: float) -> float:
        """What taking ``cost`` charged this bucket (at most one whole burst)."""
        return charged(cost, self.rate, self.burst)

    def at_most(self, now: float, available: float) -> None:
        """Offer at most ``available`` units now (then the usual pace): never loosens."""
        self.tat = at_most(self.tat, now, self.rate, self.burst, available)

    def dim(self, name: str, cost: float) -> Dim:
        return Dim(name, self.rate, self.burst, cost)
