"""The rate-limit budget on Redis, shared by every process on every machine.

Every take is one Lua script that reads the Redis server's clock (``TIME``), so hosts with skewed
clocks agree; the key has a hash tag (``{...}``) so the script's keys live in one Cluster slot;
blocks after a 429 are relative durations measured on that same clock. Lower priority classes keep
the same reserves of the burst as on SQLite (``limits_sqlite.RESERVES``).

Each process heartbeats into a sorted set of live instances (at most every 5 s, forgotten after
15 s): when Redis is away, a process limits on its own share, the limit divided by the instances
last seen. Every command names one key (Cluster-safe); timeouts are short and a circuit breaker
stops asking a Redis that does not answer (``redis_client.py``). Any failure raises; the
rate-limit policy fails open to its share.
"""

from __future__ import annotations

import contextlib
import uuid
from contextlib import suppress
from typing import Any

from ..clocks import wall
from ..gcra import STEP_MARGIN
from .limits_sqlite import MAX_BLOCK, RESERVES
from .redis_client import Guarded

__all__ = ["RedisLimitStore"]

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reserve = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local block = tonumber(redis.call('HGET', KEYS[1], 'block') or '0')
local wait = block - now
if wait <= 0 or wait > tonumber(ARGV[3 + n * 4]) then wait = 0 end  -- further ahead: stale (gcra.take)
local news = {}
for i = 0, n - 1 do
  local dim = ARGV[3 + i * 4]
  local rate = tonumber(ARGV[4 + i * 4])
  local burst = tonumber(ARGV[5 + i * 4])
  local cost = math.min(tonumber(ARGV[6 + i * 4]), burst * rate)
  local tat = tonumber(redis.call('HGET', KEYS[1], dim) or '0')
  if tat > now + burst + tonumber(ARGV[4 + n * 4]) then tat = now end  -- the clock went back (gcra.STEP_MARGIN)
  tat = math.max(tat, now)
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
if until_ > current or current > now + tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'block', tostring(until_)) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


class RedisLimitStore:
    """The shared budget: GCRA state per key in a Redis hash, every take one script on Redis' clock."""

    def __init__(self, url: str, timeout: float = 0.05) -> None:
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
        now = wall()
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
        args += [self._max_block, STEP_MARGIN]
        wait = float(self.redis.run(lambda client: self.redis.script(_TAKE)(keys=[self._key(name)], args=args)))
        self._heartbeat()
        return max(0.0, wait)

    def give_back(self, name: str, dim: str, seconds: float) -> None:
        self.redis.run(lambda client: client.hincrbyfloat(self._key(name), dim, -seconds))

    def block_for(self, name: str, seconds: float) -> None:
        args = [min(seconds, self._max_block), self._max_block]
        self.redis.run(lambda client: self.redis.script(_BLOCK)(keys=[self._key(name)], args=args))
