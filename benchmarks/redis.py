"""Redis vs SQLite, side by side in one run: rate-limit acquire and cache hit (store lookup).

    python benchmarks/redis.py [--n 5000]      # needs redis-server on PATH

Starts a local redis-server (loopback, no persistence), then alternates blocks of operations
between the two stores.
"""

from __future__ import annotations

import os
import sys

# This file is named redis.py, as asked; run as a script, its own folder would come first on
# sys.path and shadow the redis package. Drop it before anything imports redis.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from llmshim.store.limits import SQLiteLimitStore
from llmshim.store.redis import RedisCacheStore, RedisLimitStore
from llmshim.store.sqlite import Entry, SQLiteStore


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not on PATH (apt-get install -y redis-server)")
        return 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="llmshim-redis-bench-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(500):
            try:
                RedisCacheStore(url, timeout=1).client.ping()
                break
            except Exception:
                time.sleep(0.01)
        dims = [("r", 1e9, 10.0, 1.0)]
        sqlite_limits = SQLiteLimitStore(f"{workdir}/limits.sqlite3")
        redis_limits = RedisLimitStore(url, timeout=1)
        body = b"x" * 2000
        entry = Entry("a" * 64, 200, [("content-type", "application/json")], body, time.time(), None,
                      {"model": "m"})
        sqlite_cache = SQLiteStore(f"{workdir}/cache.sqlite3")
        redis_cache = RedisCacheStore(url, timeout=1)
        sqlite_cache.put(entry, time.time())
        redis_cache.put(entry, time.time())
        rows: dict[str, list[float]] = {k: [] for k in ("acquire sqlite", "acquire redis", "hit sqlite", "hit redis")}
        for _ in range(args.n // 100):
            rows["acquire sqlite"] += timed(lambda: sqlite_limits.try_take("k", time.time(), dims, "normal"), 100)
            rows["acquire redis"] += timed(lambda: redis_limits.try_take("k", time.time(), dims, "normal"), 100)
            rows["hit sqlite"] += timed(lambda: sqlite_cache.get(entry.key, time.time()), 100)
            rows["hit redis"] += timed(lambda: redis_cache.get(entry.key, time.time()), 100)
        print(f"{args.n} operations each, alternating blocks of 100, redis-server on loopback\n")
        print("| operation                          |  p50 ms |  p99 ms |")
        print("|------------------------------------|---------|---------|")
        labels = {"acquire sqlite": "rate-limit acquire, SQLite store",
                  "acquire redis": "rate-limit acquire, Redis (Lua)",
                  "hit sqlite": "cache lookup (2 KB entry), SQLite", "hit redis": "cache lookup (2 KB entry), Redis"}
        for key, values in rows.items():
            print(f"| {labels[key]:<34} | {statistics.median(values) * 1e3:7.3f} | {pct(values, 0.99) * 1e3:7.3f} |")
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
