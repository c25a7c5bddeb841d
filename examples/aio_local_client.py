"""A seed-001-style sync Ollama client made awaitable with llmshim.aio.wrap, unchanged.

    python examples/aio_local_client.py                                   # bundled local server
    OLLAMA_HOST=http://127.0.0.1:11434 MODEL=llama3.2 python examples/aio_local_client.py   # real Ollama

The client has only sync methods; ``wrap`` adds ``chat_async`` that runs ``chat`` in llmshim's
bounded pool (LLMSHIM_ASYNC_WORKERS, LLMSHIM_ASYNC_QUEUE_SIZE, LLMSHIM_ASYNC_TIMEOUT), with the
caller's priority and trace context carried into the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import requests

import llmshim
import llmshim.aio


class LocalLLMClient:
    """Sync only, as teams write them."""

    def __init__(self, host: str, model: str) -> None:
        self.host, self.model = host.rstrip("/"), model

    def chat(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": False}
        return str(requests.post(f"{self.host}/api/chat", json=body, timeout=120).json()["message"]["content"])


async def main(host: str) -> None:
    client = llmshim.aio.wrap(LocalLLMClient(host, os.environ.get("MODEL", "llama3.2")))
    questions = [f"Give me fact number {i} about the sea" for i in range(8)]
    start = time.perf_counter()
    with llmshim.priority("high"):  # reaches the worker threads
        answers = await asyncio.gather(*(client.chat_async(q) for q in questions))
    for question, answer in zip(questions, answers, strict=True):
        print(f"{question!r} -> {answer[:60]!r}")
    print(f"{len(answers)} answers in {time.perf_counter() - start:.2f}s; llmshim stats: "
          f"{llmshim.stats()['total_calls']} calls, {llmshim.stats()['output_tokens']} tokens out")


if __name__ == "__main__":
    llmshim.install()
    with contextlib.ExitStack() as stack:
        host = os.environ.get("OLLAMA_HOST")
        if host is None:
            from llmshim.testing import FakeLLMServer, Fault

            server = stack.enter_context(FakeLLMServer())
            server.inject(Fault(delay=0.2), times=None)  # each answer takes 0.2 s, like a small model
            host = server.url
        asyncio.run(main(host))
