"""llmshim's share of an OpenAI SDK cache hit, pure hits against the SDK's streamed floor.

    python benchmarks/hit_share.py [--blocks 15] [--block 100]

``cache.py`` interleaves hits with live calls (a miss and a store each) and its first floor reads the
body at construction. This one measures only the two things the issue's row compares, in alternating
blocks in one process: the SDK answered by llmshim's cache (telemetry off, one hook, the answer
stored from a real ``FakeLLMServer`` that is then stopped: every measured call is a hit), and the
same SDK call answered by ``httpx2.MockTransport`` with the same answer streamed as a socket's
body is (the SDK's floor). Once with the garbage collector on, once off: allocation the collector
pays for is part of what llmshim costs, and the difference shows how much.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from collections.abc import Iterator

from _common import timed

import llmshim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--block", type=int, default=100)
    args = parser.parse_args()

    import httpx2
    import openai

    from llmshim.testing import FakeLLMServer

    server = FakeLLMServer().start()
    cached = openai.OpenAI(base_url=server.openai_base_url, api_key="sk-bench", max_retries=0)
    question = [{"role": "user", "content": "Name three colours of the rainbow"}]
    first = cached.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=question)
    answer = first.http_response.content

    class Streamed(httpx2.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield answer

    floor = openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="sk-bench", max_retries=0,
                          http_client=httpx2.Client(transport=httpx2.MockTransport(lambda request: httpx2.Response(
                              200, headers={"content-type": "application/json"}, stream=Streamed()))))
    llmshim.install(telemetry=False, cache="on", cache_path=tempfile.mkdtemp() + "/hits.sqlite3", retry_mode="off")
    llmshim.on("call_completed", lambda record: None)
    for _ in range(50):
        cached.chat.completions.create(model="gpt-4o-mini", messages=question)
    server.stop()  # from here on a miss would fail: every measured call is a hit
    reply = cached.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=question)
    assert reply.headers.get("x-llmshim-cache") == "hit"

    print(f"llmshim {llmshim.__version__}, {args.blocks} blocks of {args.block} per side\n")
    print("| collector | SDK floor, streamed (p50 us) | llmshim hit (p50 us) | llmshim's share |")
    print("|---|---|---|---|")
    for collector in ("on", "off"):
        (gc.enable if collector == "on" else gc.disable)()
        floors: list[float] = []
        hits: list[float] = []
        for _ in range(args.blocks):
            floors += timed(lambda: floor.chat.completions.create(model="gpt-4o-mini", messages=question), args.block)
            hits += timed(lambda: cached.chat.completions.create(model="gpt-4o-mini", messages=question), args.block)
        low, high = statistics.median(floors) * 1e6, statistics.median(hits) * 1e6
        print(f"| {collector} | {low:.0f} | {high:.0f} | {high - low:+.0f} us |", flush=True)
    gc.enable()
    llmshim.uninstall()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
