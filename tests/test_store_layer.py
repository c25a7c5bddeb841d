"""One store layer (issue 13, item 3): both SQLite stores are opened the one same way, and every
sleeper in llmshim is woken through one helper.

- The cache file and the rate-limit file go through ``sqlite_files.Connections``: the same
  pragmas, the same retried switch to WAL (the rate-limit store used to fail at once with
  "database is locked" when another process held the file), the same private modes, the same
  fork safety, the same read-only detection.
- ``wake.Wakeup`` wakes a thread or a task from any thread; a closed loop answers False instead of
  raising, so whoever hands something over (an ``llmshim.aio`` pool slot) passes it to the next.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_python
from llmshim.aio import AsyncPool
from llmshim.store import sqlite_files
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.limits_sqlite import SQLiteLimitStore
from llmshim.wake import Wakeup, wake_task

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["cache", "limits"]
Store = SQLiteStore | SQLiteLimitStore


def open_store(kind: str, path: Path, busy_timeout_ms: int = 2000) -> Store:
    if kind == "cache":
        return SQLiteStore(str(path), busy_timeout_ms=busy_timeout_ms)
    return SQLiteLimitStore(str(path), busy_timeout_ms=busy_timeout_ms)


def use(store: Store) -> None:
    """One write and one read through the store's own API: they must work."""
    if isinstance(store, SQLiteStore):
        store.put(Entry("k", 200, [], b"answer", 1.0, None, {}), 1.0)
        found = store.get("k", 2.0)
        assert found is not None and found.body == b"answer"
    else:
        assert store.try_take("k", 1.0, [("r", 1.0, 10.0, 1.0)], "normal") == 0


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def store_of(tmp_path: Path) -> Iterator[dict[str, Store]]:
    opened: dict[str, Store] = {}
    yield opened
    for store in opened.values():
        store.close()


# -- the one opener -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_both_stores_get_the_same_pragmas(kind: str, tmp_path: Path, store_of: dict[str, Store]) -> None:
    store = store_of[kind] = open_store(kind, tmp_path / f"{kind}.sqlite3", busy_timeout_ms=1234)
    use(store)
    with store._connections.use() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1234


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_dropped_without_close_closes_its_connections(kind: str, tmp_path: Path) -> None:
    # Python 3.13 warns of a sqlite3 connection collected open (an error under -W error): a
    # script's own store, used from two threads and dropped, closes every connection it opened.
    import gc

    store = open_store(kind, tmp_path / f"{kind}.sqlite3")
    use(store)
    worker = threading.Thread(target=use, args=(store,))
    worker.start()
    worker.join()
    opened = [slot.conn for slot in store._connections._slots]
    assert len(opened) == 2
    del store
    gc.collect()
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")


