"""Review of "Redis reads off the event loop": what the reader threads, the async cache path and
the writer's order must still get right.

Everything runs against a real redis-server (the ``redis_server`` fixture) and the real local LLM
server, through real clients (httpx, httpx2, aiohttp, the async OpenAI SDK). A Redis read is held
where a test needs one held with a ``Gate`` on ``Guarded.run`` (every Redis operation goes through
it) that stops only reads made on llmshim's reader threads, or by freezing redis-server with
SIGSTOP (always let go with SIGCONT).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from test_redis import RedisServer, redis

import llmshim
from conftest import ROOT
from llmshim.policies.cache import CachePolicy
from llmshim.runtime import STATE
from llmshim.store import background
from llmshim.store.background import Writes
from llmshim.store.redis_client import Guarded
from llmshim.testing import FakeLLMServer
from llmshim.testing.server import Received

pytestmark = pytest.mark.timeout(90)

BODY = {"model": "m", "messages": [{"role": "user", "content": "review 22 · Слоўнік"}], "temperature": 0}
READER_THREADS = "llmshim-store-reads"


def _body(text: str) -> dict[str, Any]:
    return {**BODY, "messages": [{"role": "user", "content": text}]}


def _on_reader_thread() -> bool:
    return threading.current_thread().name.startswith(READER_THREADS)


class Gate:
    """Holds Redis operations made on llmshim's reader threads once armed: ``arm(skip)`` lets
    ``skip`` such operations through, holds the next one until ``release()``, then lets all pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()
        self._armed, self._skip = False, 0
        self._lock = threading.Lock()
        original = Guarded.run

        def run(guarded: Guarded, op: Any) -> Any:
            if _on_reader_thread() and self._take():
                self.reached.set()
                assert self.opened.wait(30)
            return original(guarded, op)

        monkeypatch.setattr(Guarded, "run", run)

    def _take(self) -> bool:
        with self._lock:
            if not self._armed:
                return False
            if self._skip:
                self._skip -= 1
                return False
            self._armed = False
            return True

    def arm(self, skip: int = 0) -> None:
        with self._lock:
            self._armed, self._skip = True, skip

    def release(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate(monkeypatch)
    try:
        yield held
    finally:
        held.release()


class HeldUpstream:
    """A FakeLLMServer whose answers wait until ``go`` is set (``reached`` says one is waiting)."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.server = FakeLLMServer(responder=self._respond)

    def _respond(self, received: Received) -> None:
        self.reached.set()
        assert self.go.wait(30)


@pytest.fixture
def held() -> Iterator[HeldUpstream]:
    upstream = HeldUpstream()
    upstream.server.start()
    try:
        yield upstream
    finally:
        upstream.go.set()
        upstream.server.stop()


@pytest.fixture
def frozen(redis_server: Any) -> Iterator[Callable[[bool], None]]:
    """``frozen(True)`` stops the redis-server process, ``frozen(False)`` lets it go; always let go after."""
    def freeze(on: bool) -> None:
        os.kill(redis_server.proc.pid, signal.SIGSTOP if on else signal.SIGCONT)

    try:
        yield freeze
    finally:
        freeze(False)


def _install(redis_url: str, tmp_path: Path, *, tiered: bool = False, **settings: Any) -> CachePolicy:
    llmshim.install(**{"cache": "on", "cache_url": redis_url, "cache_local": tiered,
                       "cache_path": str(tmp_path / "front.sqlite3"), "redis_timeout": "20s", **settings})
    return next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))


def _guard(cache: CachePolicy) -> Guarded:
    store: Any = cache.store
    return (store.back if hasattr(store, "back") else store).redis  # type: ignore[no-any-return]


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition another thread makes true (bounded: a missing wake-up fails, not hangs)."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)


async def _wait_event(event: threading.Event) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, event.wait, 20)


def _cache_header(response: httpx.Response) -> str:
    return response.headers.get("x-llmshim-cache", "-")


def _redis_entries(url: str) -> int:
    return sum(1 for _ in redis.Redis.from_url(url).scan_iter(match="llmshim:cache:[0-9a-f]*"))


# -- flights on the async path -------------------------------------------------------------------
@pytest.mark.parametrize("tiered", [False, True], ids=["redis", "tiered"])
def test_identical_async_calls_and_sync_threads_make_one_upstream_call(
        held: HeldUpstream, redis_server: Any, tmp_path: Path, tiered: bool) -> None:
    cache = _install(redis_server.url, tmp_path, tiered=tiered)
    base = held.server.openai_base_url
    sync_answers: list[httpx.Response] = []

    def ask_sync() -> None:
        sync_answers.append(httpx.post(base + "/chat/completions", json=BODY, timeout=30))

    try:
        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                leader = asyncio.create_task(client.post("/chat/completions", json=BODY))
                assert await _wait_event(held.reached)  # the leader is upstream: everyone else follows
                followers = [asyncio.create_task(client.post("/chat/completions", json=BODY)) for _ in range(10)]
                threads = [threading.Thread(target=ask_sync) for _ in range(3)]
                for thread in threads:
                    thread.start()
                key = next(iter(cache.flights._flights))
                await _until(lambda: len(cache.flights._flights[key].waiters) == 10, "ten async followers wait")
                held.go.set()
                answers = await asyncio.gather(leader, *followers)
                for thread in threads:
                    await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
                return answers

        answers = asyncio.run(main())
    finally:
        llmshim.uninstall()
    everyone = answers + sync_answers
    assert len(held.server.received) == 1
    assert [_cache_header(a) for a in answers] == ["-"] + ["hit"] * 10
    assert len(sync_answers) == 3 and all(_cache_header(a) == "hit" for a in sync_answers)
    assert all(a.status_code == 200 and a.json() == answers[0].json() for a in everyone)
    assert cache.flights.in_flight() == 0


def test_a_follower_cancelled_during_its_lookup_after_the_landing_leaves_no_flight(
        held: HeldUpstream, redis_server: Any, tmp_path: Path, gate: Gate) -> None:
    cache = _install(redis_server.url, tmp_path)
    try:
        async def main() -> tuple[httpx.Response, str]:
            async with httpx.AsyncClient(base_url=held.server.openai_base_url, timeout=30) as client:
                leader = asyncio.create_task(client.post("/chat/completions", json=BODY))
                assert await _wait_event(held.reached)
                follower = asyncio.create_task(client.post("/chat/completions", json=BODY))
                key = next(iter(cache.flights._flights))
                await _until(lambda: bool(cache.flights._flights[key].waiters), "the follower waits")
                gate.arm()  # the follower's lookup once the leader landed is held on its thread
                held.go.set()
                first = await leader
                assert await _wait_event(gate.reached)
                follower.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await follower
                assert not gate.opened.is_set()  # it ended at once, its read still held
                gate.release()
                again = await client.post("/chat/completions", json=BODY)
                return first, _cache_header(again)

        first, again = asyncio.run(main())
    finally:
        llmshim.uninstall()
    assert first.status_code == 200 and _cache_header(first) == "-"
    assert again == "hit" and len(held.server.received) == 1
    assert cache.flights.in_flight() == 0


@pytest.mark.parametrize("tiered", [False, True], ids=["redis", "tiered"])
def test_a_leader_cancelled_during_its_second_lookup_hands_the_call_to_its_follower(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, gate: Gate, tiered: bool) -> None:
    cache = _install(redis_server.url, tmp_path, tiered=tiered)
    try:
        async def main() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                gate.arm(skip=2)  # its salt and first lookup pass, its second ("late hit") is held
                leader = asyncio.create_task(client.post("/chat/completions", json=BODY))
                assert await _wait_event(gate.reached)
                assert cache.flights.in_flight() == 1  # it leads while it looks again
                follower = asyncio.create_task(client.post("/chat/completions", json=BODY))
                key = next(iter(cache.flights._flights))
                await _until(lambda: bool(cache.flights._flights[key].waiters), "the follower waits")
                leader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await leader
                answer = await follower  # woken by the cancelled leader's landing: it leads now
                gate.release()
                return answer

        answer = asyncio.run(main())
        assert cache.writes.idle(10)
    finally:
        llmshim.uninstall()
    assert answer.status_code == 200 and answer.json()["choices"] and _cache_header(answer) == "-"
    assert len(server.received) == 1 and cache.flights.in_flight() == 0
    assert _redis_entries(redis_server.url) == 1


# -- modes and controls: the async path answers as the sync path ---------------------------------
def _ask(kind: str, base: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         mode: str | None = None) -> tuple[int, str]:
    """One call, sync or async, optionally in a ``cache_control(mode)`` block: (status, cache header)."""
    def sync() -> httpx.Response:
        return httpx.post(base + "/chat/completions", json=body, headers=headers, timeout=30)

    async def in_task() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await client.post("/chat/completions", json=body, headers=headers)

    with llmshim.cache_control(mode) if mode else _nothing():
        answer = sync() if kind == "sync" else asyncio.run(in_task())
    return answer.status_code, _cache_header(answer)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


#: (setting, request header, cache_control mode, stored?) -> (status, x-llmshim-cache, went upstream)
MODE_CASES = [
    ("on", None, None, True, (200, "hit", False)),
    ("on", None, None, False, (200, "-", True)),
    ("replay", None, None, True, (200, "hit", False)),
    ("replay", None, None, False, (504, "miss", False)),
    ("readonly", None, None, True, (200, "hit", False)),
    ("readonly", None, None, False, (200, "-", True)),
    ("refresh", None, None, True, (200, "-", True)),
    ("on", None, "off", True, (200, "-", True)),
    ("on", None, "replay", False, (504, "miss", False)),
    ("on", "only-if-cached", None, False, (504, "miss", False)),
    ("on", "only-if-cached", None, True, (200, "hit", False)),
    ("on", "refresh", None, True, (200, "-", True)),
    ("on", "no-store", None, False, (200, "-", True)),
]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(("setting", "header", "control", "stored", "expected"), MODE_CASES)
def test_modes_headers_and_controls_answer_alike_sync_and_async_on_redis(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, kind: str, setting: str, header: str | None,
        control: str | None, stored: bool, expected: tuple[int, str, bool]) -> None:
    if stored:
        cache = _install(redis_server.url, tmp_path)
        try:
            assert _ask("sync", server.openai_base_url, BODY) == (200, "-")
            assert cache.writes.idle(10)
        finally:
            llmshim.uninstall()
    entries = _redis_entries(redis_server.url)
    server.reset()
    cache = _install(redis_server.url, tmp_path, cache=setting)
    try:
        status, answer = _ask(kind, server.openai_base_url, BODY,
                              {"x-llmshim-cache": header} if header else None, control)
        assert cache.writes.idle(10)
        stored_now = _redis_entries(redis_server.url)
    finally:
        llmshim.uninstall()
    assert (status, answer, len(server.received) == 1) == expected
    assert len(server.received) <= 1 and cache.flights.in_flight() == 0
    stores = expected[2] and setting in ("on", "refresh") and header != "no-store" and control != "off"
    assert stored_now == (1 if stored or stores else entries)


# -- the salt: Redis away at the first async call, then back ---------------------------------------
def test_a_redis_away_at_the_first_async_call_is_used_once_it_is_back(
        server: FakeLLMServer, tmp_path: Path) -> None:
    later = RedisServer(tmp_path)  # its port is free and closed until it starts
    cache = _install(later.url, tmp_path)
    try:
        assert _ask("async", server.openai_base_url, BODY) == (200, "-")
        assert _ask("async", server.openai_base_url, BODY) == (200, "-")
        assert llmshim.stats()["store_errors"] >= 2  # the salt was asked for again, and failed again
        later.start()
        try:
            assert _ask("async", server.openai_base_url, BODY) == (200, "-")
            assert cache.writes.idle(10)
            assert _ask("async", server.openai_base_url, BODY) == (200, "hit")
        finally:
            later.stop()
    finally:
        llmshim.uninstall()
    assert len(server.received) == 3


def test_with_the_breaker_open_async_calls_answer_uncached_then_use_redis_after_the_probe(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path) -> None:
    cache = _install(redis_server.url, tmp_path)
    guard = _guard(cache)
    try:
        with guard._lock:
            for _ in range(guard.breaker.threshold):
                guard.breaker.failed(guard.clock())
        assert guard.breaker.state(guard.clock()) == "open"
        assert _ask("async", server.openai_base_url, BODY) == (200, "-")
        assert llmshim.stats()["store_errors"] >= 1
        with guard._lock:
            guard.breaker.open_until = guard.clock() - 1  # the cooldown is over
        assert _ask("async", server.openai_base_url, BODY) == (200, "-")  # this call sends the probe
        assert guard.probe is not None
        guard.probe.join(20)
        assert guard.breaker.state(guard.clock()) == "closed"
        assert _ask("async", server.openai_base_url, BODY) == (200, "-")
        assert cache.writes.idle(10)
        assert _ask("async", server.openai_base_url, BODY) == (200, "hit")
    finally:
        llmshim.uninstall()


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("why", ["cache_control off", "non-deterministic"])
def test_a_call_the_cache_does_not_serve_does_not_ask_a_redis_that_is_away(
        server: FakeLLMServer, tmp_path: Path, kind: str, why: str) -> None:
    """As a synchronous call: no salt read, no store error, for a call the plan keeps off the cache."""
    away = RedisServer(tmp_path)
    _install(away.url, tmp_path, cache_nondeterministic="skip")
    try:
        body = {**BODY, "temperature": 1.0} if why == "non-deterministic" else BODY
        assert _ask(kind, server.openai_base_url, body, mode="off" if why == "cache_control off" else None) == (
            200, "-")
    finally:
        llmshim.uninstall()
    assert llmshim.stats()["store_errors"] == 0 and llmshim.stats()["cache_errors"] == 0


# -- reads in flight when the program ends, or forks -----------------------------------------------
_PROGRAM = """
import asyncio, os, signal, sys, threading, time, httpx, llmshim
from llmshim.store.redis_client import Guarded
REDIS, BASE, REDIS_PID, HOW = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
llmshim.install(cache="on", cache_url=REDIS, cache_path=sys.argv[5])
BODY = {body!r}
def body(text):
    return {{**BODY, "messages": [{{"role": "user", "content": text}}]}}
async def ask(text):
    async with httpx.AsyncClient(base_url=BASE, timeout=60) as client:
        return (await client.post("/chat/completions", json=body(text))).headers.get("x-llmshim-cache", "-")
print(asyncio.run(ask("warm")), asyncio.run(ask("warm")), flush=True)  # the salt known, a hit
reading, queued = threading.Event(), threading.Event()
original = Guarded.run
def run(guarded, op):
    if threading.current_thread().name.startswith("llmshim-store-reads"):
        reading.set()
    return original(guarded, op)
Guarded.run = run
async def many(n):
    tasks = [asyncio.create_task(ask(str(i))) for i in range(n)]
    await asyncio.get_running_loop().run_in_executor(None, reading.wait, 20)
    await asyncio.sleep(0)  # every task has asked for its read: 8 running, the rest queued
    queued.set()
    await asyncio.gather(*tasks)
os.kill(REDIS_PID, signal.SIGSTOP)
if HOW == "fork":
    threading.Thread(target=asyncio.run, args=(many(1),), daemon=True).start()
    assert reading.wait(20)
    pid = os.fork()
    if pid == 0:  # the parent's reader thread, mid-read, is not here: this child reads on its own
        os._exit(0 if asyncio.run(ask("warm")) == "hit" else 3)
    os.kill(REDIS_PID, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status), flush=True)
