"""Review 27: what the adversarial review of this session's changes found broken, each case a real
client over a real socket to the bundled server (and a real redis-server where Redis is in play).

- A tiered cache (a local SQLite front before Redis) whose front cannot be read or written (a
  corrupt file) answered every call as a miss, though Redis held the answer: the front's failure
  failed the whole lookup (sync: ``TieredStore.get`` raised; async: the copy of Redis' hit into the
  front raised on the reader thread), so replay mode answered its 504 for a recorded request, and
  mode ``on`` never wrote Redis either (``put`` stopped at the front).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

import llmshim
from llmshim.store.background import drain
from llmshim.testing import FakeLLMServer

BODY = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "Что такое 2+2? 二加二"}]}


def _corrupt(path: Path) -> None:
    for leftover in path.parent.glob(path.name + "-*"):  # -wal, -shm: the file alone is the front
        leftover.unlink()
    path.write_bytes(b"this is not a database" * 100)


def _httpx_sync(server: FakeLLMServer) -> tuple[int, str | None]:
    answer = httpx.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=10)
    return answer.status_code, answer.headers.get("x-llmshim-cache")


def _requests(server: FakeLLMServer) -> tuple[int, str | None]:
    answer = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=10)
    return answer.status_code, answer.headers.get("x-llmshim-cache")


def _httpx_async(server: FakeLLMServer) -> tuple[int, str | None]:
    async def main() -> tuple[int, str | None]:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(server.openai_base_url + "/chat/completions", json=BODY)
            return answer.status_code, answer.headers.get("x-llmshim-cache")

    return asyncio.run(main())


CLIENTS = {"httpx": _httpx_sync, "requests": _requests, "httpx-async": _httpx_async}


def _tiered(redis_server: Any, front: Path, mode: str) -> None:
    llmshim.install(cache=mode, cache_url=redis_server.url, cache_local=True, cache_path=str(front),
                    redis_timeout="5s")


@pytest.mark.parametrize("client", CLIENTS)
def test_replay_from_redis_when_the_tiered_front_is_corrupt(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, client: str) -> None:
    front = tmp_path / "front.sqlite3"
    _tiered(redis_server, front, "on")
    try:
        assert CLIENTS[client](server) == (200, None)  # recorded: in the front and in Redis
        assert drain()  # an event loop's writes are queued: the front is written before it is broken
    finally:
        llmshim.uninstall()
    assert len(server.received) == 1
    _corrupt(front)
    _tiered(redis_server, front, "replay")
    try:
        answer = CLIENTS[client](server)
        stats = llmshim.stats()
    finally:
        llmshim.uninstall()
    assert answer == (200, "hit")  # Redis answers (it answered 504: the front's failure failed all)
    assert len(server.received) == 1  # nothing more went upstream
    assert stats["cache_errors"] >= 1  # the front's failure is still counted


@pytest.mark.parametrize("client", CLIENTS)
def test_a_corrupt_front_still_lets_the_answer_reach_redis(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path, client: str) -> None:
    """Mode ``on`` with a corrupt front: the answer is written to Redis all the same, so another
    host (here: a healthy front of its own) replays it."""
    corrupt = tmp_path / "corrupt.sqlite3"
    _corrupt(corrupt)
    _tiered(redis_server, corrupt, "on")
    try:
        assert CLIENTS[client](server) == (200, None)
        assert drain()  # an event loop's write is queued: wait for it, not for time
    finally:
        llmshim.uninstall()
    _tiered(redis_server, tmp_path / "other-host.sqlite3", "replay")
    try:
        answer = CLIENTS[client](server)
    finally:
        llmshim.uninstall()
    assert answer == (200, "hit")
    assert len(server.received) == 1


STREAM = {**BODY, "stream": True}


def test_uninstall_mid_stream_then_install_again_on_the_same_redis(
        server: FakeLLMServer, redis_server: Any, tmp_path: Path) -> None:
    """install() → a streamed call → uninstall() while its body is still being read → install()
    again with the same Redis URL (cache and shared rate-limit budget): the call in flight ends
    normally and is stored (its store closes only after it), and the new install's stores are new
    ones, not the closed ones: a hit, a shared budget taken, no store error."""
    settings = {"cache": "on", "cache_url": redis_server.url, "cache_path": str(tmp_path / "c.sqlite3"),
                "redis_timeout": "5s", "rpm": "6000", "ratelimit_store": redis_server.url}
    llmshim.install(**settings)
    try:
        with httpx.Client(timeout=10) as client, \
                client.stream("POST", server.openai_base_url + "/chat/completions", json=STREAM) as answer:
            pieces = answer.iter_bytes()
            first = next(pieces)
            llmshim.uninstall()  # the pipeline retires; the call in flight keeps its stores
            body = first + b"".join(pieces)
        assert answer.status_code == 200 and b"[DONE]" in body
        assert drain()
        llmshim.install(**settings)
        with httpx.Client(timeout=10) as client:
            again = client.post(server.openai_base_url + "/chat/completions", json=STREAM)
        assert drain()
        stats = llmshim.stats()
    finally:
        llmshim.uninstall()
    assert again.status_code == 200 and again.headers.get("x-llmshim-cache") == "hit"
    assert again.content == body
    assert len(server.received) == 1
    assert stats["store_errors"] == 0 and stats["cache_errors"] == 0
    import redis

    with redis.Redis.from_url(redis_server.url) as check:
        assert list(check.scan_iter(match="{llmshim:rl:*"))  # the shared budget was asked


PER_CALL = [({"x-llmshim-cache": "no-store"}, None), ({"x-llmshim-cache": "refresh"}, None),
            ({}, "off"), ({}, "refresh"), ({}, "readonly"), ({}, "on")]


@pytest.mark.parametrize(("headers", "control"), PER_CALL,
                         ids=["header-no-store", "header-refresh", "off", "refresh", "readonly", "on"])
def test_replay_as_the_setting_holds_over_per_call_modes(
        server: FakeLLMServer, tmp_path: Path, headers: dict[str, str], control: str | None) -> None:
    """``LLMSHIM_CACHE=replay`` with code that asks, per call, for ``no-store`` / ``refresh`` /
    ``off`` (written for production): the call is still answered from the cache or by the 504,
    never upstream (a per-call mode replaced replay: ``no-store`` and ``off`` sent a miss live,
    ``refresh`` sent every call live). A recorded answer is still served."""
    path = str(tmp_path / "c.sqlite3")
    recorded = {**BODY, "messages": [{"role": "user", "content": "recorded"}]}
    url = server.openai_base_url + "/chat/completions"
    llmshim.install(cache="on", cache_path=path)
    try:
        assert httpx.post(url, json=recorded, timeout=10).status_code == 200
    finally:
        llmshim.uninstall()
    llmshim.install(cache="replay", cache_path=path)
    try:
        with llmshim.cache_control(mode=control) if control else contextlib.nullcontext():
            miss = httpx.post(url, json=BODY, headers=headers, timeout=10)
            hit = httpx.post(url, json=recorded, headers=headers, timeout=10)
    finally:
        llmshim.uninstall()
    assert miss.status_code == 504 and miss.headers["x-should-retry"] == "false"
    assert hit.status_code == 200 and hit.headers["x-llmshim-cache"] == "hit"
    assert len(server.received) == 1  # the recording only


def test_plan_keeps_the_replay_setting_whatever_the_call_asks() -> None:
    """The pure decision: with the setting ``replay``, neither the header nor ``cache_control()``
    changes the mode; with any other setting they still do (their documented precedence)."""
    from test_cache_units import DETERMINISTIC, make_call

    from llmshim.knobs import CacheControl
    from llmshim.policies.cache import plan

    refresh, plain = make_call(DETERMINISTIC, controls={"x-llmshim-cache": "refresh"}), make_call(DETERMINISTIC)
    assert plan(refresh, "replay", None, "cache", CacheControl("off", None)).only_cached
    assert plan(plain, "replay", None, "cache", CacheControl("refresh", None)).reason == "replay"
    assert plan(refresh, "on", None, "cache").reason == "refresh"
    assert plan(plain, "on", None, "cache", CacheControl("off", None)).reason == "cache off"


@pytest.mark.timeout(90)
def test_trio_calls_cancelled_as_their_turn_comes_leave_no_slot_and_no_queue_place(server: FakeLLMServer) -> None:
    """Round after round: the one concurrency slot held by a stream, four calls of mixed priorities
    queued behind it, then the stream closed (its slot granted to the first in line) while some of
    the queued tasks are cancelled in the same moment: a cancel before, at or after the grant. Each
    round ends with nothing held; a call after them all goes at once."""
    trio = pytest.importorskip("trio")
    import random

    from llmshim.policies.ratelimit import RateLimitPolicy
    from llmshim.runtime import STATE

    llmshim.install(cache="off", max_concurrency="1", rpm="100000", queue_timeout="60")
    limiter = next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))
    chooser = random.Random(27)

    def ask(text: str, stream: bool = False) -> dict[str, Any]:
        return {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": text}]}

    async def main() -> tuple[int, list[int]]:
        answered: list[int] = []
        async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
            for round_ in range(20):
                held = await client.send(client.build_request("POST", "/chat/completions",
                                                              json=ask(f"held {round_}", True)), stream=True)
                scopes = [trio.CancelScope() for _ in range(4)]

                async def queued(scope: Any, text: str, level: str) -> None:
                    with scope:
                        reply = await client.post("/chat/completions", json=ask(text),
                                                  headers={"x-llmshim-priority": level})
                        answered.append(reply.status_code)

                async with trio.open_nursery() as nursery:
                    for n, (scope, level) in enumerate(zip(scopes, ["high", "low", "normal", "high"], strict=True)):
                        nursery.start_soon(queued, scope, f"{round_}.{n}", level)
                    while limiter.held() != (1, 4):  # all four queued behind the stream
                        await trio.sleep(0.001)
                    await held.aread()
                    closing = held.aclose()
                    for scope in chooser.sample(scopes, chooser.randint(1, 4)):
                        scope.cancel()
                    await closing
            while limiter.held() != (0, 0):  # abandoned workers leave on their own threads
                await trio.sleep(0.005)
            return (await client.post("/chat/completions", json=ask("after"))).status_code, answered

    try:
        status, answered = trio.run(main)
        held = limiter.held()
    finally:
        llmshim.uninstall()
    assert status == 200 and held == (0, 0)
    assert set(answered) <= {200}
