"""The rate-limit budget shared by every process on one machine: GCRA state in a SQLite file.

Each take is one short ``BEGIN IMMEDIATE`` transaction (read the key's theoretical arrival times,
decide, write them back), never held while anyone sleeps. Time is the wall clock (``clocks.wall``),
the one clock all processes share. Lower priority classes keep a reserve of the burst free for
higher ones (critical 0%, high 10%, normal 20%, low 30%): across processes there is no shared
queue, so the reserve is what lets a critical call in one process pass the low calls of another.
A 429 block is a row too, so it pauses the key for every process; no block lasts more than
``MAX_BLOCK`` seconds from now, whatever a server asked or an older process wrote. A wall clock
stepped back (NTP, a resumed VM) leaves times in the future: a bucket counts as spent at most one
burst, a block further ahead than ``MAX_BLOCK`` as over (``gcra.take``).

The file is private (0600), opened like every llmshim SQLite file (WAL, busy timeout, the
retried switch to WAL: ``sqlite_files.py``); ``close()`` is safe while other threads take.
Raises ``sqlite3.Error`` / ``OSError``; the rate-limit policy fails open to its in-process share.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..clocks import wall
from ..gcra import Dim, take
from .sqlite_files import Connections

__all__ = ["MAX_BLOCK", "RESERVES", "SQLiteLimitStore"]

RESERVES = {"critical": 0.0, "high": 0.1, "normal": 0.2, "low": 0.3}
#: Seconds a key may be blocked at most after a 429 or an exhausted window (one absurd
#: ``retry-after`` must not stop every caller for a day); the next 429 blocks it again.
MAX_BLOCK = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (name TEXT NOT NULL, dim TEXT NOT NULL, tat REAL NOT NULL,
                                    PRIMARY KEY (name, dim));
"""


class SQLiteLimitStore:
    """The shared budget of one machine (``LLMSHIM_RATELIMIT_STORE=sqlite:///path``)."""

    #: The live-instance count is Redis' alone: when this file fails, the process limits on its own
    #: buckets at the full limit, as it always has.
    instances = 1

    def __init__(self, path: str, busy_timeout_ms: int = 2000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._connections = Connections(path, self._set_up, own_directory=False, busy_timeout_ms=busy_timeout_ms)

    @staticmethod
    def _set_up(conn: sqlite3.Connection, read_only: bool) -> sqlite3.Connection:
        if read_only:
            raise sqlite3.OperationalError("the rate-limit store must be writable")
        conn.executescript(_SCHEMA)  # after the shared pragmas (WAL, synchronous), under the set-up lock
        return conn

    def close(self) -> None:
        """Close every connection, from any thread: one in use closes when its use ends."""
        self._connections.close()

    def try_take(self, name: str, now: float, dims: list[tuple[str, float, float, float]], level: str) -> float:
        """``dims``: (dimension, rate per second, burst seconds, cost). Takes every dimension and
        answers 0, or takes nothing and answers the seconds until all would fit."""
        with self._connections.use() as conn:
            return self._take(conn, name, now, dims, level)

    @staticmethod
    def _take(conn: sqlite3.Connection, name: str, now: float, dims: list[tuple[str, float, float, float]],
              level: str) -> float:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows: dict[str, Any] = {dim: tat for dim, tat in conn.execute(
                "SELECT dim, tat FROM buckets WHERE name = ?", (name,))}
            wait, news = take(rows, rows.get("block", 0.0), now, (Dim(*dim) for dim in dims),
                              RESERVES.get(level, 0.2), MAX_BLOCK)
            if wait <= 0:
                conn.executemany("INSERT INTO buckets (name, dim, tat) VALUES (?, ?, ?) "
                                 "ON CONFLICT(name, dim) DO UPDATE SET tat = excluded.tat",
                                 [(name, dim, tat) for dim, tat in news.items()])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return float(max(0.0, wait))

    def give_back(self, name: str, dim: str, seconds: float) -> None:
        with self._connections.use() as conn:
            conn.execute("UPDATE buckets SET tat = tat - ? WHERE name = ? AND dim = ?", (seconds, name, dim))

    def block_for(self, name: str, seconds: float) -> None:
        self.block(name, wall() + seconds)

    def block(self, name: str, until: float) -> None:
        """Block ``name`` until ``until`` (at most ``MAX_BLOCK`` from now), or longer if it already
        is; a block stored further ahead than ``MAX_BLOCK`` is stale (the clock went back since it
        was written: ``gcra.take`` treats it as over) and this one replaces it."""
        latest = wall() + MAX_BLOCK
        until = min(until, latest)
        with self._connections.use() as conn:
            conn.execute("INSERT INTO buckets (name, dim, tat) VALUES (?, 'block', ?) ON CONFLICT(name, dim) "
                         "DO UPDATE SET tat = max(CASE WHEN tat > ? THEN 0 ELSE tat END, excluded.tat)",
                         (name, until, latest))
