"""The response cache: a hit replays stored bytes through the library's own response type; a miss
tees the live body and stores it when, and only when, the call completed normally.

Decisions are pure functions over plain values (``plan`` for a request, ``cache_recorder.storable``
for an ended call); ``CachePolicy`` only acts on them. Flow of ``handle``:

1. ``plan``: mode (setting, ``cache_control()``, or an ``x-llmshim-cache`` request header that the
   adapter already stripped), stateful or non-deterministic requests → look up? store?
2. look up (on an event loop, a store across the network is read on llmshim's reader threads,
   ``_alookup``): a hit builds the reply through ``call.replay`` (the adapter's builder of its own
   response type) with ``x-llmshim-cache: hit`` and ``age`` headers; the upstream is not called.
   In ``replay`` mode a miss answers a synthetic 504 naming the request (``x-should-retry: false``,
   so SDKs raise it at once in their usual way).
3. miss: identical concurrent requests in this process wait for the first one (single flight,
   ``singleflight.py``), then look up again; the first sends upstream, and a recorder on the body
   tap (``cache_recorder.py``) hands back the decoded bytes on normal completion (2xx, done marker,
   no error event, read to the end), which are then stored.

Fail open: any store error is a miss (or a skipped write), a warning (at most one a minute) and
``llmshim.cache.errors``; never an exception in the caller's call, never a changed response.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable

from ..call import Call, Reply
from ..clocks import monotonic, wall
from ..facts import store_failed
from ..knobs import CACHE_HEADER, MODES, CacheControl, cache_control, current_cache_control
from ..knobs import header_cache_control as _header_control
from ..pipeline import AsyncHandler, Handler, track
from ..singleflight import Flight, Flights
from ..store import cache_keys
from ..store.background import Writes, read_off_loop
from ..store.base import CacheStore, Entry
from .cache_recorder import Recorder, stored_headers

__all__ = ["MODES", "CacheControl", "CachePolicy", "Plan", "cache_control", "plan"]

log = logging.getLogger("llmshim")

HEADER = CACHE_HEADER
CLOCK: Callable[[], float] = wall  # wall clock for expiry; tests replace it


@dataclasses.dataclass(frozen=True)
class Plan:
    lookup: bool
    store: bool
    only_cached: bool
    ttl: float | None
    reason: str


def _nondeterministic(call: Call) -> bool:
    """Sampling without a seed at a temperature above 0, as the dialect read them from the request.
    Every provider's default temperature is above 0, so an absent one counts as > 0."""
    info = call.info
    if info.operation == "embeddings":
        return False
    return info.seed is None and (info.temperature is None or info.temperature > 0)


def _tokens(usage: object, name: str) -> int | None:
    """A token count from a stored entry's metadata, or None (absent, or not a count)."""
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def plan(call: Call, mode: str, ttl: float | None, nondeterministic: str, control: CacheControl | None = None) -> Plan:
    """What to do with this request. Pure: from the call (its ``x-llmshim-cache`` control header
    first), the caller's ``cache_control()`` block (``control``, read by the policy) and the
    settings, in that order of precedence; except that ``replay`` as the setting holds for every
    call: a per-call mode written for production (``no-store``, ``refresh``, ``off``) would
    otherwise send a request upstream from a run that promised nothing leaves."""
    header_mode, header_ttl = _header_control(call.controls.get(HEADER))
    if mode != "replay":
        mode = header_mode or (control.mode if control and control.mode else mode)
    ttl = header_ttl or (control.ttl if control and control.ttl else ttl)
    body = call.info.body
    if mode == "off":
        return Plan(False, False, False, ttl, "cache off")
    if call.cache_bypass:  # a test double or a recorder answers: never store it, never hide it
        return Plan(False, False, False, ttl, call.cache_bypass)
    # Never served from the cache; in replay mode never sent either (replay's promise: nothing leaves)
    if not call.dialect.generates(call.info):  # a measure (count_tokens), not an answer
        return Plan(False, False, mode == "replay", ttl, "not a generation")
    if body.get("background") or body.get("previous_response_id") or body.get("conversation"):
        return Plan(False, False, mode == "replay", ttl, "stateful request")
    if nondeterministic == "skip" and mode != "replay" and _nondeterministic(call):
        return Plan(False, False, False, ttl, "non-deterministic (temperature > 0, no seed)")
    return Plan(lookup=mode in ("on", "readonly", "replay"), store=mode in ("on", "refresh"),
                only_cached=mode == "replay", ttl=ttl, reason=mode)


