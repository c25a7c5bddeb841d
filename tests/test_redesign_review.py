"""A hostile review of the redesign (issue 13): one observer, facts, the store layer, the store thread.

Real clients over real sockets to a FakeLLMServer, real SQLite files, fresh interpreters for fork.
Each test states a promise and tries to break it; the regressions it found are fixed and kept as
tests. (Old-vs-new comparisons of recognition, cache keys, settings and whole scenarios were run
against the pre-redesign tree once, outside CI; the closing note of issue 13 gives the figures.)
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from conftest import run_python
from llmshim.call import Call, Reply
from llmshim.pipeline import AsyncHandler, Handler
from llmshim.policies.observer import ObserverPolicy
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer, Fault

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


class Otel:
    """In-memory span exporter and metric reader, handed to install()."""

    def __init__(self) -> None:
        self.exporter, self.reader = InMemorySpanExporter(), InMemoryMetricReader()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def install(self, telemetry: bool = True, **settings: Any) -> None:
        if telemetry:
            llmshim.install(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **settings)
        else:
            llmshim.install(telemetry="false", **settings)

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def total(self, name: str) -> float:
        """The sum of a counter's points (a histogram's: the count of its records)."""
        data = self.reader.get_metrics_data()
        found = 0.0
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            found += getattr(point, "value", None) if hasattr(point, "value") else point.count
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    yield Otel()


def _stream(url: str, body: dict[str, Any], read: bool = True) -> int:
    with httpx.Client(timeout=10) as client:
        response = client.send(client.build_request("POST", url, json={**body, "stream": True}), stream=True)
        status = response.status_code
        if read:
            response.read()
            response.close()
        else:
            del response
            gc.collect()
    return status


def _accounted(records: list[llmshim.CallRecord], calls: int, otel: Otel | None = None, duration: bool = True) -> None:
    """Every call counted once in stats(), one call_started and one end hook, one span, one duration
    (not for a call whose policy raised: it has no end time, before the redesign as after)."""
    snapshot = llmshim.stats()
    assert snapshot["total_calls"] == calls
    assert snapshot["completed"] + snapshot["failed"] + snapshot["aborted"] == calls
    assert sum(1 for r in records if r.event == "call_started") == calls
    assert sum(1 for r in records if r.event != "call_started") == calls
    if otel is not None:
        assert len(otel.spans()) == calls
        assert otel.total("gen_ai.client.operation.duration") == (calls if duration else 0)


# -- the observer: exactly once on every path ------------------------------------------------------

class Raising:
    """A policy with a bug: it raises instead of passing the call on."""

    def handle(self, call: Call, next: Handler) -> Reply:
        raise RuntimeError("a policy's bug")

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        raise RuntimeError("a policy's bug")


def _policy_raises(server: FakeLLMServer, otel: Otel) -> int:
    otel.install()
    STATE.pipeline.insert(Raising(), after=ObserverPolicy)
    with pytest.raises(Exception, match="a policy's bug"):
        requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5)
    return 1


def _cancelled_task(server: FakeLLMServer, otel: Otel) -> int:
    otel.install()
    server.inject(Fault(delay=5), times=1)
    started: list[Any] = []
    llmshim.on("call_started", started.append)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            task = asyncio.create_task(client.post(server.openai_base_url + "/chat/completions", json=CHAT))
            while not started:
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    try:
        asyncio.run(main())
    finally:
        llmshim.off("call_started", started.append)
    return 1


def _dropped_stream(server: FakeLLMServer, otel: Otel) -> int:
    otel.install()
    _stream(server.openai_base_url + "/chat/completions", CHAT, read=False)
    return 1


def _retry_then_success(server: FakeLLMServer, otel: Otel) -> int:
    otel.install(retry_mode="llmshim", retry_max_delay="0")
    server.inject(Fault(status=500), times=2)
    assert requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).status_code == 200
    assert llmshim.stats()["retries"] == 2
    return 1


def _cache_hit(server: FakeLLMServer, otel: Otel, tmp_path: Path) -> int:
    otel.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    for _ in range(2):
        requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5)
    _stream(server.openai_base_url + "/chat/completions", CHAT)
    _stream(server.openai_base_url + "/chat/completions", CHAT)
    assert llmshim.stats()["cache_hits"] == 2
    return 4


def _replay_miss(server: FakeLLMServer, otel: Otel, tmp_path: Path) -> int:
    otel.install(cache="replay", cache_path=str(tmp_path / "c.sqlite3"))
    assert requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).status_code == 504
    assert _stream(server.openai_base_url + "/chat/completions", CHAT) == 504
    return 2


def _queue_timeout(server: FakeLLMServer, otel: Otel) -> int:
    otel.install(rpm="1", ratelimit_burst="0", queue_timeout="0")
    statuses = [requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).status_code
                for _ in range(2)]
    assert statuses == [200, 429]
    return 2


def _uninstall_mid_stream(server: FakeLLMServer, otel: Otel) -> int:
    otel.install()
    with httpx.Client(timeout=10) as client:
        response = client.send(client.build_request("POST", server.openai_base_url + "/chat/completions",
                                                    json={**CHAT, "stream": True}), stream=True)
        llmshim.uninstall()
        response.read()
        response.close()
    otel.install()  # the test's teardown uninstalls
    return 1


def _install_churn(server: FakeLLMServer, otel: Otel, tmp_path: Path) -> int:
    otel.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    url = server.openai_base_url + "/chat/completions"
    with httpx.Client(timeout=10) as client:
        responses = [client.send(client.build_request("POST", url, json={**CHAT, "n": i, "stream": True}),
                                 stream=True) for i in range(3)]
        for i in range(6):
            otel.install(cache="on" if i % 2 else "off", cache_path=str(tmp_path / "c.sqlite3"))
        for response in responses:
            response.read()
            response.close()
    return 3


PATHS: dict[str, Callable[..., int]] = {
    "policy_raises": _policy_raises, "cancelled_task": _cancelled_task, "dropped_stream": _dropped_stream,
    "retry_then_success": _retry_then_success, "cache_hit": _cache_hit, "replay_miss": _replay_miss,
    "queue_timeout": _queue_timeout, "uninstall_mid_stream": _uninstall_mid_stream, "install_churn": _install_churn,
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_one_stats_update_one_span_one_hook_per_call(path: str, server: FakeLLMServer, otel: Otel, tmp_path: Path,
                                                      records: list[llmshim.CallRecord]) -> None:
    run = PATHS[path]
    try:
        calls = run(server, otel, tmp_path) if "tmp_path" in run.__code__.co_varnames else run(server, otel)
    finally:
        llmshim.uninstall()
    gc.collect()
    _accounted(records, calls, otel, duration=path != "policy_raises")


# -- regressions the review found in the redesign, fixed ----------------------------------------------

def test_a_started_call_has_no_error_type(server: FakeLLMServer, shim: None,
                                          records: list[llmshim.CallRecord]) -> None:
    requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5)
    assert [(r.event, r.error_type) for r in records] == [("call_started", None), ("call_completed", None)]


@pytest.mark.parametrize("telemetry", [True, False])
def test_success_after_a_retried_reset_is_no_error(server: FakeLLMServer, otel: Otel, telemetry: bool,
                                                   records: list[llmshim.CallRecord]) -> None:
    otel.install(telemetry, retry_mode="llmshim", retry_max_delay="0")
    server.inject(Fault(reset="before_headers"), times=1)
    try:
        assert requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).status_code == 200
    finally:
        llmshim.uninstall()
    assert llmshim.stats()["retries"] == 1 and llmshim.stats()["completed"] == 1
    assert [(r.event, r.outcome, r.error_type) for r in records][-1] == ("call_completed", "ok", None)
    for span in otel.spans():
        assert "error.type" not in (span.attributes or {})


def test_throttled_calls_count_calls_and_the_wait_histogram_one_total_per_call(server: FakeLLMServer,
                                                                             otel: Otel) -> None:
    """A named change of the redesign: ``throttled_calls`` counts calls (as its name says) and the
    ``llmshim.ratelimit.wait`` histogram records each call's total wait once; before, a retried call
    counted once per throttled wire attempt."""
    otel.install(rpm="600", ratelimit_burst="0", retry_mode="llmshim", retry_max_delay="0")
    server.inject(Fault(status=500), times=2)
    try:
        assert requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).status_code == 200
    finally:
        llmshim.uninstall()
    assert llmshim.stats()["retries"] == 2
    assert (llmshim.stats()["throttled_calls"], otel.total("llmshim.ratelimit.wait")) == (1, 1)


# -- store failures: counted once, warned once, never raised, telemetry on or off -------------------

def _broken_file(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "cache.sqlite3"
    path.write_bytes(b"this is not a database" * 200)
    return {"cache_path": str(path)}


def _under_a_file(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "a-file").write_text("x")  # a directory that cannot exist, for root too
    return {"cache_path": str(tmp_path / "a-file" / "cache.sqlite3")}


def _redis_down(tmp_path: Path) -> dict[str, str]:
    return {"cache_path": str(tmp_path / "c.sqlite3"), "cache_url": "redis://127.0.0.1:9/0", "cache_local": "false"}


BROKEN = {"broken_sqlite_file": _broken_file, "directory_under_a_file": _under_a_file, "redis_down": _redis_down}


@pytest.mark.parametrize("telemetry", [True, False], ids=["telemetry", "no-telemetry"])
@pytest.mark.parametrize("store", sorted(BROKEN))
def test_a_broken_cache_store_is_counted_once_and_warned_once(
        store: str, telemetry: bool, server: FakeLLMServer, otel: Otel, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, records: list[llmshim.CallRecord]) -> None:
    otel.install(telemetry, cache="on", **BROKEN[store](tmp_path))
    url = server.openai_base_url + "/chat/completions"
    try:
        with caplog.at_level(logging.WARNING, logger="llmshim"):
            statuses = [requests.post(url, json=CHAT, timeout=5).status_code for _ in range(3)]
            statuses.append(_stream(url, CHAT))
    finally:
        llmshim.uninstall()
    assert statuses == [200] * 4 and len(server.received) == 4
    snapshot = llmshim.stats()
    assert snapshot["cache_errors"] >= 4  # every call's lookup failed
    assert snapshot["store_errors"] == snapshot["cache_errors"]
    assert snapshot["cache_hits"] == snapshot["cache_misses"] == 0
    if telemetry:
        assert otel.total("llmshim.cache.errors") == snapshot["cache_errors"]
    assert len([r for r in caplog.records if "cache" in r.getMessage() and r.levelno == logging.WARNING]) == 1
    _accounted(records, 4, otel if telemetry else None)


def test_a_broken_limits_store_fails_open_once_counted(server: FakeLLMServer, otel: Otel, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from llmshim.policies import shared_budget

    monkeypatch.setattr(shared_budget, "_last_warning", [0.0])  # warned once a minute per process: start afresh
    path = tmp_path / "limits.sqlite3"
    path.write_bytes(b"this is not a database" * 200)
    otel.install(rpm="60000", ratelimit_store=f"sqlite:///{path}")
    try:
        with caplog.at_level(logging.WARNING, logger="llmshim"):
            statuses = [requests.post(server.openai_base_url + "/chat/completions", json=CHAT, timeout=5).status_code
                        for _ in range(3)]
    finally:
        llmshim.uninstall()
    assert statuses == [200] * 3
    snapshot = llmshim.stats()
    assert snapshot["store_errors"] >= 1 and snapshot["cache_errors"] == 0
    assert otel.total("llmshim.cache.errors") == 0  # a limits failure is no cache error
    assert len([r for r in caplog.records if "rate-limit store" in r.getMessage()]) == 1


# -- the rate-limit store thread --------------------------------------------------------------------

def _limiter() -> Any:
    from llmshim.policies.ratelimit import RateLimitPolicy

    policy = STATE.pipeline.find(RateLimitPolicy)
    assert policy is not None
    return policy.limiter


def test_cancelled_while_the_store_thread_is_slow_holds_nothing(server: FakeLLMServer, tmp_path: Path,
                                                                records: list[llmshim.CallRecord]) -> None:
    """An async call queued for a permit while the store thread is busy (another process's lock,
    a slow Redis) is cancelled; once the store thread is free, nothing is held, the loop never
    blocked, and the next call goes through."""
    import threading

    from llmshim.policies.shared_budget import STORE_THREAD

    llmshim.install(rpm="60000", max_concurrency=1, ratelimit_store=f"sqlite:///{tmp_path / 'limits.sqlite3'}")
    gate, busy = threading.Event(), threading.Event()
    url = server.openai_base_url + "/chat/completions"

    def slow() -> None:
        busy.set()
        gate.wait(30)

    async def main() -> int:
        async with httpx.AsyncClient(timeout=10) as client:
            STORE_THREAD.submit(slow, droppable=False)
            busy.wait(10)
            task = asyncio.create_task(client.post(url, json=CHAT))
            while _limiter().held()[1] == 0:  # queued: the loop keeps running while the store thread is busy
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
            await asyncio.to_thread(STORE_THREAD.idle, 10)
            assert _limiter().held() == (0, 0)
            return (await client.post(url, json=CHAT)).status_code

    try:
        assert asyncio.run(main()) == 200
        assert STORE_THREAD.idle(10)
        assert _limiter().held() == (0, 0)
    finally:
        gate.set()
        llmshim.uninstall()
    _accounted(records, 2)
    assert len(server.received) == 1


def test_a_fork_while_a_take_is_queued_starts_the_child_afresh(server: FakeLLMServer, tmp_path: Path) -> None:
    """The parent holds the only concurrency slot (a stream left open) and has a second call queued
    on the store thread; a fork() child neither inherits the slot nor the queue: its call goes
    through at once. Then the parent's queued call completes."""
    code = f"""
import os, threading, httpx, requests, llmshim
from llmshim.runtime import STATE
from llmshim.policies.ratelimit import RateLimitPolicy
llmshim.install(max_concurrency=1, ratelimit_store="sqlite:///{tmp_path / 'limits.sqlite3'}", cache="off")
url = "{server.openai_base_url}/chat/completions"
body = {{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "stream": True}}
limiter = STATE.pipeline.find(RateLimitPolicy).limiter
client = httpx.Client(timeout=30)
held = client.send(client.build_request("POST", url, json=body), stream=True)
done = []
queued = threading.Thread(target=lambda: done.append(requests.post(url, json=body, timeout=30).status_code))
queued.start()
while limiter.held() != (1, 1):
    threading.Event().wait(0.001)
pid = os.fork()
if pid == 0:
    ok = limiter.held() == (0, 0) and requests.post(url, json=body, timeout=10).status_code == 200
    os._exit(0 if ok and limiter.held() == (0, 0) else 3)
_, status = os.waitpid(pid, 0)
held.read(); held.close()
queued.join(30)
print(os.waitstatus_to_exitcode(status), done, limiter.held(), llmshim.stats()["total_calls"])
llmshim.uninstall()
"""
    assert run_python(code).split() == ["0", "[200]", "(0,", "0)", "2"]


