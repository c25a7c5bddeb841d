"""Review 24: trio cancellation during a send, and the Redis write scripts against a real server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trio import _limiter, body

from llmshim.testing import FakeLLMServer, Fault

# -- trio: a call cancelled while its request is upstream ----------------------------------------

@pytest.mark.timeout(30)  # the upstream answers after 60 s: a send the cancellation misses fails here
@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_trio_call_cancelled_during_its_send_stops_the_request_and_frees_its_slot(
        library: str, server: FakeLLMServer, installed_cached: Callable[..., Any]) -> None:
    """trio runs the worker's send as a system task, outside the caller's cancel scopes: before,
    the cancelled call's request stayed upstream until it was answered (billed, its slot held), and
    the next call waited behind it. Without llmshim the cancellation closes the request at once."""
    trio = pytest.importorskip("trio")
    module = pytest.importorskip(library)
    installed_cached(max_concurrency="1", queue_timeout="60")
    server.reset()
    server.inject(Fault(delay=60), times=1)

    async def cancel_once_upstream(scope: Any) -> None:
        while not server.received:  # the request is at the server (which holds it 60 s): cancel now
            await trio.sleep(0.005)
        scope.cancel()

    async def main() -> tuple[bool, int]:
        async with module.AsyncClient(base_url=server.openai_base_url, timeout=90) as client:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_once_upstream, scope)
                    await client.post("/chat/completions", json=body("slow, cancelled"))
            # Queued behind the cancelled call's slot: answered once its request has stopped.
            after = await client.post("/chat/completions", json=body("after"))
            return scope.cancelled_caught, after.status_code

    assert trio.run(main) == (True, 200)
    assert _limiter().held() == (0, 0)
    asked = [json.loads(r.body)["messages"][0]["content"] for r in server.received]
    assert asked == ["slow, cancelled", "after"]


@pytest.mark.timeout(30)  # the queue timeout is 60 s: a place or a slot kept by a cancelled call fails here
def test_many_trio_calls_cancelled_under_a_rate_and_a_concurrency_limit_leave_nothing_held(
        server: FakeLLMServer, installed_cached: Callable[..., Any]) -> None:
    trio = pytest.importorskip("trio")
    httpx = pytest.importorskip("httpx")
    installed_cached(max_concurrency="1", rpm="600", queue_timeout="60")
    server.reset()

    async def main() -> int:
        async with httpx.AsyncClient(base_url=server.openai_base_url, timeout=30) as client:
            held = await client.send(client.build_request("POST", "/chat/completions", json=body("held", True)),
                                     stream=True)

            async def ask(n: int) -> None:
                await client.post("/chat/completions", json=body(f"cancelled {n}"))

            with trio.move_on_after(0.3):  # wherever each one is then (queued, or not yet): cancelled
                async with trio.open_nursery() as nursery:
                    for n in range(30):
                        nursery.start_soon(ask, n)
            await held.aread()
            await held.aclose()
            # Queued behind the abandoned workers ahead of it (each leaves the queue's head at once).
            return (await client.post("/chat/completions", json=body("after"))).status_code

    assert trio.run(main) == 200
    assert [json.loads(r.body)["messages"][0]["content"] for r in server.received] == ["held", "after"]


def test_a_reply_that_comes_back_to_a_cancelled_trio_task_is_closed_on_the_loop() -> None:
    """The task is cancelled just as its worker's send returned: the reply reaches no caller, and
    is closed (its connection given back) rather than left to the garbage collector."""
    trio = pytest.importorskip("trio")
    from llmshim import trio_calls
    from llmshim.call import Reply
    from llmshim.tap import Tap

    async def main() -> bool:
        closed = trio.Event()

        async def asend(call: Any) -> Reply:
            async def aclose() -> None:
                closed.set()

            return Reply(200, {}, Tap(), None, adiscard=aclose)

        with trio.CancelScope() as scope:
            def run(call: Any, send: Callable[[Any], Reply]) -> Reply:
                reply = send(call)
                trio.from_thread.run_sync(scope.cancel)  # the task is cancelled; its reply came back
                return reply

            await trio_calls.run_on_worker(run, None, asend)  # type: ignore[arg-type]
        with trio.fail_after(30):  # a guard, not a measure: it is set at once, or never
            await closed.wait()
        return scope.cancelled_caught

    assert trio.run(main) is True


@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_retried_attempt_under_trio_gives_its_connection_back(
        library: str, server: FakeLLMServer, installed_cached: Callable[..., Any]) -> None:
    """The synchronous chain on trio's worker drops a retried attempt with ``discard``, a no-op for an
    async response: its connection stayed taken. With one connection allowed, the retry then failed
    with PoolTimeout in the caller's call; with the default 100, each retried attempt kept one."""
    trio = pytest.importorskip("trio")
    module = pytest.importorskip(library)
    installed_cached(retry_mode="llmshim", retry_max_delay="0.05")
    server.inject(Fault(status=500), times=2)

    async def main() -> int:
        async with module.AsyncClient(base_url=server.openai_base_url, timeout=module.Timeout(10, pool=3),
                                      limits=module.Limits(max_connections=1)) as client:
            return (await client.post("/chat/completions", json=body("retried twice"))).status_code

    assert trio.run(main) == 200
    assert len(server.received) == 3


