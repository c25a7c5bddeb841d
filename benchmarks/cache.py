"""The response cache, measured side by side in one run.

    pip install requests-cache   # for the comparison row
    python benchmarks/cache.py [--calls 2000] [--sizes 1000,100000,1000000]

1. A hit through the OpenAI SDK vs a live call to the local server (target: a hit >= 10x faster).
2. A hit of llmshim vs a hit of requests-cache (SQLite backend) for the same raw ``requests`` call.
3. llmshim's store lookup vs a bare ``sqlite3`` primary-key read of the same row (the floor;
   target: within 1.3x), over realistic rows (each its own headers, its request and usage).
4. Store lookup latency at 1k, 100k and 1M entries (it must stay flat), and the per-call cost of a
   whole hit (raw ``requests``) answered from a store of each size.

Calls alternate between the sides in blocks, so drift hits both alike. The server runs in its own
process pinned to one core, this process on the other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any

from _common import pct, start_server, timed

import llmshim
from llmshim.store.cache_sqlite import SQLiteStore

MSG: Any = [{"role": "user", "content": "benchmark the cache"}]


def row(name: str, values: list[float], baseline: list[float] | None = None) -> None:
    p50, p99 = statistics.median(values) * 1e6, pct(values, 0.99) * 1e6
    ratio = f"{statistics.median(baseline) / statistics.median(values):8.1f}x" if baseline else "         "
    print(f"| {name:<52} | {p50:9.1f} | {p99:9.1f} | {ratio} |", flush=True)


def sdk_hit_vs_live(url: str, calls: int, block: int, workdir: str) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0)
    counter = [0]

    def live() -> None:  # a new question each time: always a miss, always the server
        counter[0] += 1
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{counter[0]}"}])

    def hit() -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)

    # The SDK's own floor: the same call answered in memory by httpx2.MockTransport (no socket,
    # no llmshim). No cache can answer faster than this through the SDK.
    import httpx2

    answer = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG).http_response
    stored, stored_headers = answer.content, {"content-type": "application/json"}
    mock = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0, http_client=httpx2.Client(
        transport=httpx2.MockTransport(lambda request: httpx2.Response(200, headers=stored_headers, content=stored))))

    def floor() -> None:
        mock.chat.completions.create(model="gpt-4o-mini", messages=MSG)

    # The same, the body streamed as a socket's is (and as llmshim replays a hit, so that it flows
    # through the tap like a live body) rather than read at construction: the SDK's own work differs.
    class Streamed(httpx2.SyncByteStream):
        def __iter__(self) -> Any:
            yield stored

    streamed = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0, http_client=httpx2.Client(
        transport=httpx2.MockTransport(lambda request: httpx2.Response(200, headers=stored_headers,
                                                                       stream=Streamed()))))

    def streamed_floor() -> None:
        streamed.chat.completions.create(model="gpt-4o-mini", messages=MSG)

    lives: list[float] = []
    hits: list[float] = []
    floors: list[float] = []
    streamed_floors: list[float] = []
    llmshim.install(cache="on", cache_path=os.path.join(workdir, "sdk.sqlite3"), telemetry=False)
    hit()  # store it
    llmshim.uninstall()
    for _ in range(calls // block):
        floors += timed(floor, block)
        streamed_floors += timed(streamed_floor, block)
        llmshim.install(cache="on", cache_path=os.path.join(workdir, "sdk.sqlite3"), telemetry=False)
        try:
            lives += timed(live, block)
            hits += timed(hit, block)
        finally:
            llmshim.uninstall()
    row("OpenAI SDK: live call to the local server (miss + store)", lives)
    row("OpenAI SDK: llmshim cache hit", hits, baseline=lives)
    row("OpenAI SDK: in-memory MockTransport, no llmshim (SDK floor)", floors, baseline=lives)
    row("OpenAI SDK: the same, body streamed (SDK floor, streamed)", streamed_floors, baseline=lives)
    print(f"|   llmshim's share of a hit above the SDK floor: "
          f"{(statistics.median(hits) - statistics.median(floors)) * 1e6:.0f} us; above the streamed floor: "
          f"{(statistics.median(hits) - statistics.median(streamed_floors)) * 1e6:.0f} us", flush=True)


def llmshim_vs_requests_cache(url: str, calls: int, block: int, workdir: str) -> None:
    import requests

    body = {"model": "llama3.2", "messages": MSG, "stream": False}
    session = requests.Session()
    plain = lambda: session.post(url + "/api/chat", json=body, timeout=10).json()  # noqa: E731
    try:
        import requests_cache
    except ImportError:
        requests_cache = None
        print("- requests-cache not installed: `pip install requests-cache` for its row")
    cached_session = None
    if requests_cache is not None:
        cached_session = requests_cache.CachedSession(os.path.join(workdir, "rc"), backend="sqlite",
                                                      allowable_methods=("GET", "POST"))
        cached_session.post(url + "/api/chat", json=body, timeout=10).json()
    llmshim.install(cache="on", cache_path=os.path.join(workdir, "raw.sqlite3"), telemetry=False)
    plain()
    llmshim.uninstall()
    canned = _canned_session(session.post(url + "/api/chat", json=body, timeout=10))
    ours: list[float] = []
    theirs: list[float] = []
    floor: list[float] = []
    for _ in range(calls // block):
        llmshim.install(cache="on", cache_path=os.path.join(workdir, "raw.sqlite3"), telemetry=False)
        ours += timed(plain, block)
        llmshim.uninstall()
        if cached_session is not None:
            theirs += timed(lambda: cached_session.post(url + "/api/chat", json=body, timeout=10).json(), block)
        floor += timed(lambda: canned.post(url + "/api/chat", json=body, timeout=10).json(), block)
    if theirs:
        row("requests -> Ollama: requests-cache (SQLite) hit", theirs)
    row("requests -> Ollama: llmshim hit", ours, baseline=theirs or None)
    row("requests -> Ollama: canned adapter, no cache (requests' floor)", floor)
    base = statistics.median(floor)
    shares = f"llmshim {(statistics.median(ours) - base) * 1e6:.0f} us"
    if theirs:
        shares += f", requests-cache {(statistics.median(theirs) - base) * 1e6:.0f} us"
    print(f"|   each hit's share above requests' floor: {shares}")


def _canned_session(live: Any) -> Any:
    """A requests session whose adapter answers every request with ``live``'s status, headers and
    body, built as requests builds a response (no socket, no cache): what requests itself costs,
    which every hit of any cache under requests pays too."""
    import io

    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.response import HTTPResponse

    status, headers, content = live.status_code, dict(live.headers), live.content

    class Canned(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            raw = HTTPResponse(body=io.BytesIO(content), headers=headers, status=status, preload_content=False)
            return self.build_response(request, raw)

    session = requests.Session()
    session.mount("http://", Canned())
    return session


def populate(path: str, entries: int) -> list[str]:
    """A store with ``entries`` rows, written in bulk in the store's format with realistic rows: each
    its own response headers (a request id), a description holding its request and its usage."""
    store = SQLiteStore(path)
    _ = store.salt  # creates the schema
    store.close()
    conn = sqlite3.connect(path)
    now = time.time()
    keys = [f"{i:064x}" for i in range(entries)]
    body = b"x" * 600

    def record(i: int, key: str) -> tuple[Any, ...]:
        headers = json.dumps([["content-type", "application/json"], ["x-request-id", f"req_{i:012x}"],
                              ["openai-processing-ms", str(100 + i % 900)]])
        meta = json.dumps({"provider": "openai", "endpoint": "chat/completions", "model": "gpt-4o-mini",
                           "stream": False, "url": "https://api.openai.com/v1/chat/completions", "body_bytes": 90,
                           "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]},
                           "status": 200, "usage": {"input_tokens": 10 + i % 97, "output_tokens": 20 + i % 89}})
        return key, now, now, headers, body, meta, len(body) + len(headers) + len(meta) + len(key)

    conn.execute("BEGIN")
    for start in range(0, entries, 50_000):
        conn.executemany(
            "INSERT INTO entries (key, created_at, expires_at, last_access, status, headers, body, meta, size) "
            "VALUES (?, ?, NULL, ?, 200, ?, ?, ?, ?)",
            (record(start + i, k) for i, k in enumerate(keys[start:start + 50_000])))
    conn.execute("COMMIT")
    conn.close()
    return keys


def store_vs_floor(url: str, calls: int, workdir: str, sizes: list[int]) -> None:
    """Per size: the store's lookup against a bare read of the same row, then a whole hit (raw
    ``requests`` to the Ollama API) answered from that store among its ``size`` other entries."""
    import requests

    session = requests.Session()
    body = {"model": "llama3.2", "messages": MSG, "stream": False}
    for size in sizes:
        path = os.path.join(workdir, f"n{size}.sqlite3")
        keys = populate(path, size)
        store = SQLiteStore(path)
        floor = sqlite3.connect(path, isolation_level=None)
        picks = [random.choice(keys) for _ in range(calls)]
        ours: list[float] = []
        bare: list[float] = []
        now = time.time()
        for start in range(0, calls, 100):
            for key in picks[start:start + 100]:
                t = time.perf_counter()
                store.get(key, now)
                ours.append(time.perf_counter() - t)
            for key in picks[start:start + 100]:
                t = time.perf_counter()
                floor.execute("SELECT status, headers, body, created_at, expires_at, meta FROM entries WHERE key = ?",
                              (key,)).fetchone()
                bare.append(time.perf_counter() - t)
        row(f"store lookup, {size:,} entries: bare sqlite3 PK read (floor)", bare)
        row(f"store lookup, {size:,} entries: llmshim SQLiteStore.get", ours)
        print(f"|   ratio llmshim / floor at {size:,} entries: "
              f"{statistics.median(ours) / statistics.median(bare):.2f}x", flush=True)
        store.close()
        floor.close()
        llmshim.install(cache="on", cache_path=path, telemetry=False)
        try:
            session.post(url + "/api/chat", json=body, timeout=10).json()  # the miss that stores it
            hits = timed(lambda: session.post(url + "/api/chat", json=body, timeout=10).json(), calls // 5)
        finally:
            llmshim.uninstall()
        row(f"requests -> Ollama: llmshim hit among {size:,} entries", hits)
        os.remove(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--sizes", default="1000,100000,1000000")
    args = parser.parse_args()
    server, url = start_server()
    workdir = tempfile.mkdtemp(prefix="llmshim-bench-")
    try:
        print(f"llmshim {llmshim.__version__}, python {sys.version.split()[0]}, {args.calls} calls per side\n")
        print("| what                                                 |   p50 us  |   p99 us  |  speed-up |")
        print("|------------------------------------------------------|-----------|-----------|-----------|")
        sdk_hit_vs_live(url, args.calls, args.block, workdir)
        llmshim_vs_requests_cache(url, args.calls, args.block, workdir)
        store_vs_floor(url, args.calls * 5, workdir, [int(s) for s in args.sizes.split(",")])
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
