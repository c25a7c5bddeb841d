"""Adversarial review of LLMSHIM_REDIS_TIMEOUT, the primed HMAC, WireRequest's dict, the genuine-function
memo and on_event_loop (review 21): each test tries to break one of them with real servers and tools."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import os
import pickle
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_redis import REDIS_SERVER, RedisServer, redis

import llmshim
from conftest import run_python
from llmshim import ConfigError
from llmshim.call import WireRequest
from llmshim.runtime import STATE
from llmshim.store import background, cache_keys
from llmshim.store.breaker import Breaker
from llmshim.store.limits_redis import RedisLimitStore
from llmshim.store.redis_client import Guarded, RedisUnavailable
from llmshim.testing import FakeLLMServer

needs_redis = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"),
                                 reason="redis-server not on PATH (apt-get install -y redis-server)")


# -- 1. LLMSHIM_REDIS_TIMEOUT -------------------------------------------------------------------------

def _guards() -> list[Guarded]:
    """The Guarded clients of the installed pipeline's Redis cache and rate-limit stores."""
    found = []
    for policy in STATE.pipeline.policies:
        store = getattr(policy, "store", None)
        limiter = getattr(policy, "limiter", None)
        for candidate in (store, getattr(limiter, "shared", None)):
            guard = getattr(candidate, "redis", None)
            if isinstance(guard, Guarded):
                found.append(guard)
    return found


