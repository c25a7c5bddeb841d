"""Review 30: retries, timeouts and rate limits tried as a hostile user would.

Pure parts (``retry.decide``, the header parsers, the scheduler) under Hypothesis; the rest end to
end against FakeLLMServer's fault injection, counting the attempts the server saw."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.dialects.anthropic import server_limits_at
from llmshim.dialects.openai import OpenAIDialect, parse_reset
from llmshim.policies.retry import decide, server_delay
from llmshim.testing import FakeLLMServer, Fault

BODY = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "stream": False}
MESSAGES = BODY["messages"]

# Every form a hostile or broken server may put in a delay header.
HTTP_DATES = ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994",
              "Sun, 06 Nov 1994 08:49:37 -0000", "Sun, 06 Nov 1994 08:49:37 +0100", "Fri, 01 Jan 2100 00:00:00 GMT",
              "Mon, 01 Jan 0001 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "Tue, 01 Jan 10000 00:00:00 GMT",
              "Mon, 99 Jan 2020 00:00:00 GMT", "Mon, 01 Jan 2020 25:00:00 GMT", "Sun, 06 Nov 1994 08:49:37 PST"]
ODD_NUMBERS = ["nan", "NaN", "inf", "-inf", "1e309", "-1", "-0", "0", "0.5", "3600", "1e-320", "1_000", " 5 ",
               "5,5", "3600, 3600", "\uff11\uff12", "\u0663", "0x10", "", " ", "1" * 400]
DELAY_TEXT = st.one_of(st.text(max_size=40), st.from_regex(r"[0-9.eE+\- ]{1,30}", fullmatch=True),
                       st.sampled_from(HTTP_DATES + ODD_NUMBERS))
RESET_TEXT = st.one_of(DELAY_TEXT, st.from_regex(r"([0-9]{1,6}(\.[0-9]{1,4})?(ms|h|m|s)){1,4}", fullmatch=True),
                       st.sampled_from(["6m0s", "1ms", "20ms", "1h2m3.5s", "0s", "1.5s", "garbage", "99999999h"]))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(retry_after=st.one_of(st.none(), DELAY_TEXT), retry_after_ms=st.one_of(st.none(), DELAY_TEXT),
       max_delay=st.floats(0, 1e7), attempt=st.integers(1, 300), rand=st.floats(0, 1, exclude_max=True),
       time_left=st.one_of(st.none(), st.floats(0, 1e7)), status=st.integers(100, 599),
       body_delay=st.one_of(st.none(), st.floats(0, 1e12)), transport=st.booleans())
def test_decide_never_raises_never_waits_beyond_the_cap_or_the_callers_timeout(
        retry_after: str | None, retry_after_ms: str | None, max_delay: float, attempt: int, rand: float,
        time_left: float | None, status: int, body_delay: float | None, transport: bool) -> None:
    headers = {name: value for name, value in (("retry-after", retry_after), ("retry-after-ms", retry_after_ms))
               if value is not None}
    delay = server_delay(headers)
    assert delay is None or delay >= 0  # never negative, never NaN (NaN >= 0 is False)
    decision = decide(attempt=attempt, max_attempts=100, max_delay=max_delay, status=status, headers=headers,
                      transport_error=transport, rand=rand, time_left=time_left, body_delay=body_delay)
    assert 0 <= decision.delay <= max_delay
    if decision.retry:
        assert attempt < 100 and (time_left is None or decision.delay < time_left)
        if delay is not None and not transport:
            assert decision.delay >= delay  # the server's delay is a floor
    else:
        assert decision.delay == 0


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=RESET_TEXT, field=st.sampled_from(["requests", "tokens"]), kind=st.sampled_from(["limit", "remaining",
                                                                                             "reset"]))
def test_rate_limit_headers_never_raise_and_are_finite_and_non_negative(value: str, field: str, kind: str) -> None:
    openai_said = OpenAIDialect().server_limits({f"x-ratelimit-{kind}-{field}": value})
    anthropic_said = server_limits_at({f"anthropic-ratelimit-{field}-{kind}": value,
                                       f"anthropic-ratelimit-input-tokens-{kind}": value}, time.time())
    for said in (openai_said, anthropic_said):
        for number in dataclasses.astuple(said):
            assert number is None or 0 <= number < math.inf


@pytest.mark.parametrize(("text", "seconds"), [
    ("6m0s", 360.0), ("1ms", 0.001), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0s", 0.0), ("1.5s", 1.5)])
def test_openai_reset_durations(text: str, seconds: float) -> None:
    assert parse_reset(text) == pytest.approx(seconds)
    assert OpenAIDialect().server_limits({"x-ratelimit-reset-requests": text}).requests_reset == pytest.approx(seconds)


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is New York's (UTC-5 in November), as on a user's laptop."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("date", ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                                  "Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:37 -0000"])
def test_every_http_date_form_is_gmt_whatever_the_local_time_zone(new_york: None, date: str) -> None:
    """RFC 7231's three HTTP-date forms are all GMT; asctime's carries no zone (nor does ``-0000``)
    and was read as local time: 5 s became 18005 s in New York (handed back at once, and the key
    blocked for a minute), and east of UTC a date in the past (no floor at all)."""
    assert time.localtime(784111777).tm_gmtoff == -5 * 3600  # the zone took effect
    assert server_delay({"retry-after": date}, now=784111777.0 - 5) == 5.0


# -- end to end: how many attempts the server sees --------------------------------------------------------

@pytest.fixture
def retrying(installed: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> Callable[..., object]:
    """llmshim with retries on (``auto``), short backoffs; ``retrying(**settings)`` to change them."""
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "auto")
    monkeypatch.setenv("LLMSHIM_RETRY_MAX_DELAY", "0.02")

    def install(**settings: str) -> object:
        return installed(**settings)

    install()
    return install


@pytest.mark.parametrize("max_retries", [0, 2, 5])
def test_the_sdk_decides_the_attempts_whatever_its_max_retries(server: FakeLLMServer, retrying: Any,
                                                                max_retries: int) -> None:
    server.inject(Fault(status=500, headers={"retry-after-ms": "1"}), times=None)  # the SDK's own waits: 1 ms
    with pytest.raises(openai.InternalServerError), openai.OpenAI(
            base_url=server.openai_base_url, api_key="k", max_retries=max_retries) as client:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert len(server.received) == max_retries + 1  # never (max_retries + 1) x 3


@pytest.mark.parametrize("library", ["requests", "httpx", "aiohttp"])
def test_raw_clients_see_exactly_max_attempts_then_the_last_answer(server: FakeLLMServer, retrying: Any,
                                                                    library: str) -> None:
    retrying(retry_max_attempts="4")
    server.inject(Fault(status=502), times=None)
    url = server.openai_base_url + "/chat/completions"
    if library == "requests":
        status = requests.post(url, json=BODY, timeout=5).status_code
    elif library == "httpx":
        with httpx.Client(timeout=5) as client:
            status = client.post(url, json=BODY).status_code
    else:
        async def go() -> int:
            async with aiohttp.ClientSession() as session, session.post(url, json=BODY) as response:
                await response.read()
                return response.status
        status = asyncio.run(go())
    assert status == 502 and len(server.received) == 4


def test_a_429_on_a_streamed_call_is_retried_before_any_chunk_reaches_the_caller(server: FakeLLMServer,
                                                                                  retrying: Any) -> None:
    server.inject(Fault(status=429, headers={"retry-after-ms": "10"}))
    server.inject(Fault(status=503))
    with httpx.Client(timeout=5) as client, client.stream(
            "POST", server.openai_base_url + "/chat/completions", json={**BODY, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    assert len(server.received) == 3  # the 429, the 503, the stream


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_a_stream_cut_after_it_began_is_raised_never_retried(server: FakeLLMServer, retrying: Any,
                                                             library: str) -> None:
    server.inject(Fault(reset="after_chunks", after_chunks=2))
    url = server.openai_base_url + "/chat/completions"
    seen: list[str] = []
    with pytest.raises((requests.exceptions.ChunkedEncodingError, httpx.RemoteProtocolError,
                        httpx.ReadError)):
        if library == "requests":
            with requests.post(url, json={**BODY, "stream": True}, stream=True, timeout=5) as response:
                seen.extend(line.decode() for line in response.iter_lines() if line)
        else:
            with httpx.Client(timeout=5) as client, client.stream("POST", url, json={**BODY, "stream": True}) as r:
                seen.extend(line for line in r.iter_lines() if line)
    assert len(seen) == 2 and len(set(seen)) == 2  # what came, once each
    assert len(server.received) == 1


def test_a_post_to_a_non_llm_path_is_never_retried(server: FakeLLMServer, retrying: Any) -> None:
    server.inject(Fault(status=503), times=None)
    assert requests.post(server.url + "/v1/files", json={"purpose": "batch"}, timeout=5).status_code == 503
    server.reset()
    server.inject(Fault(reset="before_headers"), times=None)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(server.url + "/v1/files", json={"purpose": "batch"}, timeout=5)
    assert len(server.received) == 1


def test_a_retry_after_of_an_hour_goes_back_at_once_and_blocks_the_key_at_most_a_minute(
        server: FakeLLMServer, retrying: Any) -> None:
    retrying(rpm="6000", queue_timeout="0.3")
    server.inject(Fault(status=429, headers={"retry-after": "3600"}))
    started = time.monotonic()
    first = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=5)
    assert first.status_code == 429 and len(server.received) == 1  # handed back, no hour-long sleep
    second = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=5)
    assert second.status_code == 429 and second.headers["x-should-retry"] == "false"  # llmshim's queue timeout
    assert len(server.received) == 1  # the blocked key sent nothing
    assert time.monotonic() - started < 30  # bounded by the queue timeout, never the hour


@pytest.mark.parametrize("library", ["requests", "httpx", "aiohttp"])
def test_a_retry_after_sent_twice_is_read_alike_by_every_library(server: FakeLLMServer, retrying: Any,
                                                                 library: str) -> None:
    """A proxy that repeats ``retry-after: 3600``: requests and httpx join the two into ``3600, 3600``,
    which was ignored (no floor: retried after the backoff, the key not blocked), while aiohttp's
    first value handed the 429 back at once. Now the first value counts for every library."""
    server.inject(Fault(status=429, headers=(("retry-after", "3600"), ("retry-after", "3600"))), times=None)
    url = server.openai_base_url + "/chat/completions"
    if library == "requests":
        status = requests.post(url, json=BODY, timeout=5).status_code
    elif library == "httpx":
        status = httpx.post(url, json=BODY, timeout=5).status_code
    else:
        async def go() -> int:
            async with aiohttp.ClientSession() as session, session.post(url, json=BODY) as response:
                return response.status
        status = asyncio.run(go())
    assert status == 429 and len(server.received) == 1 and llmshim.stats()["retries"] == 0


# -- rate limits: a reservation above the burst ---------------------------------------------------------

def test_a_reservation_above_the_burst_gives_back_only_what_it_took(installed: Callable[..., object],
                                                                     server: FakeLLMServer) -> None:
    """A call's token reservation bigger than the bucket's burst is charged as one whole burst; its
    reconciliation gave back the whole reservation minus the usage, so a program whose calls
    reserve more than the burst (the default 1024 output tokens against a TPM below ~6k with a
    10 s burst; max_tokens=16384 against 30k TPM) was never limited at all. Here: 6 tokens a
    minute, 1 token of burst, calls using 5 tokens each: the second call must wait ~40 s, and with
    LLMSHIM_QUEUE_TIMEOUT=0 gets llmshim's 429 at once rather than going out."""
    installed(tpm="6", queue_timeout="0")
    url = server.openai_base_url + "/chat/completions"
    first = requests.post(url, json=BODY, timeout=5)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 5
    second = requests.post(url, json=BODY, timeout=5)
    assert second.status_code == 429 and second.json()["error"]["code"] == "llmshim_queue_timeout"
    assert len(server.received) == 1


