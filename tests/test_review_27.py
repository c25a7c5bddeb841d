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
