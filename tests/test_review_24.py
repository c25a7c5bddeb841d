"""Review 24: trio cancellation during a send, and the Redis write scripts against a real server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer, Fault


def body(question: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": stream}


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    def install(**settings: str) -> Any:
        llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"), **settings)
        return STATE.pipeline

    yield install
    llmshim.uninstall()


def _limiter() -> Any:
    return next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))


# -- trio: a call cancelled while its request is upstream ----------------------------------------

@pytest.mark.timeout(30)  # the upstream answers after 60 s: a send the cancellation misses fails here
@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_trio_call_cancelled_during_its_send_stops_the_request_and_frees_its_slot(
        library: str, server: FakeLLMServer, installed: Callable[..., Any]) -> None:
    """trio runs the worker's send as a system task, outside the caller's cancel scopes: before,
    the cancelled call's request stayed upstream until it was answered (billed, its slot held), and
    the next call waited behind it. Without llmshim the cancellation closes the request at once."""
    trio = pytest.importorskip("trio")
    module = pytest.importorskip(library)
    installed(max_concurrency="1", queue_timeout="60")
    server.reset()
    server.inject(Fault(delay=60), times=1)

    async def main() -> tuple[bool, int]:
        async with module.AsyncClient(base_url=server.openai_base_url, timeout=90) as client:
            with trio.move_on_after(0.3) as scope:
                await client.post("/chat/completions", json=body("slow, cancelled"))
            # Queued behind the cancelled call's slot: answered once its request has stopped.
            after = await client.post("/chat/completions", json=body("after"))
            return scope.cancelled_caught, after.status_code

    assert trio.run(main) == (True, 200)
    assert _limiter().held() == (0, 0)
    asked = [json.loads(r.body)["messages"][0]["content"] for r in server.received]
    assert asked == ["slow, cancelled", "after"]


# -- Redis Cluster: the cache writes' MULTI fallback takes one timeout, as the scripts do ----------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_redis_cluster import Cluster

    started = Cluster(tmp_path_factory.mktemp("cluster24"))
    try:
        yield started
    finally:
        started.stop()


def _connections_received(node: Any) -> int:
    node.ping()  # a round trip first: connections pending when the node resumed are accepted by now
    return int(node.info("stats")["total_connections_received"])


def test_a_cluster_write_refused_scripts_is_not_sent_again_after_a_timeout(cluster: Any) -> None:
    """A Redis user without @scripting writes through a MULTI transaction. redis-py's Cluster
    transactions retry with the client's ``Retry``, to which they add TimeoutError by name: a MULTI to
    a master that did not answer was sent again on a new connection (two timeouts, and a counter that
    may count twice). Now only a connection error is retried."""
    import os
    import signal

    from llmshim.store.cache_redis import RedisCacheStore

    for i in range(3):
        cluster.node(i).execute_command("ACL", "SETUSER", "noscript24", "on", ">pw", "~*", "+@all", "-@scripting")
    store = RedisCacheStore(cluster.url.replace("redis+cluster://", "redis+cluster://noscript24:pw@"), timeout=0.2)
    store.note(hits=1)
    assert store._scripts_refused  # the fallback is what is tested
    owner = cluster.ports.index(store.client.get_node_from_key(store.prefix + "totals").port)
    node = cluster.node(owner)
    before = _connections_received(node)
    os.kill(cluster.procs[owner].pid, signal.SIGSTOP)  # frozen: connections are accepted by the kernel only
    try:
        with pytest.raises(Exception, match="Timeout"):
            store.note(hits=1)
    finally:
        os.kill(cluster.procs[owner].pid, signal.SIGCONT)
    assert _connections_received(node) == before  # no second connection: the MULTI was not sent again
