"""What llmshim adds to each call, measured side by side in one run.

    python benchmarks/overhead.py [--calls 3000] [--block 100]

The bundled LLM server runs in its own process (so it does not share the client's GIL). For each
client (OpenAI SDK sync, AsyncOpenAI, requests -> Ollama), blocks of calls alternate between
llmshim off and llmshim installed (all features off, one event hook registered), so drift in the
machine's speed hits both sides alike. Reported: calls per second, median and p99 latency per
side, and the added microseconds per call (difference of medians and of p99s).

A second table isolates llmshim's own work per call without a network (adapter wrapper, dialect
detection, pipeline, tap, body parsing, hook), against a stand-in send, which is the figure the
end-to-end difference is noisy around.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import llmshim

MSG = [{"role": "user", "content": "benchmark me please"}]


def start_server() -> tuple[subprocess.Popen[str], str]:
    """The server in its own process, pinned to the last core while this process takes the first:
    on a small machine, sharing cores made the scheduler's noise larger than what is measured."""
    proc = subprocess.Popen([sys.executable, "-m", "llmshim.testing", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 2:
        os.sched_setaffinity(proc.pid, {cores[-1]})
        os.sched_setaffinity(0, {cores[0]})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = line.split(" on ", 1)[1].split()[0]
    return proc, url


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(run_block: Callable[[int], list[float]], calls: int, block: int) -> dict[str, list[float]]:
    """Alternate blocks off/on; returns per-call latencies (s) for each side."""
    sides: dict[str, list[float]] = {"off": [], "on": []}
    run_block(20)  # warm up connections and imports
    for i in range(2 * (calls // block)):
        side = "on" if i % 2 else "off"
        if side == "on":
            llmshim.install()
        try:
            sides[side] += run_block(block)
        finally:
            llmshim.uninstall()
    return sides


def report(name: str, sides: dict[str, list[float]]) -> dict[str, float]:
    off, on = sides["off"], sides["on"]
    row = {
        "off_rps": len(off) / sum(off), "on_rps": len(on) / sum(on),
        "off_p50_us": statistics.median(off) * 1e6, "on_p50_us": statistics.median(on) * 1e6,
        "off_p99_us": pct(off, 0.99) * 1e6, "on_p99_us": pct(on, 0.99) * 1e6,
    }
    row["added_p50_us"] = row["on_p50_us"] - row["off_p50_us"]
    row["added_p99_us"] = row["on_p99_us"] - row["off_p99_us"]
    print(f"| {name:<34} | {row['off_rps']:8.0f} | {row['on_rps']:8.0f} | {row['off_p50_us']:8.0f} | "
          f"{row['on_p50_us']:8.0f} | {row['added_p50_us']:+7.0f} | {row['off_p99_us']:8.0f} | "
          f"{row['on_p99_us']:8.0f} | {row['added_p99_us']:+7.0f} |", flush=True)
    return row


def openai_sync(url: str) -> Callable[[int], list[float]]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0)

    def block(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
            out.append(time.perf_counter() - start)
        return out

    return block


def openai_async(url: str) -> Callable[[int], list[float]]:
    import openai

    loop = asyncio.new_event_loop()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0)

    async def many(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
            out.append(time.perf_counter() - start)
        return out

    return lambda n: loop.run_until_complete(many(n))


def requests_ollama(url: str) -> Callable[[int], list[float]]:
    import requests

    session = requests.Session()
    body = {"model": "llama3.2", "messages": MSG, "stream": False}

    def block(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            session.post(url + "/api/chat", json=body, timeout=10).json()
            out.append(time.perf_counter() - start)
        return out

    return block


def in_process_cost(iterations: int) -> dict[str, float]:
    """llmshim's own per-call work with a stand-in send: no sockets, same code path otherwise."""
    from llmshim.call import Reply, Tap
    from llmshim.runtime import STATE, begin

    body = json.dumps({"model": "gpt-4o-mini", "messages": MSG}).encode()
    answer = json.dumps({"id": "x", "model": "gpt-4o-mini", "choices": [{"finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    headers = {"content-type": "application/json"}
    from llmshim.call import WireRequest

    wire = WireRequest("POST", "http://127.0.0.1:1/v1/chat/completions", (("content-type", "application/json"),),
                       body)

    def one() -> None:
        call = begin("bench", lambda: wire)
        assert call is not None

        def send(call: object) -> Reply:
            return Reply(200, headers, Tap(), None)

        reply = STATE.pipeline.run(call, send)  # type: ignore[arg-type]
        reply.tap.chunk(answer)
        reply.tap.complete()

    llmshim.install()
    try:
        for _ in range(1000):
            one()
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            one()
            samples.append(time.perf_counter() - start)
    finally:
        llmshim.uninstall()
    return {"p50_us": statistics.median(samples) * 1e6, "p99_us": pct(samples, 0.99) * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000, help="calls per side per client")
    parser.add_argument("--block", type=int, default=50, help="calls per alternating block")
    args = parser.parse_args()
    hooks_seen = []
    llmshim.on("call_completed", hooks_seen.append)
    proc, url = start_server()
    try:
        print(f"llmshim {llmshim.__version__}, python {sys.version.split()[0]}, {args.calls} calls per side, "
              f"blocks of {args.block}, server in a separate process at {url}\n")
        print("| client -> dialect                  | off rps  | on rps   | off p50  | on p50   | +p50 us "
              "| off p99  | on p99   | +p99 us |")
        print("|------------------------------------|----------|----------|----------|----------|---------"
              "|----------|----------|---------|")
        rows = {}
        for name, make in (("OpenAI SDK sync -> /v1/chat", openai_sync), ("AsyncOpenAI -> /v1/chat", openai_async),
                           ("requests -> Ollama /api/chat", requests_ollama)):
            rows[name] = report(name, measure(make(url), args.calls, args.block))
        cost = in_process_cost(20000)
        print(f"\nllmshim's own work per call, no network (20000 calls, hook on): "
              f"p50 {cost['p50_us']:.1f} us, p99 {cost['p99_us']:.1f} us")
        print(f"hook records received: {len(hooks_seen)}")
    finally:
        proc.terminate()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
