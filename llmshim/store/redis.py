"""Redis as the shared cache and the shared rate-limit budget, for many processes on many machines.

Cache: the same keys and entry format as SQLite (JSON headers/metadata, raw body bytes, never
pickle) in one hash per entry; expiry is Redis' own (``PEXPIRE``); size is bounded by Redis' own
eviction (configure ``maxmemory`` with ``maxmemory-policy allkeys-lru``). ``TieredStore`` puts a
local SQLite file in front: hits are local, misses fall through to Redis and are copied locally.

Rate limits: every take is one Lua script that reads the Redis server's clock (``TIME``), so hosts
with skewed clocks agree; the key has a hash tag (``{...}``) so the script's keys live in one
Cluster slot; blocks after a 429 are relative durations measured on that same clock.

Where Redis is: one server, a Cluster or a Sentinel-managed master (``redis_client.py`` reads
the URL). Every command here names one key, so each works unchanged on a Cluster (the pipelines
touch one key too). Timeouts are short (50 ms by default) and every operation goes through a
circuit breaker: after a few failures in a row Redis is not asked at all for a while (then one
call probes it), so a dead or black-holed Redis costs almost nothing. Any failure raises, and the
policies fail open — a cache miss, or this process's own share of the limit (the limit divided by
the live instances last seen).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import uuid
from contextlib import suppress
from typing import Any

from .redis_client import Guarded
from .sqlite import Entry, SQLiteStore

__all__ = ["RedisCacheStore", "RedisLimitStore", "TieredStore"]


class RedisCacheStore:
    prefix = "llmshim:cache:"

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

    def get(self, key: str, now: float, defer: Any = None) -> Entry | None:
        row = self.redis.run(lambda client: client.hgetall(self.prefix + key))
        if not row:
            return None
        expires = row.get(b"expires_at")
        expires_at = float(expires) if expires else None
        if expires_at is not None and expires_at <= now:
            return None
        return Entry(key, int(row[b"status"]), [tuple(h) for h in json.loads(row[b"headers"])], bytes(row[b"body"]),
                     float(row[b"created_at"]), expires_at, json.loads(row[b"meta"]))

    def put(self, entry: Entry, now: float) -> None:
        name = self.prefix + entry.key
        fields = {"status": entry.status, "headers": json.dumps(entry.headers), "body": entry.body,
                  "created_at": entry.created_at, "expires_at": entry.expires_at or "",
                  "meta": json.dumps(entry.meta, default=str)}

        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)  # one key: one slot, so MULTI works on a Cluster too
            pipe.hset(name, mapping=fields)
            if entry.expires_at is not None:
                pipe.pexpireat(name, int(entry.expires_at * 1000))
            pipe.execute()

        self.redis.run(write)

    def note(self, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        if hits or misses or tokens_saved:
            def count(client: Any) -> None:
                pipe = client.pipeline(transaction=False)
                for field, value in (("hits", hits), ("misses", misses), ("tokens_saved", tokens_saved)):
                    if value:
                        pipe.hincrby(self.prefix + "totals", field, value)
                pipe.execute()

            self.redis.run(count)

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

    def __init__(self, front: SQLiteStore, back: RedisCacheStore) -> None:
        self.front, self.back = front, back

    @property
    def salt(self) -> bytes:
        return self.back.salt  # one salt for every host, or hosts would never share an answer

    def get(self, key: str, now: float, defer: Any = None) -> Entry | None:
        entry = self.front.get(key, now, defer)
        if entry is None:
            entry = self.back.get(key, now)
            if entry is not None:  # kept in the front for the next hit: a write, deferred like the touch
                found = entry
                (defer or (lambda fn: fn()))(lambda: self.front.put(found, now))
        return entry

    def put(self, entry: Entry, now: float) -> None:
        self.front.put(entry, now)
        self.back.put(entry, now)

    def note(self, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        self.front.note(hits, misses, tokens_saved)
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


_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reserve = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local block = tonumber(redis.call('HGET', KEYS[1], 'block') or '0')
local wait = math.min(math.max(0, block - now), tonumber(ARGV[3 + n * 4]))
local news = {}
for i = 0, n - 1 do
  local dim = ARGV[3 + i * 4]
  local rate = tonumber(ARGV[4 + i * 4])
  local burst = tonumber(ARGV[5 + i * 4])
  local cost = math.min(tonumber(ARGV[6 + i * 4]), burst * rate)
  local tat = math.max(tonumber(redis.call('HGET', KEYS[1], dim) or '0'), now)
  local new = tat + cost / rate
  local tolerance = math.max(burst * (1 - reserve), cost / rate)
  wait = math.max(wait, new - tolerance - now)
  news[#news + 1] = dim
  news[#news + 1] = string.format('%.17g', new)  -- tostring keeps 14 digits: 0.1 ms of epoch seconds
end
if wait <= 0 and #news > 0 then
  redis.call('HSET', KEYS[1], unpack(news))
  redis.call('EXPIRE', KEYS[1], 3600)
end
return string.format('%.17g', wait)
"""

_BLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local until_ = now + math.min(tonumber(ARGV[1]), tonumber(ARGV[2]))
local current = tonumber(redis.call('HGET', KEYS[1], 'block') or '0')
if until_ > current then redis.call('HSET', KEYS[1], 'block', tostring(until_)) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


class RedisLimitStore:
    """The shared budget: GCRA state per key in a Redis hash, every take one script on Redis' clock."""

    def __init__(self, url: str, timeout: float = 0.05) -> None:
        from .limits import MAX_BLOCK, RESERVES

        self.redis = Guarded(url, timeout)
        self._reserves, self._max_block = RESERVES, MAX_BLOCK
        self.instance = uuid.uuid4().hex
        self.instances = 1  # live instances last seen: this process's share when Redis is away
        self._seen_at = 0.0

    @property
    def client(self) -> Any:
        return self.redis.client

    def close(self) -> None:
        """Leave the live instances (the others' share grows at once) and drop the connections."""
        instance = self.instance
        with suppress(Exception):  # through the breaker: a Redis known to be away is not waited for
            self.redis.run(lambda client: client.zrem("llmshim:rl:instances", instance))
        with suppress(Exception):
            self.redis.close()

    @staticmethod
    def _key(name: str) -> str:
        return "{llmshim:rl:" + name + "}"  # the hash tag keeps one key's data in one Cluster slot

    def _heartbeat(self) -> None:
        now = time.time()
        if now - self._seen_at < 5:
            return
        self._seen_at = now

        def beat(client: Any) -> int:
            pipe = client.pipeline(transaction=False)  # one key, so one Cluster slot
            pipe.zadd("llmshim:rl:instances", {self.instance: now})
            pipe.zremrangebyscore("llmshim:rl:instances", 0, now - 15)
            pipe.zcard("llmshim:rl:instances")
            return int(pipe.execute()[-1])

        with contextlib.suppress(Exception):  # the take has happened: a missed beat must not undo it
            self.instances = max(1, self.redis.run(beat))

    def try_take(self, name: str, now: float, dims: list[tuple[str, float, float, float]], level: str) -> float:
        args: list[Any] = [self._reserves.get(level, 0.2), len(dims)]
        for dim, rate, burst, cost in dims:
            args += [dim, rate, burst, cost]
        args.append(self._max_block)
        wait = float(self.redis.run(lambda client: self.redis.script(_TAKE)(keys=[self._key(name)], args=args)))
        self._heartbeat()
        return max(0.0, wait)

    def give_back(self, name: str, dim: str, seconds: float) -> None:
        self.redis.run(lambda client: client.hincrbyfloat(self._key(name), dim, -seconds))

    def block_for(self, name: str, seconds: float) -> None:
        args = [min(seconds, self._max_block), self._max_block]
        self.redis.run(lambda client: self.redis.script(_BLOCK)(keys=[self._key(name)], args=args))
