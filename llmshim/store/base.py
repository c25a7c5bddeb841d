"""What a store is: the cache entry, and the two protocols the policies ask stores through.

A *cache store* keeps answers by key (``cache_sqlite.SQLiteStore``, ``cache_redis.RedisCacheStore``,
``cache_redis.TieredStore``); a *limit store* keeps the rate-limit budget every process shares
(``limits_sqlite.SQLiteLimitStore``, ``limits_redis.RedisLimitStore``). The protocols list exactly
what the cache and rate-limit policies call, nothing more: the CLI and ``llmshim doctor`` use more
of a concrete store (``stats``, ``list``, ``clear``...), the policies never do.

Every method may raise (``sqlite3.Error``, ``OSError``, a Redis error): the policies fail open.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["CacheStore", "Defer", "Entry", "LimitStore"]

#: Runs a write now or later (the cache passes ``Writes.run``: queued when on an event loop).
Defer = Callable[[Callable[[], None]], object]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One stored answer: status, headers and body bytes as replayed, and a redacted description."""

    key: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    created_at: float
    expires_at: float | None
    meta: dict[str, Any]


class CacheStore(Protocol):
    """Where the cache policy keeps answers."""

    @property
    def salt(self) -> bytes:
        """The secret that keys and credential scopes are HMACs under (made on first use)."""

    def get(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        """The live entry for ``key``; a write it may be due (a last-access touch) goes through ``defer``."""

    def put(self, entry: Entry, now: float) -> None: ...

    def note(self, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        """Count hits, misses and tokens saved (may be batched)."""

    def close(self) -> None:
        """No call uses the store any more: write what is pending, drop the connections."""


class LimitStore(Protocol):
    """Where the rate limiter keeps the budget every process shares (GCRA state per key)."""

    #: Live processes sharing the budget, last seen: this process's share when the store is away.
    instances: int

    def try_take(self, name: str, now: float, dims: list[tuple[str, float, float, float]], level: str) -> float:
        """``dims``: (dimension, rate per second, burst seconds, cost). Takes every dimension and
        answers 0, or takes nothing and answers the seconds until all would fit."""

    def give_back(self, name: str, dim: str, seconds: float) -> None: ...

    def block_for(self, name: str, seconds: float) -> None:
        """Block ``name`` for every process for ``seconds`` (a 429), at most ``MAX_BLOCK``."""

    def close(self) -> None: ...
