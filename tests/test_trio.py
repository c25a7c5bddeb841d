"""Async calls under trio: every feature works, nothing raises in the caller's call.

httpx and httpx2 run under trio as well as asyncio. llmshim's async policies wait on asyncio, so a
trio task's call runs the synchronous chain on a trio worker thread and sends on the task's own
loop (``llmshim/trio_calls.py``). Before, a trio program with a rate limit got ``RuntimeError: no
running event loop`` from inside its own ``await client.post(...)``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest

import llmshim
from llmshim.policies.cache import CachePolicy
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE
from llmshim.store.background import on_event_loop
from llmshim.testing import FakeLLMServer, Fault

trio = pytest.importorskip("trio")
pytestmark = pytest.mark.timeout(60)

LIBRARIES = ["httpx", "httpx2"]


def body(question: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": stream}


def _client(library: str, server: FakeLLMServer) -> Any:
    module = pytest.importorskip(library)
    return module.AsyncClient(base_url=server.openai_base_url, timeout=30)


def _limiter() -> Any:
    return next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))


@pytest.mark.parametrize("library", LIBRARIES)
def test_cache_limits_and_retries_work_in_a_trio_program(library: str, server: FakeLLMServer,
                                                        installed_cached: Callable[..., Any]) -> None:
    installed_cached(rpm="6000", max_concurrency="2", retry_mode="llmshim", retry_max_delay="0.05")

    async def main() -> list[tuple[int, str | None]]:
        async with _client(library, server) as client:
            answers = []
            for question in ("colours", "colours", "shapes"):
                reply = await client.post("/chat/completions", json=body(question))
                answers.append((reply.status_code, reply.headers.get("x-llmshim-cache")))
            server.inject(Fault(status=429, headers={"retry-after-ms": "5"}))
            retried = await client.post("/chat/completions", json=body("retried"))
            answers.append((retried.status_code, retried.headers.get("x-llmshim-cache")))
            return answers

    assert trio.run(main) == [(200, None), (200, "hit"), (200, None), (200, None)]
    stats = llmshim.stats()
    assert (stats["completed"], stats["failed"], stats["cache_hits"], stats["retries"]) == (4, 0, 1, 1)
    assert _limiter().held() == (0, 0)


@pytest.mark.parametrize("library", LIBRARIES)
def test_identical_concurrent_trio_tasks_go_upstream_once(library: str, server: FakeLLMServer,
                                                         installed_cached: Callable[..., Any]) -> None:
    installed_cached(max_concurrency="8")
    server.reset()

    async def main() -> list[tuple[int, str]]:
        answers: list[tuple[int, str]] = []
        async with _client(library, server) as client:
            async def ask() -> None:
                reply = await client.post("/chat/completions", json=body("one question, six askers"))
                answers.append((reply.status_code, reply.json()["choices"][0]["message"]["content"]))

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(ask)
        return answers

    answers = trio.run(main)
    assert len(answers) == 6 and {status for status, _ in answers} == {200} and len({a for _, a in answers}) == 1
    assert len(server.received) == 1  # the leader went upstream; five followers were answered from its entry
    cache = next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy))
    assert cache.writes.idle(10) and cache.flights.in_flight() == 0


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_trio_tasks_context_reaches_the_policies(library: str, server: FakeLLMServer,
                                                   installed_cached: Callable[..., Any]) -> None:
    """``cache_control()`` set in the task holds on the worker thread that runs the chain."""
    installed_cached()

    async def main() -> list[str | None]:
        async with _client(library, server) as client:
            await client.post("/chat/completions", json=body("ctx"))
            with llmshim.cache_control(mode="off"):
                bypassed = await client.post("/chat/completions", json=body("ctx"))
            hit = await client.post("/chat/completions", json=body("ctx"))
            return [bypassed.headers.get("x-llmshim-cache"), hit.headers.get("x-llmshim-cache")]

    assert trio.run(main) == [None, "hit"]


@pytest.mark.parametrize("library", LIBRARIES)
def test_trio_tasks_queued_behind_an_open_stream_and_one_cancelled_leave_no_slot_held(
        library: str, server: FakeLLMServer, installed_cached: Callable[..., Any]) -> None:
    installed_cached(max_concurrency="1", queue_timeout="5")

    async def main() -> list[int]:
        statuses: list[int] = []
        async with _client(library, server) as client:
            request = client.build_request("POST", "/chat/completions", json=body("held", stream=True))
            held = await client.send(request, stream=True)  # holds the only slot until read and closed

            async def ask(n: int) -> None:
                statuses.append((await client.post("/chat/completions", json=body(f"queued {n}"))).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, 1)
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await ask(2)  # cancelled at once, before it queues or while it does
                await held.aread()
                await held.aclose()  # the slot frees: the queued call goes
        return statuses

    assert trio.run(main) == [200]
    assert _limiter().held() == (0, 0)


def test_writes_made_on_a_trio_loop_go_to_the_background_thread_and_a_worker_thread_writes_inline() -> None:
    async def main() -> tuple[bool, bool]:
        return on_event_loop(), await trio.to_thread.run_sync(on_event_loop)

    assert trio.run(main) == (True, False)
    assert on_event_loop() is False


def test_a_trio_program_that_never_installs_llmshim_is_untouched(server: FakeLLMServer) -> None:
    httpx = pytest.importorskip("httpx")

    async def main() -> int:
        async with httpx.AsyncClient(base_url=server.openai_base_url) as client:
            return (await client.post("/chat/completions", json=body("plain"))).status_code

    with contextlib.suppress(Exception):
        llmshim.uninstall()
    assert trio.run(main) == 200


@pytest.mark.timeout(25)  # the queue timeout below is 60 s: a call that waits it out fails here
@pytest.mark.parametrize("library", LIBRARIES)
def test_a_trio_call_cancelled_while_queued_ends_at_once_and_its_worker_sends_nothing(
        library: str, server: FakeLLMServer, installed_cached: Callable[..., Any]) -> None:
    installed_cached(max_concurrency="1", queue_timeout="60")
    server.reset()

    async def main() -> tuple[bool, int]:
        async with _client(library, server) as client:
            request = client.build_request("POST", "/chat/completions", json=body("holds the slot", stream=True))
            held = await client.send(request, stream=True)
            with trio.move_on_after(0.2) as scope:
                await client.post("/chat/completions", json=body("cancelled while queued"))
            cancelled_while_the_slot_was_held = scope.cancelled_caught and not held.is_closed
            await held.aread()
            await held.aclose()
            # Queued behind the abandoned worker (first in line): answered once it has let go.
            after = await client.post("/chat/completions", json=body("after"))
            return cancelled_while_the_slot_was_held, after.status_code

    assert trio.run(main) == (True, 200)
    assert _limiter().held() == (0, 0)
    asked = [json.loads(r.body)["messages"][0]["content"] for r in server.received]
    assert "cancelled while queued" not in asked and asked == ["holds the slot", "after"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("library", LIBRARIES)
def test_trio_calls_cancelled_while_queued_for_a_rate_leave_the_queue_at_once_and_take_no_permit(
        library: str, server: FakeLLMServer, installed_cached: Callable[..., Any]) -> None:
    """A cancelled task's worker waited in the limiter's queue until its turn, then took that
    turn's permit and sent nothing: every call cancelled while queued cost the program one request
    of its rate (and the calls behind it one interval each). Now its place is left at once."""
    installed_cached(rpm="60", ratelimit_burst="0", queue_timeout="60")
    server.reset()

    async def main() -> tuple[int, float, float]:
        async with _client(library, server) as client:
            await client.post("/chat/completions", json=body("first"))  # the next permit is 1 s away
            (key,) = _limiter()._keys.values()
            after_first = key.requests.tat

            async def ask(n: int) -> None:
                await client.post("/chat/completions", json=body(f"cancelled {n}"))

            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    for n in range(5):
                        nursery.start_soon(ask, n)
                    while _limiter().held()[1] < 5:  # all five queued for a permit
                        await trio.sleep(0.005)
                    scope.cancel()
            while _limiter().held() != (0, 0):  # their workers leave the queue (before: one a second)
                await trio.sleep(0.005)
            after = await client.post("/chat/completions", json=body("after"))
            return after.status_code, after_first, key.requests.tat

    status, after_first, at_end = trio.run(main)
    assert status == 200
    # One permit taken since "first" ("after"'s own: the bucket's next-permit time moved 1 s and the
    # grant's lateness); each permit a cancelled call took would move it 1 s more (the bug: 6 s).
    assert 1.0 <= at_end - after_first < 5.0
    asked = [json.loads(r.body)["messages"][0]["content"] for r in server.received]
    assert asked == ["first", "after"]


def test_a_cancellation_wakes_each_registered_waiter_once_and_no_removed_one() -> None:
    from llmshim.cancellation import Cancellation

    woken: list[str] = []
    cancellation = Cancellation()
    stop_a = cancellation.wake_with(lambda: woken.append("a"))
    stop_b = cancellation.wake_with(lambda: woken.append("b"))
    stop_b()
    cancellation.cancel()
    cancellation.cancel()
    stop_a()  # after the cancel: nothing to remove, no error
    assert woken == ["a"] and cancellation.cancelled
    cancellation.wake_with(lambda: woken.append("late"))  # registered after the cancel: woken at once
    assert woken == ["a", "late"]


def test_running_is_true_on_a_trio_runs_thread_only() -> None:
    """What routes a call to the worker and a store write to the background writer: true in the
    run, false on its worker threads (the synchronous chain runs there) and outside any run."""
    from llmshim import trio_calls

    async def main() -> tuple[bool, bool]:
        return trio_calls.running(), await trio.to_thread.run_sync(trio_calls.running)

    assert trio.run(main) == (True, False)
    assert trio_calls.running() is False
