"""Transparency is the first feature: with llmshim installed, every client behaves exactly as without.

Each scenario makes one real call through a real client library over a real socket to the local
server. It runs twice, without and with llmshim; the parsed results, the streamed pieces (in
order) and the bytes that reached the server must be identical, and the hook record must name
the right provider, operation, model and token counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import httpx2
import ollama
import openai
import pytest
import requests

import llmshim
from conftest import OPENAI_LIBRARY
from llmshim.testing import FakeLLMServer
from llmshim.tokens import GENERATIONS


@dataclasses.dataclass(frozen=True)
class Expect:
    library: str
    provider: str
    operation: str
    model: str | None
    stream: bool
    input_tokens: int | None
    output_tokens: int | None


SDK = OPENAI_LIBRARY

Scenario = Callable[[FakeLLMServer], Any]
SCENARIOS: dict[str, tuple[Scenario, Expect]] = {}


def scenario(name: str, expect: Expect) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = (fn, expect)
        return fn

    return register


def _dump(obj: Any) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


def _oai(server: FakeLLMServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)


def _aoai(server: FakeLLMServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)


MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say something nice"}]


# -- OpenAI SDK (httpx2), sync ------------------------------------------------------------------

@scenario("openai-sync-chat", Expect(SDK, "openai", "chat", "gpt-4o", False, 5, 4))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        return _dump(client.chat.completions.create(model="gpt-4o", messages=MSG, temperature=0.2))


@scenario("openai-sync-chat-stream", Expect(SDK, "openai", "chat", "gpt-4o", True, 5, 4))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True})
        return [_dump(chunk) for chunk in stream]


@scenario("openai-sync-completions", Expect(SDK, "openai", "text_completion", "gpt-3.5-turbo-instruct",
                                            False, 2, 2))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        return _dump(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hello there", max_tokens=2))


@scenario("openai-sync-completions-stream", Expect(SDK, "openai", "text_completion",
                                                   "gpt-3.5-turbo-instruct", True, None, None))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        stream = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hello there", stream=True)
        return [_dump(chunk) for chunk in stream]


@scenario("openai-sync-embeddings", Expect(SDK, "openai", "embeddings", "text-embedding-3-small",
                                           False, 5, None))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        return _dump(client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e"]))


@scenario("openai-sync-responses", Expect(SDK, "openai", "chat", "gpt-4.1", False, 3, 4))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        return _dump(client.responses.create(model="gpt-4.1", input="tell me something"))


@scenario("openai-sync-responses-stream", Expect(SDK, "openai", "chat", "gpt-4.1", True, 3, 4))
def _(server: FakeLLMServer) -> Any:
    with _oai(server) as client:
        stream = client.responses.create(model="gpt-4.1", input="tell me something", stream=True)
        return [_dump(event) for event in stream]


@scenario("openai-sync-chat-via-ollama-v1", Expect(SDK, "openai", "chat", "llama3.2", False, 5, 4))
def _(server: FakeLLMServer) -> Any:
    with openai.OpenAI(base_url=server.url + "/ollama/v1", api_key="ollama", max_retries=0) as client:
        return _dump(client.chat.completions.create(model="llama3.2", messages=MSG))


# -- OpenAI SDK (httpx2), async -----------------------------------------------------------------

@scenario("openai-async-chat", Expect(SDK, "openai", "chat", "gpt-4o-mini", False, 5, 4))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aoai(server) as client:
            return _dump(await client.chat.completions.create(model="gpt-4o-mini", messages=MSG))
    return asyncio.run(go())


@scenario("openai-async-chat-stream", Expect(SDK, "openai", "chat", "gpt-4o-mini", True, 5, 4))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aoai(server) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MSG, stream=True, stream_options={"include_usage": True})
            return [_dump(chunk) async for chunk in stream]
    return asyncio.run(go())


@scenario("openai-async-responses-stream", Expect(SDK, "openai", "chat", "gpt-4.1", True, 3, 4))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aoai(server) as client:
            stream = await client.responses.create(model="gpt-4.1", input="tell me something", stream=True)
            return [_dump(event) async for event in stream]
    return asyncio.run(go())


@scenario("openai-async-embeddings", Expect(SDK, "openai", "embeddings", "text-embedding-3-small",
                                            False, 1, None))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with _aoai(server) as client:
            return _dump(await client.embeddings.create(model="text-embedding-3-small", input="single"))
    return asyncio.run(go())


# -- requests: Ollama native, llama.cpp native, OpenAI-compatible raw ---------------------------

@scenario("requests-ollama-chat-stream", Expect("requests", "ollama", "chat", "llama3.2", True, 5, 4))
def _(server: FakeLLMServer) -> Any:
    with requests.post(server.url + "/api/chat", json={"model": "llama3.2", "messages": MSG},
                       stream=True, timeout=10) as response:
        return [json.loads(line) for line in response.iter_lines() if line]


@scenario("requests-ollama-generate", Expect("requests", "ollama", "text_completion", "llama3.2", False, 3, 4))
def _(server: FakeLLMServer) -> Any:
    response = requests.post(server.url + "/api/generate",
                             json={"model": "llama3.2", "prompt": "why is sky", "stream": False}, timeout=10)
    return response.status_code, response.json()


@scenario("requests-ollama-embed", Expect("requests", "ollama", "embeddings", "nomic-embed-text", False, 2, None))
def _(server: FakeLLMServer) -> Any:
    response = requests.post(server.url + "/api/embed", json={"model": "nomic-embed-text", "input": "two words"},
                             timeout=10)
    return response.json()


@scenario("requests-llamacpp-completion-stream", Expect("requests", "llama_cpp", "text_completion", None,
                                                        True, 2, 3))
def _(server: FakeLLMServer) -> Any:
    with requests.post(server.url + "/completion", json={"prompt": "once upon", "stream": True, "n_predict": 3},
                       stream=True, timeout=10) as response:
        return [chunk for chunk in response.iter_content(chunk_size=None)]


@scenario("requests-openai-compatible-raw", Expect("requests", "openai", "chat", "qwen2.5", False, 5, 4))
def _(server: FakeLLMServer) -> Any:
    response = requests.post(server.url + "/v1/chat/completions", json={"model": "qwen2.5", "messages": MSG},
                             headers={"Authorization": "Bearer sk-raw"}, timeout=10)
    return response.json()


# -- aiohttp ------------------------------------------------------------------------------------

@scenario("aiohttp-llamacpp-completion-stream", Expect("aiohttp", "llama_cpp", "text_completion", None,
                                                       True, 2, 3))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as session, session.post(
                server.url + "/completion", json={"prompt": "once upon", "stream": True}) as response:
            return [line async for line in response.content]
    return asyncio.run(go())


@scenario("aiohttp-ollama-chat-stream", Expect("aiohttp", "ollama", "chat", "llama3.2", True, 5, 4))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as session, session.post(
                server.url + "/api/chat", json={"model": "llama3.2", "messages": MSG}) as response:
            return [json.loads(chunk) async for chunk in response.content if chunk.strip()]
    return asyncio.run(go())


@scenario("aiohttp-openai-chat", Expect("aiohttp", "openai", "chat", "gpt-4o", False, 5, 4))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as session, session.post(
                server.openai_base_url + "/chat/completions", json={"model": "gpt-4o", "messages": MSG}) as response:
            return response.status, await response.json()
    return asyncio.run(go())


# -- raw httpx / httpx2, and the ollama client (httpx) -------------------------------------------

@scenario("httpx-ollama-generate", Expect("httpx", "ollama", "text_completion", "llama3.2", False, 3, 4))
def _(server: FakeLLMServer) -> Any:
    return httpx.post(server.url + "/api/generate",
                      json={"model": "llama3.2", "prompt": "why is sky", "stream": False}).json()


@scenario("httpx-openai-chat-stream", Expect("httpx", "openai", "chat", "gpt-4o", True, None, None))
def _(server: FakeLLMServer) -> Any:
    with httpx.Client() as client, client.stream(
            "POST", server.openai_base_url + "/chat/completions",
            json={"model": "gpt-4o", "messages": MSG, "stream": True}) as response:
        return list(response.iter_lines())


@scenario("httpx-async-llamacpp-stream", Expect("httpx", "llama_cpp", "text_completion", None, True, 2, 3))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with httpx.AsyncClient() as client, client.stream(
                "POST", server.url + "/completion", json={"prompt": "once upon", "stream": True}) as response:
            return [chunk async for chunk in response.aiter_bytes()]
    return asyncio.run(go())


@scenario("httpx2-ollama-chat", Expect("httpx2", "ollama", "chat", "llama3.2", False, 5, 4))
def _(server: FakeLLMServer) -> Any:
    return httpx2.post(server.url + "/api/chat",
                       json={"model": "llama3.2", "messages": MSG, "stream": False}).json()


@scenario("ollama-client-chat-stream", Expect("httpx", "ollama", "chat", "llama3.2", True, 5, 4))
def _(server: FakeLLMServer) -> Any:
    with ollama.Client(host=server.url) as client:
        return [_dump(part) for part in client.chat(model="llama3.2", messages=MSG, stream=True)]


@scenario("ollama-client-generate", Expect("httpx", "ollama", "text_completion", "llama3.2", False, 3, 4))
def _(server: FakeLLMServer) -> Any:
    with ollama.Client(host=server.url) as client:
        return _dump(client.generate(model="llama3.2", prompt="why is sky"))


@scenario("ollama-async-client-embed", Expect("httpx", "ollama", "embeddings", "nomic-embed-text", False, 2, None))
def _(server: FakeLLMServer) -> Any:
    async def go() -> Any:
        async with ollama.AsyncClient(host=server.url) as client:
            return _dump(await client.embed(model="nomic-embed-text", input="two words"))
    return asyncio.run(go())


def _wire(server: FakeLLMServer) -> list[tuple[str, str, tuple[tuple[str, str], ...], bytes]]:
    return [(r.method, r.path, r.headers, r.body) for r in server.received]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_identical_with_and_without_llmshim(name: str, server: FakeLLMServer,
                                            records: list[llmshim.CallRecord]) -> None:
    fn, expect = SCENARIOS[name]
    without = fn(server)
    wire_without = _wire(server)
    assert records == []  # not installed: no hook fires
    server.reset()

    llmshim.install()
    try:
        with_shim = fn(server)
    finally:
        llmshim.uninstall()
    wire_with = _wire(server)

    assert with_shim == without
    assert wire_with == wire_without, "llmshim changed what went on the wire"
    assert [r.event for r in records] == ["call_started", "call_completed"]
    done = records[-1]
    assert (done.library, done.provider, done.operation, done.model, done.stream) == (
        expect.library, expect.provider, expect.operation, expect.model, expect.stream)
    if expect.input_tokens is None and expect.output_tokens is None and expect.operation in GENERATIONS:
        # an answer without usage (a stream that did not ask): llmshim's estimate, flagged as one
        assert done.estimator is not None and done.input_tokens and done.output_tokens
    else:
        assert done.estimator is None
        assert (done.input_tokens, done.output_tokens) == (expect.input_tokens, expect.output_tokens)
    assert done.status == 200 and done.outcome == "ok" and done.error_type is None
    assert done.duration is not None and done.duration > 0
    assert done.time_to_first_chunk is not None and 0 < done.time_to_first_chunk <= done.duration
    assert done.url.startswith(server.url)


def test_non_llm_traffic_is_untouched(server: FakeLLMServer, shim: None, records: list[llmshim.CallRecord]) -> None:
    assert requests.get(server.url + "/api/tags", timeout=5).json()["models"]
    assert httpx2.get(server.openai_base_url + "/models").status_code == 200
    requests.post(server.url + "/api/chat", data=b"not json", timeout=5)  # recognised path, unreadable body
    with _oai(server) as client:
        assert client.models.list().data[0].id == "gpt-fake"
    assert records == []


def test_gzip_bodies_are_read_alongside(server: FakeLLMServer, shim: None, records: list[llmshim.CallRecord]) -> None:
    server.compress = True
    with _oai(server) as client:
        result = client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert server.received[-1].header("accept-encoding")
    assert result.usage is not None
    assert (records[-1].input_tokens, records[-1].output_tokens) == (result.usage.prompt_tokens,
                                                                     result.usage.completion_tokens)
    response = requests.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=5)
    assert response.headers["content-encoding"] == "gzip"
    assert records[-1].output_tokens == response.json()["usage"]["completion_tokens"]
