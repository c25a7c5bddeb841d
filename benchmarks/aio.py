"""llmshim.aio.batch over a sync client vs sequential calls vs the native async client.

    python benchmarks/aio.py [--calls 200] [--workers 20] [--delay 0.05]

200 sync OpenAI SDK calls to the bundled server, which waits ``--delay`` seconds before each answer
(a stand-in for generation time), measured side by side in one run: sequential; ``llmshim.aio.batch``
with 20 workers; the native ``AsyncOpenAI`` client with 20 at a time. Targets: batch >= 0.9 x the
ideal speed-up (workers / latency) and within 20% of the native async client.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import openai

import llmshim.aio as aio
from llmshim.testing import FakeLLMServer, Fault


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    messages: list[dict[str, str]] = [{"role": "user", "content": "hi"}]
    with FakeLLMServer() as server:
        server.inject(Fault(delay=args.delay), times=None)
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)

        def ask(i: int) -> str:
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
            return reply.choices[0].message.content or ""

        start = time.perf_counter()
        for i in range(args.calls):
            ask(i)
        sequential = time.perf_counter() - start

        pool = aio.AsyncPool(workers=args.workers, queue_size=args.calls, timeout=None)
        aio._pool = pool  # the shared pool, sized for this run
        start = time.perf_counter()
        asyncio.run(aio.batch(ask, range(args.calls), max_concurrency=args.workers, progress=False))
        batched = time.perf_counter() - start

        async def native() -> float:
            async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as aclient:
                semaphore = asyncio.Semaphore(args.workers)

                async def one(i: int) -> None:
                    async with semaphore:
                        await aclient.chat.completions.create(model="m", messages=messages)

                begin = time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(args.calls)))
                return time.perf_counter() - begin

        native_seconds = asyncio.run(native())
    ideal = sequential / args.workers
    print(f"{args.calls} OpenAI SDK calls, server delay {args.delay * 1000:.0f} ms, {args.workers} workers\n")
    print("| mode                              | seconds | calls/s | speed-up vs sequential |")
    print("|-----------------------------------|---------|---------|------------------------|")
    for name, seconds in (("sequential (sync SDK)", sequential), ("llmshim.aio.batch (sync SDK)", batched),
                          ("native AsyncOpenAI, 20 at a time", native_seconds)):
        print(f"| {name:<33} | {seconds:7.2f} | {args.calls / seconds:7.1f} | {sequential / seconds:22.1f} |")
    print(f"\nbatch vs ideal ({args.workers} x): {ideal / batched:.2f} of the ideal speed-up; "
          f"batch / native time: {batched / native_seconds:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
