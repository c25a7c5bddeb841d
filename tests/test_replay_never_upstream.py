"""Replay mode's promise: no request leaves, whatever the store does.

``LLMSHIM_CACHE=replay`` (and ``cache_control(mode="replay")``) is how a test suite runs offline
from a cache it recorded. A broken store fails open everywhere else (the call goes upstream); in
replay mode going upstream would send a CI run's requests, keys and spend to the live API, so a
store that cannot be opened, read or keyed answers the same synthetic 504 as a miss
(``x-should-retry: false``) and names why. Each case: a real client over a real socket to the
bundled server, which must see nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import requests

import llmshim
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.testing import FakeLLMServer

MSG = [{"role": "user", "content": "Сколько будет 2+2? 二加二は"}]
BODY = {"model": "gpt-4o-mini", "messages": MSG}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _corrupt_file(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "cache.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    return {"cache_path": str(path)}


def _folder_is_a_file(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "blocker").write_text("a file where the folder should be")
    return {"cache_path": str(tmp_path / "blocker" / "cache.sqlite3")}


def _table_gone(tmp_path: Path) -> dict[str, str]:
    """A cache that opens (its salt is there) but whose entries cannot be read."""
    path = tmp_path / "cache.sqlite3"
    store = SQLiteStore(str(path))
    assert store.salt
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if name != "settings"]
        assert tables
        for name in tables:
            db.execute(f'DROP TABLE "{name}"')
    return {"cache_path": str(path)}


def _redis_away(tmp_path: Path) -> dict[str, str]:
    return {"cache_url": f"redis://127.0.0.1:{_closed_port()}/0", "redis_timeout": "0.2"}


STORES: dict[str, Callable[[Path], dict[str, str]]] = {
    "corrupt-file": _corrupt_file, "folder-is-a-file": _folder_is_a_file, "table-gone": _table_gone,
    "redis-away": _redis_away}


def _requests(server: FakeLLMServer) -> tuple[int, str, str | None]:
    answer = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=10)
    return answer.status_code, answer.text, answer.headers.get("x-should-retry")


def _httpx_async(server: FakeLLMServer) -> tuple[int, str, str | None]:
    async def main() -> tuple[int, str, str | None]:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(server.openai_base_url + "/chat/completions", json=BODY)
            return answer.status_code, answer.text, answer.headers.get("x-should-retry")

    return asyncio.run(main())


def _openai_sync(server: FakeLLMServer) -> tuple[int, str, str | None]:
    with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=3) as client:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
        except openai.APIStatusError as error:
            return error.status_code, str(error), error.response.headers.get("x-should-retry")
    raise AssertionError("replay mode answered from a store that cannot be read")


def _openai_async(server: FakeLLMServer) -> tuple[int, str, str | None]:
    async def main() -> tuple[int, str, str | None]:
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=3) as client:
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
            except openai.APIStatusError as error:
                return error.status_code, str(error), error.response.headers.get("x-should-retry")
        raise AssertionError("replay mode answered from a store that cannot be read")

    return asyncio.run(main())


CLIENTS = {"requests": _requests, "httpx-async": _httpx_async, "openai": _openai_sync, "openai-async": _openai_async}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("how", ["setting", "cache_control"])
def test_replay_mode_never_goes_upstream_when_the_store_fails(
        server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, store: str, client: str,
        how: str) -> None:
    settings = STORES[store](tmp_path)
    llmshim.install(cache="replay" if how == "setting" else "on", **settings)
    try:
        if how == "setting":
            status, text, should_retry = CLIENTS[client](server)
        else:
            with llmshim.cache_control(mode="replay"):
                status, text, should_retry = CLIENTS[client](server)
        stats = llmshim.stats()
    finally:
        llmshim.uninstall()
    assert server.received == []  # nothing left the process, not even a retry
    assert status == 504 and should_retry == "false"
    assert "llmshim cache replay mode" in text
    assert stats["cache_errors"] >= 1  # the store's failure was counted and warned
    assert any("cache" in record.getMessage() and "failed" in record.getMessage() for record in caplog.records)


def test_outside_replay_a_store_that_fails_still_fails_open(server: FakeLLMServer, tmp_path: Path) -> None:
    """The other side of the same decision: mode ``on`` with a corrupt file answers from upstream."""
    llmshim.install(cache="on", **_corrupt_file(tmp_path))
    try:
        status, _, _ = _requests(server)
    finally:
        llmshim.uninstall()
    assert status == 200 and len(server.received) == 1
