"""Concurrency slots and queue places are released on every path (issue 12, item 4).

With ``LLMSHIM_MAX_CONCURRENCY`` set, a slot is held from the grant until the body ends. Every way
a call can end early must give it back: a retried attempt, Ctrl-C while queued, an asyncio task
cancelled while queued or right after its grant. After each, an idle process holds zero slots and
zero waiters (``Limiter.held()``), and the next call goes through at once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable

import aiohttp
import httpx
import pytest
import requests

import llmshim
from llmshim.policies.limiter import Limiter
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer, Fault

BODY = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}


def _limiter() -> Limiter:
    return next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))


def _until(predicate: object) -> None:
    """Wait for a state change another thread makes, by polling the state itself (no fixed sleep)."""
    event = threading.Event()
    while not predicate():  # type: ignore[operator]
        event.wait(0.001)


@pytest.fixture
def one_slot(installed: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_MAX_CONCURRENCY", "1")  # in the environment: it outlives a test's own install()
    monkeypatch.setenv("LLMSHIM_QUEUE_TIMEOUT", "30")
    installed()


@pytest.mark.parametrize("client", ["requests", "httpx", "aiohttp"])
def test_a_retried_attempt_gives_its_slot_back(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch,
                                               client: str) -> None:
    monkeypatch.setenv("LLMSHIM_MAX_CONCURRENCY", "4")
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "llmshim")
    monkeypatch.setenv("LLMSHIM_RETRY_MAX_DELAY", "0.01")
    server.inject(Fault(status=500), times=2)
    url = server.openai_base_url + "/chat/completions"
    llmshim.install()
    try:
        if client == "requests":
            text = requests.post(url, json=BODY, timeout=10).text
        elif client == "httpx":
            text = httpx.post(url, json=BODY, timeout=10).text
        else:
            async def ask() -> str:
                async with aiohttp.ClientSession() as session, session.post(url, json=BODY) as response:
                    return await response.text()

            text = asyncio.run(ask())
        assert "[DONE]" in text and len(server.received) == 3
        assert _limiter().held() == (0, 0)
    finally:
        llmshim.uninstall()


def test_ctrl_c_while_queued_leaves_nothing_held(server: FakeLLMServer, one_slot: None) -> None:
    url = server.openai_base_url + "/chat/completions"
    holder = requests.post(url, json=BODY, stream=True, timeout=10)  # holds the only slot, unread
    limiter = _limiter()
    assert limiter.held() == (1, 0)
    armed = threading.Event()

    def ctrl_c(signum: int, frame: object) -> None:
        if armed.is_set():  # one KeyboardInterrupt per arming: none once the caller has left the queue
            armed.clear()
            raise KeyboardInterrupt

    def interrupt_while_queued() -> None:
        # A real SIGINT aimed at the main thread while its call waits in the queue; sent again if
        # the first one landed where Python swallows exceptions (a finalizer run by the GC).
        sent = 0
        while not left.is_set():
            if limiter.held()[1] == 1 and not armed.is_set():
                if sent and left.wait(1.0):  # give a delivered interrupt time to unwind the caller
                    return
                if limiter.held()[1] == 1:
                    armed.set()
                    sent += 1
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            left.wait(0.01)

    left = threading.Event()
    previous = signal.signal(signal.SIGINT, ctrl_c)
    interrupter = threading.Thread(target=interrupt_while_queued, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            requests.post(url, json=BODY, timeout=10)
    finally:
        left.set()
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    assert limiter.held() == (1, 0)  # left the queue
    holder.close()
    assert limiter.held() == (0, 0)
    assert "[DONE]" in requests.post(url, json=BODY, timeout=10).text
    assert limiter.held() == (0, 0)


async def test_a_task_cancelled_while_queued_or_right_after_its_grant_leaves_nothing_held(
        server: FakeLLMServer, one_slot: None) -> None:
    url = server.openai_base_url + "/chat/completions"
    limiter = _limiter()
    # The slot holder is a requests stream: closing it releases the slot synchronously, in this
    # thread, so the queued task below is granted before it can run again.
    holder = requests.post(url, json=BODY, stream=True, timeout=10)
    async with aiohttp.ClientSession() as session:
        queued = asyncio.create_task(session.post(url, json=BODY))
        while limiter.held()[1] == 0:
            await asyncio.sleep(0)
        queued.cancel()  # while queued
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert limiter.held() == (1, 0)

        granted = asyncio.create_task(session.post(url, json=BODY))
        while limiter.held()[1] == 0:
            await asyncio.sleep(0)
        holder.close()  # the slot passes to the queued task: granted, its wake-up not yet run ...
        assert limiter.held() == (1, 0)
        granted.cancel()  # ... and cancelled before it resumes (a TaskGroup sibling failing, say)
        with pytest.raises(asyncio.CancelledError):
            await granted
        assert limiter.held() == (0, 0)
        async with session.post(url, json=BODY) as response:
            assert "[DONE]" in await response.text()
    assert limiter.held() == (0, 0)


FORK_CHILD = r"""
import os, sys, threading, requests, llmshim
from llmshim.testing import FakeLLMServer
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE

BODY = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
with FakeLLMServer() as server:
    url = server.openai_base_url + "/chat/completions"
    llmshim.install()
    limiter = next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))
    holder = requests.post(url, json=BODY, stream=True, timeout=10)   # the only slot, in flight
    queued = threading.Thread(target=lambda: requests.post(url, json=BODY, timeout=30).text)
    queued.start()                                                    # a waiter, a timer pending
    while limiter.held() != (1, 1):
        threading.Event().wait(0.001)
    pid = os.fork()
    if pid == 0:
        try:
            assert limiter.held() == (0, 0), limiter.held()
            response = requests.post(url, json=dict(BODY, stream=False), timeout=30)
            os._exit(0 if response.status_code == 200 and limiter.held() == (0, 0) else 3)
        except BaseException as exc:
            print("child failed:", repr(exc), flush=True)
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    holder.close()
    queued.join()
    llmshim.uninstall()
    print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_a_fork_child_starts_with_nothing_held_or_pending() -> None:
    from conftest import run_python

    env = {"LLMSHIM_MAX_CONCURRENCY": "1", "LLMSHIM_RPM": "60000", "LLMSHIM_QUEUE_TIMEOUT": "20",
           "LLMSHIM_CACHE": "off", "LLMSHIM_RETRY_MODE": "off"}
    assert "child exit 0" in run_python(FORK_CHILD, env=env, timeout=60)
