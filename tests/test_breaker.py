"""The Redis circuit breaker: the pure state machine, then a black-holed Redis under real calls.

A black hole is a real listening socket that never answers: one that accepts connections and then
says nothing (a hung server), one whose backlog is full so connections are never accepted (a
host that drops packets). Calls go requests -> llmshim -> FakeLLMServer; the assertions count the
connections the black hole saw (Redis was not asked), never wall-clock thresholds.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmshim.store.breaker import Breaker
from llmshim.testing import FakeLLMServer

# -- the state machine, on an explicit clock --------------------------------------------------------


def test_opens_after_threshold_slow_failures_in_a_row_and_refuses_until_the_cooldown_ends() -> None:
    breaker = Breaker(threshold=3, base=0.5, ceiling=4.0)
    assert [breaker.allow(0.0) and breaker.failed(0.0) for _ in range(3)] == [False, False, True]
    assert breaker.state(0.1) == "open" and not breaker.allow(0.1) and not breaker.allow(0.49)
    assert breaker.allow(0.5)  # the cooldown is over: this caller is the probe
    assert not breaker.allow(0.5) and not breaker.allow(1.0)  # one probe at a time
    assert breaker.succeeded() and breaker.state(1.0) == "closed" and breaker.allow(1.0)


def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    breaker = Breaker(threshold=3)
    for _ in range(10):
        breaker.failed(0.0)
        breaker.failed(0.0)
        breaker.succeeded()
    assert breaker.state(0.0) == "closed"


def test_a_failed_probe_doubles_the_cooldown_up_to_the_ceiling() -> None:
    breaker = Breaker(threshold=1, base=0.5, ceiling=4.0)
    now, cooldowns = 0.0, []
    breaker.failed(now)
    for _ in range(6):
        now = breaker.open_until or now
        assert breaker.allow(now)
        breaker.failed(now)
        cooldowns.append(breaker.cooldown)
    assert cooldowns == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_a_cheap_failure_does_not_count_and_a_cheap_probe_failure_closes() -> None:
    breaker = Breaker(threshold=2, slow=0.005)
    for _ in range(20):
        assert not breaker.failed(0.0, cost=0.0002)  # connection refused: asking again costs nothing
    assert breaker.state(0.0) == "closed"
    breaker.failed(0.0), breaker.failed(0.0)
    assert breaker.allow(10.0)
    breaker.failed(10.0, cost=0.0001)
    assert breaker.state(10.0) == "closed"


def test_a_probe_that_never_reports_expires_and_another_caller_probes() -> None:
    breaker = Breaker(threshold=1, base=0.5, ceiling=4.0)
    breaker.failed(0.0)
    assert breaker.allow(1.0)  # the probe's thread dies (or the process forks): no outcome comes back
    assert not breaker.allow(4.9)
    assert breaker.allow(5.0)


def test_a_probe_is_out_for_its_lease_however_short_the_cooldown() -> None:
    breaker = Breaker(threshold=1, base=0.5, ceiling=4.0, lease=30.0)
    breaker.failed(0.0)
    assert breaker.allow(1.0)  # the probe: a PING that may take its whole (long) timeout
    assert not breaker.allow(10.0) and not breaker.allow(30.9)
    assert breaker.allow(31.0)


@pytest.mark.parametrize("timeout", [0.001, 0.05, 1.0, 5.0, 60.0])
def test_a_redis_probe_outlasts_its_own_timeouts(timeout: float) -> None:
    """A probe connects and reads, each up to LLMSHIM_REDIS_TIMEOUT: with a long timeout (a
    distant Redis) the next probe must not start while the last one may still be waiting."""
    from llmshim.store.redis_client import Guarded

    lease = Guarded("redis://127.0.0.1:1/0", timeout).breaker.lease
    assert lease >= 2 * timeout and lease >= 4.0


def test_a_late_failure_from_before_the_opening_does_not_extend_the_cooldown() -> None:
    breaker = Breaker(threshold=1, base=0.5)
    breaker.failed(0.0)
    assert not breaker.failed(0.3)
    assert breaker.open_until == 0.5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["allow", "ok", "fail", "cheap"]),
                          st.floats(min_value=0, max_value=3, allow_nan=False)), max_size=60),
       st.integers(min_value=1, max_value=5))
def test_invariants_hold_for_any_sequence_of_events(events: list[tuple[str, float]], threshold: int) -> None:
    breaker = Breaker(threshold=threshold, base=0.5, ceiling=4.0)
    now, outstanding_probes = 0.0, 0
    for event, step in events:
        now += step
        before = breaker.state(now)
        if event == "allow":
            allowed = breaker.allow(now)
            if before == "closed":
                assert allowed  # closed never refuses
            if before == "open":
                assert not allowed  # open never lets anything through before its time
            if allowed and before != "closed":
                outstanding_probes += 1
                assert breaker.probing_since == now
        elif event == "ok":
            breaker.succeeded()
            outstanding_probes = 0
            assert breaker.state(now) == "closed" and breaker.failures == 0
        elif event == "cheap":
            assert not breaker.failed(now, cost=0.0)
        else:
            breaker.failed(now)
        assert 0 <= breaker.cooldown <= breaker.ceiling
        if breaker.open_until is not None:
            assert breaker.open_until <= now + breaker.ceiling
        else:
            assert breaker.failures < threshold


def test_what_counts_as_an_outage() -> None:
    import redis.exceptions as e

    from llmshim.store.redis_client import is_outage

    outages = [e.ConnectionError("refused"), e.TimeoutError("timed out"), OSError("unreachable"),
               e.ClusterDownError("CLUSTERDOWN"), e.TryAgainError("TRYAGAIN"),
               e.RedisClusterException("Redis Cluster cannot be connected"), e.MasterDownError("MASTERDOWN")]
    answers = [e.ResponseError("WRONGTYPE"), e.OutOfMemoryError("OOM"), e.NoScriptError("NOSCRIPT"),
               ValueError("bad entry"), KeyError("status")]
    assert [is_outage(x) for x in outages] == [True] * len(outages)
    assert [is_outage(x) for x in answers] == [False] * len(answers)


# -- black holes ---------------------------------------------------------------------------------------


class BlackHole:
    """A TCP port where Redis should be that never answers.

    ``accepting=True``: connections are accepted (and counted) and then nothing is ever sent back.
    ``accepting=False``: the listen backlog is filled first, so new connections are never accepted
    (the kernel drops their SYNs, as a firewalled or powered-off host does)."""

    def __init__(self, accepting: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.accepted: list[socket.socket] = []
        self.fillers: list[socket.socket] = []
        self._stop = threading.Event()
        if accepting:
            self.sock.listen(128)
            self.sock.settimeout(0.05)
            self.thread = threading.Thread(target=self._accept, daemon=True)
            self.thread.start()
        else:
            self.sock.listen(0)
            for _ in range(16):  # connect until a connection is no longer taken: the backlog is full
                filler = socket.socket()
                filler.settimeout(0.2)
                try:
                    filler.connect(("127.0.0.1", self.port))
                except OSError:
                    filler.close()
                    break
                self.fillers.append(filler)
            else:
                raise RuntimeError("the backlog never filled")

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        if hasattr(self, "thread"):
            self.thread.join()
        for conn in self.accepted + self.fillers:
            conn.close()
        self.sock.close()


@pytest.fixture(params=[True, False], ids=["accepts-never-answers", "never-accepts"])
def black_hole(request: pytest.FixtureRequest) -> Iterator[BlackHole]:
    hole = BlackHole(accepting=request.param)
    try:
        yield hole
    finally:
        hole.close()


def _redis_stores() -> list[object]:
    """The Redis stores of the installed pipeline (the cache's and the limiter's)."""
    from llmshim.runtime import STATE

    found = []
    for policy in STATE.pipeline.policies:
        store = getattr(policy, "store", None)
        store = getattr(store, "back", store)
        if getattr(store, "redis", None) is not None:
            found.append(store)
        shared = getattr(getattr(policy, "limiter", None), "shared", None)
        if getattr(shared, "redis", None) is not None:
            found.append(shared)
    return found


def _ask(server: FakeLLMServer, i: int) -> int:
    import requests

    body = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], "stream": False}
    return int(requests.post(server.url + "/api/chat", json=body, timeout=30).status_code)


def test_a_black_holed_redis_is_left_alone_after_the_first_few_calls(
        server: FakeLLMServer, black_hole: BlackHole, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import llmshim
    from llmshim.store import breaker, redis_client

    # No probe during the test: every later call is free. (Setting the class attributes did nothing:
    # a dataclass's __init__ keeps the defaults it was made with, so the 0.5 s cooldown ran out
    # whenever the 40 calls took longer than that on a loaded machine, and a probe made a 4th attempt.)
    monkeypatch.setattr(redis_client, "Breaker", functools.partial(breaker.Breaker, base=60.0, ceiling=60.0))
    llmshim.install(cache="on", cache_url=black_hole.url, cache_local=True, cache_path=str(tmp_path / "c.sqlite3"),
                    rpm="600000", ratelimit_store=black_hole.url)
    try:
        guards = [store.redis for store in _redis_stores()]  # type: ignore[attr-defined]
        assert len(guards) == 2 and all(guard.breaker.base == 60.0 for guard in guards)
        first = [_ask(server, i) for i in range(5)]
        attempts = [guard.attempts for guard in guards]
        accepted = len(black_hole.accepted)
        later = [_ask(server, i) for i in range(5, 45)]
        assert first + later == [200] * 45
        # Each store gave up after its threshold of failures: the 40 later calls never asked Redis.
        assert [guard.attempts for guard in guards] == attempts
        assert all(guard.attempts == guard.breaker.threshold for guard in guards)  # one failed operation a call
        assert len(black_hole.accepted) == accepted
        assert [guard.breaker.state(time.monotonic()) for guard in guards] == ["open", "open"]
        assert llmshim.stats()["store_errors"] > 0
        assert len(server.received) == 45  # the calls themselves all went out
    finally:
        llmshim.uninstall()


def test_redis_answering_again_is_used_again_after_one_cooldown(tmp_path: Path) -> None:
    from test_redis import RedisServer

    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore
    from llmshim.store.limits_redis import RedisLimitStore
    from llmshim.store.redis_client import Guarded, RedisUnavailable

    offset = [0.0]
    hole = BlackHole(accepting=True)
    url = hole.url
    cache = RedisCacheStore(url, guard=Guarded(url, clock=lambda: time.monotonic() + offset[0]))
    limits = RedisLimitStore(url)
    limits.redis.clock = cache.redis.clock
    dims = [("r", 100.0, 10.0, 1.0)]
    try:
        for _ in range(cache.redis.breaker.threshold):
            with pytest.raises(Exception, match=r"[Tt]imeout"):
                cache.get("a" * 64, time.time())
            with pytest.raises(Exception, match=r"[Tt]imeout"):
                limits.try_take("k", time.time(), dims, "normal")
        with pytest.raises(RedisUnavailable):
            cache.get("a" * 64, time.time())
        with pytest.raises(RedisUnavailable):
            limits.try_take("k", time.time(), dims, "normal")
    finally:
        hole.close()
    redis_server = RedisServer(tmp_path)
    redis_server.port, redis_server.url = hole.port, url  # Redis comes back where the black hole was
    redis_server.start()
    try:
        with pytest.raises(RedisUnavailable):  # still cooling down: not asked yet
            cache.get("a" * 64, time.time())
        offset[0] += cache.redis.breaker.cooldown  # one cooldown later, the next call starts a probe ...
        with pytest.raises(RedisUnavailable):  # ... and does not wait for it
            cache.get("a" * 64, time.time())
        assert cache.redis.probe is not None
        cache.redis.probe.join()  # the PING answered: the breaker is closed
        assert cache.redis.breaker.state(time.monotonic()) == "closed"
        entry = Entry("a" * 64, 200, [], b"{}", time.time(), None, {})
        cache.put(entry, time.time())
        assert cache.get("a" * 64, time.time()) == entry
        with pytest.raises(RedisUnavailable):  # the limiter's own breaker probes likewise
            limits.try_take("k", time.time(), dims, "normal")
        assert limits.redis.probe is not None
        limits.redis.probe.join()
        assert limits.try_take("k", time.time(), dims, "normal") == 0.0
    finally:
        cache.close()
        limits.close()
        redis_server.stop()


@pytest.mark.parametrize(("url", "timeout", "at_least"), [
    ("redis://h:6379/0", 0.05, 4.0),                                  # the floor: probes are rare anyway
    ("redis://h:6379/0", 2.0, 6.0),                                   # connect + read + a spare
    ("redis+sentinel://s1:26379,s2:26379,s3:26379/llm/0", 2.0, 12.0),  # each Sentinel asked, then the master
    ("redis+cluster://a:7000,b:7001/", 1.5, 7.5)])                    # each seed, then the node
def test_a_probe_is_out_longer_than_it_can_take(url: str, timeout: float, at_least: float) -> None:
    """A probe's lease covers the most it can take (one timeout per Sentinel or seed, then the
    connect and the read): the next probe never overlaps it, whatever LLMSHIM_REDIS_TIMEOUT is."""
    from llmshim.store.redis_client import Guarded, probe_lease
    from llmshim.store.redis_url import parse_redis_url

    target = parse_redis_url(url)
    assert probe_lease(target, timeout) == pytest.approx(at_least)
    assert Guarded(url, timeout).breaker.lease == pytest.approx(at_least)
