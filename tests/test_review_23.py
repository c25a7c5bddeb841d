"""Review 23: trio calls (``trio_calls.py``) and decoded SQLite entries (``store/decoded.py``), attacked.

Each test names what it breaks and asserts the behaviour a user relies on, over real sockets to
FakeLLMServer and real SQLite files.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.decoded import Decoded
from llmshim.testing import FakeLLMServer
from llmshim.testing.responses import Answer

trio = pytest.importorskip("trio")
httpx = pytest.importorskip("httpx")


def body(question: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": stream}


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    def install(**settings: str) -> Any:
        llmshim.install(cache_path=str(tmp_path / "c.sqlite3"), **settings)
        return STATE.pipeline

    yield install
    llmshim.uninstall()


def _limiter() -> Any:
    return next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))


# -- trio: llmshim's worker threads are not trio's default thread limiter's ------------------------

class _Gate:
    """A responder that answers only once ``n`` requests are inside the server at the same time
    (a barrier; a broken one answers 503): proves that many calls are in flight at once."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=10)

    def __call__(self, received: Any) -> Answer | None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            return Answer(503, [("content-type", "application/json")], b'{"error": "not all at once"}')
        return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_more_trio_calls_than_trios_default_thread_limit_are_all_in_flight_at_once(
        library: str, installed: Callable[..., Any]) -> None:
    """Each trio call occupies a worker thread until its answer's headers come. On trio's default
    limiter (40 threads) the 41st call waited for a thread: 50 concurrent calls never all reached
    the server (without llmshim they do)."""
    module = pytest.importorskip(library)
    installed()
    with FakeLLMServer(responder=_Gate(50)) as server:
        async def main() -> list[int]:
            statuses: list[int] = []
            async with module.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
                async def ask(n: int) -> None:
                    statuses.append((await client.post("/chat/completions", json=body(f"q{n}"))).status_code)

                async with trio.open_nursery() as nursery:
                    for n in range(50):
                        nursery.start_soon(ask, n)
            return statuses

        assert trio.run(main) == [200] * 50


@pytest.mark.timeout(60)
def test_trio_calls_to_a_host_name_do_not_starve_trios_name_lookups(installed: Callable[..., Any]) -> None:
    """trio looks host names up on its default thread limiter. 45 calls to ``localhost`` each held a
    default-limiter thread while their send, on the loop, waited for a lookup thread: none was
    left, and the calls ended in ConnectTimeout (with no timeout: never)."""
    installed()
    with FakeLLMServer(responder=_Gate(45)) as server:
        base = server.openai_base_url.replace("127.0.0.1", "localhost")

        async def main() -> list[Any]:
            outcomes: list[Any] = []
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(20.0), limits=limits) as client:
                async def ask(n: int) -> None:
                    try:
                        outcomes.append((await client.post("/chat/completions", json=body(f"q{n}"))).status_code)
                    except httpx.HTTPError as exc:
                        outcomes.append(type(exc).__name__)

                async with trio.open_nursery() as nursery:
                    for n in range(45):
                        nursery.start_soon(ask, n)
            return outcomes

        assert trio.run(main) == [200] * 45


