"""One table of GCRA cases, three implementations, the same answers (issue 13 item 2).

The step exists once in Python (``llmshim.gcra.take``), used by the in-memory bucket and the
SQLite store, and once in Lua (the Redis store's script, which must run inside Redis). Each case
is a key's state (theoretical arrival times, a block), a moment, the dimensions asked for and a
priority class; the answer is the wait and the state afterwards. Run against: the pure function,
the in-memory key (critical class only: a process orders its own waiters, it keeps no reserve),
the SQLite store, and the Redis script on a real redis-server, with its two clock lines replaced
by a fixed moment (Redis' own ``TIME`` otherwise) and every other byte as shipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmshim.gcra import STEP_MARGIN, Dim, take
from llmshim.policies.scheduler import Key, Waiter
from llmshim.store import limits_redis as redis_store
from llmshim.store.limits_sqlite import MAX_BLOCK, RESERVES, SQLiteLimitStore
from llmshim.values import Limits

EPOCH = 1_764_000_000.0  # a wall-clock moment: the stores keep epoch seconds, where a float has ~2e-7 s of room


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    now: float
    dims: tuple[Dim, ...]
    tats: dict[str, float] = dataclasses.field(default_factory=dict)
    block: float = 0.0
    level: str = "critical"


CASES = [
    Case("idle bucket: fits, tat one interval ahead", 100.0, (Dim("r", 1.0, 10.0, 1.0),)),
    Case("burst spent: one interval to wait", 100.0, (Dim("r", 1.0, 10.0, 1.0),), {"r": 110.0}),
    Case("tat in the past counts from now", 100.0, (Dim("r", 2.0, 5.0, 1.0),), {"r": 50.0}),
    Case("low keeps 30% of the burst free", 100.0, (Dim("r", 1.0, 10.0, 1.0),), {"r": 107.0}, level="low"),
    Case("high keeps 10% free", 100.0, (Dim("r", 1.0, 10.0, 1.0),), {"r": 108.5}, level="high"),
    Case("critical uses the whole burst", 100.0, (Dim("r", 1.0, 10.0, 1.0),), {"r": 108.5}),
    Case("a cost above the burst passes alone on an idle bucket", 100.0, (Dim("t", 10.0, 2.0, 500.0),)),
    Case("a cost above the burst waits for an empty bucket", 100.0, (Dim("t", 10.0, 2.0, 500.0),), {"t": 101.0}),
    Case("reserve never refuses one call on an idle bucket", 100.0, (Dim("r", 0.1, 5.0, 1.0),), level="low"),
    Case("two dimensions: both fit", 100.0, (Dim("r", 1.0, 10.0, 1.0), Dim("t", 100.0, 10.0, 300.0)),
         {"r": 101.0, "t": 103.0}),
    Case("two dimensions: tokens short, nothing taken", 100.0,
         (Dim("r", 1.0, 10.0, 1.0), Dim("t", 100.0, 10.0, 300.0)), {"r": 101.0, "t": 109.0}),
    Case("a block adds its remaining time", 100.0, (Dim("r", 1.0, 10.0, 1.0),), block=104.5),
    Case("a block in the past is over", 100.0, (Dim("r", 1.0, 10.0, 1.0),), block=99.0),
    Case("a block further ahead than MAX_BLOCK is stale (the clock went back): over", 100.0,
         (Dim("r", 1.0, 10.0, 1.0),), block=1e9),
    Case("a block exactly MAX_BLOCK ahead holds", 100.0, (Dim("r", 1.0, 10.0, 1.0),), block=100.0 + MAX_BLOCK),
    Case("clock stepped back an hour: a tat an hour ahead is forgotten", EPOCH,
         (Dim("r", 1.0, 10.0, 1.0),), {"r": EPOCH + 3600.0}),
    Case("clock stepped back: two dimensions forgotten", EPOCH,
         (Dim("r", 1.0, 10.0, 1.0), Dim("t", 100.0, 10.0, 300.0)), {"r": EPOCH + 3600.0, "t": EPOCH + 7200.0}),
    Case("a tat within the margin past the burst is waited out", EPOCH, (Dim("r", 1.0, 10.0, 1.0),),
         {"r": EPOCH + 40.0}),
    Case("a full bucket within the margin is no step back", EPOCH, (Dim("r", 1.0, 10.0, 1.0),), {"r": EPOCH + 10.9}),
    Case("epoch seconds: a high rate's tiny interval is kept", EPOCH, (Dim("r", 1e5, 1.0, 1.0),), {"r": EPOCH}),
    Case("epoch seconds: tokens at 500k/s", EPOCH + 0.25, (Dim("t", 500_000.0, 10.0, 1234.0),), {"t": EPOCH + 3.0}),
    Case("epoch seconds: full, wait under a millisecond", EPOCH, (Dim("r", 2000.0, 1.0, 1.0),),
         {"r": EPOCH + 1.0003}),
]


@dataclasses.dataclass(frozen=True)
class Answer:
    wait: float
    tats: dict[str, float]


def expected(case: Case) -> Answer:
    wait, news = take(case.tats, case.block, case.now, case.dims, RESERVES[case.level], MAX_BLOCK)
    return Answer(wait, news if wait <= 0 else dict(case.tats))


def _same(got: Answer, want: Answer) -> bool:
    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=0, abs_tol=2 * math.ulp(max(abs(a), abs(b), 1.0)))

    return (close(got.wait, want.wait) and got.tats.keys() == want.tats.keys()
            and all(close(got.tats[dim], want.tats[dim]) for dim in want.tats))


def test_the_table_means_what_its_names_say() -> None:
    answers = {case.name: expected(case) for case in CASES}
    assert answers["idle bucket: fits, tat one interval ahead"] == Answer(0.0, {"r": 101.0})
    assert answers["burst spent: one interval to wait"] == Answer(1.0, {"r": 110.0})
    assert answers["low keeps 30% of the burst free"].wait == pytest.approx(1.0)
    assert answers["high keeps 10% free"].wait == pytest.approx(0.5)
    assert answers["critical uses the whole burst"].wait == 0.0
    assert answers["a cost above the burst passes alone on an idle bucket"] == Answer(0.0, {"t": 102.0})
    assert answers["a cost above the burst waits for an empty bucket"].wait == pytest.approx(1.0)
    short = answers["two dimensions: tokens short, nothing taken"]
    assert short.wait == pytest.approx(2.0) and short.tats == {"r": 101.0, "t": 109.0}
    assert answers["a block adds its remaining time"].wait == 4.5
    stale = answers["a block further ahead than MAX_BLOCK is stale (the clock went back): over"]
    assert stale == Answer(0.0, {"r": 101.0})
    assert answers["a block exactly MAX_BLOCK ahead holds"].wait == MAX_BLOCK
    # a wall clock stepped back an hour: the next call waits as after a spent burst, not an hour
    assert answers["clock stepped back an hour: a tat an hour ahead is forgotten"] == Answer(0.0, {"r": EPOCH + 1.0})
    assert answers["clock stepped back: two dimensions forgotten"] == Answer(0.0, {"r": EPOCH + 1.0, "t": EPOCH + 3.0})
    assert answers["a full bucket within the margin is no step back"].wait == pytest.approx(1.9)
    assert answers["a tat within the margin past the burst is waited out"].wait == pytest.approx(31.0)
    assert answers["epoch seconds: a high rate's tiny interval is kept"].tats["r"] > EPOCH


@pytest.mark.parametrize("case", [c for c in CASES if c.level == "critical" and c.block - c.now <= MAX_BLOCK],
                         ids=lambda c: c.name)
def test_the_in_memory_key_agrees(case: Case) -> None:
    per_minute = {dim.name: dim.rate * 60 for dim in case.dims}
    key = Key(Limits(rpm=per_minute.get("r"), tpm=per_minute.get("t")), burst=max(d.burst for d in case.dims))
    buckets = {"r": key.requests, "t": key.tokens}
    for dim in case.dims:
        bucket = buckets[dim.name]
        assert bucket is not None and bucket.rate == dim.rate
        bucket.burst, bucket.tat = dim.burst, case.tats.get(dim.name, 0.0)
    key.blocked_until = case.block
    costs = {dim.name: dim.cost for dim in case.dims}
    wait = key.try_take(case.now, Waiter("critical", costs.get("r", 0.0), costs.get("t", 0.0), case.now))
    got = Answer(wait, {dim.name: buckets[dim.name].tat for dim in case.dims})  # type: ignore[union-attr]
    want = expected(case)
    assert _same(got, dataclasses.replace(want, tats={d.name: want.tats.get(d.name, 0.0) for d in case.dims}))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_sqlite_store_agrees(case: Case, tmp_path: Path) -> None:
    path = str(tmp_path / "limits.sqlite3")
    store = SQLiteLimitStore(path)
    store.give_back("warm", "r", 0.0)  # creates the file and its table
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        state = {**case.tats, **({"block": case.block} if case.block else {})}
        conn.executemany("INSERT INTO buckets (name, dim, tat) VALUES ('k', ?, ?)", state.items())
    wait = store.try_take("k", case.now, [dataclasses.astuple(dim) for dim in case.dims], case.level)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tats = dict(conn.execute("SELECT dim, tat FROM buckets WHERE name = 'k' AND dim != 'block'").fetchall())
    store.close()
    assert _same(Answer(wait, tats), expected(case))


# -- the Redis script, on a real redis-server -----------------------------------------------------
CLOCK_LINES = ("local t = redis.call('TIME')\n"
               "local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n")


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_redis import REDIS_SERVER, RedisServer, redis

    if REDIS_SERVER is None and not os.environ.get("CI"):
        pytest.skip("redis-server not on PATH (apt-get install -y redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()  # in CI a missing redis-server fails here, as the other Redis tests do
    try:
        yield redis.Redis.from_url(server.url)
    finally:
        server.stop()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_redis_script_agrees(case: Case, redis_client: Any) -> None:
    assert redis_store._TAKE.count(CLOCK_LINES) == 1  # the script reads the clock exactly there
    script = redis_store._TAKE.replace(CLOCK_LINES, "local now = tonumber(ARGV[#ARGV])\n")
    key = "{llmshim:rl:table}"
    redis_client.delete(key)
    state = {**case.tats, **({"block": case.block} if case.block else {})}
    if state:
        redis_client.hset(key, mapping={dim: repr(tat) for dim, tat in state.items()})
    args: list[Any] = [RESERVES[case.level], len(case.dims)]
    for dim in case.dims:
        args += [dim.name, repr(dim.rate), repr(dim.burst), repr(dim.cost)]
    args += [MAX_BLOCK, STEP_MARGIN, repr(case.now)]  # as RedisLimitStore.try_take passes them, plus the moment
    wait = float(redis_client.eval(script, 1, key, *args))
    stored = {k.decode(): float(v) for k, v in redis_client.hgetall(key).items() if k != b"block"}
    assert _same(Answer(wait, stored), expected(case)), (wait, stored, expected(case))
