"""The event loop never blocks on storage (issue 12, item 6).

While another process holds the SQLite cache's write lock, every cache write would wait the 2 s
busy timeout; on an event loop that froze every task (5 calls: 10 s frozen). Writes made from a
thread running an event loop are queued for a background thread instead, so the loop keeps
ticking, the calls are answered, and the entries land once the lock is released.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from loop_lag_probe import LoopLag

import llmshim
from llmshim.policies.cache import CachePolicy
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer

LOCKER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def _body(prompt: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": False}


async def test_cache_writes_never_freeze_the_loop_while_another_process_holds_the_lock(
        server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_CACHE", "on")
    monkeypatch.setenv("LLMSHIM_CACHE_PATH", str(tmp_path / "cache.sqlite3"))
    url = server.openai_base_url + "/chat/completions"
    llmshim.install()
    try:
        cache = next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(url, json=_body("warm up"))  # the file, its schema and salt exist
            assert cache.writes.idle(10)
            locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / "cache.sqlite3")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert locker.stdout is not None and locker.stdin is not None
            assert locker.stdout.readline().strip() == "locked"
            lag = LoopLag()
            lag.start()
            try:
                answers = await asyncio.gather(*(client.post(url, json=_body(f"question {i}")) for i in range(5)))
                # Keep the lock (and keep measuring) for 5 s, past two busy timeouts: the queued writes wait
                # and fail open on the writer thread, never on the loop.
                await asyncio.sleep(5.0)
            finally:
                await lag.stop()
                locker.communicate("\n", timeout=10)  # release the lock; closes the pipes
            for i, answer in enumerate(answers):
                assert answer.json()["choices"][0]["message"]["content"] == f"Echo: question {i}"
            print(f"largest loop lag while the lock was held for 5 s: {lag.largest * 1000:.1f} ms")
            assert lag.largest < 1.0  # one blocked write would freeze the loop for the 2 s busy timeout
            assert cache.writes.idle(60)
            # The cache works again once the lock is free: new answers are stored and hit.
            fresh = [(await client.post(url, json=_body(f"later {i}"))).json() for i in range(3)]
            assert cache.writes.idle(10)
            hits = [await client.post(url, json=_body(f"later {i}")) for i in range(3)]
            assert [r.headers.get("x-llmshim-cache") for r in hits] == ["hit"] * 3
            assert [r.json() for r in hits] == fresh
    finally:
        llmshim.uninstall()
