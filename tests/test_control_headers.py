"""``x-llmshim-*`` control headers never reach the upstream while llmshim is installed (issue 11,
item 10): not for LLM calls, not for other traffic (GET, unknown routes, bodies llmshim cannot
read), whether the cache is on or off, in any spelling of the name. Every library is driven over a
real socket to the bundled server, which records the headers it received."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import httpx2
import openai
import pytest
import requests

from llmshim.testing import FakeLLMServer

CONTROLS = {"X-LLMSHIM-Cache": "no-store", "x-llmshim-priority": "high", "X-Llmshim-Whatever": "1"}
KEPT = {"x-kept": "yes"}
CHAT = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}

#: (method, path, body kind) — an LLM call, and traffic llmshim does not handle.
SHAPES = {
    "llm-call": ("POST", "/v1/chat/completions", "json"),
    "get": ("GET", "/v1/models", None),
    "unknown-route": ("POST", "/v1/not-an-llm-route", "json"),
    "llm-route-streamed-body": ("POST", "/v1/chat/completions", "stream"),
    "llm-route-not-json": ("POST", "/v1/chat/completions", "text"),
}


def _body_bytes() -> bytes:
    return json.dumps(CHAT).encode()


def _requests(server: FakeLLMServer, method: str, path: str, kind: str | None) -> None:
    headers = {**CONTROLS, **KEPT, "content-type": "application/json"}
    data: Any = None
    if kind == "json":
        data = _body_bytes()
    elif kind == "stream":
        data = io.BytesIO(_body_bytes())  # a file: llmshim does not read it
    elif kind == "text":
        data = "not json"
    requests.request(method, server.url + path, data=data, headers=headers, timeout=10).close()


def _httpx_like(module: Any) -> Callable[[FakeLLMServer, str, str, str | None], None]:
    def send(server: FakeLLMServer, method: str, path: str, kind: str | None) -> None:
        headers = {**CONTROLS, **KEPT, "content-type": "application/json"}
        content: Any = None
        if kind == "json":
            content = _body_bytes()
        elif kind == "stream":  # an iterator (with a length, as the test server reads no chunked body)
            content = iter([_body_bytes()])
            headers["content-length"] = str(len(_body_bytes()))
        elif kind == "text":
            content = b"not json"
        with module.Client() as client:
            client.request(method, server.url + path, content=content, headers=headers).read()

    return send


def _httpx_async(server: FakeLLMServer, method: str, path: str, kind: str | None) -> None:
    async def gen() -> Any:
        yield _body_bytes()

    async def go() -> None:
        headers = {**CONTROLS, **KEPT, "content-type": "application/json"}
        content: Any = None if kind is None else (
            _body_bytes() if kind == "json" else gen() if kind == "stream" else b"not json")
        if kind == "stream":
            headers["content-length"] = str(len(_body_bytes()))
        async with httpx.AsyncClient() as client:
            await (await client.request(method, server.url + path, content=content, headers=headers)).aread()

    asyncio.run(go())


def _aiohttp(server: FakeLLMServer, method: str, path: str, kind: str | None) -> None:
    async def go() -> None:
        headers = {**CONTROLS, **KEPT, "content-type": "application/json"}
        data: Any = None if kind is None else (
            _body_bytes() if kind == "json" else io.BytesIO(_body_bytes()) if kind == "stream" else "not json")
        async with aiohttp.ClientSession() as session, \
                session.request(method, server.url + path, data=data, headers=headers) as response:
            await response.read()

    asyncio.run(go())


LIBRARIES: dict[str, Callable[[FakeLLMServer, str, str, str | None], None]] = {
    "requests": _requests,
    "httpx": _httpx_like(httpx),
    "httpx2": _httpx_like(httpx2),
    "httpx-async": _httpx_async,
    "aiohttp": _aiohttp,
}


@pytest.fixture(params=["cache-off", "cache-on"])
def in_each_cache_mode(request: pytest.FixtureRequest, installed: Callable[..., object], tmp_path: Path) -> None:
    if request.param == "cache-on":
        installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    else:
        installed()


def _assert_clean(server: FakeLLMServer) -> None:
    assert server.received, "the request never reached the server"
    for received in server.received:
        sent = [name for name, _ in received.headers if name.lower().startswith("x-llmshim-")]
        assert sent == [], f"{received.method} {received.path} carried {sent}"
        assert received.header("x-kept") == "yes", "another header was lost"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_control_headers_never_reach_the_upstream(library: str, shape: str, server: FakeLLMServer,
                                                  in_each_cache_mode: None) -> None:
    method, path, kind = SHAPES[shape]
    LIBRARIES[library](server, method, path, kind)
    _assert_clean(server)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_extra_headers_never_reach_the_upstream(stream: bool, server: FakeLLMServer,
                                                           in_each_cache_mode: None) -> None:
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)
    result = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}],
                                            stream=stream, extra_headers={**CONTROLS, **KEPT})
    if stream:
        list(result)  # type: ignore[call-overload]
    client.models.list(extra_headers={**CONTROLS, **KEPT})
    assert len(server.received) == 2
    _assert_clean(server)


def test_uninstalled_llmshim_touches_no_header(server: FakeLLMServer) -> None:
    """Not installed means not there: the headers go out as the caller set them."""
    _requests(server, "GET", "/v1/models", None)
    assert server.received[0].header("x-llmshim-priority") == "high"