HOLDER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")        # a RESERVED lock on a rollback-journal file
print("held", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_another_process_holds_locked_is_opened_once_it_lets_go(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_of: dict[str, Store]) -> None:
    """While another process holds a write lock on a rollback-journal file, SQLite refuses the
    switch to WAL at once ("database is locked"), without waiting for the busy timeout. Both
    stores retry it: the holder lets go exactly when the opener first backs off (no timing)."""
    path = tmp_path / f"{kind}.sqlite3"
    with sqlite3.connect(path) as conn:  # an existing file in the default (rollback) journal mode
        conn.execute("CREATE TABLE other (x)")
    conn.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        backed_off: list[float] = []

        def sleep(seconds: float) -> None:  # the opener's back-off: let the holder go the first time
            backed_off.append(seconds)
            if len(backed_off) == 1:
                assert holder.stdin is not None and holder.stdout is not None
                holder.stdin.write("go\n")
                holder.stdin.flush()
                assert holder.stdout.readline().strip() == "released"

        monkeypatch.setattr(sqlite_files, "time", types.SimpleNamespace(sleep=sleep))
        store = store_of[kind] = open_store(kind, path)
        use(store)
        assert backed_off, "the lock was never met: this test tests nothing"
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()


@pytest.mark.parametrize("kind", KINDS)
def test_both_stores_make_their_files_and_a_new_folder_private(kind: str, tmp_path: Path,
                                                               store_of: dict[str, Store]) -> None:
    folder = tmp_path / "made-by-llmshim"
    path = folder / f"{kind}.sqlite3"
    old = os.umask(0)
    try:
        store = store_of[kind] = open_store(kind, path)
        use(store)
    finally:
        os.umask(old)
    assert mode(folder) == 0o700
    assert {suffix: mode(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")} == {"": 0o600, "-wal": 0o600,
                                                                                    "-shm": 0o600}


@pytest.mark.parametrize("kind", KINDS)
def test_both_stores_tighten_an_existing_loose_file_before_opening_it(kind: str, tmp_path: Path,
                                                                      store_of: dict[str, Store]) -> None:
    path = tmp_path / f"{kind}.sqlite3"
    first = open_store(kind, path)
    use(first)
    first.close()
    os.chmod(path, 0o666)
    store = store_of[kind] = open_store(kind, path)
    use(store)
    assert mode(path) == 0o600 and mode(f"{path}-wal") == 0o600
    assert mode(tmp_path) == stat.S_IMODE(os.stat(tmp_path).st_mode)  # a user's folder is left alone


FORKED = r"""
import json, os, sys
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.limits_sqlite import SQLiteLimitStore
kind, path = os.environ["KIND"], os.environ["STORE_PATH"]
if kind == "cache":
    store = SQLiteStore(path)
    def use(name):
        store.put(Entry(name, 200, [], name.encode(), 1.0, None, {}), 1.0)
        return store.get(name, 2.0).body == name.encode()
else:
    store = SQLiteLimitStore(path)
    def use(name):
        return store.try_take(name, 1.0, [("r", 1.0, 10.0, 1.0)], "normal") == 0
assert use("parent")
pid = os.fork()
if pid == 0:
    try:
        ok = use("child")
        store.close()  # closes only the child's own connection, never the parent's
        os._exit(0 if ok else 3)
    except Exception:
        os._exit(4)
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": os.waitstatus_to_exitcode(status), "parent_after": use("parent-after")}))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_both_stores_opened_before_fork_work_in_the_child_and_the_parent(kind: str, tmp_path: Path) -> None:
    out = run_python(FORKED, env={"KIND": kind, "STORE_PATH": str(tmp_path / f"{kind}.sqlite3")})
    assert json.loads(out) == {"child": 0, "parent_after": True}


def _read_only_runner() -> list[str] | None:
    """A command prefix that runs a shell in a mount namespace of its own (root here and in CI)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "-m"], [unshare, "-rm"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


READ_ONLY = r"""
import json, sqlite3, sys
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.limits_sqlite import SQLiteLimitStore
kind, path = sys.argv[1], sys.argv[2]
if kind == "cache":
    store = SQLiteStore(path)
    outcome = store.get("k", 2.0).body.decode()
else:
    store = SQLiteLimitStore(path)
    try:
        store.try_take("k", 1.0, [("r", 1.0, 10.0, 1.0)], "normal")
        outcome = "took"
    except sqlite3.OperationalError as exc:
        outcome = str(exc)
print(json.dumps({"read_only": store._connections.read_only, "outcome": outcome}))
"""


@pytest.mark.skipif(_read_only_runner() is None, reason="needs `unshare -m` (root) or `unshare -rm`")
@pytest.mark.parametrize("kind", KINDS)
def test_both_stores_see_a_read_only_medium_the_same_way(kind: str, tmp_path: Path) -> None:
    """The opener finds the file unwritable and opens it read-only for both; the cache answers
    from it, the rate-limit store (which must write) refuses clearly. Nothing is written."""
    baked = tmp_path / "image"
    baked.mkdir()
    path = baked / f"{kind}.sqlite3"
    store = open_store(kind, path)
    use(store)
    store.close()
    before = path.read_bytes()
    script = (f"mount --bind {baked} {baked} && mount -o remount,bind,ro {baked} && "
              f"exec {sys.executable} -c \"$0\" {kind} {path}")
    runner = _read_only_runner()
    assert runner is not None
    done = subprocess.run([*runner, "sh", "-c", script, READ_ONLY], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    expected = "answer" if kind == "cache" else "the rate-limit store must be writable"
    assert json.loads(done.stdout) == {"read_only": True, "outcome": expected}
    assert path.read_bytes() == before


# -- one way to wake a sleeper ------------------------------------------------------------------
def test_a_thread_is_woken_from_another_thread_and_a_wait_ends_at_its_timeout() -> None:
    wakeup = Wakeup.for_thread()
    assert wakeup.wait(0) is False
    waker = threading.Thread(target=wakeup.wake)
    waker.start()
    assert wakeup.wait(10) is True
    waker.join()
    assert wakeup.wake() is True and wakeup.wait(0) is True  # idempotent


def test_a_task_is_woken_from_another_thread() -> None:
    async def main() -> tuple[bool, bool]:
        wakeup = Wakeup.for_task()
        timed_out = await wakeup.wait_async(0)
        waker = threading.Thread(target=wakeup.wake)
        waker.start()
        woken = await wakeup.wait_async(10)
        waker.join()
        return timed_out, woken

    assert asyncio.run(main()) == (False, True)


def test_a_cancelled_task_leaves_its_future_wakeable_and_a_late_wake_is_harmless() -> None:
    async def main() -> bool:
        wakeup = Wakeup.for_task()
        task = asyncio.ensure_future(wakeup.wait_async())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert wakeup.future is not None and not wakeup.future.cancelled()
        assert wakeup.wake() and wakeup.wake()  # twice, after the waiter left: no InvalidStateError
        await asyncio.sleep(0)
        return wakeup.future.done()

    assert asyncio.run(main()) is True


def test_a_closed_loop_cannot_be_woken_and_says_so_without_raising() -> None:
    loop = asyncio.new_event_loop()
    future: asyncio.Future[None] = loop.create_future()
    wakeup = Wakeup.for_task(loop)
    loop.close()
    assert wakeup.wake() is False
    assert wake_task(loop, future) is False


def test_an_aio_slot_released_past_a_waiter_whose_loop_closed_reaches_the_next_waiter() -> None:
    """One slot; a waiter's loop closes while it waits (never cancelled: a loop closed by hand).
    Releasing the slot must hand it to the next waiter: before, waking the closed loop raised in
    the release and the slot was lost for good."""
    pool = AsyncPool(workers=1, queue_size=0, timeout=None)
    release = threading.Event()
    loops = [asyncio.new_event_loop() for _ in range(3)]
    try:
        holder = loops[0].create_task(pool.run(lambda: release.wait(10)))
        loops[0].run_until_complete(asyncio.sleep(0))  # the holder took the slot, its thread runs
        closed = loops[1].create_task(pool.run(lambda: "never"))
        loops[1].run_until_complete(asyncio.sleep(0))
        nxt = loops[2].create_task(pool.run(lambda: "next"))
        loops[2].run_until_complete(asyncio.sleep(0))
        assert pool.queue_depth == 2
        loops[1].close()  # the first waiter's loop is gone, its task still in the queue
        release.set()  # the holder's thread ends: its slot is released from that thread
        assert loops[0].run_until_complete(holder) is True
        assert loops[2].run_until_complete(asyncio.wait_for(nxt, 10)) == "next"
        assert not closed.done()
    finally:
        release.set()
        for loop in loops:
            loop.close()
        pool.shutdown(wait=True)
