"""The embedded response cache: one SQLite file, the standard library's ``sqlite3``, no pickle.

- WAL journal, ``synchronous=NORMAL``, a ``busy_timeout``; writes in short ``BEGIN IMMEDIATE``
  transactions; readers never wait for writers.
- One connection per thread, re-opened after ``fork()`` (a connection must not cross a fork).
- Entries hold JSON (status, headers, metadata) and raw body bytes. Totals (entries, bytes) are
  kept by triggers, so size checks never scan. Expiry and last access are indexed; eviction drops
  the least recently used entries in small batches once ``max_entries`` / ``max_bytes`` is
  crossed; last access is touched at most once a minute per entry (reads stay reads).
- The file (and its directory) is created with mode 0600 (0700); the WAL and shared-memory files
  inherit the database's permissions. ``PRAGMA user_version`` versions the schema.
- Hit/miss/tokens-saved counters are kept in memory and written with the next write (or every few
  seconds, and at exit), so a hit costs no write.

Every method may raise ``sqlite3.Error`` or ``OSError``; the cache policy turns those into a miss,
a warning and a metric. This module never swallows them itself.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

__all__ = ["SCHEMA_VERSION", "Entry", "SQLiteStore", "default_path"]

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


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    created_at: float
    expires_at: float | None
    meta: dict[str, Any]


class SQLiteStore:
    def __init__(self, path: str, *, max_entries: int | None = None, max_bytes: int | None = None,
                 busy_timeout_ms: int = 2000) -> None:
        self.path = path
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._pending = {"hits": 0, "misses": 0, "tokens_saved": 0}
        self._flushed_at = time.monotonic()
        self._salt: bytes | None = None
        self._connections: list[sqlite3.Connection] = []
        atexit.register(self._flush_at_exit)

    # -- connections ---------------------------------------------------------------------------
    def _create_file(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid():
            return conn
        # First use in this thread, or first use after fork(): the parent's connection is not ours.
        self._create_file()
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        # First-time set-up is serialised between this process's threads; the switch to WAL can
        # answer "locked" without waiting while another process switches it, so it is retried.
        with self._init_lock:
            for attempt in range(50):
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 49:
                        raise
                    time.sleep(0.01)
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"cache schema version {version} is not this llmshim's ({SCHEMA_VERSION}); "
                    f"use another LLMSHIM_CACHE_PATH or `llmshim cache clear`")
            if version == 0:  # idempotent: two processes creating it at once both succeed
                conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
        local.conn, local.pid = conn, os.getpid()
        with self._lock:
            self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        conn = conn or self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Write pending counters and close every connection this store opened."""
        self._flush_at_exit()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # -- the salt for credential scopes ----------------------------------------------------------
    @property
    def salt(self) -> bytes:
        if self._salt is None:
            conn = self._conn()
            row = conn.execute("SELECT value FROM settings WHERE name = 'salt'").fetchone()
            if row is None:
                with self._write(conn):
                    conn.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('salt', ?)",
                                 (secrets.token_bytes(32),))
                row = conn.execute("SELECT value FROM settings WHERE name = 'salt'").fetchone()
            self._salt = bytes(row[0])
        return self._salt

    # -- entries ---------------------------------------------------------------------------------
    def get(self, key: str, now: float) -> Entry | None:
        conn = self._conn()
        row = conn.execute(
            "SELECT status, headers, body, created_at, expires_at, meta, last_access FROM entries WHERE key = ?",
            (key,)).fetchone()
        if row is None or (row[4] is not None and row[4] <= now):
            return None
        if now - row[6] >= TOUCH_INTERVAL:
            with self._write(conn):
                conn.execute("UPDATE entries SET last_access = ? WHERE key = ?", (now, key))
        return Entry(key, int(row[0]), [tuple(h) for h in json.loads(row[1])], bytes(row[2]), row[3], row[4],
                     json.loads(row[5]))

    def put(self, entry: Entry, now: float) -> None:
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
            due = time.monotonic() - self._flushed_at >= FLUSH_INTERVAL
        if due:
            with self._write() as conn:
                self._flush_counters(conn)

    def _flush_counters(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            pending, self._pending = self._pending, {"hits": 0, "misses": 0, "tokens_saved": 0}
            self._flushed_at = time.monotonic()
        if any(pending.values()):
            conn.execute("UPDATE totals SET hits = hits + ?, misses = misses + ?, tokens_saved = tokens_saved + ? "
                         "WHERE id = 1", (pending["hits"], pending["misses"], pending["tokens_saved"]))

    def _flush_at_exit(self) -> None:
        try:
            if any(self._pending.values()):
                with self._write() as conn:
                    self._flush_counters(conn)
        except (sqlite3.Error, OSError):
            pass

    # -- inspection and maintenance (the CLI) --------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._write() as conn:
            self._flush_counters(conn)
        row = self._conn().execute("SELECT entries, bytes, hits, misses, tokens_saved FROM totals").fetchone()
        entries, size, hits, misses, saved = row
        return {"path": self.path, "entries": entries, "bytes": size, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None, "tokens_saved": saved}

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT key, created_at, expires_at, size, meta FROM entries ORDER BY created_at DESC LIMIT ?",
            (limit,)).fetchall()
        return [{"key": r[0], "created_at": r[1], "expires_at": r[2], "size": r[3], **json.loads(r[4])}
                for r in rows]

    def find(self, key_prefix: str) -> Entry | None:
        rows = self._conn().execute(
            "SELECT key FROM entries WHERE key >= ? AND key < ? LIMIT 2", (key_prefix, key_prefix + "g")).fetchall()
        if len(rows) != 1:
            return None
        return self.get(rows[0][0], now=float("-inf"))

    def purge_expired(self, now: float) -> int:
        with self._write() as conn:
            return int(conn.execute("DELETE FROM entries WHERE expires_at <= ?", (now,)).rowcount)

    def clear(self) -> int:
        with self._write() as conn:
            removed = int(conn.execute("DELETE FROM entries").rowcount)
            conn.execute("UPDATE totals SET hits = 0, misses = 0, tokens_saved = 0 WHERE id = 1")
        return removed
