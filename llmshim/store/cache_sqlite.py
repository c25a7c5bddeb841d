"""The embedded response cache: one SQLite file, the standard library's ``sqlite3``, no pickle.

- WAL journal, ``synchronous=NORMAL``, a ``busy_timeout`` (set where every llmshim SQLite file is
  opened, ``sqlite_files.py``); writes in short ``BEGIN IMMEDIATE`` transactions; readers never
  wait for writers.
- One connection per thread, re-opened after ``fork()`` (a connection must not cross a fork);
  ``close()`` is safe from any thread while others are mid-query (see ``sqlite_files.py``).
- Entries hold JSON (status, headers, metadata) and raw body bytes. Totals (entries, bytes) are
  kept by triggers, so size checks never scan. Expiry and last access are indexed; eviction drops
  the least recently used entries in small batches once ``max_entries`` / ``max_bytes`` is
  crossed; last access is touched at most once a minute per entry (reads stay reads).
- The file is private: created 0600, an existing looser one (and its -wal/-shm/-journal) tightened
  to 0600 before the first connection, the default folder kept 0700 (``sqlite_files.py``).
  ``PRAGMA user_version`` versions the schema.
- A file this process cannot write (baked into an image, a read-only mount) is opened read-only
  and still answers hits; nothing is written to it (no last-access touch, no counters).
- Hit/miss/tokens-saved counters are kept in memory and written with the next write (or every few
  seconds, and at exit), so a hit costs no write.

Every method may raise ``sqlite3.Error`` or ``OSError``; the cache policy turns those into a miss,
a warning and a metric. This module swallows only the failure of the advisory last-access touch,
so that a busy or read-only file still answers the hit it found.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from ..clocks import monotonic
from .base import UNREADABLE, Defer, Entry
from .decoded import Decoded
from .entry_text import description, headers_of
from .sqlite_files import Connections

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "default_path"]

SCHEMA_VERSION = 1
TOUCH_INTERVAL = 60.0  # seconds between last-access updates of one entry
EVICT_BATCH = 100
FLUSH_INTERVAL = 5.0  # seconds between counter flushes when nothing else writes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL,
    last_access REAL NOT NULL,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    meta TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_expires_at ON entries(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_last_access ON entries(last_access);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    entries INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0,
    tokens_saved INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO totals (id) VALUES (1);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 1;
END;
"""


