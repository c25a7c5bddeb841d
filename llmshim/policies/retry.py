"""Retries: one layer, full-jitter exponential backoff, the server's delay as a floor, a budget.

``decide`` is a pure function of the attempt, what came back and the settings; ``RetryBudget`` is a
token bucket with an explicit clock; ``RetryPolicy`` acts on them. The rules:

- Retry connection errors and timeouts that happen before a response is handed over, and
  408/409/429/5xx. Never 400/401/403/404/422, never an exhausted quota (the dialect says which
  answer is one: OpenAI's 429 ``insufficient_quota``), never when the server says
  ``x-should-retry: false`` (and always when it says ``true``, within the attempts).
- Never after the response reached the caller: at llmshim's seam a reply is returned only once,
  so a reset mid-stream is raised to the caller, not retried (nothing is ever duplicated).
- One retry layer. Requests carrying ``x-stainless-retry-count`` come from the OpenAI SDK's own
  retry loop: in ``auto`` mode llmshim rate-limits each of those attempts but does not retry
  them, so an always-failing upstream sees the SDK's 3 attempts, not 3 x 3.
- A budget per origin: retries may add at most ~10% to the requests (plus a floor of 10 a minute),
  so an outage does not become a retry storm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import math
import random
import threading
import time
from collections.abc import Callable, Mapping

from ..call import Call, Reply
from ..clocks import monotonic, wall
from ..pipeline import AsyncHandler, Handler
from ..values import RetryMode

__all__ = ["Decision", "RetryBudget", "RetryPolicy", "decide", "server_delay"]

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
NEVER_STATUSES = frozenset({400, 401, 403, 404, 422})
BASE_DELAY = 0.5


@dataclasses.dataclass(frozen=True)
class Decision:
    retry: bool
    delay: float
    reason: str


def server_delay(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, or ``retry-after`` (seconds or an HTTP
    date). Never raises: an unreadable value (``nan``, garbage) is ignored as clients ignore it; an
    absurd one (``inf``, ``1e300``, a date in 2100) comes back as it is, possibly ``inf``, so that
    ``decide`` can refuse to wait for it."""
    if not headers:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        seconds = _seconds(raw_ms, 0.001)
        if seconds is not None:
            return seconds
    raw = headers.get("retry-after")
    if not raw:
        return None
    seconds = _seconds(raw, 1.0)
    if seconds is not None:
        return seconds
    try:
        parsed = email.utils.parsedate_to_datetime(raw)
        if parsed.tzinfo is None:  # asctime form or "-0000": an HTTP date is always GMT, not local time
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, parsed.timestamp() - (wall() if now is None else now))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None  # neither seconds nor a date: ignore it, as servers' clients do


def _seconds(raw: str, scale: float) -> float | None:
    """A non-negative number of seconds (``inf`` allowed) from a header's text, or None (``nan``,
    not a number, non-ASCII digits). A header sent twice reaches us joined (``5, 5`` from requests
    and httpx; aiohttp gives the first): its first value counts, whatever the library."""
    text = raw.split(",", 1)[0].strip()
    if not text.isascii():
        return None
    try:
        value = float(text) * scale
    except (ValueError, OverflowError):
        return None
    if math.isnan(value):
        return None
    return max(0.0, value)


def decide(*, attempt: int, max_attempts: int, max_delay: float, status: int | None = None,
           headers: Mapping[str, str] | None = None, body_error: str | None = None,
           transport_error: bool = False, sdk_attempt: bool = False, mode: RetryMode = "auto",
           rand: float = 0.5, time_left: float | None = None, body_delay: float | None = None) -> Decision:
    """Whether attempt number ``attempt`` (1-based) is followed by another, and after how long.

    ``rand`` in [0, 1) is the jitter draw, passed in so the function stays pure. A server that asks
    for more than ``max_delay`` gets its 429/503 handed back to the caller at once (the OpenAI SDK
    likewise ignores a retry-after above 60 s); no wait may outlast ``time_left``, the seconds the
    caller's own timeout leaves (None: unknown). ``body_delay``: the wait the error body asks for
    (the dialect's ``retry_delay``: Google's RetryInfo), used when no header names one."""
    if mode in ("off", "sdk") or (mode == "auto" and sdk_attempt):
        return Decision(False, 0.0, "the SDK retries" if sdk_attempt or mode == "sdk" else "retries off")
    if not transport_error:
        if status is None or status < 400:
            return Decision(False, 0.0, "success")
        should = (headers or {}).get("x-should-retry")
        if should == "false":
            return Decision(False, 0.0, "x-should-retry: false")
        if body_error is not None:  # the dialect's "quota exhausted" code (OpenAI: insufficient_quota)
            return Decision(False, 0.0, body_error)
        if status in NEVER_STATUSES or (status not in RETRY_STATUSES and should != "true"):
            return Decision(False, 0.0, f"status {status} is not retried")
    if attempt >= max_attempts:
        return Decision(False, 0.0, f"{max_attempts} attempts made")
    floor = server_delay(headers) if not transport_error else None
    if floor is None and not transport_error:
        floor = body_delay
    if floor is not None and floor > max_delay:
        return Decision(False, 0.0, f"the server asked to wait {floor:.6g} s, more than the {max_delay:g} s cap")
    backoff = rand * min(max_delay, BASE_DELAY * 2 ** min(attempt - 1, 64))  # full jitter
    delay = max(backoff, floor) if floor is not None else backoff
    if time_left is not None and delay >= time_left:
        return Decision(False, 0.0, f"a {delay:.3g} s wait would outlast the caller's timeout")
    return Decision(True, delay, "transport error" if transport_error else f"status {status}")


