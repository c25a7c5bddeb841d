"""install()/uninstall() while other threads and tasks are mid-call: no crash, every answer right.

The churn test runs this file as a script in fresh interpreters (``churn_main``): sync threads
(httpx, requests) and asyncio tasks (httpx, aiohttp), streamed and whole, OpenAI and Ollama
routes, each call asking a prompt of its own (twice, so the second may be a cache hit) against a
real FakeLLMServer, with the cache on a SQLite file, a shared SQLite rate-limit store, telemetry
into an in-memory OpenTelemetry SDK and a stats file, while one more thread installs and
uninstalls in a loop. Before the fix most runs died of SIGSEGV: ``SQLiteStore.close()`` closed
every thread's connection while other threads were inside ``execute()``.

The other tests pin each part of the promise on its own, deterministically: a call in flight
keeps its pipeline (and its cache) until its body ends, a call racing the swap goes to the new
pipeline, a store closed from another thread never closes a connection in use, and nothing
(connections, exit hooks) accumulates under churn.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import llmshim
from llmshim.call import Call, CallInfo, Reply, WireRequest
from llmshim.dialects.openai import OPENAI
from llmshim.pipeline import Pipeline
from llmshim.policies.stats import STATS
from llmshim.runtime import STATE
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.limits_sqlite import SQLiteLimitStore
from llmshim.tap import Tap
from llmshim.testing import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
RUNS = 20
ROUNDS = 1  # per worker; each round asks 3 prompts twice (on main, 10 runs of 10 died of SIGSEGV)


# -- the child: one churn run ------------------------------------------------------------------------
def _sse_text(lines: Any) -> str:
    out = []
    for line in lines:
        if line.startswith("data: {"):
            choices = json.loads(line[6:]).get("choices") or []
            if choices:
                out.append(choices[0]["delta"].get("content") or "")
    return "".join(out)


def churn_main(workdir: str, rounds: int) -> None:  # pragma: no cover - runs in a subprocess
    import aiohttp
    import requests
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    wrong: list[tuple[str, str]] = []
    answered = [0]
    stop = threading.Event()

    def check(prompt: str, got: str) -> None:
        if got != f"Echo: {prompt}":
            wrong.append((prompt, got[:200]))
        answered[0] += 1

    def chat(prompt: str, stream: bool = False) -> dict[str, Any]:
        return {"model": "m", "temperature": 0, "stream": stream, "messages": [{"role": "user", "content": prompt}]}

    def threads_worker(n: int, url: str) -> None:
        with httpx.Client(base_url=url) as client, requests.Session() as session:
            for i in range(rounds):
                for _ in range(2):
                    prompt = f"thread {n} call {i}"
                    check(prompt, client.post("/v1/chat/completions", json=chat(prompt)).json()
                          ["choices"][0]["message"]["content"])
                    with client.stream("POST", "/v1/chat/completions", json=chat(prompt + " streamed", True)) as r:
                        check(prompt + " streamed", _sse_text(r.iter_lines()))
                    ollama = session.post(url + "/api/chat", json={**chat(prompt + " ollama"), "stream": False})
                    check(prompt + " ollama", ollama.json()["message"]["content"])

    async def task_worker(n: int, url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as client, aiohttp.ClientSession() as session:
            for i in range(rounds):
                for _ in range(2):
                    prompt = f"task {n} call {i}"
                    check(prompt, (await client.post("/v1/chat/completions", json=chat(prompt))).json()
                          ["choices"][0]["message"]["content"])
                    async with client.stream("POST", "/v1/chat/completions",
                                             json=chat(prompt + " streamed", True)) as r:
                        check(prompt + " streamed", _sse_text([line async for line in r.aiter_lines()]))
                    async with session.post(url + "/v1/chat/completions", json=chat(prompt + " aiohttp")) as r:
                        check(prompt + " aiohttp", (await r.json())["choices"][0]["message"]["content"])

    async def tasks(url: str) -> None:
        await asyncio.gather(*(task_worker(n, url) for n in range(3)))

    def churn() -> int:
        rounds = 0
        while not stop.is_set():
            llmshim.install(tracer_provider=provider)
            llmshim.uninstall()
            llmshim.install(tracer_provider=provider)  # a second install while installed: swap in place
            rounds += 1
            time.sleep(0)  # let the callers run between swaps (a yield, not a wait)
        return rounds

    with FakeLLMServer() as server:
        llmshim.install(tracer_provider=provider)
        workers = [threading.Thread(target=threads_worker, args=(n, server.url)) for n in range(3)]
        workers.append(threading.Thread(target=lambda: asyncio.run(tasks(server.url))))
        for worker in workers:
            worker.start()
        with ThreadPoolExecutor(1) as pool:
            churned = pool.submit(churn)
            for worker in workers:
                worker.join()
            stop.set()
            rounds_done = churned.result()
        llmshim.uninstall()
    from llmshim.store.background import drain

    drain(30)  # a pipeline whose last call ended on an event loop closes on the background writer
    cache = os.path.join(workdir, "cache.sqlite3")
    still_open = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith(cache)]
    print(json.dumps({"answered": answered[0], "wrong": wrong[:5], "rounds": rounds_done,
                      "spans": len(spans.get_finished_spans()), "open_cache_files": still_open}))


# -- the churn test --------------------------------------------------------------------------------
def _run_once(workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update({
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "LLMSHIM_CACHE": "on",
        "LLMSHIM_CACHE_PATH": str(workdir / "cache.sqlite3"),
        "LLMSHIM_RPM": "10000000",
        "LLMSHIM_RATELIMIT_STORE": f"sqlite:///{workdir / 'limits.sqlite3'}",
        "LLMSHIM_STATS_FILE": str(workdir / "stats.json"),
        "LLMSHIM_RETRY_MODE": "off",
    })
    return subprocess.run([sys.executable, __file__, str(workdir), str(ROUNDS)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc (Linux)")
@pytest.mark.timeout(600)  # 20 interpreters: ~25 s on two idle cores, longer on a loaded machine
def test_install_churn_never_crashes_and_every_call_gets_its_own_answer(tmp_path: Path) -> None:
    dirs = [tmp_path / f"run{i}" for i in range(RUNS)]
    for directory in dirs:
        directory.mkdir()
    with ThreadPoolExecutor(2) as pool:  # two at a time: the machine has two cores
        results = list(pool.map(_run_once, dirs))
    crashed = [(r.returncode, r.stderr[-2000:]) for r in results if r.returncode != 0]
    assert not crashed, f"{len(crashed)} of {RUNS} runs crashed; first: {crashed[0]}"
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert all(not report["wrong"] for report in reports), [r["wrong"] for r in reports if r["wrong"]]
    assert all(report["answered"] > 0 and report["rounds"] > 0 and report["spans"] > 0 for report in reports)
    assert all(report["open_cache_files"] == [] for report in reports)  # every retired pipeline closed
    # Failing open would hide a store closed under a call's feet: not one cache or limits failure is allowed.
    noisy = [r.stderr for r in results if "Traceback" in r.stderr or "llmshim:" in r.stderr]
    assert not noisy, noisy[0]


# -- the parts, deterministically ------------------------------------------------------------------
def _chat(prompt: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "temperature": 0, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def test_a_stream_in_flight_keeps_its_pipeline_and_cache_across_uninstall(server: FakeLLMServer,
                                                                            tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite3"
    llmshim.install(cache="on", cache_path=str(cache))
    pipeline = STATE.pipeline
    with httpx.Client() as client, client.stream("POST", server.url + "/v1/chat/completions",
                                                 json=_chat("kept open", stream=True)) as response:
        lines = response.iter_lines()
        first = next(lines)
        llmshim.uninstall()
        assert pipeline.in_flight == 1 and not pipeline.closed  # the call holds it
        text = _sse_text([first, *lines])
    assert text == "Echo: kept open"
    assert pipeline.in_flight == 0 and pipeline.closed  # closed by the end of the last call
    assert SQLiteStore(str(cache)).stats()["entries"] == 1  # the retired pipeline's cache stored the answer


def test_reinstall_while_a_call_is_in_flight_then_the_next_call_uses_the_new_settings(server: FakeLLMServer,
                                                                                      tmp_path: Path) -> None:

    llmshim.install(cache="on", cache_path=str(tmp_path / "a.sqlite3"))
    first = STATE.pipeline
    try:
        with httpx.Client() as client:
            with client.stream("POST", server.url + "/v1/chat/completions",
                               json=_chat("slow", stream=True)) as response:
                llmshim.install(cache="on", cache_path=str(tmp_path / "b.sqlite3"))
                assert STATE.pipeline is not first and not first.closed
                assert _sse_text(response.iter_lines()) == "Echo: slow"
            assert first.closed
            answer = client.post(server.url + "/v1/chat/completions", json=_chat("after"))
            assert answer.json()["choices"][0]["message"]["content"] == "Echo: after"
    finally:
        llmshim.uninstall()
    rows = {}
    for name in ("a.sqlite3", "b.sqlite3"):
        with contextlib.closing(sqlite3.connect(tmp_path / name)) as conn:
            rows[name] = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    assert rows == {"a.sqlite3": 1, "b.sqlite3": 1}


def _fake_call() -> Any:
    return Call(WireRequest("POST", "http://x/v1/chat/completions", (), b"{}"),
                CallInfo("openai", "chat", "chat/completions", "m", False), "httpx", OPENAI)


class _Closing:
    def __init__(self) -> None:
        self.closed = 0
        self.seen: list[str] = []

    def handle(self, call: Any, next: Any) -> Any:
        self.seen.append("sync")
        return next(call)

    async def ahandle(self, call: Any, anext: Any) -> Any:
        self.seen.append("async")
        return await anext(call)

    def close(self) -> None:
        self.closed += 1


def _reply_of(call: Any) -> Any:
    return Reply(200, {"content-type": "application/json"}, Tap(), native=None)


def test_a_call_racing_the_swap_runs_on_the_successor_or_passes_through() -> None:
    old, new = _Closing(), _Closing()
    first, second = Pipeline([old]), Pipeline([new])
    first.retire(second)
    assert old.closed == 1  # no call in flight: closed at once
    reply = first.run(_fake_call(), _reply_of)  # an adapter that read STATE.pipeline just before the swap
    assert old.seen == [] and new.seen == ["sync"] and second.in_flight == 1
    reply.tap.complete()
    assert second.in_flight == 0 and new.closed == 0
    second.retire(None)  # uninstall: no successor
    assert new.closed == 1
    asyncio.run(first.arun(_fake_call(), _areply_of))
    assert new.seen == ["sync"]  # passed through both retired pipelines untouched


async def _areply_of(call: Any) -> Any:
    return _reply_of(call)


def test_a_call_that_fails_before_a_reply_releases_its_pipeline() -> None:
    policy = _Closing()
    pipeline = Pipeline([policy])

    def broken(call: Any) -> Any:
        assert pipeline.in_flight == 1
        pipeline.retire()
        assert policy.closed == 0  # still in flight
        raise ConnectionError("no answer")

    with pytest.raises(ConnectionError):
        pipeline.run(_fake_call(), broken)
    assert pipeline.in_flight == 0 and policy.closed == 1


def test_an_async_call_cancelled_mid_flight_releases_its_pipeline() -> None:
    policy = _Closing()
    pipeline = Pipeline([policy])

    async def main() -> None:
        entered = asyncio.Event()

        async def never(call: Any) -> Any:
            entered.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(pipeline.arun(_fake_call(), never))
        await entered.wait()
        pipeline.retire()
        assert policy.closed == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert pipeline.in_flight == 0 and policy.closed == 1


def test_a_reply_dropped_unread_releases_its_pipeline() -> None:
    policy = _Closing()
    pipeline = Pipeline([policy])

    class Response:
        pass

    def send(call: Any) -> Any:
        reply = _reply_of(call)
        reply.native = Response()
        reply.tap.abort_when_collected(reply.native)
        return reply

    reply = pipeline.run(_fake_call(), send)
    pipeline.retire()
    assert policy.closed == 0
    del reply
    gc.collect()
    assert policy.closed == 1


def test_a_reply_collected_while_its_pipeline_is_busy_in_the_same_thread_does_not_deadlock() -> None:
    """The garbage collector runs inside any allocation, also one made while a lock is held; a
    reply it collects ends its call right there, in the same thread."""
    policy = _Closing()
    pipeline = Pipeline([policy])

    class Response:
        pass

    def send(call: Any) -> Any:
        reply = _reply_of(call)
        reply.native = Response()
        reply.native.cycle = reply.native  # collected only by the cyclic collector
        reply.tap.abort_when_collected(reply.native)
        return reply

    reply = pipeline.run(_fake_call(), send)
    pipeline.retire()
    with pipeline._lock:
        del reply
        gc.collect()
    assert pipeline.in_flight == 0 and policy.closed == 1


@pytest.mark.parametrize("kind", ["cache", "limits"])
def test_a_store_closed_from_another_thread_never_closes_a_connection_in_use(tmp_path: Path, kind: str) -> None:
    store: Any = SQLiteStore(str(tmp_path / "c.sqlite3")) if kind == "cache" else \
        SQLiteLimitStore(str(tmp_path / "l.sqlite3"))
    inside, closed, seen = threading.Event(), threading.Event(), []

    def user() -> None:
        with store._connections.use() as conn:
            inside.set()
            closed.wait()
            seen.append(conn.execute("SELECT 1").fetchone()[0])  # still open: its use had not ended
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")  # closed by its own thread as the use ended
        with store._connections.use() as fresh:  # a later use opens a new connection
            seen.append(fresh.execute("SELECT 2").fetchone()[0])

    thread = threading.Thread(target=user)
    thread.start()
    inside.wait()
    store.close()
    closed.set()
    thread.join()
    assert seen == [1, 2]
    store.close()


def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "c.sqlite3"))
    for _ in range(30):  # a thread per request, as threading servers do
        thread = threading.Thread(target=lambda: store.get("k", time.time()))
        thread.start()
        thread.join()
    store.get("k", time.time())
    assert len(store._connections._slots) <= 2
    store.close()


def test_install_churn_adds_no_exit_hooks_and_leaves_no_file_open(tmp_path: Path) -> None:
    cache = str(tmp_path / "c.sqlite3")
    settings = {"cache": "on", "cache_path": cache, "rpm": "100000", "ratelimit_store": f"sqlite:///{tmp_path}/l.db",
                "stats_file": str(tmp_path / "stats.json")}
    llmshim.install(**settings)
    llmshim.uninstall()
    hooks = atexit._ncallbacks()
    for _ in range(20):
        llmshim.install(**settings)
        llmshim.install(**settings)
        llmshim.uninstall()
    STATS.write_to(None)
    assert atexit._ncallbacks() == hooks
    if os.path.isdir("/proc/self/fd"):
        names = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [n for n in names if n.startswith(str(tmp_path))]


if __name__ == "__main__":  # one churn run, in a fresh interpreter (see _run_once)
    churn_main(sys.argv[1], int(sys.argv[2]))
