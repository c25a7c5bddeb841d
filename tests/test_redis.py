"""Redis as the shared cache and rate-limit budget, against a real redis-server started here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT
from llmshim.store.background import drain
from llmshim.testing import FakeLLMServer

if os.environ.get("CI"):
    import redis  # in CI these tests must run: a missing package or server is a failure, not a skip
else:
    redis = pytest.importorskip("redis")
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"),
                                reason="redis-server not on PATH (apt-get install -y redis-server)")


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None, "redis-server must be installed in CI"
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Closed, not left to the collector: the refused connects before the server listens keep
        # the connection in a reference cycle (their tracebacks), and its socket, open once the
        # server answers, would be finalized unclosed later: a ResourceWarning, an error in pytest.
        with redis.Redis.from_url(self.url) as client:
            for _ in range(500):
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.01)  # the server process is starting: nothing to wait on but the port
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _python(script: str, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}, "PYTHONPATH": str(ROOT),
            **(env or {})}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_answer_on_host_a_is_a_hit_on_host_b(server: FakeLLMServer, redis_server: RedisServer,
                                                tmp_path: Path) -> None:
    script = f"""
import json, requests, llmshim
llmshim.install(cache="on", cache_url={redis_server.url!r}, cache_local=True, cache_path=CACHE, redis_timeout="10s")
r = requests.post({server.url!r} + "/api/chat", json={{"model": "m", "messages": [], "stream": False}}, timeout=5)
print(json.dumps({{"hit": r.headers.get("x-llmshim-cache"), "body": r.json()}}))
"""
    host_a = _python(script.replace("CACHE", repr(str(tmp_path / "a.sqlite3"))))
    host_b = _python(script.replace("CACHE", repr(str(tmp_path / "b.sqlite3"))))
    assert host_a["hit"] is None and host_b["hit"] == "hit" and host_a["body"] == host_b["body"]
    assert len(server.received) == 1
    raw = b"".join(redis.Redis.from_url(redis_server.url).dump(k) or b""
                   for k in redis.Redis.from_url(redis_server.url).keys("llmshim:cache:*"))
    assert b"pickle" not in raw


def test_hosts_with_skewed_clocks_share_one_budget(server: FakeLLMServer, redis_server: RedisServer) -> None:
    server.rpm_limit, server.rpm_window = 10, 1.0
    script = f"""
import json, threading, time, requests, llmshim
real = time.time
time.time = lambda: real() + OFFSET  # this host's clock is off; Redis' TIME decides
llmshim.install(rpm="540", ratelimit_burst="0.1", ratelimit_store={redis_server.url!r}, retry_mode="off",
                cache="off")  # identical requests: with the cache on they would be hits, not load
codes = []
def work():
    for _ in range(3):
        codes.append(requests.post({server.url!r} + "/v1/chat/completions", json={{"model": "m", "messages": []}},
                                   timeout=60).status_code)
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps(codes))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script.replace("OFFSET", str(offset))], stdout=subprocess.PIPE,
                              text=True, env=env) for offset in (-2.0, -1.0, 1.0, 2.0)]
    codes = [c for p in procs for c in json.loads(p.communicate(timeout=120)[0])]
    assert codes == [200] * 48, sorted(set(codes))
    times = sorted(r.at for r in server.received)
    for start in times:
        assert sum(1 for t in times if start <= t < start + 1.0) <= 10
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 0.9 * 9 <= rate <= 10, rate


def test_redis_going_away_fails_open_and_comes_back(server: FakeLLMServer, redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    import requests

    import llmshim

    # A stopped Redis refuses at once whatever the timeout; a generous one keeps a loaded machine's slow
    # round trip from giving up a write this test counts.
    llmshim.install(cache="on", cache_url=redis_server.url, rpm="60000", ratelimit_store=redis_server.url,
                    redis_timeout="10s")
    try:
        def ask(i: int) -> int:
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "stream": False}
            return int(requests.post(server.url + "/api/chat", json=body, timeout=10).status_code)

        assert [ask(i) for i in range(3)] == [200] * 3
        redis_server.stop()
        assert [ask(i) for i in range(3, 8)] == [200] * 5  # no call fails while Redis is down
        errors = llmshim.stats()["store_errors"]
        assert errors > 0
        redis_server.start()  # same port, empty (no persistence): llmshim must resume using it
        assert [ask(i) for i in range(8, 11)] == [200] * 3
        client = redis.Redis.from_url(redis_server.url)
        assert drain(10.0)  # entries are written behind the calls: wait for the writer, not a time
        assert len(client.keys("llmshim:cache:[0-9a-f]*")) == 3  # the cache is used again
        assert client.keys("{llmshim:rl:*")  # and so is the shared budget
    finally:
        llmshim.uninstall()