def default_path() -> str:
    """``$XDG_CACHE_HOME/llmshim/cache.sqlite3`` (``~/.cache/llmshim/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llmshim", "cache.sqlite3")


_OPEN_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for store in list(_OPEN_STORES):
        store._flush_at_exit()


atexit.register(_flush_all_at_exit)  # once per process, not once per store: stores come and go with installs


_GET = "SELECT status, headers, body, created_at, expires_at, meta, last_access, size FROM entries WHERE key = ?"
_PEEK = "SELECT created_at, expires_at, last_access, size FROM entries WHERE key = ?"  # the stamp (decoded.py)


def _now(fn: Callable[[], None]) -> None:
    fn()


class SQLiteStore:
    local, near = True, None  # a file on this machine: read in place, even by an event loop

    def __init__(self, path: str, *, max_entries: int | None = None, max_bytes: int | None = None,
                 busy_timeout_ms: int = 2000) -> None:
        self.path = path
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.busy_timeout_ms = busy_timeout_ms
        self._lock = threading.RLock()  # re-entrant: see Pipeline._lock (a collected reply may close us)
        self._pending = {"hits": 0, "misses": 0, "tokens_saved": 0}
        self._flushed_at = monotonic()
        self._salt: bytes | None = None
        self._decoded = Decoded()  # entries decoded lately: a hot key's hit skips decoding
        own = os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(default_path()))
        self._connections = Connections(path, self._set_up, own_directory=own, busy_timeout_ms=busy_timeout_ms)
        _OPEN_STORES.add(self)

    # -- connections ---------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        """The file could not be written by this process: it answers lookups, stores nothing."""
        return self._connections.read_only

    def _set_up(self, conn: sqlite3.Connection, read_only: bool) -> sqlite3.Connection:
        if read_only:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"read-only cache {self.path}: schema version {version}, "
                                            f"expected {SCHEMA_VERSION}")
            return conn
        # After the shared pragmas (WAL, synchronous), under the opener's set-up lock.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"cache schema version {version} is not this llmshim's ({SCHEMA_VERSION}); "
                f"use another LLMSHIM_CACHE_PATH or `llmshim cache clear`")
        if version == 0:  # idempotent: two processes creating it at once both succeed
            conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, outside any guarded use: for one-thread tools (``llmshim doctor``)."""
        with self._connections.use() as conn:
            return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._connections.use() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connections.use() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        """Write pending counters and close every connection this store opened, from any thread:
        a connection another thread is using is closed when that use ends. Usable afterwards
        (a later use opens a new connection)."""
        self._flush_at_exit()
        self._connections.close()

    # -- the salt for credential scopes ----------------------------------------------------------
    @property
    def salt(self) -> bytes:
        if self._salt is None:
            with self._read() as conn:
                row = conn.execute("SELECT value FROM settings WHERE name = 'salt'").fetchone()
            if row is None:
                with self._write() as conn:
                    conn.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('salt', ?)",
                                 (secrets.token_bytes(32),))
                    row = conn.execute("SELECT value FROM settings WHERE name = 'salt'").fetchone()
            self._salt = bytes(row[0])
        return self._salt

    # -- entries ---------------------------------------------------------------------------------
    def get(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        """The live entry for ``key``, or None. A read: the last-access touch it may be due is a
        write, run through ``defer`` when given (the cache queues it off an event loop).

        The hit path: one primary-key read on this thread's connection (``enter``/``leave``, no
        context manager), the headers decoded, of the description only its last fields
        (``Entry.stored``). A row that does not decode raises ValueError: the cache's miss."""
        connections, kept = self._connections, self._decoded.get(key)
        slot = connections.enter()
        try:
            if kept is not None:  # decoded lately: its stamp is all there is to read
                peek = slot.conn.execute(_PEEK, (key,)).fetchone()
                if peek is None:
                    return None
                if (peek[0], peek[3]) != kept[0]:  # written again since: read it whole
                    kept = None
            row = None if kept is not None else slot.conn.execute(_GET, (key,)).fetchone()
        finally:
            connections.leave(slot)
        if kept is not None:
            created_at, expires_at, last_access, _ = peek
            entry = kept[1]
        elif row is None:
            return None
        else:
            status, headers, body, created_at, expires_at, meta, last_access, size = row
        if expires_at is not None and expires_at <= now:
            return None
        if now - last_access >= TOUCH_INTERVAL and not connections.read_only:
            (defer or _now)(lambda: self._touch(key, now))
        if kept is None:
            entry = Entry.stored(key, int(status), headers_of(headers), bytes(body), created_at, expires_at, meta)
            self._decoded.keep((created_at, size), entry)
        return entry

    get_past_near = get  # no near part: the whole lookup

    def _touch(self, key: str, now: float) -> None:
        with suppress(sqlite3.Error, OSError), self._write() as conn:  # advisory: a busy file keeps its hit
            conn.execute("UPDATE entries SET last_access = ? WHERE key = ?", (now, key))

    def put(self, entry: Entry, now: float) -> None:
        self._decoded.forget(entry.key)
        headers = json.dumps(entry.headers)
        meta = json.dumps(entry.meta, default=str)
        size = len(entry.body) + len(headers) + len(meta) + len(entry.key)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO entries (key, created_at, expires_at, last_access, status, headers, body, meta, size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET created_at = excluded.created_at, "
                "expires_at = excluded.expires_at, last_access = excluded.last_access, status = excluded.status, "
                "headers = excluded.headers, body = excluded.body, meta = excluded.meta, size = excluded.size",
                (entry.key, entry.created_at, entry.expires_at, now, entry.status, headers, entry.body, meta, size))
            self._flush_counters(conn)
            self._evict(conn, now)

    def _evict(self, conn: sqlite3.Connection, now: float) -> None:
        if self.max_entries is None and self.max_bytes is None:
            return
        for _ in range(10):  # bounded work per write: at most 10 small batches
            entries, size = conn.execute("SELECT entries, bytes FROM totals WHERE id = 1").fetchone()
            over = (self.max_entries is not None and entries > self.max_entries) or (
                self.max_bytes is not None and size > self.max_bytes)
            if not over:
                return
            expired = conn.execute(
                "DELETE FROM entries WHERE key IN (SELECT key FROM entries WHERE expires_at <= ? LIMIT ?)",
                (now, EVICT_BATCH)).rowcount
            if expired:
                continue
            extra = entries - self.max_entries if self.max_entries is not None else 0
            # Over the entry count: exactly the excess (at most a batch). Over bytes only: a few at a time.
            batch = min(EVICT_BATCH, extra) if extra > 0 else 10
            conn.execute("DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY last_access LIMIT ?)",
                         (batch,))

    # -- counters --------------------------------------------------------------------------------
    def note(self, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        with self._lock:
            self._pending["hits"] += hits
            self._pending["misses"] += misses
            self._pending["tokens_saved"] += tokens_saved
            due = monotonic() - self._flushed_at >= FLUSH_INTERVAL
        if due and not self.read_only:  # a read-only file keeps its counters in memory
            with self._write() as conn:
                self._flush_counters(conn)

    def _flush_counters(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            pending, self._pending = self._pending, {"hits": 0, "misses": 0, "tokens_saved": 0}
            self._flushed_at = monotonic()
        if any(pending.values()):
            conn.execute("UPDATE totals SET hits = hits + ?, misses = misses + ?, tokens_saved = tokens_saved + ? "
                         "WHERE id = 1", (pending["hits"], pending["misses"], pending["tokens_saved"]))

    def _flush_at_exit(self) -> None:
        try:
            if any(self._pending.values()) and not self.read_only:
                with self._write() as conn:
                    self._flush_counters(conn)
        except (sqlite3.Error, OSError):
            pass

    # -- inspection and maintenance (the CLI) --------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._read() as conn:  # opened first: only then is it known whether the file is writable
            if not self.read_only:
                with self._write() as writer:
                    self._flush_counters(writer)
            row = conn.execute("SELECT entries, bytes, hits, misses, tokens_saved FROM totals").fetchone()
        entries, size, hits, misses, saved = row
        return {"path": self.path, "entries": entries, "bytes": size, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None, "tokens_saved": saved}

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key, created_at, expires_at, size, meta FROM entries ORDER BY created_at DESC LIMIT ?",
                (limit,)).fetchall()
        return [{"key": r[0], "created_at": r[1], "expires_at": r[2], "size": r[3], **_listed(r[4])} for r in rows]

    def find(self, key_prefix: str) -> Entry | None:
        with self._read() as conn:
            rows = conn.execute("SELECT key FROM entries WHERE key >= ? AND key < ? LIMIT 2",
                                (key_prefix, key_prefix + "g")).fetchall()
        if len(rows) != 1:
            return None
        entry = self.get(rows[0][0], now=float("-inf"))
        if entry is not None:
            entry.meta  # noqa: B018  # decoded now, for the command that asked (unreadable when damaged)
        return entry

    def purge_expired(self, now: float) -> int:
        with self._write() as conn:
            return int(conn.execute("DELETE FROM entries WHERE expires_at <= ?", (now,)).rowcount)

    def clear(self) -> int:
        with self._write() as conn:
            removed = int(conn.execute("DELETE FROM entries").rowcount)
            conn.execute("UPDATE totals SET hits = 0, misses = 0, tokens_saved = 0 WHERE id = 1")
        self._decoded.clear()  # their rows are gone: the memory goes too
        return removed


def _listed(meta_text: str) -> dict[str, Any]:
    """A row's description for ``llmshim cache ls``: a damaged one is listed as unreadable (the
    listing goes on), as ``Entry.meta`` reads it."""
    try:
        return description(meta_text)
    except ValueError:
        return dict(UNREADABLE)
