"""Priority rate limiting: requests and tokens per minute, four classes, a 429 blocks the key.

Pure parts, tested without sockets or sleeps:

- ``Gcra``: the generic cell rate algorithm, one float of state per dimension: a "theoretical
  arrival time". A cost fits when it would not push that time more than ``burst`` seconds ahead.
- ``Limiter.pump(now)``: hands permits out in priority order — the oldest waiter of the highest
  waiting class first, first-come-first-served within a class whatever its size; a lower class gets
  every Nth grant while it waits (its guaranteed share), so it never starves completely. It
  returns when the next permit is due, and the caller arranges one wake-up then: no polling.

Acting parts: sync threads wait on an Event, asyncio tasks on a future resolved thread-safely;
one shared ``threading.Timer`` re-runs ``pump`` when the next permit is due. A waiter that gives up
(queue timeout, task cancelled) is removed from the queue at once. Keys are (origin, credential
scope, model); token costs are estimated (characters / 4 plus the output reservation) and
reconciled from the real usage when the answer ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..call import Call, OnEnd, Reply
from ..facts import store_failed
from ..pipeline import AsyncHandler, Handler, track
from ..store.cache_keys import credential_of
from ..store.limits_sqlite import MAX_BLOCK

__all__ = ["PRIORITIES", "Gcra", "Limiter", "Limits", "RateLimitPolicy", "estimate_tokens", "parse_limits",
           "parse_reset", "priority", "resolve_priority"]

PRIORITIES = ("critical", "high", "normal", "low")
_ALIASES = {"urgent": "critical", "medium": "normal", "0": "critical", "1": "high", "2": "normal", "3": "low"}
#: A waiting class gets one grant in this many while higher classes are being served.
SHARE_EVERY = {"high": 4, "normal": 10, "low": 20}
HEADER = "x-llmshim-priority"

F = TypeVar("F", bound=Callable[..., Any])


def resolve_priority(value: str) -> str:
    name = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if name not in PRIORITIES:
        raise ValueError(f"priority {value!r}: expected one of {', '.join(PRIORITIES)} (or urgent, medium, 0-3)")
    return name


_priority: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmshim_priority", default=None)


class priority(contextlib.ContextDecorator):  # used like a function: `with llmshim.priority("high"):`
    """Priority for LLM calls made inside the block or decorated function (contextvar: follows
    awaits, and threads that copy the context)."""

    def __init__(self, name: str) -> None:
        self.name = resolve_priority(name)
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> priority:
        self._tokens.append(_priority.set(self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        _priority.reset(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                with priority(self.name):
                    return await fn(*args, **kwargs)
            return wrapper  # type: ignore[return-value]
        return super().__call__(fn)


@dataclasses.dataclass(frozen=True)
class Limits:
    rpm: float | None = None
    tpm: float | None = None


#: ASCII digits only (``\d`` would take other scripts' digits), no exponent: nan, inf and 1e400 cannot match.
_LIMIT_PART = re.compile(r"^\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*(k?)\s*(rpm|tpm)\s*$", re.IGNORECASE | re.ASCII)
MAX_RATE = 1e12  # per minute: far above any real limit, and finite


def parse_limits(spec: str) -> dict[str, Limits]:
    """``"gpt-4o=500rpm,30000tpm;llama3=60rpm"`` → {model: Limits}. Raises ValueError on bad input;
    every rate is finite and in (0, MAX_RATE] (leave a dimension out for no limit on it)."""
    form = "model=NUMBERrpm,NUMBERtpm;... such as gpt-4o=500rpm,30000tpm (rates > 0 and <= 10^12 per minute)"
    out: dict[str, Limits] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        model, sep, rest = item.partition("=")
        if not sep or not model.strip() or "\0" in model:
            raise ValueError(form)
        rpm = tpm = None
        for part in rest.split(","):
            match = _LIMIT_PART.match(part)
            if not match:
                raise ValueError(form)
            value = float(match.group(1)) * (1000 if match.group(2) else 1)
            if not 0 < value <= MAX_RATE:
                raise ValueError(form)
            if match.group(3).lower() == "rpm":
                rpm = value
            else:
                tpm = value
        out[model.strip()] = Limits(rpm, tpm)
    return out


_RESET = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` durations: ``6m0s``, ``1.5s``, ``12ms`` → seconds."""
    if not value:
        return None
    parts = _RESET.findall(value.strip())
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def estimate_tokens(body: Mapping[str, Any], default_output: int) -> tuple[int, int]:
    """(input estimate, output reservation) for a request body: characters / 4 of its text, and
    its max_tokens-style field (or the configured default)."""
    text = json.dumps([body.get(k) for k in ("messages", "prompt", "input", "content", "system", "instructions")
                       if body.get(k) is not None], ensure_ascii=False)
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    output = None
    for value in (body.get("max_completion_tokens"), body.get("max_tokens"), body.get("max_output_tokens"),
                  body.get("n_predict"), (options or {}).get("num_predict")):
        if isinstance(value, int) and value > 0:
            output = value
            break
    return max(1, len(text) // 4), output if output is not None else default_output


class Gcra:
    """One dimension of one key: ``rate`` per second, ``burst`` seconds of tolerance."""

    __slots__ = ("burst", "rate", "tat")

    def __init__(self, per_minute: float, burst_seconds: float) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(burst_seconds, 1.0 / self.rate)  # at least one unit always fits an idle bucket
        self.tat = 0.0

    def wait(self, now: float, cost: float) -> float:
        """Seconds until ``cost`` fits (0: now). Pure: does not take it."""
        if cost * 1.0 / self.rate > self.burst:  # bigger than the whole burst: let it through alone
            cost = self.burst * self.rate
        return max(0.0, max(self.tat, now) + cost / self.rate - self.burst - now)

    def take(self, now: float, cost: float) -> None:
        self.tat = max(self.tat, now) + min(cost, self.burst * self.rate) / self.rate

    def give_back(self, cost: float) -> None:
        self.tat -= cost / self.rate

    def at_most(self, now: float, available: float) -> None:
        """Offer at most ``available`` units now (then the usual pace): never loosens."""
        self.tat = max(self.tat, now + self.burst - max(0.0, available) / self.rate)


def _header_number(raw: str | None) -> float | None:
    """A finite, non-negative number from a rate-limit header, or None."""
    if not raw or not raw.strip().isascii():
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 <= value < float("inf") else None


@dataclasses.dataclass(eq=False)
class Waiter:
    priority: str
    requests: float
    tokens: float
    enqueued: float
    granted: bool = False
    holds_slot: bool = False
    event: threading.Event | None = None
    future: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def wake(self) -> None:
        self.granted = True
        if self.event is not None:
            self.event.set()
        if self.future is not None:
            loop, future = self.future
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Key:
    def __init__(self, limits: Limits, burst: float, name: str = "", shared: Any = None,
                 concurrency: int | None = None) -> None:
        self.name, self.shared = name, shared
        # Local servers: at most ``capacity`` calls in flight; halved on 503, regrown by one per
        # ``capacity`` successes (AIMD), never above the configured maximum.
        self.max_concurrency = concurrency
        self.capacity = float(concurrency) if concurrency else None
        self.in_flight = 0
        self.requests = Gcra(limits.rpm, burst) if limits.rpm else None
        self.tokens = Gcra(limits.tpm, burst) if limits.tpm else None
        self.queues: dict[str, collections.deque[Waiter]] = {p: collections.deque() for p in PRIORITIES}
        self.passed_over = dict.fromkeys(PRIORITIES, 0)
        self.blocked_until = 0.0

    def wait(self, now: float, waiter: Waiter) -> float:
        waits = [self.blocked_until - now]
        if self.requests is not None:
            waits.append(self.requests.wait(now, waiter.requests))
        if self.tokens is not None:
            waits.append(self.tokens.wait(now, waiter.tokens))
        return max(0.0, *waits)

    def try_take(self, now: float, waiter: Waiter) -> float:
        """Take the waiter's permits and answer 0, or take nothing and answer the seconds to wait
        (``inf``: until a call in flight ends). With a shared store, the machine-wide budget
        decides; if the store fails, this process's own buckets do (fail open: a warning, the
        ``store_errors`` stat, and the call goes on)."""
        if self.capacity is not None and self.in_flight >= max(1, int(self.capacity)):
            return float("inf")
        wait = self._take_rate(now, waiter)
        if wait <= 0 and self.capacity is not None:
            self.in_flight += 1
            waiter.holds_slot = True
        return wait

    def release(self, outcome_status: int | None) -> None:
        """A call holding a concurrency slot ended; adapt the capacity to what the server said."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.capacity is None or self.max_concurrency is None:
            return
        if outcome_status == 503:
            self.capacity = max(1.0, self.capacity / 2)
        elif outcome_status is not None and outcome_status < 500:
            self.capacity = min(float(self.max_concurrency), self.capacity + 1.0 / self.capacity)

    def learn(self, headers: Mapping[str, str], now: float) -> None:
        """Never offer more than the server says it has: tighten to its limits
        (``x-ratelimit-limit-requests/-tokens``, per minute) and to what remains of them
        (``x-ratelimit-remaining-*``). OpenAI's ``reset`` is the time until the limit is whole
        again, not until the next request fits, so it is not a block: with ``remaining: 0`` the
        next request fits one refill interval later, as the bucket's own pacing gives."""
        for dim, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            limit = _header_number(headers.get(f"x-ratelimit-limit-{dim}"))
            if limit is not None and 0 < limit / 60.0 < bucket.rate:
                bucket.tat = max(bucket.tat, 0.0)
                bucket.rate = limit / 60.0
            remaining = _header_number(headers.get(f"x-ratelimit-remaining-{dim}"))
            if remaining is not None:
                bucket.at_most(now, remaining)

    def _take_rate(self, now: float, waiter: Waiter) -> float:
        if self.shared is not None:
            dims = []
            if self.requests is not None:
                dims.append(("r", self.requests.rate, self.requests.burst, waiter.requests))
            if self.tokens is not None and waiter.tokens:
                dims.append(("t", self.tokens.rate, self.tokens.burst, waiter.tokens))
            try:
                shared_wait: float = self.shared.try_take(self.name, time.time(), dims, waiter.priority)
                return max(shared_wait, self.blocked_until - now)
            except Exception as exc:  # sqlite3.Error, OSError, RedisError: fall back to the local buckets
                _store_failed(exc)
                share = max(1, int(getattr(self.shared, "instances", 1)))
                if share > 1:  # this process's share: the limit divided by the live instances last seen
                    waiter = dataclasses.replace(waiter, requests=waiter.requests * share,
                                                 tokens=waiter.tokens * share)
        wait = self.wait(now, waiter)
        if wait <= 0:
            if self.requests is not None:
                self.requests.take(now, waiter.requests)
            if self.tokens is not None:
                self.tokens.take(now, waiter.tokens)
        return wait

    def next_waiter(self) -> Waiter | None:
        """Highest waiting class, unless a lower waiting class is owed its share."""
        waiting = [p for p in PRIORITIES if self.queues[p]]
        if not waiting:
            return None
        top = waiting[0]
        for lower in reversed(waiting[1:]):
            if self.passed_over[lower] >= SHARE_EVERY.get(lower, 10) - 1:
                return self.queues[lower][0]
        return self.queues[top][0]

    def granted(self, waiter: Waiter) -> None:
        self.queues[waiter.priority].popleft()
        self.passed_over[waiter.priority] = 0
        for name, queue in self.queues.items():
            if queue and name != waiter.priority:
                self.passed_over[name] += 1


_last_warning = [0.0]


def _store_failed(exc: BaseException) -> None:
    import logging

    store_failed("limits", "take")
    now = time.monotonic()
    if now - _last_warning[0] >= 60:
        _last_warning[0] = now
        logging.getLogger("llmshim").warning(
            "llmshim: the shared rate-limit store failed (%s: %s); this process limits on its own until it "
            "recovers (warned once a minute)", type(exc).__name__, exc)


_LIMITERS: weakref.WeakSet[Limiter] = weakref.WeakSet()


def _reset_limiters_in_child() -> None:
    for limiter in list(_LIMITERS):
        limiter._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_limiters_in_child)


