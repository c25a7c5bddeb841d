"""The response cache on Redis, shared by many processes on many machines.

The same keys and entry format as SQLite (JSON headers/metadata, raw body bytes, never pickle) in
one hash per entry; expiry is Redis' own (``PEXPIRE``); size is bounded by Redis' own eviction
(configure ``maxmemory`` with ``maxmemory-policy allkeys-lru``). ``TieredStore`` puts a local
SQLite file in front: hits are local, misses fall through to Redis and are copied locally.

Where Redis is: one server, a Cluster or a Sentinel-managed master (``redis_url.py`` reads
the URL). Every command here names one key, so each works unchanged on a Cluster (the two
write scripts too). Timeouts are short (50 ms by default) and every operation goes through a
circuit breaker: after a few failures in a row Redis is not asked at all for a while (then one
call probes it), so a dead or black-holed Redis costs almost nothing. Any failure raises, and the
cache policy fails open: a miss.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from .base import Defer, Entry
from .cache_sqlite import SQLiteStore
from .redis_client import Guarded

__all__ = ["RedisCacheStore", "TieredStore"]

# Each write is one command (a script naming one key: one Cluster slot, atomic), not a pipeline:
# redis-py's Cluster pipelines send a timed-out batch again (a counter flush to a frozen master took
# five timeouts), while one command that times out is not sent again (``redis_client``). A Redis
# user whose ACL refuses scripts gets the same writes as a MULTI transaction (``_write``).
_PUT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ARGV[1] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIREAT', KEYS[1], ARGV[1]) end
return 1
"""
_NOTE = """
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class RedisCacheStore:
    """Answers in Redis hashes named ``llmshim:cache:<key>``; one salt for every host."""

    prefix = "llmshim:cache:"
    local, near = False, None  # across the network: an event loop reads it on a thread

    def __init__(self, url: str, timeout: float = 0.05, guard: Guarded | None = None) -> None:
        self.redis = guard or Guarded(url, timeout)
        self.url = self.redis.target.describe()  # no credentials: it is shown by stats and doctor

    @property
    def client(self) -> Any:
        return self.redis.client

    @property
    def salt(self) -> bytes:
        if self._salt is None:
            name = self.prefix + "salt"

            def read(client: Any) -> bytes:
                client.setnx(name, secrets.token_bytes(32))
                return bytes(client.get(name))

            self._salt = self.redis.run(read)
        return self._salt

    _salt: bytes | None = None

    def get(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        row = self.redis.run(lambda client: client.hgetall(self.prefix + key))
        if not row:
            return None
        expires = row.get(b"expires_at")
        expires_at = float(expires) if expires else None
        if expires_at is not None and expires_at <= now:
            return None
        return Entry(key, int(row[b"status"]), [tuple(h) for h in json.loads(row[b"headers"])], bytes(row[b"body"]),
                     float(row[b"created_at"]), expires_at, json.loads(row[b"meta"]))

    get_past_near = get  # no near part: the whole lookup

    _scripts_refused = False  # the Redis user may not run scripts (an ACL without @scripting)

    def _write(self, script: str, name: str, args: list[Any], commands: Callable[[Any], None]) -> None:
        """``script`` on ``name`` (one command); where scripts are refused (NOPERM), ``commands``
        on a MULTI transaction of the one key instead, from then on."""
        if not self._scripts_refused:
            from redis.exceptions import NoPermissionError

            try:
                self.redis.run(lambda client: self.redis.script(script)(keys=[name], args=args))
                return
            except NoPermissionError:
                self._scripts_refused = True

        def transaction(client: Any) -> None:
            pipe = client.pipeline(transaction=True)  # one key: one slot, so MULTI works on a Cluster too
            commands(pipe)
            pipe.execute()

        self.redis.run(transaction)

    def put(self, entry: Entry, now: float) -> None:
        name = self.prefix + entry.key
        fields = ("status", entry.status, "headers", json.dumps(entry.headers), "body", entry.body,
                  "created_at", entry.created_at, "expires_at", entry.expires_at or "",
                  "meta", json.dumps(entry.meta, default=str))
        expires_ms = int(entry.expires_at * 1000) if entry.expires_at is not None else ""

        def commands(pipe: Any) -> None:
            pipe.hset(name, mapping=dict(zip(fields[::2], fields[1::2], strict=True)))
            if expires_ms == "":
                pipe.persist(name)
            else:
                pipe.pexpireat(name, expires_ms)

        self._write(_PUT, name, [expires_ms, *fields], commands)

    def note(self, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        counts = [(field, value) for field, value in (("hits", hits), ("misses", misses),
                                                       ("tokens_saved", tokens_saved)) if value]
        if counts:
            name = self.prefix + "totals"

            def commands(pipe: Any) -> None:
                for field, value in counts:
                    pipe.hincrby(name, field, value)

            self._write(_NOTE, name, [part for pair in counts for part in pair], commands)

    def stats(self) -> dict[str, Any]:
        totals = {k.decode(): int(v) for k, v in self.redis.run(
            lambda client: client.hgetall(self.prefix + "totals")).items()}
        # SCAN on a Cluster client walks every master; each entry is counted once, by its master.
        entries = self.redis.run(lambda client: sum(
            1 for _ in client.scan_iter(match=self.prefix + "[0-9a-f]*", count=1000)))
        hits, misses = totals.get("hits", 0), totals.get("misses", 0)
        return {"path": self.url, "entries": entries, "bytes": None, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "tokens_saved": totals.get("tokens_saved", 0)}

    def clear(self) -> int:
        def delete(client: Any) -> int:
            names = list(client.scan_iter(match=self.prefix + "[0-9a-f]*", count=1000))
            for name in names:  # one key per DEL: keys in different Cluster slots cannot share one
                client.delete(name)
            client.delete(self.prefix + "totals")
            return len(names)

        return self.redis.run(delete)

    def purge_expired(self, now: float) -> int:
        return 0  # Redis expires entries itself

    def close(self) -> None:
        """Called once no call uses this store any more (the pipeline retired, its last call ended)."""
        with suppress(Exception):  # an unreachable Redis must not break install() or uninstall()
            self.redis.close()


class TieredStore:
    """A local SQLite front for hits, Redis behind it for every host."""

    local = False  # a front miss asks Redis: an event loop reads the front in place, then all on a thread

    def __init__(self, front: SQLiteStore, back: RedisCacheStore) -> None:
        self.front, self.back = front, back
        self.near: SQLiteStore | None = front

    @property
    def salt(self) -> bytes:
        return self.back.salt  # one salt for every host, or hosts would never share an answer

    def get(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        entry = self.front.get(key, now, defer)
        return entry if entry is not None else self.get_past_near(key, now, defer)

    def get_past_near(self, key: str, now: float, defer: Defer | None = None) -> Entry | None:
        """The front missed: Redis, and a hit kept in the front for the next time (a write,
        deferred like the touch)."""
        entry = self.back.get(key, now)
        if entry is not None:
            found = entry
            (defer or (lambda fn: fn()))(lambda: self.front.put(found, now))
        return entry

    def put(self, entry: Entry, now: float) -> None:
        """Both tiers, each whatever the other does: a front that cannot be written (a corrupt
        local file) must not keep the answer from every other host. The first failure is raised."""
        try:
            self.front.put(entry, now)
        finally:
            self.back.put(entry, now)

    def note(self, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        try:
            self.front.note(hits, misses, tokens_saved)
        finally:
            self.back.note(hits, misses, tokens_saved)

    def stats(self) -> dict[str, Any]:
        return self.back.stats()

    def clear(self) -> int:
        self.front.clear()
        return self.back.clear()

    def purge_expired(self, now: float) -> int:
        return self.front.purge_expired(now)

    def close(self) -> None:
        self.front.close()
        self.back.close()
