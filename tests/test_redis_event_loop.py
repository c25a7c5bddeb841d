"""A slow Redis delays the task that reads it, never the event loop's other tasks.

The Redis server here is a real one, frozen with SIGSTOP while a task looks an answer up (its
socket stays open, the read waits), then let go with SIGCONT. A lookup made on the loop's own
thread would hold the loop until the read returned or timed out; on llmshim's reader threads the
loop runs on, and the read, once Redis answers, is still a hit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_redis import redis

import llmshim
from conftest import run_python
from llmshim.policies.cache import CachePolicy
from llmshim.runtime import STATE
from llmshim.store.background import Writes
from llmshim.store.redis_client import Guarded
from llmshim.testing import FakeLLMServer

pytestmark = pytest.mark.timeout(60)

BODY = {"model": "m", "messages": [{"role": "user", "content": "Слоўнік · 辞書 · ضوء"}], "temperature": 0}


class WatchedReads:
    """Marks when the first Redis operation of the watched call starts and ends (on whichever
    thread): every operation of the Redis stores goes through ``Guarded.run``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.ended = threading.Event(), threading.Event()
        self.watching = False
        self.threads: set[int] = set()  # where the watched operations ran
        original = Guarded.run

        def run(guarded: Guarded, op: Any) -> Any:
            if self.watching:
                self.threads.add(threading.get_ident())
            if not self.watching or self.started.is_set():
                return original(guarded, op)
            self.started.set()
            try:
                return original(guarded, op)
            finally:
                self.ended.set()

        monkeypatch.setattr(Guarded, "run", run)


@pytest.fixture
def frozen(redis_server: Any) -> Iterator[Any]:
    """``frozen.freeze()`` stops the redis-server process; it is always let go again."""
    class Freezer:
        def freeze(self) -> None:
            os.kill(redis_server.proc.pid, signal.SIGSTOP)

        def thaw(self) -> None:
            os.kill(redis_server.proc.pid, signal.SIGCONT)

    freezer = Freezer()
    try:
        yield freezer
    finally:
        freezer.thaw()


def _install(redis_url: str, tmp_path: Path, front: str, tiered: bool) -> CachePolicy:
    llmshim.install(cache="on", cache_url=redis_url, cache_local=tiered, cache_path=str(tmp_path / front),
                    redis_timeout="20s")
    return next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))


def _store_once(server: FakeLLMServer, redis_url: str, tmp_path: Path, tiered: bool) -> None:
    """The answer in Redis, and (tiered) the next install with an empty local front: its lookup asks Redis."""
    cache = _install(redis_url, tmp_path, "first.sqlite3", tiered)
    try:
        first = httpx.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=10)
        assert first.status_code == 200 and "x-llmshim-cache" not in first.headers  # a miss
        assert cache.writes.idle(10)
    finally:
        llmshim.uninstall()


def _warm(server: FakeLLMServer, cache: CachePolicy) -> None:
    """Another question first: the store's salt is known, so the watched call's first Redis
    operation is its lookup."""
    other = {**BODY, "messages": [{"role": "user", "content": "warm-up"}]}
    assert httpx.post(server.openai_base_url + "/chat/completions", json=other, timeout=10).status_code == 200
    assert cache.writes.idle(10)


@pytest.mark.parametrize(("tiered", "first_operation"), [(False, "lookup"), (True, "lookup"), (False, "salt")],
                         ids=["redis", "tiered", "redis-salt"])