@given(cost=st.floats(0, 1e9), per_minute=st.floats(1, 1e9), burst=st.floats(0, 86400))
def test_giving_back_what_was_charged_restores_the_bucket(cost: float, per_minute: float, burst: float) -> None:
    from llmshim.gcra import Gcra

    bucket = Gcra(per_minute, burst)
    bucket.take(100.0, cost)
    bucket.give_back(bucket.charged(cost))
    assert bucket.tat == pytest.approx(100.0, abs=1e-6 * max(1.0, 100.0))


def test_one_huge_request_on_an_idle_bucket_goes_at_once(installed: Callable[..., object],
                                                         server: FakeLLMServer) -> None:
    installed(tpm="60", queue_timeout="0")  # 1 token a second, 10 of burst; the call reserves a million
    response = requests.post(server.openai_base_url + "/chat/completions", json={**BODY, "max_tokens": 10**6},
                             timeout=5)
    assert response.status_code == 200 and len(server.received) == 1


# -- the scheduler under Hypothesis: a fake clock, arbitrary arrivals, costs, classes and departures -----------

class HeapClock:
    """A fake clock whose wake-ups fire in due order (time never goes back)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._count = 0

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        import heapq

        self._count += 1
        heapq.heappush(self._due, (self.now + delay, self._count, fn))

    def run_until(self, until: float) -> None:
        import heapq

        while self._due and self._due[0][0] <= until:
            due, _, fn = heapq.heappop(self._due)
            self.now = max(self.now, due)
            fn()
        self.now = max(self.now, until)

    def run_all(self) -> None:
        for _ in range(100_000):
            if not self._due:
                return
            self.run_until(self._due[0][0])
        raise AssertionError("wake-ups never stop")


ARRIVALS = st.lists(st.tuples(st.floats(0, 5), st.sampled_from(["critical", "high", "normal", "low"]),
                              st.one_of(st.just(1.0), st.floats(0, 1e6)), st.booleans()), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(arrivals=ARRIVALS, rpm=st.sampled_from([None, 1, 60, 600]), tpm=st.sampled_from([None, 100, 6000]),
       burst=st.sampled_from([0.0, 1.0, 10.0]))
def test_every_waiter_is_served_once_in_order_within_its_class_and_the_rate_holds(
        arrivals: list[tuple[float, str, float, bool]], rpm: int | None, tpm: int | None, burst: float) -> None:
    from llmshim.policies.limiter import Limiter
    from llmshim.policies.scheduler import Waiter
    from llmshim.values import Limits

    rpm = rpm if rpm or tpm else 60
    clock = HeapClock()
    limiter = Limiter(burst, clock=clock, schedule=clock.schedule)
    key = limiter.key("k", Limits(rpm, tpm))
    grants: list[tuple[float, Waiter]] = []

    @dataclasses.dataclass(eq=False)
    class Recorded(Waiter):
        def wake(self) -> None:
            assert not self.granted, "granted twice"
            grants.append((clock.now, self))
            super().wake()

    waiters: list[Waiter] = []
    left: set[int] = set()
    for gap, level, tokens, previous_leaves in arrivals:
        clock.run_until(clock.now + gap)
        waiter = Recorded(level, 1.0, tokens if tpm else 0.0, clock.now)
        waiters.append(waiter)
        limiter.enqueue(key, waiter)
        if previous_leaves and len(waiters) > 1 and limiter.withdraw(key, waiters[-2]):
            left.add(id(waiters[-2]))  # a caller that gave up while queued takes no permit
    clock.run_all()
    stayed = [w for w in waiters if id(w) not in left]
    assert all(w.granted for w in stayed) and limiter.held() == (0, 0)  # nobody starves or is forgotten
    assert len(grants) == len(stayed)
    for level in ("critical", "high", "normal", "low"):  # first come, first served within a class
        assert [w for _, w in grants if w.priority == level] == [w for w in stayed if w.priority == level]
    if rpm:  # never more than the burst plus the rate, over any stretch of time
        per_second, whole_burst = rpm / 60.0, max(burst, 60.0 / rpm) * rpm / 60.0
        times = [at for at, _ in grants]
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= whole_burst + per_second * (times[j] - start) + 1e-6


# -- the caller's own timeout ------------------------------------------------------------------------------

def _limiter() -> Any:
    from llmshim.policies.ratelimit import RateLimitPolicy
    from llmshim.runtime import STATE

    return next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))


@pytest.mark.parametrize("library", ["requests", "httpx", "aiohttp-sock_read"])
def test_a_stalled_server_costs_at_most_max_attempts_read_timeouts(server: FakeLLMServer, retrying: Any,
                                                                   library: str) -> None:
    """A read timeout is a transport error before a response: retried, each attempt held to the
    caller's own timeout, never more than LLMSHIM_RETRY_MAX_ATTEMPTS of them; the caller gets its
    library's own timeout error."""
    server.inject(Fault(delay=1.5), times=None)
    url = server.openai_base_url + "/chat/completions"
    started = time.monotonic()
    if library == "requests":
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(url, json=BODY, timeout=0.3)
    elif library == "httpx":
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=BODY, timeout=0.3)
    else:
        async def go() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=0.3)) as session:
                await session.post(url, json=BODY)
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(go())
    elapsed = time.monotonic() - started
    assert len(server.received) == 3  # the default 3 attempts, each given up after 0.3 s of silence
    assert elapsed >= 0.9  # each attempt waited out the caller's 0.3 s
    assert elapsed < 3 * (0.3 + 0.02) + 30  # generous: never the server's 1.5 s per attempt, never a hang


