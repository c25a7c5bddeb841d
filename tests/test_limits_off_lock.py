"""The shared rate-limit store is never asked under the limiter's lock nor on a caller's thread
(issue 12 item 6, issue 13 item 2).

A take from the shared budget is a SQLite write transaction (up to the 2 s busy timeout while
another process holds the file's lock) or a Redis round trip. Asked under the limiter's lock on
the caller's thread, as before, it froze an event loop for seconds. Now every store operation of
every limiter runs on one store thread, one at a time. The first attempt at this (4458bd6,
reverted in 802581c) let several threads open connections to a fresh limits file at once: SQLite's
switch to WAL answers "database is locked" at once in that race, without the busy timeout, and the
churn test logged fail-opens. These tests pin each part: the loop keeps ticking while the file is
locked, the lock stays free while a take hangs, store calls never overlap or nest (not even when a
finalizer ends a call in the middle of a take), a waiter that left meanwhile gets its permit
returned, and limiters opening a fresh file together never see "database is locked".
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from loop_lag_probe import LoopLag
from test_loop_lag import LOCKER, _body

import llmshim
from llmshim.policies import shared_budget
from llmshim.policies.limiter import Limiter
from llmshim.policies.scheduler import Waiter
from llmshim.policies.stats import STATS
from llmshim.store.limits_sqlite import SQLiteLimitStore
from llmshim.testing import FakeLLMServer
from llmshim.values import Limits


async def test_a_shared_rate_limit_store_never_freezes_the_loop(server: FakeLLMServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """While another process holds the limits file's lock for 5 s, each take waits the busy
    timeout and fails open to the local budget, on the store thread: the loop keeps ticking and
    every call is answered."""
    limits = tmp_path / "limits.sqlite3"
    monkeypatch.setenv("LLMSHIM_RATELIMIT_STORE", f"sqlite:///{limits}")
    monkeypatch.setenv("LLMSHIM_RPM", "100000")
    url = server.openai_base_url + "/chat/completions"
    llmshim.install()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(url, json=_body("warm up"))  # the limits file and its table exist
            locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(limits)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert locker.stdout is not None
            assert locker.stdout.readline().strip() == "locked"
            lag = LoopLag()
            lag.start()
            errors = STATS.snapshot()["store_errors"]
            try:
                answers = await asyncio.gather(*(client.post(url, json=_body(f"limited {i}")) for i in range(3)))
                await asyncio.sleep(5.0)  # keep the lock (and keep measuring) for 5 s in all
            finally:
                await lag.stop()
                locker.communicate("\n", timeout=10)
            assert STATS.snapshot()["store_errors"] > errors  # the store really was locked: it failed open
            expected = [f"Echo: limited {i}" for i in range(3)]
            assert [a.json()["choices"][0]["message"]["content"] for a in answers] == expected
            print(f"largest loop lag while the limits file was locked for 5 s: {lag.largest * 1000:.1f} ms")
            assert lag.largest < 1.0  # one take on the loop would freeze it for the 2 s busy timeout
            answer = await client.post(url, json=_body("after"))  # the store works again
            assert answer.status_code == 200
    finally:
        llmshim.uninstall()


class GatedStore:
    """A shared store whose takes wait for ``gate`` and record where and how they ran."""

    def __init__(self, answer: float = 0.0) -> None:
        self.answer = answer
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: set[int] = set()
        self.inside = 0
        self.most_inside = 0
        self.given_back: list[tuple[str, str, float]] = []
        self.during_take: Any = None  # called inside a take, as a finalizer could be

    def try_take(self, name: str, now: float, dims: list[tuple[str, float, float, float]], level: str) -> float:
        self.threads.add(threading.get_ident())
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            self.entered.set()
            assert self.gate.wait(30)
            if self.during_take is not None:
                hook, self.during_take = self.during_take, None
                hook()
            return self.answer
        finally:
            self.inside -= 1

    def give_back(self, name: str, dim: str, seconds: float) -> None:
        self.given_back.append((name, dim, seconds))

    def block_for(self, name: str, seconds: float) -> None:
        pass


def _limiter(store: Any) -> tuple[Limiter, shared_budget.StoreThread]:
    thread = shared_budget.StoreThread()  # a store thread of the test's own
    return Limiter(burst=1.0, shared=store, store_thread=thread), thread


def test_a_hanging_take_holds_neither_the_lock_nor_the_caller() -> None:
    store = GatedStore()
    limiter, thread = _limiter(store)
    key = limiter.key("k", Limits(rpm=60))
    first = Waiter("normal", 1, 0, 0.0, event=threading.Event())
    limiter.enqueue(key, first)  # returns at once: the take runs on the store thread
    assert store.entered.wait(10)
    assert limiter._lock.acquire(blocking=False)  # the lock is free while the store hangs
    limiter._lock.release()
    second = Waiter("high", 1, 0, 0.0, event=threading.Event())
    limiter.enqueue(key, second)  # queues without waiting either
    assert limiter.held() == (0, 2) and not first.granted
    store.gate.set()
    assert first.event is not None and first.event.wait(10)
    assert second.event is not None and second.event.wait(10)
    assert thread.idle(10)
    assert store.threads == {thread._thread.ident if thread._thread else -1}  # one thread, not the caller's
    assert threading.get_ident() not in store.threads and store.most_inside == 1


def test_a_call_ending_inside_a_take_only_queues_its_release() -> None:
    """The garbage collector may end a dropped call on the store thread in the middle of a take:
    its release and give-back are queued, never run inside the transaction."""
    store = GatedStore()
    limiter, thread = _limiter(store)
    key = limiter.key("k", Limits(rpm=60, tpm=6000))
    waiter = Waiter("normal", 1, 10, 0.0, event=threading.Event())

    def finalizer() -> None:
        limiter.release(key, None)
        limiter.give_back(key, 5.0)
        limiter.enqueue(key, Waiter("low", 1, 10, 0.0, event=threading.Event()))

    store.during_take = finalizer
    store.gate.set()
    limiter.enqueue(key, waiter)
    assert waiter.event is not None and waiter.event.wait(10)
    assert thread.idle(10)
    assert store.most_inside == 1  # nothing nested in a take
    assert limiter.held() == (0, 0)  # the low waiter was granted by the queued pass
    assert [(dim, round(seconds, 6)) for _, dim, seconds in store.given_back] == [("t", 0.05)]


def test_a_waiter_that_leaves_while_the_store_is_asked_gets_its_permit_returned() -> None:
    store = GatedStore(answer=0.0)
    limiter, thread = _limiter(store)
    key = limiter.key("k", Limits(rpm=60))
    waiter = Waiter("normal", 1, 0, 0.0, event=threading.Event())
    limiter.enqueue(key, waiter)
    assert store.entered.wait(10)
    assert limiter.withdraw(key, waiter) is True  # the caller gave up while the store was asked
    store.gate.set()
    assert thread.idle(10)
    assert not waiter.granted and limiter.held() == (0, 0)
    assert store.given_back == [("k", "r", 1.0)]  # one request at 1/s: one second of the budget back


def test_limiters_opening_a_fresh_limits_file_together_never_see_it_locked(tmp_path: Path) -> None:
    """Four limiters (four pipelines of one process, as install churn makes) and four threads take
    from a fresh limits file at the same instant, 40 times. Each store opens its own connection;
    on the store thread they open one after another, so SQLite's switch to WAL never races."""
    errors = STATS.snapshot()["store_errors"]
    for trial in range(40):
        path = str(tmp_path / f"limits{trial}.sqlite3")
        limiters = [Limiter(burst=1.0, shared=SQLiteLimitStore(path)) for _ in range(4)]
        waiters = [Waiter("normal", 1, 0, 0.0, event=threading.Event()) for _ in limiters]
        start = threading.Barrier(len(limiters))

        def take(limiter: Limiter, waiter: Waiter, start: threading.Barrier = start) -> None:
            key = limiter.key("k", Limits(rpm=6000))
            start.wait()
            limiter.enqueue(key, waiter)

        threads = [threading.Thread(target=take, args=pair) for pair in zip(limiters, waiters, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(w.event is not None and w.event.wait(10) for w in waiters)
        for limiter in limiters:
            limiter.close()
    assert shared_budget.STORE_THREAD.idle(30)
    assert STATS.snapshot()["store_errors"] == errors


def test_the_store_thread_starts_afresh_after_fork() -> None:
    thread = shared_budget.StoreThread()
    thread.submit(lambda: None)
    assert thread.idle(10)
    thread._after_fork_in_child()
    assert thread._thread is None and not thread._pumps and not thread._writes
    ran = threading.Event()
    thread.submit(ran.set)
    assert ran.wait(10) and thread.idle(10)
