"""The rate limiter, measured: acquire overhead, and priorities under overload.

    python benchmarks/limits.py [--seconds 6]

1. Acquire overhead of an immediate grant: in-process (target p99 < 0.2 ms) with 1, 10 and 100 keys
   active, and through the shared SQLite store while 4 processes acquire at once (target p99 < 2 ms).
2. Priorities at 2x overload: a limit of 100 requests/s, 200 requests/s offered for ``--seconds``
   by asyncio tasks (mix critical 10%, high 20%, normal 30%, low 40%), waits per class. Targets:
   critical and high p99 under 1 s, p50 ordered critical <= high <= normal <= low, low still served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _common import pct

from llmshim.policies.limiter import Limiter
from llmshim.policies.scheduler import Waiter
from llmshim.store.limits_sqlite import SQLiteLimitStore
from llmshim.values import Limits


def in_process_acquire(n: int, keys: int = 1) -> list[float]:
    """An immediate grant on one key while ``keys - 1`` other keys are active: each has used its
    budget and holds a queued waiter, so the limiter has them all to consider on every pass."""
    limiter = Limiter(burst=10.0)
    for other in range(keys - 1):
        busy = limiter.key(f"busy-{other}", Limits(rpm=1.0))
        for _ in range(2):  # the first is granted, the second waits (about a minute)
            limiter.enqueue(busy, Waiter("normal", 1, 0, 0.0, event=threading.Event()))
    key = limiter.key("bench", Limits(rpm=1e12))
    samples = []
    for _ in range(n):
        waiter = Waiter("normal", 1, 0, 0.0, event=threading.Event())
        start = time.perf_counter()
        limiter.enqueue(key, waiter)
        waiter.event.wait()  # type: ignore[union-attr]
        samples.append(time.perf_counter() - start)
    return samples


def sqlite_worker(path: str, n: int) -> None:
    store = SQLiteLimitStore(path)
    dims = [("r", 1e9, 10.0, 1.0)]
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        store.try_take("bench", time.time(), dims, "normal")
        samples.append(time.perf_counter() - start)
    print(json.dumps(samples))


def sqlite_acquire(n: int, processes: int) -> list[float]:
    path = os.path.join(tempfile.mkdtemp(prefix="llmshim-limits-"), "limits.sqlite3")
    SQLiteLimitStore(path).try_take("warm", time.time(), [("r", 1e9, 10.0, 1.0)], "normal")
    procs = [subprocess.Popen([sys.executable, __file__, "--sqlite-worker", path, str(n)], stdout=subprocess.PIPE,
                              text=True) for _ in range(processes)]
    return [s for p in procs for s in json.loads(p.communicate()[0])]


async def overload(seconds: float, limit_per_s: float, offered_per_s: float) -> dict[str, list[float]]:
    limiter = Limiter(burst=0.1)
    key = limiter.key("bench", Limits(rpm=limit_per_s * 60))
    loop = asyncio.get_running_loop()
    waits: dict[str, list[float]] = {"critical": [], "high": [], "normal": [], "low": []}
    mix = ["critical"] * 10 + ["high"] * 20 + ["normal"] * 30 + ["low"] * 40
    rnd = random.Random(7)

    async def one(level: str) -> None:
        future: asyncio.Future[None] = loop.create_future()
        waiter = Waiter(level, 1, 0, limiter.clock(), future=(loop, future))
        start = time.perf_counter()
        limiter.enqueue(key, waiter)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=seconds * 3)
            waits[level].append(time.perf_counter() - start)
        except asyncio.TimeoutError:
            limiter.withdraw(key, waiter)

    tasks = []
    start = time.perf_counter()
    for i in range(int(seconds * offered_per_s)):
        due = start + i / offered_per_s
        await asyncio.sleep(max(0.0, due - time.perf_counter()))  # the arrival schedule, not synchronisation
        tasks.append(asyncio.create_task(one(rnd.choice(mix))))
    await asyncio.gather(*tasks)
    return waits


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--sqlite-worker":
        sqlite_worker(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print("| acquire (immediate grant)                  |  p50 ms |  p99 ms |")
    print("|--------------------------------------------|---------|---------|")
    for name, samples in (("in-process", in_process_acquire(20000)),
                          ("in-process, 10 keys active", in_process_acquire(20000, keys=10)),
                          ("in-process, 100 keys active", in_process_acquire(20000, keys=100)),
                          ("SQLite store, 4 processes at once", sqlite_acquire(3000, 4))):
        print(f"| {name:<42} | {statistics.median(samples) * 1e3:7.3f} | {pct(samples, 0.99) * 1e3:7.3f} |")
    waits = asyncio.run(overload(args.seconds, 100.0, 200.0))
    offered = int(args.seconds * 200)
    print(f"\n2x overload: 100 requests/s allowed, 200/s offered for {args.seconds:g} s ({offered} requests), "
          "mix critical 10% / high 20% / normal 30% / low 40%; waits measured until the run drains\n")
    print("| class    | served | p50 wait s | p99 wait s |")
    print("|----------|--------|------------|------------|")
    for level, values in waits.items():
        if values:
            print(f"| {level:<8} | {len(values):6d} | {statistics.median(values):10.3f} | {pct(values, 0.99):10.3f} |")
        else:
            print(f"| {level:<8} |      0 |          - |          - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
