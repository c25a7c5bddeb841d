"""Retries: the pure decision table, the budget, and one retry layer against the bundled server's
fault injection (the server counts every attempt that reaches it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
import requests

import llmshim
from llmshim.policies.retry import RetryBudget, decide, server_delay
from llmshim.testing import FakeLLMServer, Fault

BODY = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "stream": False}


def _decide(**kwargs: Any) -> Any:
    defaults: dict[str, Any] = {"attempt": 1, "max_attempts": 3, "max_delay": 8.0}
    return decide(**{**defaults, **kwargs})


@pytest.mark.parametrize(("status", "retry"), [
    (200, False), (400, False), (401, False), (403, False), (404, False), (422, False),
    (408, True), (409, True), (429, True), (500, True), (502, True), (503, True), (504, True), (418, False)])
def test_which_statuses_are_retried(status: int, retry: bool) -> None:
    assert _decide(status=status).retry is retry


def test_server_signals_and_limits() -> None:
    assert not _decide(status=500, headers={"x-should-retry": "false"}).retry
    assert _decide(status=418, headers={"x-should-retry": "true"}).retry
    assert not _decide(status=429, body_error="insufficient_quota").retry
    assert not _decide(status=500, attempt=3).retry
    assert _decide(transport_error=True).retry
    assert not _decide(transport_error=True, sdk_attempt=True).retry  # the SDK's own loop retries
    assert _decide(transport_error=True, sdk_attempt=True, mode="llmshim").retry
    assert not _decide(status=500, mode="sdk").retry and not _decide(status=500, mode="off").retry


def test_full_jitter_with_the_server_delay_as_a_floor() -> None:
    assert _decide(status=500, rand=0.0).delay == 0.0
    assert _decide(status=500, attempt=2, rand=0.999).delay == pytest.approx(0.999)
    assert _decide(status=500, attempt=10, max_attempts=20, rand=0.999, max_delay=8).delay == pytest.approx(7.992)
    assert _decide(status=429, rand=0.0, headers={"retry-after-ms": "1500"}).delay == 1.5
    assert _decide(status=429, rand=0.0, headers={"retry-after": "5"}, max_delay=5).delay == 5.0
    # Above the cap the 429 goes back to the caller at once (issue 12: no hang on an absurd delay).
    assert not _decide(status=429, rand=0.0, headers={"retry-after": "30"}, max_delay=5).retry


def test_server_delay_forms() -> None:
    assert server_delay({"retry-after-ms": "250"}) == 0.25
    assert server_delay({"retry-after": "2"}) == 2.0
    assert server_delay({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert server_delay({"retry-after": "soon"}) is None and server_delay({}) is None


def test_budget_allows_a_floor_then_a_tenth_of_requests() -> None:
    budget = RetryBudget()
    assert [budget.withdraw("h", 0.0) for _ in range(11)] == [True] * 10 + [False]
    for _ in range(20):
        budget.deposit("h")
    assert [budget.withdraw("h", 1.0) for _ in range(3)] == [True, True, False]
    assert budget.withdraw("h", 61.0)  # the floor renews each minute


@pytest.fixture
def retrying(installed: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "auto")  # in the environment: it outlives a test's own install()
    monkeypatch.setenv("LLMSHIM_RETRY_MAX_DELAY", "0.05")
    installed()


def test_the_sdk_retry_loop_is_not_multiplied(server: FakeLLMServer, retrying: None) -> None:
    server.inject(Fault(status=500), times=None)
    with pytest.raises(openai.InternalServerError), openai.OpenAI(
            base_url=server.openai_base_url, api_key="k", max_retries=2) as client:
        client.chat.completions.create(model="gpt-4o", messages=BODY["messages"])
    assert len(server.received) == 3  # the SDK's 3 attempts, not 3 x 3
    assert [r.header("x-stainless-retry-count") for r in server.received] == ["0", "1", "2"]


def test_raw_requests_get_exactly_max_attempts(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_RETRY_MAX_DELAY", "0.01")
    server.inject(Fault(status=503), times=None)
    llmshim.install(retry_mode="auto", retry_max_attempts="4")
    try:
        response = requests.post(server.url + "/api/chat", json=BODY, timeout=5)
        stats = llmshim.stats()
    finally:
        llmshim.uninstall()
    assert response.status_code == 503  # the last attempt's answer reaches the caller as it was
    assert len(server.received) == 4 and stats["retries"] == 3


def test_429_retry_after_is_honoured(server: FakeLLMServer, retrying: None) -> None:
    llmshim.install(retry_max_delay="1")  # a server delay is honoured up to the cap (above it: handed back)
    server.inject(Fault(status=429, headers={"retry-after-ms": "400"}))
    response = requests.post(server.url + "/api/chat", json=BODY, timeout=5)
    assert response.status_code == 200 and len(server.received) == 2
    assert server.received[1].at - server.received[0].at >= 0.4


def test_reset_before_headers_is_retried_transparently(server: FakeLLMServer, retrying: None) -> None:
    server.inject(Fault(reset="before_headers"))
    assert requests.post(server.url + "/api/chat", json=BODY, timeout=5).json()["done"] is True
    assert len(server.received) == 2


def test_reset_after_the_first_chunk_is_raised_not_retried(server: FakeLLMServer, retrying: None) -> None:
    server.inject(Fault(reset="after_chunks", after_chunks=1))
    lines = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError), requests.post(
            server.url + "/api/chat", json={**BODY, "stream": True}, stream=True, timeout=5) as response:
        for line in response.iter_lines():
            lines.append(line)
    assert len(lines) == 1 and len(server.received) == 1  # no duplicated chunks, no second attempt


@pytest.mark.parametrize("fault", [
    Fault(status=400), Fault(status=401), Fault(status=404), Fault(status=500, headers={"x-should-retry": "false"}),
    Fault(status=429, body={"error": {"message": "You exceeded your quota", "type": "insufficient_quota",
                                      "code": "insufficient_quota"}})])
def test_never_retried(server: FakeLLMServer, retrying: None, fault: Fault) -> None:
    server.inject(fault, times=None)
    response = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=5)
    assert response.status_code == fault.status and len(server.received) == 1


def test_async_aiohttp_is_retried_with_a_span_count(server: FakeLLMServer, retrying: None) -> None:
    server.inject(Fault(status=503), times=2)

    async def go() -> Any:
        async with aiohttp.ClientSession() as session, session.post(
                server.url + "/completion", json={"prompt": "x y"}) as response:
            return response.status, await response.json()

    status, body = asyncio.run(go())
    assert status == 200 and body["stop"] is True
    assert len(server.received) == 3 and llmshim.stats()["retries"] >= 2