# -- Redis Cluster: the cache writes' MULTI fallback takes one timeout, as the scripts do ----------

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
        with cluster.node(i) as admin:  # every client the test opens is closed (an unclosed socket
            admin.execute_command("ACL", "SETUSER", "noscript24", "on", ">pw", "~*", "+@all", "-@scripting")
    store = RedisCacheStore(cluster.url.replace("redis+cluster://", "redis+cluster://noscript24:pw@"), timeout=0.2)
    try:  # collected later is a ResourceWarning, an error at the session's end)
        store.note(hits=1)
        assert store._scripts_refused  # the fallback is what is tested
        owner = cluster.ports.index(store.client.get_node_from_key(store.prefix + "totals").port)
        with cluster.node(owner) as node:
            before = _connections_received(node)
            os.kill(cluster.procs[owner].pid, signal.SIGSTOP)  # frozen: connections accepted by the kernel only
            try:
                with pytest.raises(Exception, match="Timeout"):
                    store.note(hits=1)
            finally:
                os.kill(cluster.procs[owner].pid, signal.SIGCONT)
            assert _connections_received(node) == before  # no second connection: the MULTI was not sent again
    finally:
        store.close()


# -- Redis: what ``get`` reads back is what ``put`` wrote -----------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_ENTRIES = st.builds(
    lambda key, status, headers, body, created, ttl, meta: (key, status, headers, body, created, ttl, meta),
    st.text("0123456789abcdef", min_size=1, max_size=16), st.integers(100, 599),
    st.lists(st.tuples(_TEXT, _TEXT), max_size=4), st.binary(max_size=2048),
    st.floats(0, 1e8), st.one_of(st.none(), st.floats(1, 1e7)),
    st.dictionaries(_TEXT, st.one_of(st.integers(-2**53, 2**53), _TEXT, st.booleans(), st.none()), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_ENTRIES)
def test_an_entry_read_back_from_redis_is_the_entry_written(redis_server: Any, example: tuple[Any, ...]) -> None:
    """Every byte value in the body, any text in headers and metadata, with or without expiry:
    the one-script write and the hash read agree, through a real server."""
    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore

    key, status, headers, body_bytes, offset, ttl, meta = example
    created = time.time() + offset  # Redis expires by the wall clock: none expires during the test
    entry = Entry(key, status, headers, body_bytes, created, created + ttl if ttl is not None else None, meta)
    store = RedisCacheStore(redis_server.url, timeout=5)
    try:
        store.put(entry, created)
        assert store.get(key, created) == entry
        remaining = store.client.pttl(store.prefix + key)
        assert remaining == -1 if ttl is None else remaining > 0
    finally:
        store.close()


def test_an_entry_whose_expiry_passed_is_not_kept_and_an_expiry_removed_is_removed(redis_server: Any) -> None:
    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore

    now = time.time()
    store = RedisCacheStore(redis_server.url, timeout=5)
    try:
        store.put(Entry("0ld", 200, [], b"x", now - 10, now - 5, {}), now)
        assert store.get("0ld", now) is None and not store.client.exists(store.prefix + "0ld")
        store.put(Entry("a9e", 200, [], b"x", now, now + 100, {}), now)
        store.put(Entry("a9e", 200, [], b"y", now, None, {}), now)  # written again without expiry: kept for good
        assert store.client.pttl(store.prefix + "a9e") == -1 and store.get("a9e", now + 1000).body == b"y"
    finally:
        store.close()


def test_a_body_of_several_megabytes_with_every_byte_value_survives_the_script(redis_server: Any) -> None:
    from llmshim.store.base import Entry
    from llmshim.store.cache_redis import RedisCacheStore

    entry = Entry("5eed", 200, [("content-type", "application/json")], bytes(range(256)) * 24_000, 1.0, None, {})
    store = RedisCacheStore(redis_server.url, timeout=5)
    try:
        store.put(entry, 1.0)
        assert store.get("5eed", 1.0) == entry
    finally:
        store.close()
