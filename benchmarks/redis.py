"""Redis vs SQLite, side by side in one run; then what a black-holed Redis costs each call.

    python benchmarks/redis.py [--n 5000] [--calls 300]      # needs redis-server on PATH

Part 1 starts a local redis-server (loopback, no persistence), then alternates blocks of
operations between the two stores.

Part 2 makes real calls (requests -> llmshim -> FakeLLMServer, cache and rate limiter both on
Redis, every prompt new so every call reads and writes the stores) while Redis is black-holed: a
socket that accepts connections and never answers. It reports the latency per call for the first
calls and for the later ones, next to the same calls with a healthy Redis and without llmshim;
then Redis comes back on that port and it reports how long until a call uses it again. Part 2
uses only llmshim's public API, so it also measures an older llmshim (PYTHONPATH=old/checkout).
"""

from __future__ import annotations

import os
import sys

# This file is named redis.py, as asked; run as a script, its own folder would come first on
# sys.path and shadow the redis package. Drop it before anything imports redis.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from llmshim.store.base import Entry
from llmshim.store.cache_redis import RedisCacheStore
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.limits_redis import RedisLimitStore
from llmshim.store.limits_sqlite import SQLiteLimitStore


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


def start_redis(binary: str, port: int, workdir: str) -> subprocess.Popen[bytes]:
    import redis

    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL)
    for _ in range(500):
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.01)
    raise RuntimeError("redis-server did not start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not on PATH (apt-get install -y redis-server)")
        return 1
    stores_table(binary, args.n)
    black_hole_table(binary, args.calls)
    return 0


def stores_table(binary: str, n: int) -> None:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="llmshim-redis-bench-")
    proc = start_redis(binary, port, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    try:
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
        for _ in range(n // 100):
            rows["acquire sqlite"] += timed(lambda: sqlite_limits.try_take("k", time.time(), dims, "normal"), 100)
            rows["acquire redis"] += timed(lambda: redis_limits.try_take("k", time.time(), dims, "normal"), 100)
            rows["hit sqlite"] += timed(lambda: sqlite_cache.get(entry.key, time.time()), 100)
            rows["hit redis"] += timed(lambda: redis_cache.get(entry.key, time.time()), 100)
        print(f"{n} operations each, alternating blocks of 100, redis-server on loopback\n")
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


class BlackHole:
    """Accepts connections where Redis should be, and never answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.05)
        self.held: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def accept(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(OSError):  # the accept timed out: look at the stop flag again
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


def black_hole_table(binary: str, calls: int) -> None:
    import redis
    import requests

    import llmshim
    from llmshim.testing import FakeLLMServer

    counter = iter(range(10**9))

    def ask(url: str) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{next(counter)}"}], "stream": False}
        requests.post(url + "/api/chat", json=body, timeout=60).raise_for_status()

    def install(redis_url: str, workdir: str) -> None:
        llmshim.install(cache="on", cache_url=redis_url, cache_path=f"{workdir}/c.sqlite3", rpm="6000000",
                        ratelimit_store=redis_url, retry_mode="off", telemetry=False)

    rows: dict[str, list[float]] = {}
    with FakeLLMServer() as server:
        session_warmup = [ask(server.url) for _ in range(20)]
        del session_warmup
        rows["without llmshim"] = timed(lambda: ask(server.url), calls)
        port, workdir = free_port(), tempfile.mkdtemp(prefix="llmshim-redis-bench-")
        proc = start_redis(binary, port, workdir)
        install(f"redis://127.0.0.1:{port}/0", workdir)
        rows["llmshim, healthy Redis"] = timed(lambda: ask(server.url), calls)
        llmshim.uninstall()
        proc.kill()
        proc.wait()
        port = free_port()
        hole = BlackHole(port)
        url = f"redis://127.0.0.1:{port}/0"
        install(url, workdir)
        rows["llmshim, black-holed Redis: calls 1-5"] = timed(lambda: ask(server.url), 5)
        rows["llmshim, black-holed Redis: calls 6+"] = timed(lambda: ask(server.url), calls)
        asked = len(hole.held)
        hole.close()
        proc = start_redis(binary, port, workdir)  # Redis answers again, on the same port
        back = time.perf_counter()
        client: Any = redis.Redis(port=port)
        while not client.keys("{llmshim:rl:*") or not client.keys("llmshim:cache:[0-9a-f]*"):
            ask(server.url)
            time.sleep(0.01)
        recovery = time.perf_counter() - back
        llmshim.uninstall()
        proc.kill()
        proc.wait()
    print("\nreal calls (requests -> llmshim -> FakeLLMServer, cache and limiter on Redis, new prompt each)\n")
    print("| calls                                    |  p50 ms |  p99 ms |  max ms |")
    print("|------------------------------------------|---------|---------|---------|")
    for label, values in rows.items():
        print(f"| {label:<40} | {statistics.median(values) * 1e3:7.2f} | {pct(values, 0.99) * 1e3:7.2f} "
              f"| {max(values) * 1e3:7.2f} |")
    print(f"\nconnections the black hole accepted over {calls + 5} calls: {asked}")
    print(f"Redis back: used again by the cache and the limiter after {recovery:.2f} s (a call every ~10 ms)")


if __name__ == "__main__":
    raise SystemExit(main())
