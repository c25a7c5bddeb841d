"""The response cache: a hit replays stored bytes through the library's own response type; a miss
tees the live body and stores it when, and only when, the call completed normally.

Decisions are pure functions over plain values (``plan`` for a request, ``storable`` for an
ended call); ``CachePolicy`` only acts on them. Flow of ``handle``:

1. ``plan``: mode (setting, ``cache_control()``, or an ``x-llmshim-cache`` request header that the
   adapter already stripped), stateful or non-deterministic requests → look up? store?
2. look up: a hit builds the reply through ``call.replay`` (the adapter's builder of its own
   response type) with ``x-llmshim-cache: hit`` and ``age`` headers; the upstream is not called.
   In ``replay`` mode a miss answers a synthetic 504 naming the request (``x-should-retry: false``,
   so SDKs raise it at once in their usual way).
3. miss: identical concurrent requests in this process wait for the first one (coalescing),
   then look up again; the first sends upstream, and a recorder on the body tap stores the
   decoded bytes on normal completion (2xx, done marker, no error event, read to the end).

Fail open: any store error is a miss (or a skipped write), a warning (at most one a minute) and
``llmshim.cache.errors``; never an exception in the caller's call, never a changed response.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import redact
from ..call import Call, Reply
from ..pipeline import AsyncHandler, Handler, track
from ..store import keys
from ..store.background import Writes
from ..store.sqlite import Entry
from .coalescing import Flight, Flights
from .stats import STATS

__all__ = ["MODES", "CacheControl", "CachePolicy", "Plan", "cache_control", "plan", "storable"]

log = logging.getLogger("llmshim")

MODES = ("off", "on", "readonly", "refresh", "replay")
HEADER = "x-llmshim-cache"
#: Response headers never stored: hop-by-hop, the body's encoding (we store it decoded), cookies.
DROPPED_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection", "keep-alive",
                             "set-cookie", "date", HEADER, "age"})
CLOCK: Callable[[], float] = time.time  # wall clock for expiry; tests replace it


@dataclasses.dataclass(frozen=True)
class CacheControl:
    mode: str | None = None
    ttl: float | None = None


_control: contextvars.ContextVar[CacheControl | None] = contextvars.ContextVar("llmshim_cache_control", default=None)


@contextlib.contextmanager
def cache_control(mode: str | None = None, ttl: float | None = None) -> Iterator[None]:
    """Per-call cache behaviour for calls made inside the block (also across await and threads
    that copy the context): ``mode`` one of off/on/readonly/refresh/replay, ``ttl`` seconds."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"cache mode {mode!r}: expected one of {', '.join(MODES)}")
    if ttl is not None and ttl <= 0:
        raise ValueError(f"cache ttl {ttl!r}: expected a positive number of seconds")
    token = _control.set(CacheControl(mode, ttl))
    try:
        yield
    finally:
        _control.reset(token)


@dataclasses.dataclass(frozen=True)
class Plan:
    lookup: bool
    store: bool
    only_cached: bool
    ttl: float | None
    reason: str


def _header_control(value: str | None) -> tuple[str | None, float | None]:
    """``x-llmshim-cache: no-store | refresh | only-if-cached | ttl=N`` → (mode, ttl)."""
    if not value:
        return None, None
    mode, ttl = None, None
    for part in value.split(","):
        part = part.strip().lower()
        if part == "no-store":
            mode = "readonly"
        elif part == "refresh":
            mode = "refresh"
        elif part == "only-if-cached":
            mode = "replay"
        elif part.startswith("ttl="):
            with contextlib.suppress(ValueError):
                ttl = float(part[4:]) if float(part[4:]) > 0 else None
    return mode, ttl


def _nondeterministic(call: Call) -> bool:
    """Sampling without a seed at a temperature above 0, as the dialect read them from the request.
    Every provider's default temperature is above 0, so an absent one counts as > 0."""
    info = call.info
    if info.operation == "embeddings":
        return False
    return info.seed is None and (info.temperature is None or info.temperature > 0)


