"""Priority rate limiting: the policy. Every wire attempt takes a permit before it is sent.

Flow of ``handle`` (sync) and ``ahandle`` (asyncio), the same steps:

1. ``_plan``: the call's key (origin, credential scope, model), its limits (per model or the
   defaults; a local server also gets a concurrency limit), its priority (the
   ``x-llmshim-priority`` header, else ``llmshim.priority()``, else the default) and its cost
   (one request; tokens: characters / 4 plus the output reservation). No limit: pass through.
2. Queue with the limiter and wait for the grant, at most the queue timeout (then a 429 of
   llmshim's own, or ``TimeoutError`` where no response can be built). A caller that gives up
   (Ctrl-C, a cancelled task) leaves the queue, or releases what it was granted meanwhile.
3. Send; learn from the reply: the server's own limits tighten the key, a 429's delay blocks it
   for every caller (at most ``MAX_BLOCK``), llama.cpp's "Loading model" blocks it until
   ``/health`` answers.
4. When the body ends, however it ends: release the concurrency slot and give back the tokens
   reserved but not used.

Who goes next is decided in ``scheduler.py``, acted on in ``limiter.py``; the per-call knobs are
in ``knobs.py``; what the limiter reads from the wire it asks the call's dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..call import Call, Reply
from ..cancellation import Abandoned
from ..clocks import monotonic
from ..knobs import PRIORITIES, PRIORITY_HEADER, current_priority, priority, resolve_priority
from ..pipeline import AsyncHandler, Handler, track
from ..store.cache_keys import credential_of
from ..store.limits_sqlite import MAX_BLOCK
from ..tap import OnEnd
from ..values import Limits, parse_limits
from .limiter import Limiter
from .scheduler import Key, Waiter

if TYPE_CHECKING:
    from ..store.base import LimitStore

__all__ = ["PRIORITIES", "STORE_ANSWER_WAIT", "RateLimitPolicy", "parse_limits", "priority", "resolve_priority"]

#: The longest a caller that will not wait (``LLMSHIM_QUEUE_TIMEOUT=0``) waits for a shared budget's
#: answer (the store's own timeouts are shorter: a store that fails is answered locally).
STORE_ANSWER_WAIT = 5.0


class RateLimitPolicy:
    """Takes a permit for every wire attempt (it sits below the retry layer), by priority."""

    def __init__(self, *, rpm: float | None, tpm: float | None, per_model: Mapping[str, Limits], burst: float,
                 default_priority: str, queue_timeout: float, default_output_tokens: int,
                 shared: LimitStore | None = None,
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
        self.limiter.close()

    def _local(self, host: str) -> bool:
        return host in self.local_hosts or host in ("localhost", "::1") or host.startswith("127.")

    def _plan(self, call: Call) -> tuple[Key, Waiter] | None:
        if not call.dialect.generates(call.info):  # count_tokens: limited apart by its provider
            return None
        limits = self.per_model.get(call.info.model or "", self.default)
        host, port = call.request.server
        concurrency = self.max_concurrency if self.max_concurrency and self._local(host) else None
        if limits.rpm is None and limits.tpm is None and concurrency is None:
            return None
        credential = credential_of(call.request.headers, call.request.url)
        scope = hashlib.sha256(credential.encode()).hexdigest()[:12] if credential else "-"
        name = f"{host}:{port}|{scope}|{call.info.model or '-'}"
        header = call.controls.get(PRIORITY_HEADER)
        try:
            level = resolve_priority(header) if header else (current_priority() or self.default_priority)
        except ValueError:
            level = self.default_priority
        info = call.info  # characters / 4 of the prompt, and its max-tokens field (or the default)
        tokens_in, tokens_out = max(1, info.input_chars // 4), info.max_output_tokens or self.default_output_tokens
        call.facts.priority = level
        waiter = Waiter(level, 1.0, float(tokens_in + tokens_out) if limits.tpm else 0.0, self.limiter.clock(),
                        impatient=self.queue_timeout <= 0)
        return self.limiter.key(name, limits, concurrency), waiter

    def _patience(self, key: Key, waiter: Waiter) -> float:
        """How long the caller waits for its turn: the queue timeout. One that will not wait
        (``LLMSHIM_QUEUE_TIMEOUT=0``) still waits for the answer of a shared budget, asked on the
        store thread after the enqueue (at most ``STORE_ANSWER_WAIT``): the first pass that looks
        at it wakes it, granted or not."""
        if waiter.impatient and key.shared is not None and not waiter.granted:
            return STORE_ANSWER_WAIT
        return self.queue_timeout

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

    def _learn(self, key: Key, reply: Reply, call: Call) -> None:
        """The server's rate-limit headers tighten the key's buckets; a 429 blocks the key for every
        caller until its retry-after (at most MAX_BLOCK)."""
        from .retry import server_delay

        headers = reply.headers
        self.limiter.learn(key, call.dialect.server_limits(headers))
        if _loading(call, reply):
            self._await_health(key, call)
            return
        pause = server_delay(headers) if reply.status == 429 else None
        if pause is not None and pause > 0:  # capped at MAX_BLOCK by block()
            self.limiter.block(key, self.limiter.clock() + min(pause, MAX_BLOCK))

    def _await_health(self, key: Key, call: Call) -> None:
        """Block the key until the server's health URL answers 200 (polled: llama.cpp has no
        push), at most the queue timeout. One watcher per key."""
        url = call.dialect.health_url(call.request)
        if key.watching or url is None:
            return
        key.watching = True
        limiter, deadline = self.limiter, self.queue_timeout
        limiter.block(key, limiter.clock() + deadline, cap=deadline)

        def watch() -> None:
            import urllib.request

            end = monotonic() + deadline
            try:
                while monotonic() < end:
                    try:
                        with urllib.request.urlopen(url, timeout=2) as response:
                            if response.status == 200:
                                break
                    except Exception:
                        pass
                    threading.Event().wait(0.25)
            finally:
                limiter.unblock(key)

        threading.Thread(target=watch, name="llmshim-health", daemon=True).start()

    def _abandon(self, key: Key, waiter: Waiter) -> None:
        """The caller gave up while queued: leave the queue, or, if the permit was granted in the
        meantime, release the concurrency slot it came with (once: a second call does nothing)."""
        if not self.limiter.withdraw(key, waiter) and waiter.holds_slot:
            waiter.holds_slot = False
            self.limiter.release(key, None)

    def _hold(self, key: Key, waiter: Waiter, reply: Reply) -> None:
        """A concurrency slot is held until the body ends, however it ends."""
        if not waiter.holds_slot:
            return
        limiter, status = self.limiter, reply.status
        reply.tap.subscribe(OnEnd(lambda: limiter.release(key, status)))

    def _reconcile(self, key: Key, waiter: Waiter, reply: Reply, call: Call) -> None:
        if key.tokens is None:
            return
        limiter = self.limiter

        def reconcile() -> None:
            usage = call.response.tokens if call.response else None  # reported, else estimated
            if usage is None or usage.input_tokens is None or key.tokens is None:
                return
            used = usage.input_tokens + (usage.output_tokens or 0)
            limiter.give_back(key, key.tokens.charged(waiter.tokens) - used)  # what was taken, not asked

        reply.tap.subscribe(OnEnd(reconcile))

    def handle(self, call: Call, next: Handler) -> Reply:
        planned = self._plan(call)
        if planned is None:
            return next(call)
        key, waiter = planned
        waiter.event = threading.Event()
        cancellation = call.cancellation  # a trio task gone: leave the queue now, not at our turn
        handed = False  # the slot is the reply's now: its body's end releases it
        # One guard from the enqueue (which may grant at once) to the release's subscription: a
        # Ctrl-C anywhere in between, not only in the wait, leaves the queue or gives the slot back.
        try:
            key = self.limiter.enqueue(key, waiter)
            stop_waking = cancellation.wake_with(waiter.event.set) if cancellation is not None else None
            try:
                waiter.event.wait(self._patience(key, waiter))
            finally:
                if stop_waking is not None:
                    stop_waking()
            if cancellation is not None and cancellation.cancelled:
                raise Abandoned("the caller went away while its call was queued")
            if not waiter.granted and self.limiter.withdraw(key, waiter):
                return self._timed_out(call)
            self._waited(call, waiter)
            reply = next(call)
            self._learn(key, reply, call)
            self._hold(key, waiter, reply)
            handed = True
        except BaseException:
            if not handed:
                self._abandon(key, waiter)
            raise
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
        handed = False
        try:  # as in ``handle``: cancelled anywhere before the slot is the reply's, nothing stays held
            key = self.limiter.enqueue(key, waiter)
            with contextlib.suppress(asyncio.TimeoutError):  # not granted in time: withdrawn below
                await asyncio.wait_for(asyncio.shield(future), self._patience(key, waiter))
            if not waiter.granted and self.limiter.withdraw(key, waiter):
                return self._timed_out(call)
            self._waited(call, waiter)
            reply = await anext(call)
            self._learn(key, reply, call)
            self._hold(key, waiter, reply)
            handed = True
        except BaseException:
            if not handed:
                self._abandon(key, waiter)
            raise
        self._reconcile(key, waiter, reply, call)
        return reply


def _loading(call: Call, reply: Reply) -> bool:
    """The server says its model is still loading (llama.cpp's 503): read only on the dialect's
    statuses, and only where the library lets a small error body be read synchronously."""
    dialect = call.dialect
    if reply.status not in dialect.loading_statuses or reply.peek is None:
        return False
    try:
        return dialect.loading(reply.status, reply.peek())
    except Exception:
        return False