@pytest.mark.timeout(60)
def test_trio_calls_queued_under_a_limit_leave_the_programs_own_threads_free(
        server: FakeLLMServer, installed: Callable[..., Any]) -> None:
    """60 calls queued behind a held stream (max_concurrency=1): the program's own
    ``trio.to_thread.run_sync`` still runs at once (it waited for the queue before), then every
    queued call goes once the stream is closed."""
    installed(max_concurrency="1", queue_timeout="15")

    async def main() -> tuple[int, list[int]]:
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
            request = client.build_request("POST", "/chat/completions", json=body("held", stream=True))
            held = await client.send(request, stream=True)

            async def ask(n: int) -> None:
                statuses.append((await client.post("/chat/completions", json=body(f"queued {n}"))).status_code)

            async with trio.open_nursery() as nursery:
                for n in range(60):
                    nursery.start_soon(ask, n)
                while _limiter().held()[1] < 60:  # every call waits in llmshim's queue
                    await trio.sleep(0.01)
                with trio.fail_after(10):
                    own = await trio.to_thread.run_sync(lambda: 42)
                await held.aread()
                await held.aclose()
        return own, statuses

    own, statuses = trio.run(main)
    assert own == 42 and statuses == [200] * 60
    assert _limiter().held() == (0, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_trio_response_dropped_unread_frees_its_slot_at_the_next_collection(
        library: str, server: FakeLLMServer, installed: Callable[..., Any]) -> None:
    """The worker thread handed the reply back inside trio's outcome and still held it, in its own
    frame, when the task went on: a response dropped unread then outlived the collection that ends
    it under asyncio, and its rate-limit slot stayed held until some later full collection (the
    next call waited for the queue timeout and got a 429)."""
    module = pytest.importorskip(library)
    installed(max_concurrency="1", queue_timeout="5")

    async def main() -> tuple[tuple[int, int], int]:
        async with module.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
            for n in range(5):  # each time: the worker may be a moment late
                request = client.build_request("POST", "/chat/completions", json=body(f"dropped {n}", stream=True))
                dropped = await client.send(request, stream=True)
                del dropped
                gc.collect()
                held = _limiter().held()
                if held != (0, 0):
                    return held, 0
            return held, (await client.post("/chat/completions", json=body("next"))).status_code

    assert trio.run(main) == ((0, 0), 200)


# -- decoded entries (store/decoded.py) -----------------------------------------------------------

def _held_bytes(decoded: Any) -> int:
    """What the kept entries hold: body, headers, description text and key (the row's size)."""
    return sum(len(e.body) + len(json.dumps(e.headers)) + len(e._meta_text or json.dumps(e.meta)) + len(e.key)
               for _, e in decoded._entries.values())


def test_decoded_entries_bound_what_they_hold_not_only_their_bodies(tmp_path: Path) -> None:
    """An entry keeps its description text (the request, up to 64 KB of its body) besides the
    answer: bounded by body bytes alone, short answers to long prompts held several times the
    bound (256 x 64 KB = 16 MiB against an 8 MiB bound)."""
    store = SQLiteStore(str(tmp_path / "c.sqlite3"))
    store._decoded = Decoded(max_entries=256, max_bytes=200_000)
    prompt = "a long prompt " * 4000  # ~56 KB of request in the description
    for n in range(20):
        key = f"{n:064x}"
        store.put(Entry(key, 200, [("content-type", "application/json")], b'{"answer": "yes"}', 1.0, None,
                        {"request": prompt, "status": 200, "usage": {"input_tokens": 9, "output_tokens": 1}}), 1.0)
        assert store.get(key, 2.0) is not None
    decoded = store._decoded
    assert _held_bytes(decoded) <= 200_000
    assert decoded._bytes == _held_bytes(decoded)
    assert len(decoded._entries) >= 2  # still keeps what fits
    store.close()


FORK_CHILD = r"""
import os, signal, sys
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore

store = SQLiteStore(sys.argv[1])
key, other = "a" * 64, "b" * 64
store.put(Entry(key, 200, [], b'{"answer": "red"}', 1.0, None, {"status": 200}), 1.0)
assert store.get(key, 2.0).body == b'{"answer": "red"}'  # kept
store._decoded._lock.acquire()  # as a thread keeping an entry holds it, at the instant of the fork
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a deadlocked child dies of it
    os.read(read_end, 1)  # the parent wrote the row again
    found = store.get(key, 3.0)
    store.put(Entry(other, 200, [], b'{"answer": "mine"}', 4.0, None, {"status": 200}), 4.0)
    mine = store.get(other, 5.0)
    os._exit(0 if found.body == b'{"answer": "blue"}' and mine.body == b'{"answer": "mine"}' else 3)
store._decoded._lock.release()
store.put(Entry(key, 200, [], b'{"answer": "blue"}', 2.5, None, {"status": 200}), 2.5)
os.write(write_end, b"x")
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
print("parent", store.get(key, 3.0).body.decode())
"""


def test_a_fork_child_reads_rows_the_parent_rewrote_and_keeps_entries_of_its_own(tmp_path: Path) -> None:
    """The child inherits the entries kept before the fork, and their lock as it was: one a thread
    held at the fork was never released in the child, whose next write or keep hung for good."""
    from conftest import run_python

    out = run_python(FORK_CHILD.replace("sys.argv[1]", repr(str(tmp_path / "c.sqlite3"))), timeout=60)
    assert out.splitlines() == ["child exit 0", 'parent {"answer": "blue"}']