def test_while_redis_is_frozen_the_loop_runs_and_the_read_is_a_hit_once_it_answers(
        server: FakeLLMServer, redis_server: Any, frozen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        tiered: bool, first_operation: str) -> None:
    _store_once(server, redis_server.url, tmp_path, tiered)
    reads = WatchedReads(monkeypatch)
    cache = _install(redis_server.url, tmp_path, "second.sqlite3", tiered)
    try:
        if first_operation == "lookup":
            _warm(server, cache)

        async def main() -> tuple[bool, str]:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                reads.watching = True
                frozen.freeze()
                call = asyncio.create_task(client.post("/chat/completions", json=BODY))
                # Wait for the read on a thread of our own: a frozen loop would not even get here.
                assert await asyncio.get_running_loop().run_in_executor(None, reads.started.wait, 20)
                loop_ran_during_the_read = not reads.ended.is_set()
                frozen.thaw()
                return loop_ran_during_the_read, (await call).headers.get("x-llmshim-cache", "miss")

        loop_ran, answer = asyncio.run(main())
        assert loop_ran, "the event loop was held while Redis was read"
        assert answer == "hit"
        assert threading.get_ident() not in reads.threads  # asyncio.run's loop ran on this thread
    finally:
        llmshim.uninstall()


def test_a_redis_frozen_at_the_first_call_costs_that_call_its_cache_not_the_loop(
        server: FakeLLMServer, redis_server: Any, frozen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The salt cannot be read (Redis answers nothing within the timeout): the call goes upstream
    without the cache, and no Redis operation is tried again on the loop's thread."""
    reads = WatchedReads(monkeypatch)
    llmshim.install(cache="on", cache_url=redis_server.url, cache_path=str(tmp_path / "c.sqlite3"),
                    redis_timeout="200ms")
    try:
        async def main() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                reads.watching = True
                frozen.freeze()
                return await client.post("/chat/completions", json=BODY)

        answer = asyncio.run(main())
        assert answer.status_code == 200 and answer.json()["choices"]
        assert reads.started.is_set() and threading.get_ident() not in reads.threads
        frozen.thaw()
        assert llmshim.stats()["store_errors"] >= 1
    finally:
        llmshim.uninstall()


def test_a_task_cancelled_during_its_redis_read_ends_at_once_and_leaves_nothing_behind(
        server: FakeLLMServer, redis_server: Any, frozen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _store_once(server, redis_server.url, tmp_path, tiered=False)
    reads = WatchedReads(monkeypatch)
    cache = _install(redis_server.url, tmp_path, "second.sqlite3", tiered=False)
    try:
        _warm(server, cache)
        async def main() -> str:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                reads.watching = True
                frozen.freeze()
                call = asyncio.create_task(client.post("/chat/completions", json=BODY))
                assert await asyncio.get_running_loop().run_in_executor(None, reads.started.wait, 20)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert not reads.ended.is_set()  # cancelled while Redis still had not answered
                frozen.thaw()
                reads.watching = False
                return (await client.post("/chat/completions", json=BODY)).headers.get("x-llmshim-cache", "miss")

        assert asyncio.run(main()) == "hit"
        assert cache.flights.in_flight() == 0
        assert reads.ended.wait(20)  # the abandoned read ended on its thread
    finally:
        llmshim.uninstall()


def test_a_default_executor_full_of_the_programs_own_work_does_not_hold_the_cache_read(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path) -> None:
    """A thread-pool chat wrapper fills the loop's default executor: the lookup does not queue behind it."""
    _store_once(server, redis_server.url, tmp_path, tiered=False)
    _install(redis_server.url, tmp_path, "second.sqlite3", tiered=False)
    release = threading.Event()
    try:
        async def main() -> str:
            loop = asyncio.get_running_loop()
            busy = ThreadPoolExecutor(1)
            loop.set_default_executor(busy)
            held = loop.run_in_executor(None, release.wait, 30)  # the program's own blocking work
            try:
                async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                    answer = await client.post("/chat/completions", json=BODY)
                    assert not release.is_set() and not held.done()
                    return answer.headers.get("x-llmshim-cache", "miss")
            finally:
                release.set()
                await held

        assert asyncio.run(main()) == "hit"
    finally:
        release.set()
        llmshim.uninstall()


def test_after_fork_the_child_reads_redis_off_its_loop_on_threads_of_its_own(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path) -> None:
    script = f"""
import asyncio, json, os, httpx, llmshim
llmshim.install(cache="on", cache_url={redis_server.url!r}, cache_path={str(tmp_path / "f.sqlite3")!r},
                redis_timeout="10s")
BODY = {BODY!r}
async def ask():
    async with httpx.AsyncClient(base_url={server.openai_base_url!r}, timeout=30) as client:
        return (await client.post("/chat/completions", json=BODY)).headers.get("x-llmshim-cache", "miss")
first = asyncio.run(ask()); second = asyncio.run(ask())  # the parent's reader threads are made
pid = os.fork()
if pid == 0:
    os._exit(0 if asyncio.run(ask()) == "hit" else 3)
_, status = os.waitpid(pid, 0)
print(json.dumps([first, second, os.waitstatus_to_exitcode(status)]))
"""
    out = run_python(script, timeout=60)
    assert out.strip().splitlines()[-1] == '["miss", "hit", 0]'


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_writes_run_in_the_order_they_were_made_from_a_loop_or_not(from_a_loop: list[bool]) -> None:
    """A write made off any loop while writes a loop queued are still pending runs after them:
    the close made by ``uninstall()`` after an asyncio program's last counters, not under them."""
    writes, order = Writes(), []

    async def on_a_loop(n: int) -> None:
        writes.run(lambda: order.append(n))

    for n, loop in enumerate(from_a_loop):
        if loop:
            asyncio.run(on_a_loop(n))
        else:
            writes.run(lambda n=n: order.append(n))  # type: ignore[misc]
    assert writes.idle(10)
    assert order == list(range(len(from_a_loop)))


def test_uninstall_after_an_asyncio_programs_hits_loses_no_count_and_breaks_no_write(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tiered store counts each hit in SQLite and in Redis, queued by the loop; ``uninstall()``
    closes the store from this thread: after those writes, not while one is using the connection."""
    cache = _install(redis_server.url, tmp_path, "c.sqlite3", tiered=True)
    try:
        async def main() -> list[str]:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                return [(await client.post("/chat/completions", json=BODY)).headers.get("x-llmshim-cache", "miss")
                        for _ in range(30)]

        answers = asyncio.run(main())
        assert answers == ["miss"] + ["hit"] * 29
    finally:
        llmshim.uninstall()
    assert cache.writes.idle(10)
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    totals = redis.Redis.from_url(redis_server.url).hgetall("llmshim:cache:totals")
    assert (int(totals[b"hits"]), int(totals[b"misses"])) == (29, 1)


def test_an_async_tiered_lookup_reads_its_local_front_once(server: FakeLLMServer, redis_server: Any,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front (SQLite) is read in place on the loop; a miss there sends only the Redis read to a
    reader thread (it read the front again there), and the Redis hit is kept in the front: the
    next lookup is a front hit, with no Redis read."""
    from llmshim.store.cache_sqlite import SQLiteStore

    _store_once(server, redis_server.url, tmp_path, tiered=True)
    cache = _install(redis_server.url, tmp_path, "second.sqlite3", tiered=True)
    front_reads: list[str] = []
    front_get = SQLiteStore.get

    def counted(self: SQLiteStore, key: str, now: float, defer: Any = None) -> Any:
        front_reads.append(key)
        return front_get(self, key, now, defer)

    monkeypatch.setattr(SQLiteStore, "get", counted)
    try:
        async def main() -> list[str]:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                first = await client.post("/chat/completions", json=BODY)
                reads_for_the_first = len(front_reads)
                assert cache.writes.idle(10)  # the front's copy is written
                second = await client.post("/chat/completions", json=BODY)
                return [first.headers["x-llmshim-cache"], second.headers["x-llmshim-cache"],
                        str(reads_for_the_first), str(len(front_reads))]

        assert asyncio.run(main()) == ["hit", "hit", "1", "2"]
        assert len(server.received) == 1  # only _store_once's call went upstream
    finally:
        llmshim.uninstall()