def plan(call: Call, mode: str, ttl: float | None, nondeterministic: str) -> Plan:
    """What to do with this request. Pure: reads the call, the settings and the call's controls."""
    control = _control.get()
    header_mode, header_ttl = _header_control(call.controls.get(HEADER))
    mode = header_mode or (control.mode if control and control.mode else mode)
    ttl = header_ttl or (control.ttl if control and control.ttl else ttl)
    body = dict(call.info.body)
    if mode == "off":
        return Plan(False, False, False, ttl, "cache off")
    if call.cache_bypass:  # a test double or a recorder answers: never store it, never hide it
        return Plan(False, False, False, ttl, call.cache_bypass)
    if body.get("background") or body.get("previous_response_id") or body.get("conversation"):
        return Plan(False, False, False, ttl, "stateful request")
    if nondeterministic == "skip" and mode != "replay" and _nondeterministic(call):
        return Plan(False, False, False, ttl, "non-deterministic (temperature > 0, no seed)")
    return Plan(lookup=mode in ("on", "readonly", "replay"), store=mode in ("on", "refresh"),
                only_cached=mode == "replay", ttl=ttl, reason=mode)


def storable(call: Call, opaque: bool) -> bool:
    """Whether an ended call's answer may be stored: complete, successful, readable."""
    response = call.response
    return (call.outcome == "ok" and call.status is not None and 200 <= call.status < 300 and not opaque
            and response is not None and response.done and not response.error)


def stored_headers(headers: Any) -> list[tuple[str, str]]:
    """The response headers an entry keeps: not hop-by-hop ones, and never a credential (a
    gateway echoing a key or a session token must not write it into the cache file)."""
    items = headers.multi_items() if hasattr(headers, "multi_items") else list(headers.items())
    return [(str(k), str(v)) for k, v in items
            if str(k).lower() not in DROPPED_HEADERS and not redact.is_secret_header(str(k))]


class _Recorder:
    """Tees the decoded body of a miss; stores it if the call ended well."""

    __slots__ = ("_call", "_chunks", "_headers", "_key", "_policy", "_size", "_tap", "_ttl")

    def __init__(self, policy: CachePolicy, call: Call, key: str, reply: Reply, ttl: float | None) -> None:
        self._policy, self._call, self._key, self._ttl = policy, call, key, ttl
        self._headers = stored_headers(reply.headers)
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._tap = reply.tap

    def on_chunk(self, data: bytes) -> None:
        if self._chunks is None:
            return
        self._size += len(data)
        if self._size > self._policy.max_entry_bytes:  # too big to keep: stop buffering, never store
            self._chunks = None
            return
        self._chunks.append(data)

    def on_complete(self) -> None:
        self._finish()

    def on_abort(self, error: BaseException | None) -> None:
        self._finish()  # the tracker judged it: a close after the done marker is still "ok"

    def _finish(self) -> None:
        call, policy, key = self._call, self._policy, self._key
        chunks, self._chunks = self._chunks, None
        # missed: bytes were read where the tap could not see them; None: more than max_entry_bytes
        keep = chunks is not None and storable(call, self._tap.opaque_body or self._tap.missed)
        body = b"".join(chunks) if keep and chunks is not None else None
        headers, ttl = self._headers, self._ttl

        def write() -> None:
            try:
                if body is not None:
                    policy.save(call, key, headers, body, ttl)
            finally:
                policy.landed(key)  # followers look up again only once the entry is written

        policy.flights.writing(key)
        if not policy.writes.run(write):  # on an event loop the write is queued; queue full: dropped
            policy.landed(key)