@pytest.mark.parametrize("seconds", [99999.0, 1e300])
def test_a_redis_block_is_capped_and_one_stored_further_ahead_is_over(redis_server: RedisServer,
                                                                      seconds: float) -> None:
    from llmshim.store.limits_redis import RedisLimitStore
    from llmshim.store.limits_sqlite import MAX_BLOCK

    store = RedisLimitStore(redis_server.url, timeout=1.0)
    store.block_for("k", seconds)
    assert 0 < store.try_take("k", time.time(), [("rpm", 1.0, 1.0, 1.0)], "normal") <= MAX_BLOCK
    # A block further ahead than any write makes (an earlier llmshim without the cap, or Redis'
    # clock stepped back since) is over: read capped, it made every take wait MAX_BLOCK again, for
    # as long as the stored time lay ahead (a year here). A new block replaces it.
    store.client.hset(store._key("k"), "block", str(time.time() + 86400 * 365))
    assert store.try_take("k", time.time(), [("rpm", 1.0, 1.0, 1.0)], "normal") == 0
    store.block_for("k", 5.0)
    assert 0 < store.try_take("k", time.time(), [("rpm", 1.0, 1.0, 1.0)], "normal") <= 5.0


@pytest.mark.parametrize("redis_timeout", ["", "30s"])
def test_a_redis_slower_than_its_timeout_costs_the_write_not_the_call(server: FakeLLMServer,
                                                                       redis_server: RedisServer,
                                                                       redis_timeout: str) -> None:
    """Writes held back by Redis itself (``CLIENT PAUSE WRITE``): with the default 50 ms timeout the
    cache write is given up and counted, the call answered at once; with ``LLMSHIM_REDIS_TIMEOUT``
    raised the write waits for Redis and lands (a Redis across a slow network keeps its cache)."""
    import requests

    import llmshim

    def ask(i: int) -> tuple[int, str | None, Any]:
        body = {"model": "m", "messages": [{"role": "user", "content": f"slow {i}"}], "stream": False}
        reply = requests.post(server.url + "/api/chat", json=body, timeout=60)
        return reply.status_code, reply.headers.get("x-llmshim-cache"), reply.json()

    admin = redis.Redis.from_url(redis_server.url)
    llmshim.install(cache="on", cache_url=redis_server.url, **({"redis_timeout": redis_timeout} if redis_timeout
                                                                 else {}))
    try:
        assert ask(0)[:2] == (200, None)  # connected, the shared salt written: the next write is the answer's
        errors_before = llmshim.stats()["store_errors"]
        pause_ms = 300 if redis_timeout else 20_000  # the raised timeout outlasts its pause; the default never
        admin.client_pause(pause_ms, all=False)
        started = time.monotonic()
        try:
            status, cache, answer = ask(1)
            took = time.monotonic() - started
        finally:
            admin.client_unpause()
        assert status == 200 and cache is None and answer["message"]["role"] == "assistant"
        if redis_timeout:
            assert drain(10.0)
            assert len(admin.keys("llmshim:cache:[0-9a-f]*")) == 2  # the write waited for Redis and landed
            assert llmshim.stats()["store_errors"] == errors_before
            assert ask(1)[:2] == (200, "hit")
        else:
            assert took < pause_ms / 1000  # the call did not wait for Redis
            assert llmshim.stats()["store_errors"] > errors_before  # the lost write is counted
    finally:
        llmshim.uninstall()


def test_an_entry_stored_again_without_a_ttl_keeps_no_expiry_of_the_old_one(redis_server: RedisServer) -> None:
    """``LLMSHIM_CACHE=refresh`` without a TTL over an entry stored with one: the new answer does
    not vanish when the old one would have."""
    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore

    store = RedisCacheStore(redis_server.url, timeout=10)
    key, raw = "cd" * 32, redis.Redis.from_url(redis_server.url)
    store.put(Entry(key, 200, [("a", "1")], b"old", 1.0, time.time() + 3600, {"v": 1}), 2.0)
    assert 0 < raw.pttl(RedisCacheStore.prefix + key) <= 3_600_000
    store.put(Entry(key, 200, [("a", "2")], b"new", 3.0, None, {"v": 2}), 4.0)
    assert raw.pttl(RedisCacheStore.prefix + key) == -1
    found = store.get(key, 5.0)
    assert found is not None and (found.body, found.headers, found.expires_at) == (b"new", [("a", "2")], None)
    store.close()