elif HOW == "loop in a daemon thread":
    threading.Thread(target=asyncio.run, args=(many(100),), daemon=True).start()
    assert queued.wait(20)
else:  # asyncio.run ends (cancelling its tasks) while reads are in flight
    async def main():
        tasks = [asyncio.create_task(ask(str(i))) for i in range(20)]
        await asyncio.get_running_loop().run_in_executor(None, reading.wait, 20)
    asyncio.run(main())
print("exiting", time.monotonic(), flush=True)
"""


def _run_program(how: str, server: FakeLLMServer, redis_server: Any, tmp_path: Path, timeout: str) -> tuple[
        list[str], float]:
    """The program's output lines, and how long it took to exit after its last line."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")},
           "PYTHONPATH": str(ROOT), "LLMSHIM_REDIS_TIMEOUT": timeout}
    proc = subprocess.Popen([sys.executable, "-c", _PROGRAM.format(body=BODY), redis_server.url,
                             server.openai_base_url, str(redis_server.proc.pid), how, str(tmp_path / "p.sqlite3")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=150)
        ended = time.monotonic()
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.split("\n")
    said = float(next(line for line in lines if line.startswith("exiting")).split()[1])
    return lines, ended - said


@pytest.mark.timeout(170)
@pytest.mark.parametrize("how", ["asyncio.run ends", "loop in a daemon thread"])
def test_a_program_ends_without_waiting_for_reads_of_a_frozen_redis(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, how: str) -> None:
    """The reads in flight (and queued) at exit would each wait for ``LLMSHIM_REDIS_TIMEOUT`` (30 s
    here); the program ends long before one timeout (the bound is half of it, for a loaded machine)."""
    lines, exit_took = _run_program(how, server, redis_server, tmp_path, "30s")
    assert lines[0] == "- hit"
    assert exit_took < 15, f"the interpreter waited {exit_took:.1f} s for reads at exit"


def test_a_child_forked_while_a_reader_thread_is_mid_read_reads_on_threads_of_its_own(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path) -> None:
    lines, _ = _run_program("fork", server, redis_server, tmp_path, "20s")
    assert lines[0] == "- hit" and "child 0" in lines


def test_a_read_runs_in_the_context_of_the_task_that_awaits_it(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the sync path (and ``asyncio.to_thread``): the OpenTelemetry span current in the task
    is current around its Redis read, so a Redis instrumentation nests its span under the caller's."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    seen: list[Any] = []
    original = Guarded.run

    def run(guarded: Guarded, op: Any) -> Any:
        if _on_reader_thread():
            seen.append(trace.get_current_span().get_span_context())
        return original(guarded, op)

    monkeypatch.setattr(Guarded, "run", run)
    tracer = TracerProvider().get_tracer("review22")
    _install(redis_server.url, tmp_path)
    try:
        async def main() -> Any:
            with tracer.start_as_current_span("the program's request") as span:
                async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                    assert (await client.post("/chat/completions", json=BODY)).status_code == 200
                return span.get_span_context()

        parent = asyncio.run(main())
    finally:
        llmshim.uninstall()
    assert len(seen) >= 2 and all(context == parent for context in seen)  # the salt, the lookups


# -- the writer's order, bound and fork ------------------------------------------------------------
def _queue_from_a_loop(writes: Writes, fn: Callable[[], None]) -> bool:
    async def on_a_loop() -> bool:
        return writes.run(fn)

    return asyncio.run(on_a_loop())


def test_writes_made_by_threads_and_a_loop_at_once_keep_each_ones_order() -> None:
    writes, done = Writes(limit=10_000), []
    lock = threading.Lock()

    def write(source: str, n: int) -> Callable[[], None]:
        def fn() -> None:
            with lock:
                done.append((source, n))
        return fn

    def plain(source: str) -> None:
        for n in range(200):
            assert writes.run(write(source, n))

    async def loop_writes() -> None:
        for n in range(200):
            assert writes.run(write("loop", n))
            if n % 10 == 0:
                await asyncio.sleep(0)

    threads = [threading.Thread(target=plain, args=(f"thread{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=asyncio.run, args=(loop_writes(),)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert writes.idle(10) and background.drain(10)
    assert len(done) == 1000 and writes.dropped == 0
    for source in {s for s, _ in done}:
        assert [n for s, n in done if s == source] == list(range(200)), source


class _LookedAt:
    """Marks when the watched thread reads ``Writes._busy`` or ``Writes._queue`` (in whichever order
    ``run`` reads them), and holds the worker's taking of a job until that thread has looked."""

    def __init__(self) -> None:
        self.thread: int | None = None  # the watched thread, once it writes
        self.hold_worker = False
        self.looked, self.a_started = threading.Event(), threading.Event()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the step-by-step hook this test installs (a deque "
                    "subclass's __len__) is not consulted by bool() before Python 3.11")
def test_a_plain_threads_write_never_overtakes_the_queued_one_the_worker_is_taking() -> None:
    """The worker marks itself busy, then takes the job: ``run`` must read the queue before ``busy``
    (else it can see "not busy" just before the worker marks it and "queue empty" just after it
    took the job, and run its write inline, before the queued one). Forced here step by step."""
    watch = _LookedAt()

    class Queue(collections.deque):  # type: ignore[type-arg]
        def __len__(self) -> int:
            length = super().__len__()
            if threading.get_ident() == watch.thread:
                watch.looked.set()
            return length

    class Watched(Writes):
        @property  # type: ignore[override]
        def _busy(self) -> bool:
            value = self.__dict__["busy"]
            if threading.get_ident() == watch.thread:
                watch.looked.set()
                assert watch.a_started.wait(10)  # the worker takes the job meanwhile
            return value  # type: ignore[no-any-return]

        @_busy.setter
        def _busy(self, value: bool) -> None:
            if value and watch.hold_worker:
                assert watch.looked.wait(10)  # the worker takes a job only once the writer has looked
            self.__dict__["busy"] = value

    writes, order, release = Watched(), [], threading.Event()
    writes._queue = Queue()

    def a() -> None:
        watch.a_started.set()
        assert release.wait(10)
        order.append("a")

    watch.hold_worker = True
    assert _queue_from_a_loop(writes, a)  # queued; the worker waits to take it
    watch.thread = threading.get_ident()
    assert writes.run(lambda: order.append("b"))
    release.set()
    assert writes.idle(10)
    assert order == ["a", "b"]


def test_the_queue_bound_drops_and_counts_writes_from_a_loop_and_from_threads_behind_it() -> None:
    writes, ran, release, started = Writes(limit=2), [], threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        assert release.wait(10)

    assert _queue_from_a_loop(writes, blocker)
    assert started.wait(10)  # the worker runs it: the queue is empty again
    assert _queue_from_a_loop(writes, lambda: ran.append(1))
    assert writes.run(lambda: ran.append(2))  # a plain thread's write, behind them, is queued too
    assert not _queue_from_a_loop(writes, lambda: ran.append(3))
    assert not writes.run(lambda: ran.append(4))
    assert writes.dropped == 2
    assert not background.drain(0.05)  # the blocker still runs: not settled
    release.set()
    assert writes.idle(10) and background.drain(10)
    assert ran == [1, 2]


def test_uninstall_closes_the_store_even_behind_a_full_write_queue(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path) -> None:
    """The close is the one write that is never dropped: else the retired store's Redis
    connections (and a SQLite front's pending counters) stay open until the program ends."""
    cache = _install(redis_server.url, tmp_path)
    guard = _guard(cache)
    release, started = threading.Event(), threading.Event()
    try:
        assert _ask("async", server.openai_base_url, BODY) == (200, "-")
        assert cache.writes.idle(10) and guard._client is not None

        def blocker() -> None:
            started.set()
            assert release.wait(10)

        assert _queue_from_a_loop(cache.writes, blocker) and started.wait(10)
        while cache.writes.run(lambda: None):  # fill the queue to its bound
            pass
    finally:
        llmshim.uninstall()
        release.set()
    assert cache.writes.idle(10)
    assert guard._client is None


def test_a_child_forked_while_the_writer_is_busy_writes_on_its_own(tmp_path: Path) -> None:
    script = """
import asyncio, os, threading
from llmshim.store.background import Writes
writes, release, started = Writes(), threading.Event(), threading.Event()
async def queue(fn):
    return writes.run(fn)
def blocker():
    started.set(); release.wait(30)
asyncio.run(queue(blocker)); started.wait(10)
asyncio.run(queue(lambda: None))  # pending behind the blocker
pid = os.fork()
if pid == 0:
    done = []
    writes.run(lambda: done.append("inline"))  # nothing pending here: it runs now
    asyncio.run(queue(lambda: done.append("queued")))
    os._exit(0 if writes.idle(10) and done == ["inline", "queued"] else 3)
_, status = os.waitpid(pid, 0)
release.set()
print(os.waitstatus_to_exitcode(status), writes.idle(10))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"]


# -- many tasks on a frozen Redis ------------------------------------------------------------------
@pytest.mark.parametrize("uninstall_midway", [False, True], ids=["installed", "uninstalled mid-way"])
def test_two_hundred_tasks_on_a_frozen_redis_all_answer_on_at_most_eight_reader_threads(
        server: FakeLLMServer, redis_server: Any, frozen: Callable[[bool], None], tmp_path: Path,
        gate: Gate, uninstall_midway: bool) -> None:
    """Redis stops answering while 200 distinct calls look up: each read waits at most the timeout
    (300 ms), the breaker then refuses the queued ones at once (few reach Redis at all), every call
    answers from upstream, and ``uninstall()`` in the middle of it all breaks nothing."""
    cache = _install(redis_server.url, tmp_path, redis_timeout="300ms")
    guard = _guard(cache)
    try:
        assert _ask("async", server.openai_base_url, _body("warm")) == (200, "-")  # the salt is known
        assert cache.writes.idle(10)
        attempts_before = guard.attempts
        readers: set[str] = set()

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=60,
                                         limits=httpx.Limits(max_connections=20)) as client:
                frozen(True)
                gate.arm()
                tasks = [asyncio.create_task(client.post("/chat/completions", json=_body(f"q{i}")))
                         for i in range(200)]
                assert await _wait_event(gate.reached)  # one read is held; its peers queue behind it
                await asyncio.sleep(0)
                readers.update(t.name for t in threading.enumerate() if t.name.startswith(READER_THREADS))
                if uninstall_midway:
                    await asyncio.get_running_loop().run_in_executor(None, llmshim.uninstall)
                gate.release()
                answers = await asyncio.gather(*tasks)
                readers.update(t.name for t in threading.enumerate() if t.name.startswith(READER_THREADS))
                frozen(False)
                return answers

        answers = asyncio.run(main())
    finally:
        frozen(False)
        llmshim.uninstall()
    assert [a.status_code for a in answers] == [200] * 200
    assert all(a.json()["choices"] and _cache_header(a) == "-" for a in answers)
    assert 1 <= len(readers) <= 8
    assert guard.attempts - attempts_before < 40  # not one timeout per queued read
    assert cache.flights.in_flight() == 0
    assert llmshim.stats()["store_errors"] >= 1


# -- other async clients with the Redis cache ------------------------------------------------------
async def _aiohttp_call(base: str) -> tuple[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(base + "/chat/completions", json=BODY) as answer:
        return answer.headers.get("x-llmshim-cache", "-"), await answer.json()


async def _openai_call(base: str) -> tuple[str, Any]:
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-review", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY)
        return raw.headers.get("x-llmshim-cache", "-"), raw.parse().model_dump()


async def _openai_stream(base: str) -> tuple[str, Any]:
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-review", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY, stream=True)
        chunks = [chunk.model_dump() async for chunk in raw.parse()]
        return raw.headers.get("x-llmshim-cache", "-"), [c["choices"] for c in chunks]


async def _httpx2_call(base: str) -> tuple[str, Any]:
    httpx2 = pytest.importorskip("httpx2")
    async with httpx2.AsyncClient(base_url=base, timeout=30) as client:
        answer = await client.post("/chat/completions", json=BODY)
        return answer.headers.get("x-llmshim-cache", "-"), answer.json()


CLIENTS: dict[str, Callable[[str], Awaitable[tuple[str, Any]]]] = {
    "aiohttp": _aiohttp_call, "openai": _openai_call, "openai-stream": _openai_stream, "httpx2": _httpx2_call}


@pytest.mark.parametrize("tiered", [False, True], ids=["redis", "tiered"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_other_async_clients_miss_then_hit_the_redis_cache(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, client: str, tiered: bool) -> None:
    cache = _install(redis_server.url, tmp_path, tiered=tiered)
    try:
        first = asyncio.run(CLIENTS[client](server.openai_base_url))
        assert cache.writes.idle(10)
        second = asyncio.run(CLIENTS[client](server.openai_base_url))
    finally:
        llmshim.uninstall()
    assert first[0] == "-" and second[0] == "hit"
    assert first[1] == second[1] and len(server.received) == 1 and _redis_entries(redis_server.url) == 1
