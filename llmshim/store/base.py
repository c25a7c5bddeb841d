"""What a store is: the cache entry, and the two protocols the policies ask stores through.

A *cache store* keeps answers by key (``cache_sqlite.SQLiteStore``, ``cache_redis.RedisCacheStore``,
``cache_redis.TieredStore``); a *limit store* keeps the rate-limit budget every process shares
(``limits_sqlite.SQLiteLimitStore``, ``limits_redis.RedisLimitStore``). The protocols list exactly
what the cache and rate-limit policies call, nothing more: the CLI and ``llmshim doctor`` use more
of a concrete store (``stats``, ``list``, ``clear``...), the policies never do.

Every method may raise (``sqlite3.Error``, ``OSError``, a Redis error): the policies fail open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .entry_text import description, outcome_of

__all__ = ["CacheStore", "Defer", "Entry", "LimitStore"]

#: Runs a write now or later (the cache passes ``Writes.run``: queued when on an event loop).
Defer = Callable[[Callable[[], None]], object]


#: The description of an entry whose stored description text is damaged (its outcome is not).
UNREADABLE = {"description": "unreadable"}


class Entry:
    """One stored answer: status, headers and body bytes as replayed, and a redacted description.

    ``meta``, the description (the request as ``llmshim cache show`` prints it, up to 64 KB of its
    body, then the answer's status, usage and estimator), is decoded when first read. A hit reads
    only ``outcome``: the description's last fields, which a store holding JSON text decodes alone
    (``outcome_of``), so a hit does not pay for decoding a prompt it never looks at."""

    __slots__ = ("_meta", "_meta_text", "body", "created_at", "expires_at", "headers", "key", "outcome", "status")

    def __init__(self, key: str, status: int, headers: list[tuple[str, str]], body: bytes, created_at: float,
                 expires_at: float | None, meta: dict[str, Any]) -> None:
        self.key, self.status, self.headers, self.body = key, status, headers, body
        self.created_at, self.expires_at = created_at, expires_at
        self._meta: dict[str, Any] | None = meta
        self._meta_text: str | None = None
        #: What the hit reports: ``usage`` (input/output tokens) and ``estimator``, when present.
        self.outcome: Mapping[str, Any] = meta

    @classmethod
    def stored(cls, key: str, status: int, headers: list[tuple[str, str]], body: bytes, created_at: float,
               expires_at: float | None, meta_text: str) -> Entry:
        """An entry read back from JSON text. Its outcome (status, usage, estimator: what a hit
        needs) is decoded now, alone when it can be, else with the whole description: an outcome
        that is not JSON raises ValueError here, at the lookup, where the cache turns it into a
        miss. The rest of the description (the request, for ``llmshim cache show``) is decoded
        only when read; damaged there, the entry is still served (its answer and usage are
        intact) and its ``meta`` says the description is unreadable."""
        entry = cls.__new__(cls)
        entry.key, entry.status, entry.headers, entry.body = key, status, headers, body
        entry.created_at, entry.expires_at = created_at, expires_at
        outcome = outcome_of(meta_text)
        if outcome is None:  # not written by llmshim's own ``put``: decode it all, now
            entry._meta = entry.outcome = description(meta_text)
            entry._meta_text = None
        else:
            entry._meta, entry._meta_text, entry.outcome = None, meta_text, outcome
        return entry

    @property
    def meta(self) -> dict[str, Any]:
        """The stored description; ``{"description": "unreadable"}`` when its text is damaged
        before the outcome (never an exception: a copy to another store or ``cache show`` reads it)."""
        if self._meta is None:
            try:
                self._meta = description(self._meta_text or "{}")
            except ValueError:
                self._meta = dict(UNREADABLE)
        return self._meta

    def _fields(self) -> tuple[Any, ...]:
        return self.key, self.status, self.headers, self.body, self.created_at, self.expires_at, self.meta

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable fields, as the dataclass it replaced

    def __repr__(self) -> str:
        return (f"Entry(key={self.key!r}, status={self.status!r}, headers={self.headers!r}, body={self.body!r}, "
                f"created_at={self.created_at!r}, expires_at={self.expires_at!r}, meta={self.meta!r})")


class CacheStore(Protocol):
    """Where the cache policy keeps answers."""

    @property
    def local(self) -> bool:
        """Answers without a network round trip: an event loop reads it in place (else on a thread)."""

    @property
    def near(self) -> CacheStore | None:
        """A local part asked first, in place, by an event loop (a tiered store's SQLite front)."""

    @property
    def salt(self) -> bytes:
        """The secret that keys and credential scopes are HMACs under (made on first use)."""

    def get(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        """The live entry for ``key``; a write it may be due (a last-access touch) goes through ``defer``."""

    def get_past_near(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        """``get`` once ``near`` was asked and missed (without a ``near``: ``get``)."""

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
