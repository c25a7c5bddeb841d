"""Unit tests of the pure-ish core the README describes: the tap's exactly-once end, the pipeline's
order, the observer reporting each call once from its facts. No sockets, no sleeps."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import llmshim
from llmshim.call import Call, CallInfo, Reply, WireRequest
from llmshim.config import load
from llmshim.facts import Facts, error_type, store_failed
from llmshim.pipeline import Pipeline
from llmshim.policies import events
from llmshim.policies.observer import ObserverPolicy
from llmshim.policies.stats import Stats
from llmshim.runtime import build_pipeline
from llmshim.tap import OnEnd, Tap


class Log:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_chunk(self, data: bytes) -> None:
        self.seen.append(data)

    def on_complete(self) -> None:
        self.seen.append("complete")

    def on_abort(self, error: BaseException | None) -> None:
        self.seen.append(("abort", error))


ENDS = st.lists(st.sampled_from(["chunk", "complete", "abort", "release", "opaque"]), max_size=12)


@given(ENDS)
def test_a_tap_ends_exactly_once_and_delivers_in_order_whatever_the_sequence(steps: list[str]) -> None:
    tap, log = Tap(), Log()
    tap.subscribe(log)
    fed: list[Any] = []
    released, ended, opaque = False, False, False
    for i, step in enumerate(steps):
        if step == "chunk":
            tap.chunk(b"%d" % i)
            if not ended and not opaque:
                fed.append(b"%d" % i)
        elif step == "opaque":
            tap.opaque()
            opaque = True
        elif step == "release" and not released:
            tap.release()
            released = True
        elif step in ("complete", "abort") and not ended:
            getattr(tap, step)()
            ended = True
            fed.append("complete" if step == "complete" else ("abort", None))
        elif step in ("complete", "abort"):
            getattr(tap, step)()  # a second end is ignored
    if not released:
        tap.release()
    assert log.seen == fed
    assert sum(1 for item in log.seen if not isinstance(item, bytes)) == int(ended)


def test_a_raising_observer_is_dropped_and_the_others_still_hear_the_end(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Log):
        def on_chunk(self, data: bytes) -> None:
            raise RuntimeError("observer bug")

    tap, broken, fine = Tap(), Broken(), Log()
    tap.subscribe(broken)
    tap.subscribe(fine)
    tap.release()
    tap.chunk(b"a")
    tap.chunk(b"b")
    tap.complete()
    assert fine.seen == [b"a", b"b", "complete"] and broken.seen == []
    assert "body observer failed" in caplog.text


def test_a_response_collected_unread_aborts_its_tap_once() -> None:
    class Response:
        pass

    tap, log = Tap(), Log()
    tap.subscribe(log)
    tap.release()
    owner = Response()
    tap.abort_when_collected(owner)
    del owner
    gc.collect()
    tap.complete()
    assert log.seen == [("abort", None)]


def _call(outcome: str | None = None, status: int | None = None, error: BaseException | None = None) -> Call:
    call = Call(request=WireRequest("POST", "http://h:1/v1/chat/completions", (), b"{}"),
                info=CallInfo("openai", "chat", "chat/completions", "m", False), library="httpx",
                dialect=None)  # type: ignore[arg-type]
    call.outcome, call.status, call.error = outcome, status, error
    return call


@pytest.mark.parametrize(("outcome", "status", "error", "expected"), [
    ("ok", 200, None, None),
    ("error", 500, None, "500"),
    ("error", 429, None, "429"),
    ("error", None, ConnectionResetError(), "ConnectionResetError"),
    ("aborted", 200, None, "aborted"),
    ("aborted", 200, TimeoutError(), "TimeoutError"),
    (None, None, None, None),  # not ended (a call_started record)
    ("ok", 200, ConnectionResetError(), None),  # succeeded after a retried attempt failed
])
def test_error_type_has_one_definition(outcome: str | None, status: int | None, error: BaseException | None,
                                       expected: str | None) -> None:
    assert error_type(_call(outcome, status, error)) == expected


def test_the_pipeline_order_is_observer_cache_retry_limits() -> None:
    settings = load({}, cache="on", retry_mode="auto", rpm="60")
    pipeline = build_pipeline(settings)
    try:
        assert [type(p).__name__ for p in pipeline.policies] == [
            "ObserverPolicy", "CachePolicy", "RetryPolicy", "RateLimitPolicy"]
        assert pipeline.find(ObserverPolicy) is pipeline.policies[0]
    finally:
        pipeline.close()
    off = build_pipeline(load({}, cache="off", retry_mode="off"))
    assert [type(p).__name__ for p in off.policies] == ["ObserverPolicy"]
    off.close()


def test_insert_puts_a_policy_just_inside_another_and_find_returns_it() -> None:
    class Marker:
        def handle(self, call: Call, next: Any) -> Reply:
            return next(call)

        async def ahandle(self, call: Call, anext: Any) -> Reply:
            return await anext(call)

    pipeline = Pipeline([ObserverPolicy(None, Stats()), Marker()])
    inner = Marker()
    pipeline.insert(inner, after=ObserverPolicy)
    assert pipeline.policies[1] is inner and pipeline.find(Marker) is inner
    outer = Marker()
    pipeline.insert(outer)
    assert pipeline.policies[0] is outer


def _reply(status: int = 200) -> Reply:
    tap = Tap()
    return Reply(status=status, headers={"content-type": "application/json"}, tap=tap, native=None)


def test_the_observer_reports_each_call_once_from_its_facts() -> None:
    stats = Stats()
    ended: list[llmshim.CallRecord] = []
    llmshim.on("call_completed", ended.append)
    try:
        observer = ObserverPolicy(None, stats)
        call = _call()

        def inner(call: Call) -> Reply:
            call.facts = Facts(cache_hit=True, saved_input_tokens=3, saved_output_tokens=4, retries=2,
                               ratelimit_wait_s=0.5, priority="high")
            reply = _reply()
            reply.tap.subscribe(OnEnd(lambda: setattr(call, "outcome", "ok")))
            return reply

        reply = observer.handle(call, inner)
        reply.tap.release()
        reply.tap.complete()
        reply.tap.abort()  # a second end changes nothing
    finally:
        llmshim.off("call_completed", ended.append)
    snap = stats.snapshot()
    assert (snap["total_calls"], snap["completed"], snap["cache_hits"], snap["tokens_saved"], snap["retries"],
            snap["throttled_calls"]) == (1, 1, 1, 7, 2, 1)
    assert [r.cache_hit for r in ended] == [True]


def test_a_call_that_raises_is_reported_once_as_failed() -> None:
    stats, failed = Stats(), []
    events.on("call_failed", failed.append)
    try:
        observer = ObserverPolicy(None, stats)

        def inner(call: Call) -> Reply:
            call.outcome, call.error = "error", ConnectionError("down")
            raise ConnectionError("down")

        with pytest.raises(ConnectionError):
            observer.handle(_call(), inner)
    finally:
        events.off("call_failed", failed.append)
    assert stats.snapshot()["failed"] == 1 and [r.error_type for r in failed] == ["ConnectionError"]


def test_store_failures_outside_any_call_reach_the_newest_observer() -> None:
    old, new = Stats(), Stats()
    ObserverPolicy(None, old)
    ObserverPolicy(None, new)
    store_failed("cache", "write")
    store_failed("limits", "take")
    assert (new.snapshot()["store_errors"], new.snapshot()["cache_errors"]) == (2, 1)
    assert old.snapshot()["store_errors"] == 0
