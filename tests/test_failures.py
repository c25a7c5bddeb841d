"""Failures stay the caller's own: same exception types and messages, same statuses, streams not
buffered, early closes and resets reported exactly once, raising hooks never reaching the call."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import requests

import llmshim
from llmshim.testing import FakeLLMServer, Fault

MSG = [{"role": "user", "content": "one two three four five six"}]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    """(exception type, message) or ("ok", repr(result)) of one call."""
    try:
        return "ok", repr(fn())
    except Exception as exc:
        return type(exc).__qualname__, str(exc)


def _same_with_and_without(fn: Callable[[], Any], server: FakeLLMServer | None = None,
                           fault: Fault | None = None) -> tuple[str, str]:
    if server and fault:
        server.inject(fault)
    without = _outcome(fn)
    if server and fault:
        server.inject(fault)
    llmshim.install()
    try:
        with_shim = _outcome(fn)
    finally:
        llmshim.uninstall()
    assert with_shim == without
    return with_shim


def _openai_chat(base_url: str, **options: Any) -> Callable[[], Any]:
    def call() -> Any:
        with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, **options) as client:
            return client.chat.completions.create(model="gpt-4o", messages=MSG).model_dump()
    return call


def _requests_chat(base_url: str, **options: Any) -> Callable[[], Any]:
    def call() -> Any:
        response = requests.post(base_url + "/api/chat", json={"model": "m", "messages": MSG, "stream": False},
                                 **options)
        return response.status_code, response.text
    return call


def _aiohttp_completion(base_url: str, **options: Any) -> Callable[[], Any]:
    async def go() -> Any:
        async with aiohttp.ClientSession(**options) as session, session.post(
                base_url + "/completion", json={"prompt": "a b", "stream": True}) as response:
            return response.status, await response.read()
    return lambda: asyncio.run(go())


@pytest.mark.parametrize(("make", "wire_error"), [
    (_openai_chat, "ConnectError"), (_requests_chat, "ConnectionError"),
    (_aiohttp_completion, "ClientConnectorError")])
def test_connection_refused_is_unchanged(make: Callable[..., Callable[[], Any]], wire_error: str,
                                         records: list[llmshim.CallRecord]) -> None:
    kind, _ = _same_with_and_without(make(f"http://127.0.0.1:{_closed_port()}" + (
        "/v1" if make is _openai_chat else "")))
    assert kind != "ok"
    assert [r.event for r in records] == ["call_started", "call_failed"]
    assert records[-1].error_type == wire_error  # the exception raised on the wire, by class name
    assert records[-1].outcome == "error"


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_error_statuses_are_unchanged(server: FakeLLMServer, status: int,
                                      records: list[llmshim.CallRecord]) -> None:
    fault = Fault(status=status, headers={"retry-after-ms": "10"})
    kind, message = _same_with_and_without(_openai_chat(server.openai_base_url), server, fault)
    assert kind.endswith("Error") and str(status) in message
    raw = _same_with_and_without(_requests_chat(server.url), server, fault)
    assert raw[0] == "ok" and str(status) in raw[1]
    failed = [r for r in records if r.event == "call_failed"]
    assert [r.error_type for r in failed] == [str(status), str(status)]
    assert all(r.status == status for r in failed)


def test_read_timeouts_are_unchanged(server: FakeLLMServer) -> None:
    fault = Fault(delay=0.5)
    kind, _ = _same_with_and_without(_openai_chat(server.openai_base_url, timeout=0.1), server, fault)
    assert kind == "APITimeoutError"
    kind, _ = _same_with_and_without(_requests_chat(server.url, timeout=0.1), server, fault)
    assert kind == "ReadTimeout"
    timeout = aiohttp.ClientTimeout(total=0.1)
    kind, _ = _same_with_and_without(_aiohttp_completion(server.url, timeout=timeout), server, fault)
    assert kind in ("TimeoutError", "ServerTimeoutError", "ConnectionTimeoutError")


def test_reset_before_headers_is_unchanged(server: FakeLLMServer) -> None:
    fault = Fault(reset="before_headers")
    assert _same_with_and_without(_openai_chat(server.openai_base_url), server, fault)[0] == "APIConnectionError"
    assert _same_with_and_without(_requests_chat(server.url), server, fault)[0] == "ConnectionError"
    assert _same_with_and_without(_aiohttp_completion(server.url), server, fault)[0] != "ok"


def test_reset_mid_stream_is_raised_unchanged_and_reported_once(
        server: FakeLLMServer, records: list[llmshim.CallRecord]) -> None:
    def stream() -> Any:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
            seen = []
            for chunk in client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
                seen.append(chunk.choices[0].delta.content)
            return seen

    fault = Fault(reset="after_chunks", after_chunks=3)
    kind, _ = _same_with_and_without(stream, server, fault)
    assert kind in ("APIConnectionError", "ReadError", "RemoteProtocolError")  # openai 3.x wraps; 2.x does not
    assert [r.event for r in records] == ["call_started", "call_failed"]
    assert records[-1].outcome == "aborted"
    assert records[-1].time_to_first_chunk is not None


def test_stream_closed_early_is_failed_once(server: FakeLLMServer, shim: None,
                                            records: list[llmshim.CallRecord]) -> None:
    with httpx.Client() as client, client.stream(
            "POST", server.url + "/api/chat", json={"model": "m", "messages": MSG}) as response:
        first = next(response.iter_lines())
    assert '"done": false' in first
    assert [r.event for r in records] == ["call_started", "call_failed"]
    assert records[-1].outcome == "aborted" and records[-1].error_type == "aborted"


def test_response_dropped_unread_still_ends_the_call(server: FakeLLMServer, shim: None,
                                                     records: list[llmshim.CallRecord]) -> None:
    response = requests.post(server.url + "/completion", json={"prompt": "x", "stream": True}, stream=True,
                             timeout=5)
    assert response.status_code == 200
    assert [r.event for r in records] == ["call_started"]
    response.close()
    del response
    gc.collect()
    assert [r.event for r in records] == ["call_started", "call_failed"]


def test_slow_stream_chunks_arrive_unbuffered(server: FakeLLMServer) -> None:
    """Time to the first chunk of a slow stream is the same with and without llmshim: nothing waits
    for the stream to end before handing a chunk over."""
    server.chunk_delay = 0.15

    def first_and_total() -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        with requests.post(server.url + "/api/generate", json={"model": "m", "prompt": "a b c d e f"},
                           stream=True, timeout=10) as response:
            for _line in response.iter_lines():
                first = first or time.perf_counter() - start
        return first or 0.0, time.perf_counter() - start

    plain_first, plain_total = first_and_total()
    llmshim.install()
    try:
        shim_first, shim_total = first_and_total()
    finally:
        llmshim.uninstall()
    assert plain_total > 1.0 and shim_total > 1.0  # 8 pieces x 0.15 s: the stream really is slow
    assert shim_first < 0.4 * shim_total  # the first piece came long before the end
    assert abs(shim_first - plain_first) < 0.1


def test_a_raising_hook_is_logged_and_the_call_goes_on(
        server: FakeLLMServer, shim: None, caplog: pytest.LogCaptureFixture) -> None:
    def broken(record: llmshim.CallRecord) -> None:
        raise RuntimeError("hook bug")

    llmshim.on("call_started", broken)
    llmshim.on("call_completed", broken)
    try:
        with caplog.at_level(logging.ERROR, logger="llmshim"):
            response = requests.post(server.url + "/api/chat", json={"model": "m", "messages": MSG,
                                                                     "stream": False}, timeout=5)
        assert response.json()["done"] is True
    finally:
        llmshim.off("call_started", broken)
        llmshim.off("call_completed", broken)
    assert [r.message for r in caplog.records].count(
        f"llmshim: call_started hook {broken!r} raised; the call is not affected") == 1
    assert any("call_completed hook" in r.message and "hook bug" in (r.exc_text or "") for r in caplog.records)


def test_hook_records_carry_no_secrets(server: FakeLLMServer, shim: None,
                                       records: list[llmshim.CallRecord]) -> None:
    with openai.OpenAI(base_url=server.openai_base_url.replace("http://", "http://user:pw@"),
                       default_query={"key": "q"}, api_key="sk-very-secret", max_retries=0) as client:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert server.received[-1].path.endswith("?key=q")
    assert [r.event for r in records] == ["call_started", "call_completed"]
    assert records[-1].url == server.openai_base_url + "/chat/completions"
    for record in records:
        text = repr(record)
        assert "sk-very-secret" not in text and "pw@" not in text and "key=q" not in text


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_llmshim_keeps_no_response_alive(server: FakeLLMServer, shim: None,
                                        records: list[llmshim.CallRecord]) -> None:
    """Responses dropped unread are collected (and their calls end); finished ones leave nothing
    behind in llmshim's registry of watched responses."""
    import weakref

    from llmshim import tap as call_module

    body = {"model": "m", "messages": MSG}
    dropped = [requests.post(server.url + "/api/chat", json=body, stream=True, timeout=5)]
    client = httpx.Client()
    dropped.append(client.send(client.build_request("POST", server.url + "/api/chat", json=body), stream=True))
    refs = [weakref.ref(r) for r in dropped]
    del dropped
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert [r.outcome for r in records if r.event == "call_failed"] == ["aborted", "aborted"]
    client.close()
    for _ in range(3):
        requests.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=5).json()
    gc.collect()
    assert set() == call_module._WATCHED