def test_an_idle_process_holds_no_slot_after_every_kind_of_end(server: FakeLLMServer, tmp_path: Path) -> None:
    """Completed, dropped unread, failed on the wire, cancelled, timed out in the queue: with a
    concurrency limit and a shared store, nothing stays held once the process is idle."""
    from llmshim.policies.shared_budget import STORE_THREAD

    llmshim.install(max_concurrency=2, ratelimit_store=f"sqlite:///{tmp_path / 'limits.sqlite3'}")
    url = server.openai_base_url + "/chat/completions"
    try:
        requests.post(url, json=CHAT, timeout=5)
        _stream(url, CHAT, read=False)
        server.inject(Fault(reset="before_headers"), times=1)
        with pytest.raises(requests.ConnectionError):
            requests.post(url, json=CHAT, timeout=5)
        server.inject(Fault(reset="after_chunks", after_chunks=1), times=1)
        with pytest.raises(httpx.HTTPError):
            _stream(url, CHAT)

        async def cancelled() -> None:
            server.inject(Fault(delay=5), times=1)
            async with httpx.AsyncClient(timeout=10) as client:
                task = asyncio.create_task(client.post(url, json=CHAT))
                while not server.received:
                    await asyncio.sleep(0.001)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(cancelled())
        gc.collect()
        assert STORE_THREAD.idle(10)
        assert _limiter().held() == (0, 0)
    finally:
        llmshim.uninstall()