def test_an_aiohttp_total_timeout_covers_retries_and_the_queue(server: FakeLLMServer, retrying: Any) -> None:
    """aiohttp's ``total`` covers the whole call, llmshim's retries and rate-limit wait included: a
    stalled server is tried once, and a task queued behind a spent limit leaves the queue when the
    total runs out, taking no permit.

    The bug: the total fired during the first attempt (aiohttp turns its cancellation into
    TimeoutError and un-cancels the task), llmshim retried that TimeoutError, and the retry queued
    for the spent permit with nothing left to interrupt it: the 0.3 s call took the whole
    LLMSHIM_QUEUE_TIMEOUT and came back as llmshim's 429 instead of aiohttp's TimeoutError."""
    retrying(rpm="1", queue_timeout="20")  # one request a minute: the first call spends it
    url = server.openai_base_url + "/chat/completions"
    server.inject(Fault(delay=1.5))

    async def call(total: float) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total)) as session, \
                session.post(url, json=BODY) as response:
            return response.status

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(call(0.3))  # the stalled attempt: the total ends it
    assert len(server.received) == 1 and llmshim.stats()["retries"] == 0  # no retry after the deadline
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(call(0.3))  # queued behind the spent permit
    assert time.monotonic() - started < 30 and _limiter().held() == (0, 0)
    assert len(server.received) == 1


