"""An asyncio program with the cache on Redis: what a hit costs, and how long a slow Redis holds the loop.

    python benchmarks/redis_async.py [--calls 400] [--rounds 3] [--against TREE]   # redis-server on PATH

One local redis-server; an ``httpx.AsyncClient`` asks FakeLLMServer the same question again and
again, with llmshim's cache on Redis alone (``redis``) and tiered (``tiered``: a local SQLite front).
Each tree (this one, and ``--against`` an earlier checkout) runs in its own interpreter, in turns,
``--rounds`` times, so both see the same moments of the machine. Reported per tree and store:

- the median latency of a hit;
- the loop's longest stall during one Redis lookup that waits 300 ms (Redis paused with
  ``CLIENT PAUSE 300 ALL`` from another connection just before the call): a ticker task on the
  same loop measures the longest gap between its ticks. A lookup made on the loop's own thread
  stalls it ~300 ms; one made on a thread, a few milliseconds at most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import asyncio, json, sys, tempfile, time, statistics
sys.path.insert(0, sys.argv[1])
import httpx, redis, llmshim
from llmshim.testing import FakeLLMServer
url, calls = sys.argv[2], int(sys.argv[3])
BODY = {"model": "m", "messages": [{"role": "user", "content": "Name three colours"}], "temperature": 0}
out = {}
with FakeLLMServer() as server, tempfile.TemporaryDirectory() as folder:
    for store in ("redis", "tiered"):
        redis.Redis.from_url(url).flushall()
        llmshim.install(cache="on", cache_url=url, cache_local=store == "tiered", redis_timeout="2s",
                        cache_path=f"{folder}/{store}.sqlite3")

        async def main():
            async with httpx.AsyncClient(base_url=server.openai_base_url) as client:
                await client.post("/chat/completions", json=BODY)  # the miss that stores it (the next
                # identical call waits for that write to land, then hits)
                times = []
                for _ in range(calls):
                    began = time.perf_counter()
                    answer = await client.post("/chat/completions", json=BODY)
                    times.append(time.perf_counter() - began)
                    assert answer.headers.get("x-llmshim-cache") == "hit"
                # a lookup Redis answers only after 300 ms (tiered: a question its front has not seen)
                other = {**BODY, "messages": [{"role": "user", "content": "never asked"}]}
                gaps, ticking = [], True

                async def ticker():
                    last = time.perf_counter()
                    while ticking:
                        await asyncio.sleep(0.001)
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now

                tick = asyncio.create_task(ticker())
                await asyncio.sleep(0.01)
                redis.Redis.from_url(url).execute_command("CLIENT", "PAUSE", "300", "ALL")
                await client.post("/chat/completions", json=other)
                ticking = False
                await tick
                return statistics.median(times), max(gaps)

        out[store] = asyncio.run(main())
        llmshim.uninstall()
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", help="an earlier checkout of llmshim, measured the same way in turns")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not on PATH (apt-get install -y redis-server)")
        return 1
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, **({"--against": os.path.abspath(args.against)} if args.against else {})}
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                   "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(200):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.02)  # the server is starting: nothing to wait on but its port
            results: dict[str, list[dict[str, list[float]]]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    done = subprocess.run([sys.executable, "-c", CHILD, tree, url, str(args.calls)],
                                          capture_output=True, text=True, timeout=600)
                    if done.returncode:
                        print(f"{name} failed:\n{done.stderr[-2000:]}")
                        return 1
                    results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        finally:
            server.kill()
            server.wait()
    print(f"asyncio + httpx, cache on Redis; {args.calls} hits per run, {args.rounds} runs per tree, in turns")
    print("| tree | store | hit, median of runs' medians | loop's longest stall during a 300 ms Redis read |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        for store in ("redis", "tiered"):
            hit = statistics.median(run[store][0] for run in runs) * 1e6
            stall = statistics.median(run[store][1] for run in runs) * 1e3
            print(f"| {name} | {store} | {hit:.0f} µs | {stall:.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