@pytest.mark.parametrize("how", ["install", "env"])
@pytest.mark.parametrize(("given_value", "seconds"), [("250ms", 0.25), ("2s", 2.0), ("0.001", 0.001), ("60s", 60.0)])
def test_the_redis_timeout_reaches_every_redis_connection_of_both_stores(
        how: str, given_value: str, seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache and rate-limit store, their guard and the sockets' connect and read timeouts: the
    setting, given either way (no Redis needed: clients are built without connecting)."""
    url = "redis://127.0.0.1:1/0"
    kwargs: dict[str, Any] = {"redis_timeout": given_value} if how == "install" else {}
    if how == "env":
        monkeypatch.setenv("LLMSHIM_REDIS_TIMEOUT", given_value)
    llmshim.install(cache="on", cache_url=url, rpm="600", ratelimit_store=url, **kwargs)
    try:
        guards = _guards()
        assert len(guards) == 2
        for guard in guards:
            assert guard.timeout == seconds
            connection = guard.client.connection_pool.connection_kwargs
            assert connection["socket_timeout"] == seconds and connection["socket_connect_timeout"] == seconds
    finally:
        llmshim.uninstall()


def test_the_redis_timeout_reaches_the_sentinels_and_the_master_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_REDIS_TIMEOUT", "3s")
    url = "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/0"
    llmshim.install(cache="on", cache_url=url)
    try:
        (guard,) = _guards()
        client = guard.client
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
        sentinels = client.connection_pool.sentinel_manager.sentinels
        assert len(sentinels) == 2
        for sentinel in sentinels:
            options = sentinel.connection_pool.connection_kwargs
            assert options["socket_timeout"] == 3.0 and options["socket_connect_timeout"] == 3.0
    finally:
        llmshim.uninstall()


@pytest.mark.parametrize("value", ["abc", "0", "0ms", "61s", "-1", "nan", "inf", "1e-9", "50 parsecs"])
@pytest.mark.parametrize("how", ["install", "env"])
def test_a_malformed_redis_timeout_is_a_config_error_naming_the_variable(
        value: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "env":
        monkeypatch.setenv("LLMSHIM_REDIS_TIMEOUT", value)
    with pytest.raises(ConfigError, match="LLMSHIM_REDIS_TIMEOUT"):
        llmshim.install(**({"redis_timeout": value} if how == "install" else {}))
    assert not llmshim.is_installed()


@needs_redis
@pytest.mark.parametrize("timeout", [10.0, 0.05])
def test_a_rate_limit_take_waits_for_a_paused_redis_only_within_its_timeout(redis_server: RedisServer,
                                                                            timeout: float) -> None:
    """The Lua take is held back by ``CLIENT PAUSE WRITE`` (scripts wait too): a timeout longer than the pause lets it
    land (and counts nothing against the breaker); the default gives it up long before the pause ends."""
    admin = redis.Redis.from_url(redis_server.url)
    store = RedisLimitStore(redis_server.url, timeout=timeout)
    dims = [("rpm", 10.0, 10.0, 1.0)]
    assert store.try_take("k", 0.0, dims, "normal") == 0.0  # connected, the script loaded
    admin.client_pause(300 if timeout > 1 else 20_000, all=False)
    try:
        if timeout > 1:
            assert store.try_take("k", 0.0, dims, "normal") == 0.0
            assert store.redis.breaker.failures == 0
        else:
            with pytest.raises(redis.TimeoutError):
                store.try_take("k", 0.0, dims, "normal")
            assert store.redis.breaker.failures == 1
    finally:
        admin.client_unpause()
        store.close()


@needs_redis
@pytest.mark.parametrize("timeout", [10.0, 0.05])
def test_the_breakers_probe_waits_as_long_as_any_operation(redis_server: RedisServer, timeout: float) -> None:
    """A half-open breaker's PING runs with the configured timeout: a Redis slower than 50 ms but
    within the timeout closes the breaker; with 50 ms the probe fails and it stays open."""
    admin = redis.Redis.from_url(redis_server.url)
    guard = Guarded(redis_server.url, timeout, breaker=Breaker(open_until=0.0, cooldown=0.5))
    assert guard.client.ping()  # the connection exists: the probe's wait is the paused command's
    # PAUSE ALL holds PING back, and (Redis 7.0) CLIENT UNPAUSE too: the pause must end on its own.
    admin.client_pause(300 if timeout > 1 else 1000, all=True)
    try:
        with pytest.raises(RedisUnavailable):
            guard.run(lambda client: client.get("x"))  # this call falls back; the probe goes out
        assert guard.probe is not None
        guard.probe.join(30)
    finally:
        admin.client_unpause()
    assert (guard.breaker.state(guard.clock()) == "closed") == (timeout > 1)


def _silent_redis() -> tuple[socket.socket, list[socket.socket]]:
    """A TCP server that accepts and never answers: a black-holed Redis."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return listener, held


def test_a_silent_redis_costs_at_most_threshold_operations_then_nothing() -> None:
    """However long the timeout, a Redis that never answers is asked ``threshold`` times: then every
    operation is refused at once (and no probe goes out during the cooldown)."""
    listener, held = _silent_redis()
    try:
        clock = [0.0]
        guard = Guarded(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", 0.2, clock=lambda: clock[0])

        def op(client: Any) -> Any:
            clock[0] += 0.2  # each attempt costs its timeout, on this clock
            return client.get("x")

        outcomes = []
        for _ in range(6):
            try:
                guard.run(op)
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes == ["TimeoutError"] * 3 + ["RedisUnavailable"] * 3
        assert guard.attempts == 3
    finally:
        listener.close()
        for sock in held:
            sock.close()


# -- 2. the primed HMAC --------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_primed_hmac_equals_hmac_digest_for_any_salt_and_message(salt: bytes, message: bytes) -> None:
    assert cache_keys.hmac_sha256_hex(salt, message) == hmac.digest(salt, message, "sha256").hex()


@pytest.mark.parametrize("length", [0, 1, 31, 32, 63, 64, 65, 127, 128, 129, 1000])
def test_primed_hmac_at_the_block_size_edges(length: int) -> None:
    for salt in (b"\0" * length, b"\xff" * length, bytes(range(256))[:length] * 4):
        for message in (b"", b"\n", b"x" * 10_000):
            assert cache_keys.hmac_sha256_hex(salt, message) == hmac.digest(salt, message, "sha256").hex()
    # Two salts whose zero-padded keys are equal are different HMAC keys only if hmac says so:
    assert cache_keys.hmac_sha256_hex(b"a", b"m") == hmac.digest(b"a\0", b"m", "sha256").hex()


def test_primed_hmac_from_many_threads_with_more_salts_than_the_memo_holds() -> None:
    """Twenty salts (the memo holds eight and is emptied when full) from eight threads at once:
    every answer is hmac's."""
    salts = [hashlib.sha256(str(i).encode()).digest() * (1 + i % 3) for i in range(20)]
    barrier = threading.Barrier(8)
    wrong: list[tuple[bytes, bytes]] = []

    def work(seed: int) -> None:
        barrier.wait()
        for i in range(400):
            salt, message = salts[(seed * 7 + i) % len(salts)], f"{seed}:{i}".encode()
            if cache_keys.hmac_sha256_hex(salt, message) != hmac.digest(salt, message, "sha256").hex():
                wrong.append((salt, message))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert len(cache_keys._PADS) <= 8


def test_primed_hmac_after_fork_in_the_child() -> None:
    out = run_python("""
import hmac, os
from llmshim.store import cache_keys
salt = b"s" * 70
assert cache_keys.hmac_sha256_hex(salt, b"before") == hmac.digest(salt, b"before", "sha256").hex()
pid = os.fork()
if pid == 0:
    ok = all(cache_keys.hmac_sha256_hex(s, b"after") == hmac.digest(s, b"after", "sha256").hex()
             for s in (salt, b"", b"other"))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
""")
    assert out.strip() == "0"


def _holds(value: Any, secret: str, seen: set[int] | None = None) -> bool:
    """Whether ``value`` (containers, walked) holds ``secret`` as text or bytes."""
    seen = seen if seen is not None else set()
    if id(value) in seen:
        return False
    seen.add(id(value))
    if isinstance(value, str):
        return secret in value
    if isinstance(value, (bytes, bytearray)):
        return secret.encode() in value
    if isinstance(value, dict):
        return any(_holds(k, secret, seen) or _holds(v, secret, seen) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds(item, secret, seen) for item in value)
    return False


def test_no_api_key_stays_in_the_key_modules_state(server: FakeLLMServer, tmp_path: Path) -> None:
    """After calls keyed by a secret credential, neither the HMAC memo nor any other module-level
    state of cache_keys holds the credential; the memo holds salts only."""
    import requests

    secret = "sk-review21-" + "q" * 32
    llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    try:
        for i in range(2):
            reply = requests.post(server.url + "/v1/chat/completions",
                                  headers={"Authorization": f"Bearer {secret}"},
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
            assert reply.status_code == 200
            assert reply.headers.get("x-llmshim-cache") == ("hit" if i else None)
        salts = list(cache_keys._PADS)
    finally:
        llmshim.uninstall()
    assert salts and all(isinstance(salt, bytes) and secret.encode() not in salt for salt in salts)
    assert not _holds(dict(vars(cache_keys)), secret)


# -- 3. WireRequest in its dict ---------------------------------------------------------------------------

def _requests(counter: list[int]) -> list[WireRequest]:
    def reader() -> tuple[tuple[str, str], ...]:
        counter.append(1)
        return (("a", "1"), ("b", "2"))

    return [WireRequest("POST", "http://h:1/p?q=1", (("a", "1"), ("b", "2")), b"{}"),
            WireRequest("POST", "http://h:1/p?q=1", reader, b"{}")]


@pytest.mark.parametrize("name", ["method", "url", "body", "_headers", "_read_headers", "_path", "_server", "new"])
def test_wire_request_refuses_assignment_and_deletion_of_any_name(name: str) -> None:
    for request in _requests([]):
        with pytest.raises(dataclasses_frozen()):
            setattr(request, name, "x")
        with pytest.raises(dataclasses_frozen()):
            delattr(request, name)
        assert request.url == "http://h:1/p?q=1" and request.headers == (("a", "1"), ("b", "2"))


def dataclasses_frozen() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "replace"])
def test_wire_request_copies_equal_hash_and_keep_their_memos_apart(how: str) -> None:
    """A copy made after the memos were filled, or before, equals and hashes as the original; filling
    one's memo never touches the other's dict (they do not share it)."""
    for memos_first in (True, False):
        for original in _requests([]):
            if memos_first:
                assert (original.path, original.server) == ("/p", ("h", 1))
            made: WireRequest = {"copy": copy.copy, "deepcopy": copy.deepcopy,
                                 "pickle": lambda r: pickle.loads(pickle.dumps(r)),
                                 "replace": lambda r: r.replace()}[how](original)
            assert made == original and hash(made) == hash(original) and made is not original
            assert made.__dict__ is not original.__dict__
            assert made.path == "/p" and made.server == ("h", 1)
            changed = original.replace(url="http://other:2/z")
            assert (changed.path, changed.server) == ("/z", ("other", 2))
            assert (original.path, original.server) == ("/p", ("h", 1))


def test_wire_request_memos_live_in_the_instance_not_the_class() -> None:
    first, second = WireRequest("GET", "http://a:1/x", (), b""), WireRequest("GET", "http://b:2/y", (), b"")
    assert (first.path, first.server) == ("/x", ("a", 1))
    assert (second.path, second.server) == ("/y", ("b", 2))
    assert WireRequest._path is None and WireRequest._server is None and WireRequest._headers is None


def test_lazy_headers_read_by_many_threads_at_once_are_one_answer() -> None:
    """Sixteen threads ask a lazy request's headers at the same moment (a tiny switch interval):
    every one gets the same headers, the reader is let go, and it ran at most once per thread."""
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(50):
            counter: list[int] = []
            request = _requests(counter)[1]
            barrier = threading.Barrier(16)
            answers: list[Any] = []

            def read(request: WireRequest = request, barrier: threading.Barrier = barrier,
                     answers: list[Any] = answers) -> None:
                barrier.wait()
                answers.append(request.headers)

            threads = [threading.Thread(target=read) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert answers == [(("a", "1"), ("b", "2"))] * 16
            assert 1 <= len(counter) <= 16 and request._read_headers is None
    finally:
        sys.setswitchinterval(interval)


# -- 4. the genuine-function memo against test doubles activated after real calls -----------------------

def _ask(url: str, content: str = "warm") -> Any:
    import requests

    return requests.post(url + "/v1/chat/completions",
                         json={"model": "m", "messages": [{"role": "user", "content": content}]}, timeout=10)


def _stored_bodies(path: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [bytes(row[0]) for row in db.execute("SELECT body FROM entries")] if _has_entries(db) else []


def _has_entries(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone() is not None


MOCKED = b'{"id": "mocked", "object": "chat.completion", "mocked": true, "choices": []}'


@pytest.fixture
def warm(server: FakeLLMServer, tmp_path: Path) -> Iterator[Path]:
    """llmshim with a SQLite cache, after two real calls (one answered from the cache): every
    check's memo is warm."""
    path = tmp_path / "cache.sqlite3"
    llmshim.install(cache="on", cache_path=str(path))
    try:
        assert _ask(server.url).headers.get("x-llmshim-cache") is None
        assert _ask(server.url).headers.get("x-llmshim-cache") == "hit"
        yield path
    finally:
        llmshim.uninstall()


def _fake_urlopen(self: Any, method: Any, url: Any, body: Any = None, headers: Any = None, retries: Any = None,
                  redirect: Any = True, assert_same_host: Any = True, timeout: Any = None, pool_timeout: Any = None,
                  release_conn: Any = None, chunked: Any = False, body_pos: Any = None, preload_content: Any = True,
                  decode_content: Any = True, **response_kw: Any) -> Any:
    """Run as urllib3's own urlopen's code (its globals): answers without the network."""
    return __import__("urllib3").HTTPResponse(body=__import__("io").BytesIO(  # no closure, no test-module globals
        b'{"id": "mocked", "object": "chat.completion", "mocked": true, "choices": []}'),
        headers={"content-type": "application/json"}, status=200, preload_content=False, decode_content=False)


@contextlib.contextmanager
def _code_swapped(function: Any, code: Any) -> Iterator[None]:
    """``function.__code__ = code`` for a while (``mock.patch.object`` cannot put a code object back)."""
    original = function.__code__
    function.__code__ = code
    try:
        yield
    finally:
        function.__code__ = original


@pytest.mark.parametrize("tool", ["code", "wrapt"])
def test_a_genuine_function_changed_in_place_after_real_calls_is_a_double(server: FakeLLMServer, tmp_path: Path,
                                                                          tool: str) -> None:
    """urllib3's own urlopen, found genuine by real calls, then changed in place: its ``__code__``
    swapped, or the wrapt proxy over it (as instrumentation puts there) re-pointed at a double. The
    caller gets the double's answer, not the cached one, and the double's answer is not stored."""
    import urllib3.connectionpool as pools
    import wrapt

    path = tmp_path / "cache.sqlite3"
    original = pools.HTTPConnectionPool.__dict__["urlopen"]
    proxy = wrapt.FunctionWrapper(original, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))
    if tool == "wrapt":
        pools.HTTPConnectionPool.urlopen = proxy
    llmshim.install(cache="on", cache_path=str(path))
    try:
        assert _ask(server.url).headers.get("x-llmshim-cache") is None
        assert _ask(server.url).headers.get("x-llmshim-cache") == "hit"
        changed: Any = contextlib.nullcontext()
        if tool == "wrapt":
            proxy.__wrapped__ = _fake_urlopen
        else:
            changed = _code_swapped(original, _fake_urlopen.__code__)
        with changed:
            reply = _ask(server.url)
            assert reply.headers.get("x-llmshim-cache") is None
            assert reply.json()["mocked"] is True
            assert _ask(server.url, "new").json()["mocked"] is True
    finally:
        pools.HTTPConnectionPool.urlopen = original
        llmshim.uninstall()
    assert all(b"mocked" not in body for body in _stored_bodies(path))


def test_responses_activated_after_real_calls_answers_and_is_not_stored(server: FakeLLMServer, warm: Path) -> None:
    import responses

    with responses.RequestsMock() as mocked:
        mocked.add(responses.POST, server.url + "/v1/chat/completions", body=MOCKED,
                   content_type="application/json")
        for content in ("warm", "new"):
            reply = _ask(server.url, content)
            assert reply.json()["mocked"] is True and reply.headers.get("x-llmshim-cache") is None
    assert _ask(server.url, "new").headers.get("x-llmshim-cache") is None  # the mocked answer was not stored
    assert all(b"mocked" not in body for body in _stored_bodies(warm))


def test_requests_mock_activated_after_real_calls_answers_and_is_not_stored(server: FakeLLMServer,
                                                                             warm: Path) -> None:
    import requests_mock

    with requests_mock.Mocker() as mocked:
        mocked.post(server.url + "/v1/chat/completions", content=MOCKED, headers={"content-type": "application/json"})
        for content in ("warm", "new"):
            reply = _ask(server.url, content)
            assert reply.json()["mocked"] is True and reply.headers.get("x-llmshim-cache") is None
    assert _ask(server.url, "new").headers.get("x-llmshim-cache") is None
    assert all(b"mocked" not in body for body in _stored_bodies(warm))


def test_mock_patch_of_a_class_attribute_after_real_calls_answers_and_is_not_stored(server: FakeLLMServer,
                                                                                     warm: Path) -> None:
    """``mock.patch.object`` on a requests class attribute below llmshim's seam (``build_response``),
    wrapping the real one and changing its body, after the memo is warm."""
    from requests.adapters import HTTPAdapter

    real = HTTPAdapter.build_response

    def build_response(self: Any, request: Any, raw: Any) -> Any:
        response = real(self, request, raw)
        response._content = MOCKED
        return response

    with mock.patch.object(HTTPAdapter, "build_response", build_response):
        for content in ("warm", "new"):
            reply = _ask(server.url, content)
            assert reply.json()["mocked"] is True and reply.headers.get("x-llmshim-cache") is None
    assert _ask(server.url, "new").headers.get("x-llmshim-cache") is None
    assert all(b"mocked" not in body for body in _stored_bodies(warm))


def test_respx_activated_after_real_httpx_calls_answers_and_is_not_stored(server: FakeLLMServer,
                                                                          tmp_path: Path) -> None:
    import httpx
    import respx

    path = tmp_path / "cache.sqlite3"
    body = {"model": "m", "messages": [{"role": "user", "content": "warm"}]}
    llmshim.install(cache="on", cache_path=str(path))
    try:
        with httpx.Client() as client:
            url = server.url + "/v1/chat/completions"
            assert client.post(url, json=body).headers.get("x-llmshim-cache") is None
            assert client.post(url, json=body).headers.get("x-llmshim-cache") == "hit"
            with respx.mock(assert_all_called=False) as router:
                router.post(url).mock(return_value=httpx.Response(200, content=MOCKED,
                                                                  headers={"content-type": "application/json"}))
                for content in ("warm", "new"):
                    reply = client.post(url, json={**body, "messages": [{"role": "user", "content": content}]})
                    assert reply.json()["mocked"] is True and reply.headers.get("x-llmshim-cache") is None
            assert client.post(url, json=body).headers.get("x-llmshim-cache") == "hit"  # the real one, kept
    finally:
        llmshim.uninstall()
    assert all(b"mocked" not in stored for stored in _stored_bodies(path))


def test_a_vcrpy_cassette_opened_after_real_calls_sees_every_request(server: FakeLLMServer, warm: Path,
                                                                      tmp_path: Path) -> None:
    """A cassette opened once the memo is warm must record the request the cache could answer."""
    import vcr

    cassette_path = tmp_path / "cassette.yaml"
    with vcr.use_cassette(str(cassette_path), record_mode="all") as cassette:
        reply = _ask(server.url)
        assert reply.headers.get("x-llmshim-cache") is None
        assert len(cassette) == 1
    assert "/v1/chat/completions" in cassette_path.read_text()


# -- 5. on_event_loop -----------------------------------------------------------------------------------

def _reference() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _both() -> tuple[bool, bool]:
    return background.on_event_loop(), _reference()


def test_on_event_loop_agrees_with_get_running_loop_everywhere() -> None:
    seen: dict[str, tuple[bool, bool]] = {"plain": _both()}

    def in_thread(name: str, fn: Callable[[], Any]) -> None:
        thread = threading.Thread(target=lambda: seen.__setitem__(name, fn()))
        thread.start()
        thread.join()

    async def main() -> None:
        seen["coroutine"] = _both()
        seen["to_thread"] = await asyncio.to_thread(_both)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[bool, bool]] = loop.create_future()
        loop.call_soon(lambda: done.set_result(_both()))
        seen["callback"] = await done

        async def nested() -> tuple[bool, bool]:
            return _both()

        in_thread("other loop in a thread", lambda: asyncio.run(nested()))
        in_thread("thread from a loop", _both)
        seen["after nested"] = _both()

    asyncio.run(main())
    seen["after the loop"] = _both()
    loop = asyncio.new_event_loop()
    try:
        async def inner() -> tuple[bool, bool]:
            return _both()

        seen["run_until_complete"] = loop.run_until_complete(inner())
        seen["loop made, not running"] = _both()
    finally:
        loop.close()
    assert {name: a == b for name, (a, b) in seen.items()} == dict.fromkeys(seen, True)
    assert {name: a for name, (a, _) in seen.items()} == {
        "plain": False, "coroutine": True, "to_thread": False, "callback": True, "other loop in a thread": True,
        "thread from a loop": False, "after nested": True, "after the loop": False, "run_until_complete": True,
        "loop made, not running": False}


def test_on_event_loop_in_a_child_forked_from_a_running_loop() -> None:
    out = run_python("""
import asyncio, os
from llmshim.store.background import on_event_loop
def reference():
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
async def main():
    pid = os.fork()
    if pid == 0:
        os._exit(10 + 2 * on_event_loop() + reference())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
print(asyncio.run(main()))
""")
    code = int(out.strip()) - 10
    assert divmod(code, 2)[0] == divmod(code, 2)[1]  # the two agree in the child


def test_a_wrapt_proxy_bound_at_every_access_does_not_fill_the_genuine_memo() -> None:
    """wrapt binds a new ``BoundFunctionWrapper`` at every attribute access (OpenTelemetry's httpx
    instrumentation wraps methods so): each check must not leave one more memo entry behind."""
    import requests.adapters
    import wrapt

    from llmshim.adapters import _doubles

    class Adapter(requests.adapters.HTTPAdapter):
        pass

    Adapter.build_response = wrapt.FunctionWrapper(requests.adapters.HTTPAdapter.build_response,
                                                   lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))
    adapter = Adapter()
    before = len(_doubles._GENUINE)
    for _ in range(200):
        assert _doubles.genuine(adapter.build_response, "requests")  # a new bound proxy each time
    assert len(_doubles._GENUINE) <= before + 1