@pytest.mark.parametrize("server_limit", [1, 3, 5])
def test_a_servers_limit_below_one_request_per_burst_is_held(server_limit: int) -> None:
    """OpenAI's free tier says ``x-ratelimit-limit-requests: 3``. Tightening lowered the rate but
    kept the 10 s burst, shorter than one request's 20 s interval: each request was charged as a
    whole burst, so the key granted one every 10 s (6 a minute) against the server's 3."""
    from llmshim.dialects import ServerLimits
    from llmshim.policies.scheduler import Key, Waiter
    from llmshim.values import Limits

    key = Key(Limits(rpm=60), burst=10.0)
    key.learn(ServerLimits(requests_limit=server_limit), 0.0)
    granted = [at / 4 for at in range(0, 4 * 600) if key.try_take(at / 4, Waiter("normal", 1.0, 0.0, at / 4)) <= 0]
    assert len(granted) <= 1 + server_limit * 10  # 10 minutes: the limit, plus one request of burst
    assert len(granted) >= server_limit * 10  # and not slower than the server allows


def test_threads_and_asyncio_tasks_share_one_queue_in_priority_order(server: FakeLLMServer,
                                                                     installed: Callable[..., object]) -> None:
    """Low-priority threads queued first, critical asyncio tasks queued after them on the same key:
    the tasks (woken through their loop) go before the threads (woken through Events)."""
    import threading

    installed(rpm="60", ratelimit_burst="0")  # one a second, one at once
    url = server.openai_base_url + "/chat/completions"

    def body(text: str) -> dict[str, Any]:
        return {**BODY, "messages": [{"role": "user", "content": text}]}

    def queued() -> int:
        return int(_limiter().held()[1])

    def until(condition: Callable[[], bool]) -> None:
        pause = threading.Event()
        for _ in range(4000):
            if condition():
                return
            pause.wait(0.005)
        raise AssertionError("never reached")

    assert requests.post(url, json=body("first"), timeout=30).status_code == 200  # spends the permit
    lows = [threading.Thread(target=requests.post, args=(url,), kwargs={
        "json": body(f"low {i}"), "headers": {"x-llmshim-priority": "low"}, "timeout": 30}) for i in range(3)]
    for thread in lows:
        thread.start()
    until(lambda: queued() + len(server.received) - 1 >= 3)

    async def criticals() -> list[int]:
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> int:
                async with session.post(url, json=body(f"critical {i}"),
                                        headers={"x-llmshim-priority": "critical"}) as response:
                    await response.read()
                    return response.status
            tasks = [asyncio.create_task(one(i)) for i in range(3)]
            await asyncio.to_thread(until, lambda: queued() + len(server.received) - 1 >= 6)
            sent_before = len(server.received)
            statuses = await asyncio.gather(*tasks)
            return [*statuses, sent_before]

    *statuses, sent_before = asyncio.run(criticals())
    for thread in lows:
        thread.join()
    order = [r.json()["messages"][0]["content"].split()[0] for r in server.received]
    assert statuses == [200, 200, 200] and len(order) == 7
    assert order[sent_before:sent_before + 3] == ["critical"] * 3, order  # ahead of every low still queued