class CachePolicy:
    serves_answers = True  # answers without the upstream: test doubles must be detected (adapters)

    def __init__(self, store: CacheStore, *, mode: str, ttl: float | None, shared: bool, nondeterministic: str,
                 coalesce_timeout: float = 30.0,
                 ignored_headers: frozenset[str] = frozenset(), max_entry_bytes: int = 32 * 2**20) -> None:
        self.store, self.mode, self.ttl, self.shared = store, mode, ttl, shared
        self.ignored_headers = ignored_headers
        self.nondeterministic = nondeterministic
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

        self.writes.run(close, droppable=False)  # else the connections stay open behind a full queue

    # -- store access, failing open --------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> None:
        store_failed("cache", what)
        now = monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("llmshim: cache %s failed (%s: %s); the call goes on without the cache, in replay "
                        "mode answered 504 (further cache errors are counted in llmshim.cache.errors, warned "
                        "once a minute)",
                        what, type(exc).__name__, exc)

    def _key(self, call: Call) -> str | None:
        try:
            return cache_keys.cache_key(call, self.store.salt, self.shared, self.ignored_headers)
        except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
            self._failed("open", exc)
            return None

    def _defer(self, write: Callable[[], None]) -> bool:
        """How a store defers a write it makes while reading (a last-access touch, a tiered hit
        copied into the front): queued off a loop, and failing open on its own, so that a front
        that cannot be written never turns the hit just read into a miss."""
        def guarded() -> None:
            try:
                write()
            except Exception as exc:  # sqlite3, OS, Redis: the hit stands, the copy is skipped
                self._failed("write", exc)

        return self.writes.run(guarded)

    def _read(self, get: Callable[..., Entry | None], key: str) -> Entry | None:
        """``get(key)`` of a store (or a tier of one), any failure of it a miss."""
        try:
            return get(key, CLOCK(), defer=self._defer)
        except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
            self._failed("read", exc)
            return None

    def _lookup(self, key: str) -> Entry | None:
        """The entry for ``key``, or None. A tiered store's front and the store behind it fail
        apart: a front that cannot be read (a corrupt local file) still lets Redis answer."""
        store = self.store
        near = store.near
        if near is None:  # one store, the path of every hit: read in place (no extra call)
            try:
                return store.get(key, CLOCK(), defer=self._defer)
            except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
                self._failed("read", exc)
                return None
        entry = self._read(near.get, key)
        return entry if entry is not None else self._read(store.get_past_near, key)

    async def _alookup(self, key: str) -> Entry | None:
        """``_lookup`` for a task. A local store is read in place (a primary-key read); one across
        the network on llmshim's reader threads, so a slow Redis (up to ``LLMSHIM_REDIS_TIMEOUT``
        a read) delays this call only, never the loop's other tasks. A tiered store's local front
        is read in place first: its hits take no thread hop."""
        store = self.store
        if store.local:
            return self._lookup(key)
        near = store.near
        if near is not None:
            entry = self._read(near.get, key)
            if entry is not None:
                return entry
        try:  # past the front (read above): only Redis, on a reader thread
            return await read_off_loop(lambda: self._read(store.get_past_near, key))
        except Exception as exc:  # the reader threads refused it (the interpreter is exiting): a miss
            self._failed("read", exc)
            return None

    def save(self, call: Call, key: str, headers: list[tuple[str, str]], body: bytes, ttl: float | None) -> None:
        now = CLOCK()
        usage = call.response.tokens if call.response else None  # reported, else estimated
        meta = {**cache_keys.summary(call), "status": call.status,
                "usage": {"input_tokens": usage.input_tokens if usage else None,
                          "output_tokens": usage.output_tokens if usage else None}}
        if call.response is not None and usage is call.response.estimated:
            meta["estimator"] = call.response.estimator
        try:
            self.store.put(Entry(key, int(call.status or 200), headers, body, now, now + ttl if ttl else None, meta),
                           now)
        except Exception as exc:  # sqlite3, OS, Redis: any store failure is a miss
            self._failed("write", exc)

    def _count(self, hit: bool, call: Call, entry: Entry | None = None) -> None:
        facts = call.facts
        facts.cache_hit = hit
        saved = 0
        if hit and entry is not None:
            facts.cache_age_s = max(0.0, CLOCK() - entry.created_at)
            usage = entry.outcome.get("usage") or {}
            facts.saved_input_tokens, facts.saved_output_tokens = _tokens(usage, "input_tokens"), _tokens(
                usage, "output_tokens")
            estimator = entry.outcome.get("estimator")
            facts.estimator = estimator if isinstance(estimator, str) and facts.tokens_saved else None
            saved = facts.tokens_saved

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
    def _missing(call: Call, key: str | None, never_cached: str | None = None) -> Reply | None:
        """Replay mode's answer when the cache cannot serve: a miss, a store that cannot be read
        (``key`` None), or a request the cache never serves (``never_cached``: the plan's reason, a
        stateful request or a count_tokens). Never the upstream: replay's promise is that no
        request leaves."""
        if call.replay is None:
            return None
        request = f"{call.request.method} {call.request.public_url}"
        if never_cached:
            why = f"{request} is never answered from the cache ({never_cached}), and replay mode sends nothing"
        elif key is None:
            why = f"the cache could not be read for {request} (see the llmshim warning)"
        else:
            why = f"no cached answer for {request} (model {call.info.model or '-'}, key {key[:16]})"
        body = json.dumps({"error": {
            "message": f"llmshim cache replay mode: {why}",
            "type": "llmshim_cache_miss", "code": "llmshim_cache_miss", "param": None}}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   (HEADER, "miss"), ("x-should-retry", "false")]
        return track(call, call.replay(504, headers, body))

    def landed(self, key: str) -> None:
        self.flights.land(key)

    def _record(self, call: Call, key: str, reply: Reply, ttl: float | None) -> None:
        """Tee the miss's body; when it ends, store it if the recorder kept it, then land."""
        headers = stored_headers(reply.headers)

        def finish(body: bytes | None) -> None:
            def write() -> None:
                try:
                    if body is not None:
                        self.save(call, key, headers, body, ttl)
                finally:
                    self.landed(key)  # followers look up again only once the entry is written

            self.flights.writing(key)
            if not self.writes.run(write):  # on an event loop the write is queued; queue full: dropped
                self.landed(key)

        reply.tap.subscribe(Recorder(call, reply.tap, self.max_entry_bytes, finish))

    # -- the seam --------------------------------------------------------------------------------
    def _plan(self, call: Call) -> Plan:
        return plan(call, self.mode, self.ttl, self.nondeterministic, current_cache_control())

    def _decide(self, call: Call) -> tuple[Plan, str | None]:
        """The plan, and the key when the plan looks up or stores (None: neither, or no key)."""
        decided = self._plan(call)
        if not (decided.lookup or decided.store):
            return decided, None
        return decided, self._key(call)

    def _answer(self, call: Call, decided: Plan, key: str | None, entry: Entry | None) -> Reply | None:
        """After the first lookup: the hit, replay mode's 504 for a miss, or None (go on)."""
        if not decided.lookup:
            return self._missing(call, None, decided.reason) if decided.only_cached else None
        if key is None:  # the store failed (counted and warned): replay mode still never goes upstream
            return self._missing(call, None) if decided.only_cached else None
        if entry is not None:
            hit = self._hit(call, entry)
            if hit is not None:
                return hit
        return self._missing(call, key) if decided.only_cached else None

    def _after_miss(self, call: Call, decided: Plan, key: str | None, reply: Reply) -> Reply:
        if key is None or not decided.store:
            if key is not None:
                self.landed(key)
            return reply
        self._record(call, key, reply, decided.ttl)
        return reply

    @staticmethod
    def _looks_again(decided: Plan, key: str | None, flight: Flight | None) -> bool:
        """A new leader looks again: the previous one may have stored the answer and landed
        between our first lookup and our joining (otherwise two identical calls go upstream)."""
        return key is not None and flight is None and decided.store and decided.lookup

    def _late_hit(self, call: Call, key: str, entry: Entry | None) -> Reply | None:
        """The new leader's second lookup found ``entry``: its hit ends our flight at once."""
        hit = self._hit(call, entry) if entry is not None else None
        if hit is not None:
            self.landed(key)
        return hit

    def _after_wait(self, call: Call, decided: Plan, entry: Entry | None) -> Reply | None:
        """After the request we waited for landed: its stored answer, if there is one."""
        return self._hit(call, entry) if entry is not None and decided.lookup else None

    def handle(self, call: Call, next: Handler) -> Reply:
        decided, key = self._decide(call)
        answer = self._answer(call, decided, key, self._lookup(key) if key is not None and decided.lookup else None)
        if answer is not None:
            return answer
        flight = self.flights.join(key) if key is not None and decided.store else None
        if self._looks_again(decided, key, flight):
            assert key is not None
            late = self._late_hit(call, key, self._lookup(key))
            if late is not None:
                return late
        if key is not None and decided.lookup and flight is None:
            self._count(False, call)  # the leader's miss; a follower counts the hit it gets
        if flight is not None and key is not None:
            if not self.flights.wait(flight):
                return next(call)  # a leader it may not wait on, or one that did not land in time
            return self._after_wait(call, decided, self._lookup(key) if decided.lookup else None) or self.handle(
                call, next)
        try:
            reply = next(call)
        except BaseException:
            if key is not None and decided.store:
                self.landed(key)
            raise
        return self._after_miss(call, decided, key if decided.store else None, reply)

    async def _salt_off_loop(self) -> bool:
        """The store's salt is read (and, the very first time, written) once per store: off the
        loop, since the write can wait for another process's lock and Redis is across the network.
        False: the store could not give it (counted and warned); the call then goes without the
        cache, as a synchronous one does, rather than ask again on the loop in ``_key``."""
        if not self._salted:
            try:
                await read_off_loop(lambda: self.store.salt)
            except Exception as exc:  # sqlite3, OS, Redis, or the reader threads refused
                self._failed("open", exc)
                return False
            self._salted = True
        return True

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        decided = self._plan(call)  # a call the cache does not serve never asks the store, as in ``handle``
        if not (decided.lookup or decided.store):
            missing = self._missing(call, None, decided.reason) if decided.only_cached else None
            return missing if missing is not None else await anext(call)
        if not await self._salt_off_loop():
            missing = self._missing(call, None) if decided.only_cached and decided.lookup else None
            return missing if missing is not None else await anext(call)
        key = self._key(call)
        answer = self._answer(call, decided, key,
                              await self._alookup(key) if key is not None and decided.lookup else None)
        if answer is not None:
            return answer
        flight = self.flights.join(key) if key is not None and decided.store else None
        if self._looks_again(decided, key, flight):
            assert key is not None
            try:  # we lead a flight now: a cancellation while we look must end it
                entry = await self._alookup(key)
            except BaseException:
                self.landed(key)
                raise
            late = self._late_hit(call, key, entry)
            if late is not None:
                return late
        if key is not None and decided.lookup and flight is None:
            self._count(False, call)
        if flight is not None and key is not None:
            if not await self.flights.await_landing(flight):
                return await anext(call)
            entry = await self._alookup(key) if decided.lookup else None
            return self._after_wait(call, decided, entry) or await self.ahandle(call, anext)
        try:
            reply = await anext(call)
        except BaseException:
            if key is not None and decided.store:
                self.landed(key)
            raise
        return self._after_miss(call, decided, key if decided.store else None, reply)
