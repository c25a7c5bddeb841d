"""The response cache, end to end: real clients, the real SQLite file, the bundled server counting
what reaches it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
from test_transparency import MSG, SCENARIOS

import llmshim
from conftest import run_python
from llmshim.policies import cache as cache_policy
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.testing import FakeLLMServer, Fault

BODY = {"model": "llama3.2", "messages": MSG, "stream": False}


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "llm.sqlite3"


@pytest.fixture
def cached(installed: Callable[..., object], cache_path: Path) -> Path:
    installed(cache="on", cache_path=str(cache_path))
    return cache_path


def _post(server: FakeLLMServer, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.post(server.url + "/api/chat", json=body or BODY, timeout=10, **kwargs)


def _same_bytes(result: Any) -> Any:
    """Raw byte pieces are compared joined: a hit arrives in one piece, a live stream in however
    many the network made (the bytes are the same)."""
    if isinstance(result, list) and result and all(isinstance(piece, bytes) for piece in result):
        return b"".join(result)
    return result


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_second_identical_call_is_a_hit_with_an_identical_parse(
        name: str, server: FakeLLMServer, cached: Path, records: list[llmshim.CallRecord]) -> None:
    fn, expect = SCENARIOS[name]
    first = _same_bytes(fn(server))
    assert len(server.received) == 1
    second = _same_bytes(fn(server))
    assert second == first
    assert len(server.received) == 1, "the hit reached the server"
    done = [r for r in records if r.event == "call_completed"]
    assert [r.cache_hit for r in done] == [False, True]
    if expect.input_tokens is None and expect.output_tokens is None and done[0].estimator is not None:
        # a stream without usage: the paid call's tokens were estimated, and a hit saves the estimate
        assert done[1].estimator == done[0].estimator
        assert (done[1].saved_input_tokens, done[1].saved_output_tokens) == (done[0].input_tokens,
                                                                             done[0].output_tokens)
    else:
        assert (done[1].saved_input_tokens, done[1].saved_output_tokens) == (expect.input_tokens,
                                                                             expect.output_tokens)
    assert (done[1].input_tokens, done[1].output_tokens) == (None, None)  # a hit spends nothing
    assert llmshim.stats()["tokens_saved"] >= (expect.input_tokens or 0) + (expect.output_tokens or 0)


def test_hits_carry_cache_headers_and_nothing_reaches_the_wire(server: FakeLLMServer, cached: Path) -> None:
    live = _post(server)
    assert "x-llmshim-cache" not in live.headers  # a miss is passed through untouched
    hit = _post(server)
    assert hit.json() == live.json()
    assert hit.headers["x-llmshim-cache"] == "hit" and int(hit.headers["age"]) >= 0
    assert hit.headers["content-type"] == live.headers["content-type"]
    assert len(server.received) == 1


def test_two_api_keys_never_share_an_entry_and_no_key_is_stored(server: FakeLLMServer, cached: Path) -> None:
    def ask(key: str) -> Any:
        with openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0) as client:
            return client.chat.completions.create(model="gpt-4o", messages=MSG).model_dump()

    ask("sk-alice-0123456789")
    ask("sk-bob-9876543210")
    assert len(server.received) == 2  # bob did not get alice's answer
    ask("sk-alice-0123456789")
    assert len(server.received) == 2  # alice's second call is her own hit
    llmshim.uninstall()
    data = b"".join(p.read_bytes() for p in cached.parent.iterdir() if p.name.startswith(cached.name))
    assert b"sk-alice" not in data and b"sk-bob" not in data and b"Bearer" not in data


def test_shared_scope_serves_one_answer_to_every_key(server: FakeLLMServer, cache_path: Path) -> None:
    llmshim.install(cache="on", cache_path=str(cache_path), cache_scope="shared")
    try:
        _post(server, headers={"Authorization": "Bearer one"})
        _post(server, headers={"Authorization": "Bearer two"})
    finally:
        llmshim.uninstall()
    assert len(server.received) == 1


def test_cache_files_are_private(server: FakeLLMServer, cached: Path) -> None:
    _post(server)
    _post(server)
    assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700
    for path in cached.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_transport_noise_spelling_and_keep_alive_do_not_change_the_key(server: FakeLLMServer, cached: Path) -> None:
    # Key order and `user` are part of the key (issue 11): see tests/test_keys_hardening.py.
    first = json.dumps({"model": "m", "messages": MSG, "stream": False, "options": {"temperature": 0}})
    second = json.dumps({"model": "m", "messages": MSG, "stream": False, "options": {"temperature": 0},
                         "keep_alive": "5m"}, indent=2)
    requests.post(server.url + "/api/chat", data=first, headers={"User-Agent": "a", "traceparent": "00-1-2-01"},
                  timeout=5)
    requests.post(server.url + "/api/chat", data=second, headers={"User-Agent": "b", "x-stainless-os": "x"},
                  timeout=5)
    assert len(server.received) == 1


@pytest.mark.parametrize(("mode", "expected_requests"), [
    ("on", 1), ("readonly", 2), ("refresh", 2), ("off", 2)])
def test_modes(server: FakeLLMServer, cache_path: Path, mode: str, expected_requests: int) -> None:
    llmshim.install(cache="on", cache_path=str(cache_path))
    try:
        with llmshim.cache_control(mode=mode):
            _post(server)
            _post(server)
    finally:
        llmshim.uninstall()
    assert len(server.received) == expected_requests
    llmshim.install(cache="readonly", cache_path=str(cache_path))
    try:
        _post(server)
    finally:
        llmshim.uninstall()
    stored = mode in ("on", "refresh")
    assert len(server.received) == expected_requests + (0 if stored else 1)


def test_replay_mode_serves_hits_and_names_a_miss(server: FakeLLMServer, cache_path: Path) -> None:
    llmshim.install(cache="on", cache_path=str(cache_path))
    try:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=2) as client:
            recorded = client.chat.completions.create(model="gpt-4o", messages=MSG).model_dump()
            with llmshim.cache_control(mode="replay"):
                assert client.chat.completions.create(model="gpt-4o", messages=MSG).model_dump() == recorded
                with pytest.raises(openai.APIStatusError) as caught:
                    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    finally:
        llmshim.uninstall()
    assert caught.value.status_code == 504
    assert "llmshim cache replay mode: no cached answer for POST" in str(caught.value)
    assert "model gpt-4o-mini" in str(caught.value)
    assert len(server.received) == 1  # no retries of the synthetic miss, nothing sent upstream


@pytest.mark.parametrize(("header", "expected_requests"), [
    ("no-store", 2), ("refresh", 2), ("ttl=60", 1)])
def test_request_header_controls_are_obeyed_and_stripped(server: FakeLLMServer, cached: Path, header: str,
                                                         expected_requests: int) -> None:
    _post(server, headers={"x-llmshim-cache": header})
    _post(server, headers={"x-llmshim-cache": header})
    assert len(server.received) == expected_requests
    assert all(r.header("x-llmshim-cache") is None for r in server.received)


def test_only_if_cached_header_answers_504_on_a_miss(server: FakeLLMServer, cached: Path) -> None:
    response = _post(server, headers={"x-llmshim-cache": "only-if-cached"})
    assert response.status_code == 504 and response.json()["error"]["type"] == "llmshim_cache_miss"
    assert server.received == []


def test_failures_and_unfinished_streams_are_never_stored(server: FakeLLMServer, cached: Path) -> None:
    server.inject(Fault(status=500))
    assert _post(server).status_code == 500
    server.inject(Fault(reset="after_chunks", after_chunks=2))
    with pytest.raises(requests.exceptions.ChunkedEncodingError), _post(
            server, {"model": "m", "messages": MSG}, stream=True) as response:
        list(response.iter_lines())
    with httpx.Client() as client, client.stream("POST", server.url + "/api/generate",
                                                 json={"model": "m", "prompt": "x y"}) as response:
        next(response.iter_lines())  # closed early
    before = len(server.received)
    assert _post(server).status_code == 200
    with _post(server, {"model": "m", "messages": MSG}, stream=True) as response:
        list(response.iter_lines())
    with httpx.Client() as client, client.stream("POST", server.url + "/api/generate",
                                                 json={"model": "m", "prompt": "x y"}) as response:
        list(response.iter_lines())
    assert len(server.received) == before + 3  # none of the failed attempts left an entry


def test_error_event_inside_a_stream_is_not_stored(server: FakeLLMServer, cached: Path) -> None:
    from llmshim.testing import Answer

    error_stream = [b'data: {"id":"x","model":"m","choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
                    b'data: {"error": {"message": "overloaded", "code": "overloaded"}}\n\n', b"data: [DONE]\n\n"]
    server.responder = lambda received: Answer(200, [("Content-Type", "text/event-stream")], chunks=error_stream)
    body = {"model": "m", "messages": MSG, "stream": True}
    for _ in range(2):
        with requests.post(server.openai_base_url + "/chat/completions", json=body, stream=True, timeout=5) as r:
            list(r.iter_lines())
    assert len(server.received) == 2


def test_stateful_and_nondeterministic_requests(server: FakeLLMServer, cache_path: Path) -> None:
    llmshim.install(cache="on", cache_path=str(cache_path), cache_nondeterministic="skip")
    try:
        for body in ({"model": "m", "input": "x", "previous_response_id": "resp_1"},
                     {"model": "m", "input": "x", "temperature": 0.7},
                     {"model": "m", "input": "x"}):
            for _ in range(2):
                requests.post(server.openai_base_url + "/responses", json=body, timeout=5)
        assert len(server.received) == 6
        for body in ({"model": "m", "input": "x", "temperature": 0},
                     {"model": "m", "input": "x", "temperature": 0.9, "seed": 7},
                     {"model": "e", "input": "x"}):
            path = "/embeddings" if body["model"] == "e" else "/responses"
            for _ in range(2):
                requests.post(server.openai_base_url + path, json=body, timeout=5)
        assert len(server.received) == 9
    finally:
        llmshim.uninstall()


def test_ttl_expiry(server: FakeLLMServer, cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(cache_policy, "CLOCK", lambda: now[0])
    llmshim.install(cache="on", cache_path=str(cache_path), cache_ttl="60")
    try:
        _post(server)
        now[0] += 59
        assert _post(server).headers["age"] == "59"
        now[0] += 2
        assert "x-llmshim-cache" not in _post(server).headers
        with llmshim.cache_control(ttl=3600):
            _post(server, {**BODY, "model": "other"})
            now[0] += 120
            assert _post(server, {**BODY, "model": "other"}).headers["x-llmshim-cache"] == "hit"
    finally:
        llmshim.uninstall()
    assert len(server.received) == 3
    store = SQLiteStore(str(cache_path))
    assert store.purge_expired(now[0] + 10_000) == 2


def test_lru_eviction_keeps_the_recently_used(server: FakeLLMServer, cache_path: Path) -> None:
    llmshim.install(cache="on", cache_path=str(cache_path), cache_max_entries="3")
    try:
        for i in range(5):
            _post(server, {**BODY, "messages": [{"role": "user", "content": f"q{i}"}]})
    finally:
        llmshim.uninstall()
    store = SQLiteStore(str(cache_path))
    stats = store.stats()
    assert stats["entries"] == 3 and stats["bytes"] == sum(row["size"] for row in store.list())
    kept = {json.dumps(row["body"]["messages"]) for row in store.list()}
    assert kept == {json.dumps([{"role": "user", "content": f"q{i}"}]) for i in (2, 3, 4)}


def test_identical_concurrent_requests_make_one_upstream_call(server: FakeLLMServer, cached: Path) -> None:
    server.chunk_delay = 0.05
    body = {"model": "m", "messages": MSG}
    results: list[Any] = []

    def ask() -> None:
        with _post(server, body, stream=True) as response:
            results.append([json.loads(line) for line in response.iter_lines() if line])

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(server.received) == 1 and len(results) == 6 and all(r == results[0] for r in results)

    async def many() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
            answers = await asyncio.gather(*(client.chat.completions.create(model="gpt-4o", messages=MSG)
                                             for _ in range(5)))
            return [a.model_dump() for a in answers]

    answers = asyncio.run(many())
    assert len(server.received) == 2 and all(a == answers[0] for a in answers)


def test_corrupt_database_fails_open(server: FakeLLMServer, cache_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    cache_path.parent.mkdir(parents=True)
    cache_path.write_bytes(b"this is not a database" * 100)
    llmshim.install(cache="on", cache_path=str(cache_path))
    try:
        first, second = _post(server).json(), _post(server).json()
    finally:
        llmshim.uninstall()
    assert first == second and len(server.received) == 2
    assert llmshim.stats()["cache_errors"] >= 1
    assert sum("llmshim: cache" in r.message for r in caplog.records) == 1  # warned once, counted always


def test_unwritable_location_fails_open(server: FakeLLMServer, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    llmshim.install(cache="on", cache_path=str(blocker / "cache.sqlite3"))
    try:
        assert _post(server).json()["done"] is True
        assert _post(server).json()["done"] is True
    finally:
        llmshim.uninstall()
    assert len(server.received) == 2


def test_locked_database_fails_open(server: FakeLLMServer, cache_path: Path) -> None:
    import sqlite3

    llmshim.install(cache="on", cache_path=str(cache_path))
    try:
        _post(server, {**BODY, "model": "warm"})  # creates the file
        blocker = sqlite3.connect(str(cache_path), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # no writer gets in while this is held
        try:
            assert _post(server).json()["done"] is True  # the write times out; the caller is unaffected
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert _post(server).json()["done"] is True
    finally:
        llmshim.uninstall()
    assert len(server.received) == 3
    assert llmshim.stats()["cache_errors"] >= 1


def test_full_disk_fails_open(server: FakeLLMServer, tmp_path: Path) -> None:
    out = run_python(f"""
