"""A batch job sharing a rate limit with interactive traffic: the batch runs at low priority, so a
critical request goes first even while the batch has the queue full.

    python examples/batch_priorities.py                              # the bundled local server
    LLM_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... python examples/batch_priorities.py

Settings come from the environment as usual; the defaults below give a visible queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import openai

import llmshim
import llmshim.aio


def ask(client: openai.OpenAI, prompt: str) -> str:
    reply = client.chat.completions.create(model=os.environ.get("MODEL", "gpt-4o-mini"),
                                           messages=[{"role": "user", "content": prompt}])
    return reply.choices[0].message.content or ""


async def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "sk-local"))
    start = time.perf_counter()
    finished: list[tuple[str, float]] = []

    def timed(label: str, prompt: str) -> str:
        answer = ask(client, prompt)
        finished.append((label, time.perf_counter() - start))
        return answer

    with llmshim.priority("low"):
        batch = asyncio.create_task(llmshim.aio.batch(lambda i: timed(f"batch {i}", f"summarise item {i}"),
                                                      range(12), max_concurrency=12, progress=False))
    await asyncio.sleep(0.3)  # the batch has filled the queue by now (this is the scenario, not a sync)
    with llmshim.priority("critical"):
        await llmshim.aio.to_async(timed)("CRITICAL", "the user is waiting")
    await batch
    order = [label for label, _ in sorted(finished, key=lambda item: item[1])]
    print("completion order:", ", ".join(order))
    print(f"critical finished {order.index('CRITICAL') + 1} of {len(order)}; "
          f"throttled calls: {llmshim.stats()['throttled_calls']}")


if __name__ == "__main__":
    llmshim.install(rpm=os.environ.get("LLMSHIM_RPM", "240"), ratelimit_burst=os.environ.get(
        "LLMSHIM_RATELIMIT_BURST", "0.5"), cache="off")
    with contextlib.ExitStack() as stack:
        url = os.environ.get("LLM_BASE_URL")
        if url is None:
            from llmshim.testing import FakeLLMServer

            url = stack.enter_context(FakeLLMServer()).openai_base_url
        asyncio.run(main(url))