@pytest.mark.parametrize("operation", ["get", "put", "note", "salt"])
def test_an_operation_that_outlives_close_opens_no_connection(redis_server: RedisServer, operation: str) -> None:
    """A read queued on llmshim's reader threads before ``uninstall()`` (a cancelled task's, say)
    can run after the store was closed: it is a store failure (the call it served is gone), and it
    builds no new client whose connections nobody would ever close."""
    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore
    from llmshim.store.redis_client import RedisUnavailable

    store = RedisCacheStore(redis_server.url, timeout=10)
    raw = redis.Redis.from_url(redis_server.url)
    entry = Entry("ef" * 32, 200, [("a", "1")], b"body", 1.0, None, {"v": 1})
    store.put(entry, 2.0)
    assert store.get(entry.key, 3.0) is not None
    store.close()
    before = len(raw.client_list())
    late = {"get": lambda: store.get(entry.key, 4.0), "put": lambda: store.put(entry, 4.0),
            "note": lambda: store.note(hits=1, misses=0, tokens_saved=0), "salt": lambda: store.salt}[operation]
    with pytest.raises(RedisUnavailable, match="closed"):
        late()
    assert store.redis._client is None
    assert len(raw.client_list()) == before
    assert store.redis.breaker.failures == 0 and store.redis.attempts == 2  # put, get: nothing after close


def test_a_redis_user_refused_scripts_still_gets_the_cache_written(redis_server: RedisServer,
                                                                  server: FakeLLMServer, tmp_path: Path) -> None:
    """An ACL without ``@scripting`` (NOPERM on EVALSHA): entries and counters are written as a
    MULTI transaction instead, and the cache answers as it does for any user."""
    import llmshim

    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "llm", "on", ">s3cret-pw", "~*", "&*", "+@all", "-@scripting")
    url = f"redis://llm:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(url).eval("return 1", 0)
    llmshim.install(cache="on", cache_url=url, cache_path=str(tmp_path / "c.sqlite3"), redis_timeout="10s")
    try:
        import requests

        body = {"model": "m", "messages": [{"role": "user", "content": "ACL"}], "temperature": 0}
        answers = [requests.post(server.openai_base_url + "/chat/completions", json=body, timeout=10)
                   for _ in range(3)]
        assert [a.headers.get("x-llmshim-cache") for a in answers] == [None, "hit", "hit"]
        assert len({a.text for a in answers}) == 1
        assert llmshim.stats()["store_errors"] == 0
    finally:
        llmshim.uninstall()
    totals = admin.hgetall("llmshim:cache:totals")
    assert (int(totals[b"hits"]), int(totals[b"misses"])) == (2, 1)
    names = [n for n in admin.keys("llmshim:cache:*") if n not in (b"llmshim:cache:totals", b"llmshim:cache:salt")]
    assert len(names) == 1 and admin.pttl(names[0]) == -1  # no TTL asked: none set


def test_a_fork_child_uses_redis_even_when_a_parent_thread_held_the_pool_lock_at_the_fork(
        redis_server: RedisServer) -> None:
    """redis-py's pool resets itself in a child under the lock it inherited: held by a parent's
    thread at the fork (taking or returning a connection), that lock stayed held for good and the
    child's every Redis operation waited for ever (seen as a hung fork test under load). The child
    builds a client of its own."""
    script = f"""
import os, signal, threading
from llmshim.store.redis_client import Guarded
guarded = Guarded({redis_server.url!r}, 5.0)
assert guarded.run(lambda client: client.ping())
lock = guarded.client.connection_pool._lock
holding, release = threading.Event(), threading.Event()
def hold():
    with lock:  # as a thread inside get_connection() or release() at the moment of the fork
        holding.set()
        release.wait()
threading.Thread(target=hold, daemon=True).start()
holding.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hang ends the child with SIGALRM
    ok = guarded.run(lambda client: client.set("forked", "yes")) and guarded.run(lambda client: client.get("forked"))
    os._exit(0 if ok == b"yes" else 3)
release.set()
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    assert _python(script) == 0
