"""LiteLLM under llmshim: every way LiteLLM calls a model is seen once, cached, and unchanged.

LiteLLM calls OpenAI-compatible servers through the OpenAI SDK on an httpx client of its own, Ollama
through its own httpx client, and makes its async calls (``acompletion``) through an httpx
transport that sends with aiohttp (``LiteLLMAiohttpTransport``). That last one was never cached:
to the httpx seam an unknown transport is a possible test double, so each ``acompletion`` went
upstream. Now the httpx seam passes such a request to aiohttp, whose seam takes the call (and can
verify what answers it). Each test asks the bundled server through LiteLLM with and without
llmshim: the answers are the same, the second identical call is a hit served without the server,
and each call is reported once (one record, one span).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim
from llmshim.testing import FakeLLMServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM fetches prices at import otherwise
litellm = pytest.importorskip("litellm", reason="litellm is in the test extra")
#: LiteLLM's own warnings about itself, not about llmshim (the suite turns warnings into errors).
pytestmark = pytest.mark.filterwarnings("ignore:.* the `ReadOnly` qualifier:UserWarning")


def _ask(server: FakeLLMServer, how: str, prompt: str) -> str:
    """One LiteLLM call, its answer's text read to the end."""
    messages = [{"role": "user", "content": prompt}]
    openai = {"model": "openai/gpt-4o-mini", "api_base": server.openai_base_url, "api_key": "sk-test",
              "messages": messages, "temperature": 0}
    if how == "completion":
        return str(litellm.completion(**openai).choices[0].message.content)
    if how == "stream":
        return "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**openai, stream=True))
    if how == "ollama_chat":
        ollama = {"model": "ollama_chat/llama3.2", "api_base": server.url, "messages": messages, "temperature": 0}
        return str(litellm.completion(**ollama).choices[0].message.content)

    async def ask_async() -> str:
        if how == "acompletion":
            return str((await litellm.acompletion(**openai)).choices[0].message.content)
        chunks = await litellm.acompletion(**openai, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks])

    return RUNNER[0].run(ask_async())


#: One event loop for the module's async calls, as a program has: LiteLLM keeps its aiohttp
#: sessions per loop, and a loop per call leaves each one's connections unclosed (without llmshim
#: too). Closed, with LiteLLM's clients, when the module ends.
RUNNER: list[asyncio.Runner] = []


@pytest.fixture(autouse=True, scope="module")
def _one_loop() -> Iterator[None]:
    from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

    with asyncio.Runner() as runner:
        RUNNER.append(runner)
        try:
            yield
        finally:
            runner.run(close_litellm_async_clients())
            RUNNER.clear()
            for client in list(litellm.in_memory_llm_clients_cache.cache_dict.values()):  # its sync clients
                close = getattr(client, "close", None)
                if callable(close) and not asyncio.iscoroutinefunction(close):
                    close()


HOWS = ("completion", "stream", "acompletion", "astream", "ollama_chat")
#: The library whose seam sees each kind of call.
SEAM = {"completion": "httpx", "stream": "httpx", "acompletion": "aiohttp", "astream": "aiohttp",
        "ollama_chat": "httpx"}


def _llm_requests(server: FakeLLMServer, prompt: str) -> int:
    """The requests that reached the server asking ``prompt`` (escaped or not in their JSON)."""
    return sum(1 for request in server.received
               if request.body and prompt in json.dumps(request.json(), ensure_ascii=False))


@pytest.fixture
def cached(installed: Callable[..., object], tmp_path: Path) -> Iterator[list[llmshim.CallRecord]]:
    seen: list[llmshim.CallRecord] = []
    llmshim.on("call_completed", seen.append)
    try:
        installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
        yield seen
    finally:
        llmshim.off("call_completed", seen.append)


@pytest.mark.parametrize("how", HOWS)
def test_a_litellm_call_is_cached_and_answers_as_without_llmshim(
        how: str, server: FakeLLMServer, cached: list[llmshim.CallRecord]) -> None:
    prompt = f"{how}: héllo 世界 مرحبا"
    first, second = _ask(server, how, prompt), _ask(server, how, prompt)
    assert _llm_requests(server, prompt) == 1  # the second was served by the cache
    assert [(r.library, r.cache_hit) for r in cached] == [(SEAM[how], False), (SEAM[how], True)]
    llmshim.uninstall()
    assert first == second == _ask(server, how, prompt)  # and llmshim changed nothing in the answer


def test_an_async_call_is_a_hit_for_the_same_sync_call(server: FakeLLMServer,
                                                       cached: list[llmshim.CallRecord]) -> None:
    """completion and acompletion send the same request through different libraries: one entry."""
    assert _ask(server, "completion", "shared") == _ask(server, "acompletion", "shared")
    assert _llm_requests(server, "shared") == 1 and [r.cache_hit for r in cached] == [False, True]


def test_without_the_aiohttp_seam_an_async_call_stays_the_httpx_seams(
        server: FakeLLMServer, installed: Callable[..., object], tmp_path: Path) -> None:
    """LLMSHIM_LIBRARIES without aiohttp: the httpx seam keeps the call (reported, not lost), and
    as it cannot see what answers behind that transport it does not cache it."""
    seen: list[llmshim.CallRecord] = []
    llmshim.on("call_completed", seen.append)
    try:
        installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"), libraries="httpx,httpx2,requests")
        for _ in range(2):
            _ask(server, "acompletion", "no aiohttp")
    finally:
        llmshim.off("call_completed", seen.append)
    assert [(r.library, r.cache_hit) for r in seen] == [("httpx", None)] * 2
    assert _llm_requests(server, "no aiohttp") == 2


def test_a_mounted_transport_for_the_url_decides(server: FakeLLMServer, cached: list[llmshim.CallRecord]) -> None:
    """A client whose default transport is LiteLLM's but whose mount for this URL is httpx's own:
    the request goes through httpx's transport, so the httpx seam takes it."""
    import httpx
    from litellm.llms.custom_httpx.aiohttp_transport import LiteLLMAiohttpTransport

    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mounted"}], "temperature": 0}

    async def ask() -> Any:
        transport = LiteLLMAiohttpTransport(client=lambda: __import__("aiohttp").ClientSession())
        async with httpx.AsyncClient(transport=transport, mounts={server.url: httpx.AsyncHTTPTransport()}) as client:
            reply = await client.post(server.openai_base_url + "/chat/completions", json=body,
                                      headers={"Authorization": "Bearer sk-test"})
            return reply.json()["choices"][0]["message"]["content"]

    assert RUNNER[0].run(ask()) == RUNNER[0].run(ask())
    assert [(r.library, r.cache_hit) for r in cached] == [("httpx", False), ("httpx", True)]


def test_each_litellm_call_is_one_span(server: FakeLLMServer, installed: Callable[..., object]) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    installed(tracer_provider=provider, cache="off")
    for how in HOWS:
        _ask(server, how, f"span {how}")
    spans = [s for s in exporter.get_finished_spans() if s.instrumentation_scope.name == "llmshim"]
    assert len(spans) == len(HOWS)
    assert all(span.attributes and span.attributes.get("llmshim.outcome") == "ok" for span in spans)
