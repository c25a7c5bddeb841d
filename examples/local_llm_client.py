"""A seed-001-style local LLM client (requests + aiohttp, Ollama and llama.cpp dialects), unmodified,
with llmshim installed underneath it.

    python examples/local_llm_client.py                          # bundled local server
    OLLAMA_HOST=http://127.0.0.1:11434 MODEL=llama3.2 python examples/local_llm_client.py   # real Ollama
    LLAMACPP_HOST=http://127.0.0.1:8080 python examples/local_llm_client.py                 # real llama-server

The client below knows nothing about llmshim; the hook at the bottom sees every call it makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator

import aiohttp
import requests

import llmshim


class LocalLLMClient:
    """What teams hand-roll: Ollama /api/chat with NDJSON streaming, llama.cpp /completion with SSE."""

    def __init__(self, ollama: str, llamacpp: str, model: str) -> None:
        self.ollama, self.llamacpp, self.model = ollama.rstrip("/"), llamacpp.rstrip("/"), model

    def chat(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": False}
        return str(requests.post(f"{self.ollama}/api/chat", json=body, timeout=120).json()["message"]["content"])

    def chat_stream(self, prompt: str) -> Iterator[str]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        with requests.post(f"{self.ollama}/api/chat", json=body, stream=True, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)["message"]["content"]

    async def complete_async(self, prompt: str) -> str:
        text = []
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.llamacpp}/completion", json={"prompt": prompt, "n_predict": 32, "stream": True}) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    text.append(json.loads(line[6:])["content"])
        return "".join(text)


def main(ollama: str, llamacpp: str) -> None:
    client = LocalLLMClient(ollama, llamacpp, os.environ.get("MODEL", "llama3.2"))
    print("chat:", client.chat("Why is the sky blue? One sentence."))
    print("stream:", "".join(client.chat_stream("Name three primes.")))
    print("llama.cpp:", asyncio.run(client.complete_async("Once upon a time")))


if __name__ == "__main__":
    llmshim.on("call_completed", lambda r: print(
        f"  [llmshim] {r.library} -> {r.provider}/{r.operation} {r.model or r.response_model}: "
        f"{r.input_tokens}+{r.output_tokens} tokens in {r.duration * 1000:.0f} ms"))
    llmshim.install()
    with contextlib.ExitStack() as stack:
        ollama_url, llamacpp_url = os.environ.get("OLLAMA_HOST"), os.environ.get("LLAMACPP_HOST")
        if ollama_url is None or llamacpp_url is None:
            from llmshim.testing import FakeLLMServer

            local = stack.enter_context(FakeLLMServer(chunk_delay=0.01)).url
            ollama_url, llamacpp_url = ollama_url or local, llamacpp_url or local
        main(ollama_url, llamacpp_url)
