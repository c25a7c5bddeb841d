"""Redis at scale: the URL forms, a real 3-master Redis Cluster, a real Sentinel failover.

The Cluster is three ``redis-server --cluster-enabled yes`` on loopback joined with ``redis-cli
--cluster create``; the Sentinel set-up is a master, a replica and three sentinels, and the
master is killed mid-run. Calls go through llmshim with real clients to FakeLLMServer.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmshim.store.redis_url import parse_redis_url
from llmshim.testing import FakeLLMServer

if os.environ.get("CI"):
    import redis  # in CI these tests must run: a missing package or server is a failure, not a skip
else:
    redis = pytest.importorskip("redis")
REDIS_SERVER, REDIS_CLI = shutil.which("redis-server"), shutil.which("redis-cli")
needs_servers = pytest.mark.skipif((REDIS_SERVER is None or REDIS_CLI is None) and not os.environ.get("CI"),
                                   reason="redis-server / redis-cli not on PATH (apt-get install -y redis-server)")

# -- URL forms (pure) -------------------------------------------------------------------------------------


def test_cluster_and_sentinel_urls() -> None:
    cluster = parse_redis_url("redis+cluster://u:p%40ss@10.0.0.1:7000,node-b,[::1]:7002")
    assert (cluster.kind, cluster.nodes, cluster.username, cluster.password, cluster.tls) == (
        "cluster", (("10.0.0.1", 7000), ("node-b", 6379), ("::1", 7002)), "u", "p@ss", False)
    sentinel = parse_redis_url("rediss+sentinel://:pw@s1:26380,s2/mymaster/3?sentinel_password=x")
    assert (sentinel.kind, sentinel.nodes, sentinel.service, sentinel.db, sentinel.password, sentinel.tls) == (
        "sentinel", (("s1", 26380), ("s2", 26379)), "mymaster", 3, "pw", True)
    assert parse_redis_url("redis://h:1/0").kind == "single"
    assert parse_redis_url("unix:///run/redis.sock").kind == "single"
    for bad in ["redis+sentinel://s1:26379", "redis+cluster://", "redis+cluster://h:0", "redis+cluster://h:7000/2",
                "redis+sentinel://s1/m/x", "redis+cluster://h:\uff17\uff10\uff10\uff10", "http://h:6379", "redis://"]:
        with pytest.raises(ValueError):
            parse_redis_url(bad)


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
       st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=4))
def test_credentials_survive_any_alphabet_and_are_never_described(user: str, password: str,
                                                                   ports: list[int]) -> None:
    from urllib.parse import quote

    hosts = ",".join(f"h{i}.example:{port}" for i, port in enumerate(ports))
    for scheme, tail in (("redis+cluster", ""), ("redis+sentinel", "/svc/1")):
        target = parse_redis_url(f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{hosts}{tail}")
        assert (target.username, target.password) == (user, password)
        assert [port for _, port in target.nodes] == ports
        assert target.describe() == f"{scheme}://{hosts}{tail}"  # where, never who
        # never shown: the password occurs in the repr no more often than in the same target's repr
        # without a password (a password such as "Fals" is part of the word "False" there)
        bare = parse_redis_url(f"{scheme}://{quote(user, safe='')}@{hosts}{tail}")
        assert repr(target).count(password) <= repr(bare).count(password) or len(password) < 4


def test_settings_accept_cluster_and_sentinel_urls_and_reject_malformed_ones_without_echoing_them() -> None:
    from llmshim.config import ConfigError, load

    ok = load({}, cache_url="redis+cluster://a:7000,b:7001", ratelimit_store="redis+sentinel://s:26379/m")
    assert ok.cache_url == "redis+cluster://a:7000,b:7001" and ok.ratelimit_store == "redis+sentinel://s:26379/m"
    with pytest.raises(ConfigError) as info:
        load({}, ratelimit_store="redis+sentinel://:hunter2@s:26379")  # no service name
    assert "service" in str(info.value)


# -- servers ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _until(condition: Callable[[], Any], what: str, deadline: float = 20.0) -> Any:
    """Wait for another process's state (a server up, a failover done); fail after ``deadline``."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            value = condition()
            if value:
                return value
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.02)  # polling a server we do not control: nothing to wait on but its answers
    raise AssertionError(f"timed out waiting for {what}")


def _asked(port: int, question: Callable[[Any], Any]) -> Any:
    """``question(client)`` on a client closed after it: polled while a server starts, an unclosed
    one keeps its socket in the reference cycle of its refused connects (see RedisServer.start)."""
    with redis.Redis(port=port) as client:
        return question(client)