class RetryBudget:
    """Per origin: each request deposits 0.1 retry token (at most 10 banked), each retry spends one,
    and at least ``floor_per_minute`` retries are always allowed."""

    def __init__(self, ratio: float = 0.1, floor_per_minute: int = 10) -> None:
        self.ratio, self.floor = ratio, floor_per_minute
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._recent: dict[str, list[float]] = {}

    def deposit(self, origin: str) -> None:
        with self._lock:
            self._tokens[origin] = min(10.0, self._tokens.get(origin, 0.0) + self.ratio)

    def withdraw(self, origin: str, now: float) -> bool:
        with self._lock:
            recent = [t for t in self._recent.get(origin, []) if now - t < 60.0]
            self._recent[origin] = recent
            if len(recent) < self.floor:
                recent.append(now)
                return True
            if self._tokens.get(origin, 0.0) >= 1.0:
                self._tokens[origin] -= 1.0
                recent.append(now)
                return True
            return False


def _origin(call: Call) -> str:
    host, port = call.request.server
    return f"{host}:{port}"


class RetryPolicy:
    def __init__(self, *, mode: RetryMode, max_attempts: int, max_delay: float,
                 sleep: Callable[[float], None] = time.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.mode, self.max_attempts, self.max_delay = mode, max_attempts, max_delay
        self.budget = RetryBudget()
        self._sleep, self._rand = sleep, rand

    def _decide(self, call: Call, attempt: int, reply: Reply | None, error: BaseException | None) -> Decision:
        transport = error is not None and isinstance(error, call.transport_errors)
        if error is not None and not transport:
            return Decision(False, 0.0, "not a transport error")
        body_error, body_delay = _body_says(call, reply)
        decision = decide(
            attempt=attempt, max_attempts=self.max_attempts, max_delay=self.max_delay,
            status=reply.status if reply else None, headers=reply.headers if reply else None,
            body_error=body_error, transport_error=transport,
            sdk_attempt=call.request.header("x-stainless-retry-count") is not None, mode=self.mode,
            rand=self._rand(), time_left=call.timeout, body_delay=body_delay)
        if decision.retry and call.expired is not None and call.expired():
            return Decision(False, 0.0, "the caller's timeout ran out")
        if decision.retry and not self.budget.withdraw(_origin(call), monotonic()):
            return Decision(False, 0.0, "retry budget exhausted")
        return decision

    @staticmethod
    def _count(call: Call, retries: int) -> None:
        call.facts.retries = retries

    def handle(self, call: Call, next: Handler) -> Reply:
        self.budget.deposit(_origin(call))
        attempt = 1
        while True:
            try:
                reply = next(call)
            except Exception as exc:
                decision = self._decide(call, attempt, None, exc)
                if not decision.retry:
                    raise
            else:
                decision = self._decide(call, attempt, reply, None)
                if not decision.retry:
                    return reply
                _drop(reply)
            self._count(call, attempt)
            self._sleep(decision.delay)
            attempt += 1

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        self.budget.deposit(_origin(call))
        attempt = 1
        while True:
            try:
                reply = await anext(call)
            except Exception as exc:
                decision = self._decide(call, attempt, None, exc)
                if not decision.retry:
                    raise
            else:
                decision = self._decide(call, attempt, reply, None)
                if not decision.retry:
                    return reply
                await _adrop(reply)
            self._count(call, attempt)
            await asyncio.sleep(decision.delay)
            attempt += 1


def _drop(reply: Reply) -> None:
    """A retried attempt's reply never reaches the caller: close it and end its tap, delivering
    what the tap held, so the policies below (a concurrency slot, a token reservation) hear its
    end now rather than never."""
    reply.tap.release()
    try:
        reply.discard()
    finally:
        reply.tap.abort(None)


async def _adrop(reply: Reply) -> None:
    reply.tap.release()
    try:
        await reply.adiscard()
    finally:
        reply.tap.abort(None)


def _body_says(call: Call, reply: Reply | None) -> tuple[str | None, float | None]:
    """What the error body says, read by the dialect: its code for an exhausted quota (OpenAI: a
    429 ``insufficient_quota``; not retried), and the wait it asks for (Google's RetryInfo)."""
    if reply is None or reply.peek is None or reply.status not in call.dialect.quota_statuses:
        return None, None  # the body is read only where the dialect's quota answer can be
    try:
        body = reply.peek()
        code: str | None = call.dialect.quota_exhausted(reply.status, body)
        delay: float | None = call.dialect.retry_delay(reply.status, body)
    except Exception:
        return None, None
    return code, delay
