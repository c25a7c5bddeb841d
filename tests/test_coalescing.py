"""Request coalescing never waits on itself, and never without bound (issue 12, item 1).

Identical requests in flight share one upstream call, but a follower only waits on a leader in
another thread or task, for at most ``LLMSHIM_CACHE_COALESCE_TIMEOUT``; landing wakes every
follower even when one of their event loops has closed; a fork child has no flights.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import httpx
import openai
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

import llmshim
from llmshim.policies.cache import CachePolicy
from llmshim.runtime import STATE
from llmshim.singleflight import Owner, may_wait
from llmshim.testing import FakeLLMServer

BODY = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
FAST = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": False}


@pytest.fixture
def cached(installed: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_CACHE", "on")  # in the environment: it outlives a test's own install()
    installed(cache_coalesce_timeout="0.5")


def _cache() -> CachePolicy:
    return next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))


@given(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 3),
       st.one_of(st.none(), st.integers(0, 3)))
def test_a_follower_never_waits_on_its_own_thread_or_task(lt: int, ltask: int | None, ft: int,
                                                          ftask: int | None) -> None:
    leader, follower = Owner(lt, ltask), Owner(ft, ftask)
    allowed = may_wait(leader, follower)
    if ftask is None and lt == ft:
        assert not allowed  # a blocked thread cannot read its own leader's body
    if ftask is not None and (lt, ltask) == (ft, ftask):
        assert not allowed
    if lt != ft:
        assert allowed


def test_the_same_stream_opened_twice_before_reading_either(server: FakeLLMServer, cached: None) -> None:
    url = server.openai_base_url + "/chat/completions"
    first = requests.post(url, json=BODY, stream=True, timeout=10)
    second = requests.post(url, json=BODY, stream=True, timeout=10)  # same thread, first unread
    assert second.text == first.text and "[DONE]" in first.text
    assert len(server.received) == 2 and _cache().flights.in_flight() == 0


def test_httpx_streams_interleaved_in_one_thread(server: FakeLLMServer, cached: None) -> None:
    url = server.openai_base_url + "/chat/completions"
    with httpx.Client(timeout=10) as client, client.stream("POST", url, json=BODY) as a, \
            client.stream("POST", url, json=BODY) as b:
        bodies: dict[str, bytes] = {"a": b"", "b": b""}
        streams = {"a": a.iter_bytes(), "b": b.iter_bytes()}
        while streams:  # one piece of each in turn, in this one thread
            for name in list(streams):
                piece = next(streams[name], None)
                if piece is None:
                    del streams[name]
                else:
                    bodies[name] += piece
    assert bodies["a"] == bodies["b"] and b"[DONE]" in bodies["a"]


def test_break_out_of_a_stream_then_ask_again(server: FakeLLMServer, cached: None) -> None:
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0, timeout=5)
    messages = BODY["messages"]
    for _chunk in client.chat.completions.create(model="m", messages=messages, stream=True):  # type: ignore[call-overload]
        break  # the OpenAI SDK idiom: stop early, the response stays open
    again = client.chat.completions.create(model="m", messages=messages, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == "Echo: one two three"


def test_a_stream_dropped_unread_in_another_thread_holds_a_follower_only_for_the_bound(
        server: FakeLLMServer, cached: None) -> None:
    url = server.openai_base_url + "/chat/completions"
    kept: list[requests.Response] = []
    opener = threading.Thread(target=lambda: kept.append(requests.post(url, json=BODY, stream=True, timeout=10)))
    opener.start()
    opener.join()  # that thread is gone; its response is neither read nor closed nor collected
    response = requests.post(url, json=BODY, timeout=10)  # follows, gives up after 0.5 s, goes itself
    assert "[DONE]" in response.text and len(server.received) == 2
    kept[0].close()


def test_a_follower_whose_loop_closed_does_not_keep_the_others_asleep(server: FakeLLMServer,
                                                                      cached: None) -> None:
    llmshim.install(cache="on", cache_coalesce_timeout="30")
    url = server.openai_base_url + "/chat/completions"
    leader = requests.post(url, json=BODY, stream=True, timeout=10)  # in flight, unread
    flights = _cache().flights

    async def follow(give_up: bool) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            call = client.post(url, json=BODY)
            if give_up:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(call, 0.05)  # cancelled while following; its loop then closes
                return ""
            return (await call).text

    def waiters() -> int:
        with flights._lock:
            return sum(len(f.waiters) for f in flights._flights.values())

    asyncio.run(follow(give_up=True))
    results: list[str] = []
    follower = threading.Thread(target=lambda: results.append(asyncio.run(follow(give_up=False))))
    follower.start()
    while waiters() == 0:
        threading.Event().wait(0.001)
    assert "[DONE]" in leader.text  # read to its end: stored and landed
    follower.join(timeout=20)
    assert results and results[0] == leader.text
    assert len(server.received) == 1  # the follower was answered from the leader's entry


FORK = r"""
import os, threading, requests, llmshim
from llmshim.testing import FakeLLMServer
from llmshim.policies.cache import CachePolicy
from llmshim.runtime import STATE

BODY = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
with FakeLLMServer() as server:
    url = server.openai_base_url + "/chat/completions"
    llmshim.install(cache="on", cache_coalesce_timeout="60", cache_path=os.environ["CACHE"])
    cache = next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))
    leader = requests.post(url, json=BODY, stream=True, timeout=10)   # a flight in progress
    assert cache.flights.in_flight() == 1
    pid = os.fork()
    if pid == 0:
        ok = cache.flights.in_flight() == 0
        ok = ok and "[DONE]" in requests.post(url, json=BODY, timeout=10).text
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    leader.close()
    llmshim.uninstall()
    print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_a_fork_child_has_no_flights(tmp_path: object) -> None:
    from conftest import run_python

    out = run_python(FORK, env={"CACHE": f"{tmp_path}/cache.sqlite3", "LLMSHIM_RETRY_MODE": "off",
                                "LLMSHIM_TELEMETRY": "false"}, timeout=60)
    assert "child exit 0" in out


def test_landing_wakes_every_follower_even_as_each_woken_one_leaves_the_list() -> None:
    """A woken follower removes its own entry at once (from its loop's thread); landing must not
    skip the next follower because the list shrank under it (seen: 1 of 4 followers slept for the
    whole coalescing timeout under load). Here each wake-up removes its entry synchronously."""
    from llmshim.singleflight import Flight

    flight = Flight(Owner(1, None))

    class Waiter:
        def __init__(self) -> None:
            self.result: object = "unset"

        def done(self) -> bool:
            return self.result != "unset"

        def set_result(self, value: object) -> None:
            self.result = value
            with contextlib.suppress(ValueError):  # the follower leaves, as await_landing's finally does
                flight.waiters.remove(entry_of[id(self)])

    class ImmediateLoop:
        def call_soon_threadsafe(self, fn: object, *args: object) -> None:
            fn(*args)  # type: ignore[operator]

    loop = ImmediateLoop()
    waiters = [Waiter() for _ in range(5)]
    entry_of = {id(w): (loop, w) for w in waiters}
    flight.waiters.extend(entry_of.values())  # type: ignore[arg-type]
    flight.land()
    assert [w.result for w in waiters] == [None] * 5