import resource, signal, json, requests, llmshim
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
llmshim.install(cache="on", cache_path={str(tmp_path / "full.sqlite3")!r})
requests.post({server.url!r} + "/api/chat", json={{"model": "w", "messages": [], "stream": False}}, timeout=5)
resource.setrlimit(resource.RLIMIT_FSIZE, (70_000, 70_000))  # the file cannot grow much more
answers = []
for i in range(40):
    body = {{"model": "m", "messages": [{{"role": "user", "content": "x" * 4000 + str(i)}}], "stream": False}}
    answers.append(requests.post({server.url!r} + "/api/chat", json=body, timeout=5).json()["done"])
print(json.dumps({{"answers": answers, "errors": llmshim.stats()["cache_errors"]}}))
""")
    result = json.loads(out)
    assert result["answers"] == [True] * 40
    assert result["errors"] >= 1


def test_four_processes_by_four_threads_hammer_one_file(tmp_path: Path) -> None:
    """Sixteen writers and readers on one file never read a wrong answer and never corrupt it.

    What may happen under contention is that a write waits past the busy timeout: "database is
    locked", which the cache policy turns into a skipped write (fail open). Such errors are
    counted, not asserted absent (on a loaded 2-core machine they happen); any other kind of
    error, a wrong body or a broken file fails the test. Each thread does a fixed number of
    operations, so the work done does not depend on the machine's speed."""
    path = tmp_path / "shared.sqlite3"
    script = f"""
import collections, hashlib, json, os, random, sqlite3, threading, time
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
store = SQLiteStore({str(path)!r}, max_entries=150)
kinds, mismatches, done = collections.Counter(), [], collections.Counter()
def body(key): return hashlib.sha256(key.encode()).digest() * 64
def kind(exc):
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return "locked"
    return repr(exc)
def work(seed):
    rnd = random.Random(seed)
    for _ in range(1000):
        key = f"k{{rnd.randrange(200)}}"
        try:
            if rnd.random() < 0.5:
                now = time.time()
                store.put(Entry(key, 200, [["content-type", "application/json"]], body(key), now, None,
                                {{"model": "m"}}), now)
                done["put"] += 1
            else:
                entry = store.get(key, time.time())
                if entry is not None and entry.body != body(key):
                    mismatches.append(key)
                done["hit" if entry is not None else "miss"] += 1
        except Exception as exc:
            kinds[kind(exc)] += 1
threads = [threading.Thread(target=work, args=(os.getpid() * 10 + i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({{"kinds": kinds, "mismatches": len(mismatches), "done": done}}))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    results = [json.loads(p.communicate(timeout=100)[0]) for p in procs]
    assert [r["mismatches"] for r in results] == [0, 0, 0, 0]
    assert [set(r["kinds"]) - {"locked"} for r in results] == [set()] * 4, results  # only fail-open kinds
    for r in results:  # every operation either succeeded or failed open
        assert sum(r["done"].values()) + r["kinds"].get("locked", 0) == 4 * 1000
        assert r["done"]["put"] > 0 and r["done"]["hit"] > 0, r  # it wrote, and read back what was written
    import sqlite3

    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count, total = conn.execute("SELECT count(*), sum(size) FROM entries").fetchone()
    assert conn.execute("SELECT entries, bytes FROM totals").fetchone() == (count, total)  # triggers kept up
    assert count <= 150
    conn.close()


def test_a_store_opened_before_fork_works_in_the_child(tmp_path: Path) -> None:
    out = run_python(f"""
