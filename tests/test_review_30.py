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