class Limiter:
    """All keys of one process. ``clock`` and ``schedule`` are injectable for tests."""

    def __init__(self, burst: float, clock: Callable[[], float] = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], None] | None = None, shared: Any = None) -> None:
        self.burst = burst
        self.shared = shared
        self.clock = clock
        self._schedule = schedule or self._timer
        self._lock = threading.RLock()
        self._keys: dict[tuple[str, Limits], _Key] = {}
        self._timer_at: float | None = None
        self._timer_obj: threading.Timer | None = None
        _LIMITERS.add(self)

    def _after_fork_in_child(self) -> None:
        """A fork() child has none of the parent's waiting threads, timer or calls in flight, and
        the lock may have been held by a parent thread at the fork: start that state afresh (the
        rate budgets, a copy of the parent's, are kept)."""
        self._lock = threading.RLock()
        self._timer_at, self._timer_obj = None, None
        for key in self._keys.values():
            key.in_flight = 0
            for queue in key.queues.values():
                queue.clear()

    def key(self, name: str, limits: Limits, concurrency: int | None = None) -> _Key:
        with self._lock:
            found = self._keys.get((name, limits))
            if found is None:
                found = self._keys[(name, limits)] = _Key(limits, self.burst, name, self.shared, concurrency)
            return found

    def enqueue(self, key: _Key, waiter: Waiter) -> None:
        with self._lock:
            key.queues[waiter.priority].append(waiter)
        self.pump()

    def release(self, key: _Key, status: int | None) -> None:
        with self._lock:
            key.release(status)
        self.pump()

    def withdraw(self, key: _Key, waiter: Waiter) -> bool:
        """Remove a waiter that gives up; False if it was granted meanwhile (it then owns a permit)."""
        with self._lock:
            if waiter.granted:
                return False
            with contextlib.suppress(ValueError):
                key.queues[waiter.priority].remove(waiter)
            return True

    def block(self, key: _Key, until: float, cap: float = MAX_BLOCK) -> None:
        """Pause the key for every caller until ``until``, at most ``cap`` seconds from now (a
        server's delay: ``MAX_BLOCK``; llama.cpp's loading wait: the queue timeout)."""
        until = min(until, self.clock() + cap)
        with self._lock:
            key.blocked_until = max(key.blocked_until, until)
            if key.shared is not None:
                try:
                    key.shared.block_for(key.name, until - self.clock())
                except Exception as exc:
                    _store_failed(exc)
        self.pump()

    def held(self) -> tuple[int, int]:
        """(concurrency slots in flight, callers waiting) over every key: both 0 in an idle process."""
        with self._lock:
            return (sum(key.in_flight for key in self._keys.values()),
                    sum(len(queue) for key in self._keys.values() for queue in key.queues.values()))

    def pump(self) -> None:
        """Grant every permit that is due now; arrange one wake-up for the next one."""
        with self._lock:
            now = self.clock()
            soonest: float | None = None
            for key in self._keys.values():
                while (waiter := key.next_waiter()) is not None:
                    wait = key.try_take(now, waiter)
                    if wait > 0:
                        if wait != float("inf"):  # inf: woken by a release, not by time
                            soonest = wait if soonest is None else min(soonest, wait)
                        break
                    key.granted(waiter)
                    waiter.wake()
            if soonest is not None:
                due = now + soonest
                if self._timer_at is None or due < self._timer_at - 1e-4:
                    self._timer_at = due
                    self._schedule(soonest, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer_at = None
        self.pump()

    def _timer(self, delay: float, fn: Callable[[], None]) -> None:
        if self._timer_obj is not None:
            self._timer_obj.cancel()
        timer = threading.Timer(delay, fn)
        timer.daemon = True
        timer.start()
        self._timer_obj = timer


class RateLimitPolicy:
    """Takes a permit for every wire attempt (it sits below the retry layer), by priority."""

    def __init__(self, *, rpm: float | None, tpm: float | None, per_model: Mapping[str, Limits], burst: float,
                 default_priority: str, queue_timeout: float, default_output_tokens: int,
                 shared: Any = None,
                 max_concurrency: int | None = None, local_hosts: frozenset[str] = frozenset()) -> None:
        self.max_concurrency = max_concurrency
        self.local_hosts = local_hosts
        self.default = Limits(rpm, tpm)
        self.per_model = dict(per_model)
        self.default_priority = default_priority
        self.queue_timeout = queue_timeout
        self.default_output_tokens = default_output_tokens
        self.limiter = Limiter(burst, shared=shared)

    def close(self) -> None:
        """When the pipeline retires and its last call has ended: release the shared store."""
        close = getattr(self.limiter.shared, "close", None)
        if close is not None:
            close()

    def _local(self, host: str) -> bool:
        return host in self.local_hosts or host in ("localhost", "::1") or host.startswith("127.")

    def _plan(self, call: Call) -> tuple[_Key, Waiter] | None:
        limits = self.per_model.get(call.info.model or "", self.default)
        host, port = call.request.server
        concurrency = self.max_concurrency if self.max_concurrency and self._local(host) else None
        if limits.rpm is None and limits.tpm is None and concurrency is None:
            return None
        credential = credential_of(call.request.headers)
        scope = hashlib.sha256(credential.encode()).hexdigest()[:12] if credential else "-"
        name = f"{host}:{port}|{scope}|{call.info.model or '-'}"
        header = call.controls.get(HEADER)
        try:
            level = resolve_priority(header) if header else (_priority.get() or self.default_priority)
        except ValueError:
            level = self.default_priority
        tokens_in, tokens_out = estimate_tokens(call.info.body, self.default_output_tokens)
        call.facts.priority = level
        waiter = Waiter(level, 1.0, float(tokens_in + tokens_out) if limits.tpm else 0.0, self.limiter.clock())
        return self.limiter.key(name, limits, concurrency), waiter

    def _waited(self, call: Call, waiter: Waiter) -> None:
        waited = max(0.0, self.limiter.clock() - waiter.enqueued)
        call.facts.ratelimit_wait_s = (call.facts.ratelimit_wait_s or 0.0) + waited

    def _timed_out(self, call: Call) -> Reply:
        body = json.dumps({"error": {
            "message": f"llmshim rate limit: no permit within {self.queue_timeout:g}s for {call.request.method} "
                       f"{call.request.public_url} (model {call.info.model or '-'}); raise LLMSHIM_QUEUE_TIMEOUT "
                       "or the limits", "type": "llmshim_queue_timeout", "code": "llmshim_queue_timeout"}}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("retry-after", "1"), ("x-should-retry", "false")]
        if call.replay is None:
            raise TimeoutError(json.loads(body)["error"]["message"])
        return track(call, call.replay(429, headers, body))

    def _learn(self, key: _Key, reply: Reply) -> None:
        """The server's rate-limit headers tighten the key's buckets; a 429 blocks the key for every
        caller until its retry-after (at most MAX_BLOCK)."""
        from .retry import server_delay

        headers = reply.headers
        with self.limiter._lock:
            key.learn(headers, self.limiter.clock())
        if reply.status == 503 and self._loading(reply):
            self._await_health(key, reply)
            return
        pause = server_delay(headers) if reply.status == 429 else None
        if pause is not None and pause > 0:  # capped at MAX_BLOCK by block()
            self.limiter.block(key, self.limiter.clock() + min(pause, MAX_BLOCK))

    @staticmethod
    def _loading(reply: Reply) -> bool:
        """llama.cpp answers 503 "Loading model" while it loads; its body says so."""
        if reply.peek is None:
            return False
        try:
            return b"Loading model" in reply.peek()
        except Exception:
            return False

    def _await_health(self, key: _Key, reply: Reply) -> None:
        """Block the key until the server's ``/health`` answers 200 (polled: llama.cpp has no push),
        at most the queue timeout. One watcher per key."""
        if getattr(key, "watching", False):
            return
        key.watching = True  # type: ignore[attr-defined]
        host, port = key.name.split("|", 1)[0].rsplit(":", 1)
        url = f"http://{host}:{port}/health"
        limiter, deadline = self.limiter, self.queue_timeout
        limiter.block(key, limiter.clock() + deadline, cap=deadline)

        def watch() -> None:
            import urllib.request

            end = time.monotonic() + deadline
            try:
                while time.monotonic() < end:
                    try:
                        with urllib.request.urlopen(url, timeout=2) as response:
                            if response.status == 200:
                                break
                    except Exception:
                        pass
                    threading.Event().wait(0.25)
            finally:
                with limiter._lock:
                    key.blocked_until = 0.0
                    key.watching = False  # type: ignore[attr-defined]
                limiter.pump()

        threading.Thread(target=watch, name="llmshim-health", daemon=True).start()

    def _abandon(self, key: _Key, waiter: Waiter) -> None:
        """The caller gave up while queued: leave the queue, or, if the permit was granted in the
        meantime, release the concurrency slot it came with."""
        if not self.limiter.withdraw(key, waiter) and waiter.holds_slot:
            self.limiter.release(key, None)

    def _hold(self, key: _Key, waiter: Waiter, reply: Reply) -> None:
        """A concurrency slot is held until the body ends, however it ends."""
        if not waiter.holds_slot:
            return
        limiter, status = self.limiter, reply.status
        reply.tap.subscribe(OnEnd(lambda: limiter.release(key, status)))

    def _reconcile(self, key: _Key, waiter: Waiter, reply: Reply, call: Call) -> None:
        if key.tokens is None:
            return
        limiter = self.limiter

        def reconcile() -> None:
            usage = call.response.usage if call.response else None
            if usage is None or usage.input_tokens is None or key.tokens is None:
                return
            unused = waiter.tokens - (usage.input_tokens + (usage.output_tokens or 0))
            with limiter._lock:
                key.tokens.give_back(unused)
                if key.shared is not None:
                    with contextlib.suppress(Exception):
                        key.shared.give_back(key.name, "t", unused / key.tokens.rate)
            limiter.pump()

        reply.tap.subscribe(OnEnd(reconcile))

    def handle(self, call: Call, next: Handler) -> Reply:
        planned = self._plan(call)
        if planned is None:
            return next(call)
        key, waiter = planned
        waiter.event = threading.Event()
        self.limiter.enqueue(key, waiter)
        try:
            granted = waiter.event.wait(self.queue_timeout)
        except BaseException:  # Ctrl-C while queued: leave the queue, or give back what was granted
            self._abandon(key, waiter)
            raise
        if not granted and self.limiter.withdraw(key, waiter):
            return self._timed_out(call)
        self._waited(call, waiter)
        try:
            reply = next(call)
        except BaseException:
            if waiter.holds_slot:
                self.limiter.release(key, None)
            raise
        self._learn(key, reply)
        self._hold(key, waiter, reply)
        self._reconcile(key, waiter, reply, call)
        return reply

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        planned = self._plan(call)
        if planned is None:
            return await anext(call)
        key, waiter = planned
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter.future = (loop, future)
        self.limiter.enqueue(key, waiter)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.queue_timeout)
        except asyncio.TimeoutError:
            if self.limiter.withdraw(key, waiter):
                return self._timed_out(call)
        except BaseException:  # cancelled while waiting (or right after the grant): nothing stays held
            self._abandon(key, waiter)
            raise
        self._waited(call, waiter)
        try:
            reply = await anext(call)
        except BaseException:
            if waiter.holds_slot:
                self.limiter.release(key, None)
            raise
        self._learn(key, reply)
        self._hold(key, waiter, reply)
        self._reconcile(key, waiter, reply, call)
        return reply

