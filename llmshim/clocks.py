"""The clock llmshim measures waits, deadlines and durations with: the machine's, whatever a test fakes.

Tools that fake time in a program's tests replace the ``time`` module's functions. Under
freezegun's ``freeze_time`` ``time.monotonic`` and ``time.perf_counter`` stand still (or jump to
the frozen date), so a rate limit's wait or a queue deadline measured with them would never end,
and a duration taken across the freeze would be decades long. ``time.clock_gettime(CLOCK_MONOTONIC)``
is the clock CPython's ``monotonic`` and ``perf_counter`` read on Linux; neither freezegun nor
time-machine replaces it (``tests/test_fake_time.py``). Where it is missing (Windows) the time
module's ``monotonic`` as it was when llmshim was imported serves.

It is a ``functools.partial``, not a function: freezegun swaps module attributes that *are* the
time module's functions, and a call through ``partial`` costs no Python frame on the hot path.

``wall`` is the machine's wall clock (``CLOCK_REALTIME``, ``time.time``'s), for what other
processes and runs read back: a cached answer's expiry and last use, the shared rate-limit budget,
a server's reset date. freezegun leaves it alone, so an answer cached while a test froze time in
2030 does not outlive its TTL in every later run. time-machine moves it too (it patches
``clock_gettime``): with ``travel(..., tick=False)`` those wall-clock times stand still.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

__all__ = ["monotonic", "wall"]

monotonic: Callable[[], float]
wall: Callable[[], float]
if hasattr(time, "clock_gettime") and hasattr(time, "CLOCK_MONOTONIC"):
    monotonic = functools.partial(time.clock_gettime, time.CLOCK_MONOTONIC)
    wall = functools.partial(time.clock_gettime, time.CLOCK_REALTIME)
else:  # pragma: no cover - Windows
    monotonic, wall = functools.partial(time.monotonic), functools.partial(time.time)