class CachePolicy:
    serves_answers = True  # answers without the upstream: test doubles must be detected (adapters)
    def __init__(self, store: Any, *, mode: str, ttl: float | None, shared: bool, nondeterministic: str,
                 instruments: Callable[[], Any] = lambda: None, coalesce_timeout: float = 30.0,
                 ignored_headers: frozenset[str] = frozenset(), max_entry_bytes: int = 32 * 2**20) -> None:
        self.store, self.mode, self.ttl, self.shared = store, mode, ttl, shared
        self.ignored_headers = ignored_headers
        self.nondeterministic = nondeterministic
        self._instruments = instruments
        self.flights = Flights(coalesce_timeout)
        self.max_entry_bytes = max_entry_bytes
        # Store writes (an entry, a last-access touch, counters, the close) never block an event
        # loop: made from a thread running one, they are queued for a background thread.
        self.writes = Writes()
        self._salted = False
        self._warned_at = 0.0

    def close(self) -> None:
        """When the last call on this policy's pipeline ended: write pending counters, close the
        connections (after any queued write)."""
        def close() -> None:
            with contextlib.suppress(Exception):
                self.store.close()

        self.writes.run(close)

    # -- store access, failing open --------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> None:
        STATS.add(cache_errors=1, store_errors=1)
        with contextlib.suppress(Exception):
            instruments = self._instruments()
            if instruments is not None:
                instruments.cache_errors.add(1, {"llmshim.cache.operation": what})
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("llmshim: cache %s failed (%s: %s); the call goes on without the cache "
                        "(further cache errors are counted in llmshim.cache.errors, warned once a minute)",
                        what, type(exc).__name__, exc)

    def _key(self, call: Call) -> str | None:
        try:
            return keys.cache_key(call, self.store.salt, self.shared, self.ignored_headers)
        except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
            self._failed("open", exc)
            return None

    def _lookup(self, key: str) -> Entry | None:
        try:
            entry: Entry | None = self.store.get(key, CLOCK(), defer=self.writes.run)
            return entry
        except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
            self._failed("read", exc)
            return None

    def save(self, call: Call, key: str, headers: list[tuple[str, str]], body: bytes, ttl: float | None) -> None:
        now = CLOCK()
        usage = call.response.usage if call.response else None
        meta = {**keys.summary(call), "status": call.status,
                "usage": {"input_tokens": usage.input_tokens if usage else None,
                          "output_tokens": usage.output_tokens if usage else None}}
        try:
            self.store.put(Entry(key, int(call.status or 200), headers, body, now, now + ttl if ttl else None, meta),
                           now)
        except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
            self._failed("write", exc)

    def _count(self, hit: bool, call: Call, entry: Entry | None = None) -> None:
        call.span_attributes["llmshim.cache.hit"] = hit
        saved = 0
        if hit and entry is not None:
            call.span_attributes["llmshim.cache.age_s"] = max(0.0, CLOCK() - entry.created_at)
            usage = entry.meta.get("usage") or {}
            saved = (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0)
        STATS.add(**({"cache_hits": 1, "tokens_saved": saved} if hit else {"cache_misses": 1}))
        with contextlib.suppress(Exception):
            instruments = self._instruments()
            if instruments is not None:
                (instruments.cache_hits if hit else instruments.cache_misses).add(
                    1, {"gen_ai.provider.name": call.info.provider})
        def note() -> None:
            try:
                self.store.note(hits=int(hit), misses=int(not hit), tokens_saved=saved)
            except Exception as exc:
                self._failed("write", exc)

        self.writes.run(note)

    # -- replies built without the upstream ------------------------------------------------------
    def _hit(self, call: Call, entry: Entry) -> Reply | None:
        if call.replay is None:
            return None
        age = int(max(0.0, CLOCK() - entry.created_at))
        headers = [*entry.headers, ("content-length", str(len(entry.body))), (HEADER, "hit"), ("age", str(age))]
        try:
            reply = call.replay(entry.status, headers, entry.body)
        except Exception as exc:  # a hit we cannot rebuild is a miss: the upstream answers instead
            self._failed("replay", exc)
            return None
        self._count(True, call, entry)
        return track(call, reply)

    @staticmethod
    def _missing(call: Call, key: str) -> Reply | None:
        if call.replay is None:
            return None
        body = json.dumps({"error": {
            "message": f"llmshim cache replay mode: no cached answer for {call.request.method} "
                       f"{call.request.public_url} (model {call.info.model or '-'}, key {key[:16]})",
            "type": "llmshim_cache_miss", "code": "llmshim_cache_miss", "param": None}}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   (HEADER, "miss"), ("x-should-retry", "false")]
        return track(call, call.replay(504, headers, body))

    def landed(self, key: str) -> None:
        self.flights.land(key)

    # -- the seam --------------------------------------------------------------------------------
    def _before(self, call: Call) -> tuple[Plan, str | None, Reply | None]:
        decided = plan(call, self.mode, self.ttl, self.nondeterministic)
        if not (decided.lookup or decided.store):
            return decided, None, None
        key = self._key(call)
        if key is None:
            return decided, None, None
        if decided.lookup:
            entry = self._lookup(key)
            if entry is not None:
                hit = self._hit(call, entry)
                if hit is not None:
                    return decided, key, hit
            if decided.only_cached:
                return decided, key, self._missing(call, key)
        return decided, key, None

    def _after_miss(self, call: Call, decided: Plan, key: str | None, reply: Reply) -> Reply:
        if key is None or not decided.store:
            if key is not None:
                self.landed(key)
            return reply
        reply.tap.subscribe(_Recorder(self, call, key, reply, decided.ttl))
        return reply

    def _late_hit(self, call: Call, decided: Plan, key: str | None, flight: Flight | None) -> Reply | None:
        """A new leader looks again: the previous one may have stored the answer and landed
        between our first lookup and our joining (otherwise two identical calls go upstream)."""
        if key is None or flight is not None or not decided.store or not decided.lookup:
            return None
        hit = self._after_wait(call, decided, key)
        if hit is not None:
            self.landed(key)
        return hit

    def _after_wait(self, call: Call, decided: Plan, key: str) -> Reply | None:
        """After the request we waited for landed: its stored answer, if there is one."""
        entry = self._lookup(key) if decided.lookup else None
        return self._hit(call, entry) if entry is not None else None

    def handle(self, call: Call, next: Handler) -> Reply:
        decided, key, answer = self._before(call)
        if answer is not None:
            return answer
        flight = self.flights.join(key) if key is not None and decided.store else None
        late = self._late_hit(call, decided, key, flight)
        if late is not None:
            return late
        if key is not None and decided.lookup and flight is None:
            self._count(False, call)  # the leader's miss; a follower counts the hit it gets
        if flight is not None and key is not None:
            if not self.flights.wait(flight):
                return next(call)  # a leader it may not wait on, or one that did not land in time
            return self._after_wait(call, decided, key) or self.handle(call, next)
        try:
            reply = next(call)
        except BaseException:
            if key is not None and decided.store:
                self.landed(key)
            raise
        return self._after_miss(call, decided, key if decided.store else None, reply)

    async def _salt_off_loop(self) -> None:
        """The store's salt is read (and, the very first time, written) once per store: off the
        loop, since the write can wait for another process's lock."""
        if not self._salted:
            with contextlib.suppress(Exception):  # a failure shows again, failing open, in _key
                await asyncio.to_thread(lambda: self.store.salt)
            self._salted = True

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        await self._salt_off_loop()
        decided, key, answer = self._before(call)
        if answer is not None:
            return answer
        flight = self.flights.join(key) if key is not None and decided.store else None
        late = self._late_hit(call, decided, key, flight)
        if late is not None:
            return late
        if key is not None and decided.lookup and flight is None:
            self._count(False, call)
        if flight is not None and key is not None:
            if not await self.flights.await_landing(flight):
                return await anext(call)
            return self._after_wait(call, decided, key) or await self.ahandle(call, anext)
        try:
            reply = await anext(call)
        except BaseException:
            if key is not None and decided.store:
                self.landed(key)
            raise
        return self._after_miss(call, decided, key if decided.store else None, reply)