import json, os, time
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
store = SQLiteStore({str(tmp_path / "fork.sqlite3")!r})
now = time.time()
store.put(Entry("parent", 200, [], b"from parent", now, None, {{}}), now)
pid = os.fork()
if pid == 0:
    try:
        ok = store.get("parent", time.time()).body == b"from parent"
        store.put(Entry("child", 200, [], b"from child", time.time(), None, {{}}), time.time())
        os._exit(0 if ok else 3)
    except Exception:
        os._exit(4)
_, status = os.waitpid(pid, 0)
seen = store.get("child", time.time()).body.decode()
print(json.dumps({{"child": os.waitstatus_to_exitcode(status), "sees_child": seen}}))
""")
    assert json.loads(out) == {"child": 0, "sees_child": "from child"}


def test_no_pickle_anywhere_in_the_package() -> None:
    import re

    package = Path(llmshim.__file__).parent
    use = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|shelve|marshal)\b|\b(pickle|shelve|marshal)\.[a-z]",
                     re.MULTILINE)
    for path in package.rglob("*.py"):
        assert not use.search(path.read_text()), path


def test_cli_cache_commands(server: FakeLLMServer, cached: Path) -> None:
    _post(server)
    _post(server)
    llmshim.uninstall()

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "llmshim", "cache", "--path", str(cached), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    stats = cli("stats")
    assert "entries      1" in stats and "hits         1" in stats and "hit rate     50.0%" in stats
    listing = cli("ls")
    assert "ollama api/chat model=llama3.2" in listing
    key = listing.split()[0]
    shown = cli("show", key)
    assert '"status": 200' in shown and '"done": true' in shown and "Authorization" not in shown
    assert "removed 0 expired entries" in cli("purge", "--expired")
    assert "removed 1 entries" in cli("clear")
    assert "entries      0" in cli("stats")


def test_a_damaged_description_is_listed_shown_and_served_never_a_traceback(server: FakeLLMServer,
                                                                            cached: Path) -> None:
    """A row whose stored description is damaged before its answer's usage: the next identical call
    is still served from it (answer and usage intact), and ``llmshim cache ls`` / ``show`` list and
    show it as unreadable (``ls`` ended in a JSONDecodeError traceback)."""
    import sqlite3

    _post(server)
    with contextlib.closing(sqlite3.connect(cached)) as conn, conn:
        (meta,) = conn.execute("SELECT meta FROM entries").fetchone()
        damaged = '{"provider": "ollama", "url": "http://h/api/ch\x00 garbage, ' + meta[meta.index('"status"'):]
        conn.execute("UPDATE entries SET meta = ?", (damaged,))
    hit = _post(server)
    assert hit.headers["x-llmshim-cache"] == "hit" and len(server.received) == 1
    llmshim.uninstall()

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "llmshim", "cache", "--path", str(cached), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return done.stdout

    listing = cli("ls")
    assert len(listing.splitlines()) == 1 and "model=None" in listing
    shown = cli("show", listing.split()[0])
    assert '"description": "unreadable"' in shown and '"done": true' in shown