def _redis_server(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    assert REDIS_SERVER is not None, "redis-server must be installed in CI"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(workdir), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def ping() -> bool:
        with redis.Redis(port=port) as client:  # closed: see test_redis.RedisServer.start
            return bool(client.ping())

    try:
        _until(ping, f"redis-server on {port}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.ports = [_free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for port in self.ports:  # the bus port is set too: port + 10000, the default, may be taken or > 65535
                self.procs.append(_redis_server(port, workdir / str(port), "--cluster-enabled", "yes",
                                                "--cluster-port", str(_free_port()), "--cluster-config-file",
                                                str(workdir / str(port) / "nodes.conf"), "--cluster-node-timeout",
                                                "1000"))
            assert REDIS_CLI is not None
            subprocess.run([REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
            _until(lambda: all(self.node(i).cluster("INFO")["cluster_state"] == "ok" for i in range(3)),
                   "cluster ok")
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def node(self, i: int) -> Any:
        return redis.Redis(port=self.ports[i])

    def keys(self, pattern: str) -> dict[int, list[bytes]]:
        return {i: self.node(i).keys(pattern) for i in range(3)}

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def empty_cluster(cluster: Cluster) -> Cluster:
    for i in range(3):
        cluster.node(i).flushall()
    return cluster


def _ask(server: FakeLLMServer, i: int) -> tuple[int, str | None]:
    import requests

    body = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], "stream": False}
    reply = requests.post(server.url + "/api/chat", json=body, timeout=30)
    return reply.status_code, reply.headers.get("x-llmshim-cache")


@needs_servers
@pytest.mark.parametrize("form", ["redis+cluster", "redis-to-one-node"])
def test_cache_and_budget_work_on_a_three_master_cluster(server: FakeLLMServer, empty_cluster: Cluster,
                                                         form: str) -> None:
    import llmshim

    url = empty_cluster.url if form == "redis+cluster" else f"redis://127.0.0.1:{empty_cluster.ports[2]}/0"
    # A generous Redis timeout: on a loaded machine a round trip over 50 ms gives a write up (fail
    # open, tested in test_redis.py), and this test is about the cluster, not about timeouts.
    llmshim.install(cache="on", cache_url=url, rpm="600000", ratelimit_store=url, redis_timeout="10s")
    try:
        first = [_ask(server, i) for i in range(6)]
        second = [_ask(server, i) for i in range(6)]
        assert first == [(200, None)] * 6 and second == [(200, "hit")] * 6  # 6 of 6 expected hits
        assert llmshim.stats()["store_errors"] == 0
    finally:
        llmshim.uninstall()
    entries = empty_cluster.keys("llmshim:cache:[0-9a-f]*")
    assert sum(len(v) for v in entries.values()) == 6
    from redis.crc import key_slot

    # Spread by slot, not pinned to one by a hash tag: a real Cluster use. (Which masters hold six
    # random slots is chance: all six on one of three happens 1 time in 243.)
    slots = {key_slot(key.encode() if isinstance(key, str) else key) for keys in entries.values() for key in keys}
    assert len(slots) == 6
    assert any(empty_cluster.keys("{llmshim:rl:*").values())  # the shared budget lives there too
    assert len(server.received) == 6


@needs_servers
def test_every_store_operation_works_on_the_cluster(empty_cluster: Cluster) -> None:
    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore
    from llmshim.store.limits_redis import RedisLimitStore

    cache = RedisCacheStore(empty_cluster.url, timeout=1)
    now = time.time()
    keys = [f"{i:064x}" for i in range(30)]
    for key in keys:
        cache.put(Entry(key, 200, [("content-type", "application/json")], b"{}", now, now + 60, {"m": 1}), now)
    assert all(cache.get(key, now) is not None for key in keys)
    assert cache.salt == RedisCacheStore(empty_cluster.url, timeout=1).salt  # one salt for every host
    cache.note(hits=2, misses=1)
    stats = cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"]) == (30, 2, 1)
    assert "@" not in stats["path"]
    assert cache.clear() == 30 and cache.stats()["entries"] == 0

    host_a, host_b = (RedisLimitStore(empty_cluster.url, timeout=1) for _ in range(2))
    dims = [("r", 1.0, 3.0, 1.0)]  # 1 per second, a burst of 3: one budget for both hosts
    waits = [store.try_take("k", time.time(), dims, "critical") for store in (host_a, host_b) * 3]
    assert sum(1 for w in waits if w <= 0) == 3, waits
    host_a.give_back("k", "r", 1.0)
    host_b.block_for("k", 5.0)
    assert host_a.try_take("k", time.time(), dims, "critical") > 4.0
    host_b._seen_at = 0.0
    host_b.try_take("other", time.time(), dims, "critical")
    assert host_b.instances == 2  # both hosts' heartbeats, in one sorted set


@needs_servers
def test_resharding_mid_run_moves_keys_and_every_answer_is_still_a_hit(server: FakeLLMServer,
                                                                       empty_cluster: Cluster) -> None:
    import llmshim
    from llmshim.store.background import drain

    llmshim.install(cache="on", cache_url=empty_cluster.url, redis_timeout="10s")  # see above
    try:
        assert [_ask(server, i) for i in range(6)] == [(200, None)] * 6
        assert drain(10.0)  # the entries are written behind the calls: wait for the writer, not a time
        assert sum(len(v) for v in empty_cluster.keys("llmshim:cache:[0-9a-f]*").values()) == 6  # before the moves
        slots = {(int(empty_cluster.node(i).cluster("KEYSLOT", key)), i) for i in range(3)
                 for key in empty_cluster.node(i).keys("llmshim:cache:[0-9a-f]*")}
        for slot, node in slots:  # every cached answer's slot goes to the next master
            _move_slot(empty_cluster, slot, node, (node + 1) % 3)
        assert sum(len(v) for v in empty_cluster.keys("llmshim:cache:[0-9a-f]*").values()) == 6
        assert [_ask(server, i) for i in range(6)] == [(200, "hit")] * 6  # MOVED followed, not failed open
        assert llmshim.stats()["store_errors"] == 0
    finally:
        llmshim.uninstall()


def _move_slot(cluster: Cluster, slot: int, src: int, dst: int) -> None:
    """Move one slot and its keys from node src to node dst, as ``redis-cli --cluster reshard`` does."""
    source, target = cluster.node(src), cluster.node(dst)
    source_id, target_id = source.cluster("MYID"), target.cluster("MYID")
    if isinstance(source_id, bytes):
        source_id, target_id = source_id.decode(), target_id.decode()
    target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    for key in source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", cluster.ports[dst], key, 0, 5000)
    for node in (target, source, cluster.node(3 - src - dst)):
        node.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


@needs_servers
def test_a_cluster_master_dying_mid_run_fails_no_call(server: FakeLLMServer, tmp_path: Path) -> None:
    import llmshim

    own = Cluster(tmp_path / "c")  # this test kills a node: a cluster of its own
    try:
        llmshim.install(cache="on", cache_url=own.url, rpm="600000", ratelimit_store=own.url)
        try:
            assert [_ask(server, i)[0] for i in range(6)] == [200] * 6
            own.procs[1].kill()
            own.procs[1].wait()
            assert [_ask(server, i)[0] for i in range(6, 20)] == [200] * 14
            assert [_ask(server, i)[0] for i in range(6)] == [200] * 6
        finally:
            llmshim.uninstall()
    finally:
        own.stop()



# -- One timeout per operation ------------------------------------------------------------------------------


class SentTo:
    """Counts the commands redis-py sends, per server port (instrumentation: nothing is changed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ports: list[int] = []
        original = redis.connection.AbstractConnection.send_packed_command

        def send(connection: Any, command: Any, check_health: bool = True) -> Any:
            self.ports.append(int(connection.port))
            return original(connection, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)


@needs_servers
@pytest.mark.parametrize("operation", ["lookup", "store", "count"])
@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_a_command_a_frozen_redis_never_answered_is_sent_once(topology: str, operation: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``LLMSHIM_REDIS_TIMEOUT`` bounds one operation: the command to a server that does not
    answer (SIGSTOP) is not sent to it again. redis-py's Cluster client retried a timed-out command
    once after refreshing its slot map (two timeouts), its pipelines more (a counter flush took
    five). The other masters may still be asked for the slot map."""
    import signal

    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore
    from llmshim.store.redis_client import Guarded

    servers: Any
    if topology == "cluster":
        servers = Cluster(tmp_path / "c")
        url = servers.url
    else:
        from test_redis import RedisServer

        servers = RedisServer(tmp_path)
        servers.start()
        url = servers.url
    frozen = None
    try:
        guarded = Guarded(url, 0.3)
        store = RedisCacheStore(url, guard=guarded)
        key = "ab" * 32
        entry = Entry(key, 200, [("content-type", "application/json")], b'{"ok": 1}', 1.0, 4e9, {"k": "v"})
        act = {"lookup": lambda: store.get(key, 2.0), "store": lambda: store.put(entry, 2.0),
               "count": lambda: store.note(hits=1, tokens_saved=5)}[operation]
        name = RedisCacheStore.prefix + ("totals" if operation == "count" else key)
        act()  # connected, slot map known, the scripts loaded
        if topology == "cluster":
            port = guarded.client.get_node_from_key(name).port
            frozen = servers.procs[servers.ports.index(port)]
        else:
            port, frozen = servers.port, servers.proc
        sent = SentTo(monkeypatch)
        os.kill(frozen.pid, signal.SIGSTOP)
        with pytest.raises(redis.TimeoutError):
            act()
        assert sent.ports.count(port) == 1, sent.ports
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        servers.stop()

# -- Sentinel ---------------------------------------------------------------------------------------------


class SentinelSet:
    def __init__(self, workdir: Path) -> None:
        self.master_port, self.replica_port = _free_port(), _free_port()
        self.master = _redis_server(self.master_port, workdir / "master")
        self.replica = _redis_server(self.replica_port, workdir / "replica", "--replicaof", "127.0.0.1",
                                     str(self.master_port))
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        try:
            self._start_sentinels(workdir)
        except BaseException:
            self.stop()
            raise
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + "/llm/0"

    def _start_sentinels(self, workdir: Path) -> None:
        for port in self.sentinel_ports:
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                            f"sentinel monitor llm 127.0.0.1 {self.master_port} 2\n"
                            "sentinel down-after-milliseconds llm 300\nsentinel failover-timeout llm 3000\n")
            assert REDIS_SERVER is not None
            self.sentinels.append(subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _until(lambda: redis.Redis(port=self.replica_port).info("replication")["master_link_status"] == "up",
               "the replica in sync")
        for port in self.sentinel_ports:  # each sentinel sees the replica and the two others: ready to fail over
            _until(lambda p=port: (lambda m: m["num-slaves"] >= 1 and m["num-other-sentinels"] >= 2)(
                _asked(p, lambda client: client.sentinel_master("llm"))), "sentinels ready")

    def master_is(self, port: int) -> bool:
        return all(int(redis.Redis(port=p).sentinel_get_master_addr_by_name("llm")[1]) == port
                   for p in self.sentinel_ports)

    def stop(self) -> None:
        for proc in [self.master, self.replica, *self.sentinels]:
            proc.kill()
            proc.wait()


@needs_servers
def test_sentinel_failover_mid_run_fails_no_call_and_the_cache_and_budget_carry_on(
        server: FakeLLMServer, tmp_path: Path) -> None:
    import llmshim

    servers = SentinelSet(tmp_path)
    try:
        llmshim.install(cache="on", cache_url=servers.url, rpm="600000", ratelimit_store=servers.url)
        try:
            assert [_ask(server, i) for i in range(4)] == [(200, None)] * 4
            assert redis.Redis(port=servers.master_port).wait(1, 5000) == 1  # the replica has them
            servers.master.kill()  # mid-run: calls go on while the sentinels notice and promote the replica
            servers.master.wait()
            during = [_ask(server, i)[0] for i in range(4, 10)]
            _until(lambda: servers.master_is(servers.replica_port), "the failover")
            answers = _until(lambda: (lambda got: got if got[-1] == (200, "hit") else None)(
                [_ask(server, i) for i in range(4)]), "hits from the new master")
            promoted = redis.Redis(port=servers.replica_port)
            budget_before = {key: promoted.hget(key, "r") for key in promoted.keys("{llmshim:rl:*")}
            after = [_ask(server, i) for i in range(10, 13)]
            assert during == [200] * 6 and [a[0] for a in answers] == [200] * 4
            assert after == [(200, None)] * 3
            assert [_ask(server, i) for i in range(10, 13)] == [(200, "hit")] * 3  # written to the new master
            budget_after = {key: promoted.hget(key, "r") for key in promoted.keys("{llmshim:rl:*")}
            assert budget_after and budget_after != budget_before  # the budget is taken on the new master
        finally:
            llmshim.uninstall()
        assert len(promoted.keys("llmshim:cache:[0-9a-f]*")) >= 7
    finally:
        servers.stop()
