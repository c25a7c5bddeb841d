"""Server-requested delays never hang a caller, and key blocks are capped in every store (issue 12).

A ``retry-after`` of 99999 s, ``inf``, ``1e300`` ms or a date in 2100 must neither raise nor sleep:
above ``LLMSHIM_RETRY_MAX_DELAY`` the 429/503 goes back to the caller at once. A 429 blocks its
rate-limit key for at most ``MAX_BLOCK`` seconds, in memory, in the SQLite store (which survives
restarts) and in Redis.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

import llmshim
from llmshim.policies.limiter import Limiter
from llmshim.policies.retry import decide, server_delay
from llmshim.store.limits_sqlite import MAX_BLOCK, SQLiteLimitStore
from llmshim.testing import FakeLLMServer, Fault
from llmshim.values import Limits

BODY = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "stream": False}
ABSURD = [
    {"retry-after": "99999"},
    {"retry-after": "inf"},
    {"retry-after": "Infinity"},
    {"retry-after": "1e400"},
    {"retry-after-ms": "1e300"},
    {"retry-after": "Fri, 31 Dec 2100 23:59:59 GMT"},
]


@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms"]), st.text(), min_size=1))
def test_server_delay_never_raises_and_is_never_nan(headers: dict[str, str]) -> None:
    delay = server_delay(headers)
    assert delay is None or (delay >= 0 and not math.isnan(delay))


@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms"]), st.text(), min_size=1),
       st.floats(min_value=0.01, max_value=3600), st.integers(min_value=1, max_value=200))
def test_no_decided_wait_exceeds_the_cap(headers: dict[str, str], cap: float, attempt: int) -> None:
    decision = decide(attempt=attempt, max_attempts=1000, max_delay=cap, status=429, headers=headers, rand=0.999)
    assert not decision.retry or 0 <= decision.delay <= cap


@pytest.mark.parametrize("headers", ABSURD, ids=lambda h: next(iter(h.values())))
def test_an_absurd_delay_is_handed_back_not_slept(headers: dict[str, str]) -> None:
    decision = decide(attempt=1, max_attempts=3, max_delay=20.0, status=429, headers=headers)
    assert not decision.retry and decision.delay == 0.0


def test_non_ascii_digits_are_not_a_delay() -> None:
    assert server_delay({"retry-after": "١٢"}) is None  # Arabic-Indic digits: float() would accept them
    assert server_delay({"retry-after": "nan"}) is None
    # A date past datetime's range is garbage, ignored like any unreadable value: an ordinary backoff.
    assert server_delay({"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}) is None


def test_no_wait_outlasts_the_callers_timeout() -> None:
    assert decide(attempt=1, max_attempts=3, max_delay=20.0, status=429, headers={"retry-after": "5"},
                  time_left=2.0).retry is False
    assert decide(attempt=1, max_attempts=3, max_delay=20.0, status=429, headers={"retry-after": "1"},
                  time_left=2.0).retry is True


@pytest.mark.parametrize("headers", ABSURD, ids=lambda h: next(iter(h.values())))
def test_a_real_call_gets_the_429_at_once(server: FakeLLMServer, headers: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "llmshim")
    server.inject(Fault(status=429, headers=headers))
    llmshim.install()
    try:
        response = requests.post(server.openai_base_url + "/chat/completions", json=BODY, timeout=5)
    finally:
        llmshim.uninstall()
    assert response.status_code == 429
    assert len(server.received) == 1  # handed back, not retried after a wait


@pytest.mark.parametrize("pause", [99999.0, math.inf, 1e300])
def test_the_in_process_block_is_capped(pause: float) -> None:
    now = [1000.0]
    limiter = Limiter(burst=1.0, clock=lambda: now[0], schedule=lambda delay, fn: None)
    key = limiter.key("k", Limits(rpm=60))
    limiter.block(key, now[0] + pause)
    assert key.blocked_until == now[0] + MAX_BLOCK


def test_the_sqlite_block_is_capped_and_one_stored_further_ahead_is_over(tmp_path: Path) -> None:
    store = SQLiteLimitStore(str(tmp_path / "limits.sqlite3"))
    store.block_for("k", 99999.0)
    wait = store.try_take("k", time.time(), [("rpm", 1.0, 1.0, 1.0)], "normal")
    assert 0 < wait <= MAX_BLOCK
    store.close()
    # A row further ahead than any write makes (an earlier llmshim without the cap, a day-long
    # block; or the clock stepped back since) is over: read capped, it made every take wait
    # MAX_BLOCK again for a day (tests/test_clock_steps.py). A new block replaces it.
    with sqlite3.connect(tmp_path / "limits.sqlite3", isolation_level=None) as conn:
        conn.execute("UPDATE buckets SET tat = ? WHERE name = 'k' AND dim = 'block'", (time.time() + 86400,))
    conn.close()
    reopened = SQLiteLimitStore(str(tmp_path / "limits.sqlite3"))
    try:
        assert reopened.try_take("k", time.time(), [("rpm", 1.0, 1.0, 1.0)], "normal") == 0
        reopened.block_for("k", 5.0)
        assert 0 < reopened.try_take("k", time.time(), [("rpm", 1.0, 1.0, 1.0)], "normal") <= 5.0
    finally:
        reopened.close()


@pytest.mark.parametrize("client", ["requests", "httpx", "openai"])
def test_no_retry_wait_outlasts_the_callers_timeout(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch,
                                                    client: str) -> None:
    import httpx
    import openai

    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "llmshim")
    server.inject(Fault(status=503, headers={"retry-after": "5"}))  # under the 20 s cap, over the 2 s timeout
    url = server.openai_base_url + "/chat/completions"
    llmshim.install()
    try:
        if client == "requests":
            status = requests.post(url, json=BODY, timeout=2).status_code
        elif client == "httpx":
            status = httpx.post(url, json=BODY, timeout=2).status_code
        else:
            with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0, timeout=2) as sdk, \
                    pytest.raises(openai.InternalServerError):  # closed: its pooled socket is not left to the GC
                sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}])
            status = 503
    finally:
        llmshim.uninstall()
    assert status == 503 and len(server.received) == 1  # handed back at once, not slept on

    # With a timeout longer than the delay, the same answer is retried after the server's delay.
    server.reset()
    server.inject(Fault(status=503, headers={"retry-after-ms": "100"}))
    llmshim.install()
    try:
        assert requests.post(url, json=BODY, timeout=2).status_code == 200
    finally:
        llmshim.uninstall()
    assert len(server.received) == 2
