"""The pipeline: one Call through the policy chain to the library's original send.

Each policy has the same seam, sync and async twins side by side::

    handle(call, next) -> Reply          ahandle(call, anext) -> Reply

The chain ends in ``send``/``asend``, the adapter's call of the original library method. Right
after it returns, the pipeline subscribes a :class:`ResponseTracker` to the reply's tap *first*,
so when any policy's own observer hears the end, the call already carries status, usage, model,
timings and ``call.outcome``. Observers judge by ``call.outcome`` ("ok" | "error" | "aborted"),
not by which callback fired: a stream closed right after its done marker is "ok".

A pipeline counts the calls running on it, so ``install()``/``uninstall()`` can swap it while
calls are in flight: the old one closes its resources when its last call ends (``Pipeline``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from . import trio_calls
from .call import INCOMPLETE_STREAM, Call, Reply
from .clocks import monotonic
from .context import in_call
from .dialects import BodyParser
from .tap import OnEnd
from .tokens import estimate

__all__ = ["AsyncHandler", "Handler", "Pipeline", "Policy", "ResponseTracker", "track"]

log = logging.getLogger("llmshim")

P = TypeVar("P")
Handler = Callable[[Call], Reply]
AsyncHandler = Callable[[Call], Awaitable[Reply]]


class Policy(Protocol):
    def handle(self, call: Call, next: Handler) -> Reply: ...

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply: ...


class ResponseTracker:
    """Reads one reply's body through the call's dialect and records how the call ended.

    Holds the tap, never the reply: the reply carries the library's response object, and a tap
    observer that reached it would keep an unread response alive (the tap is reachable from
    the registry that notices responses dropped unread)."""

    __slots__ = ("_call", "_parser", "_tap")

    def __init__(self, call: Call, reply: Reply) -> None:
        self._call, self._tap = call, reply.tap
        call.status = reply.status
        ok = 200 <= reply.status < 300
        content_type = reply.headers.get("content-type")
        self._parser = BodyParser(call.dialect, call.info, content_type, call.capture_content) if ok else None

    def on_chunk(self, data: bytes) -> None:
        if self._call.chunk_times is not None:
            self._call.chunk_times.append(monotonic())
        if self._parser is not None:
            self._parser.feed(data)

    def on_complete(self) -> None:
        call = self._call
        call.ended_at = monotonic()
        call.first_chunk_at = self._tap.first_chunk_at
        if self._parser is None:
            call.outcome = "error"
            return
        if self._tap.opaque_body:
            call.outcome = "ok"  # status says success; the body could not be read for details
            return
        call.response = info = self._parser.finish()
        if info.error is None and call.info.stream and not info.done and not info.finish_reasons:
            # The body ended cleanly, the answer did not (no end marker, nothing finished): cut
            # upstream. One that finished some of its n choices is not called an error (servers
            # that ignore n send one), only never stored (``done`` needs every choice).
            info.error = INCOMPLETE_STREAM
        call.outcome = "error" if info.error else "ok"
        estimate(call.info, info)

    def on_abort(self, error: BaseException | None) -> None:
        parser = self._parser
        ended = parser is not None and (parser.result.done or parser.result.marker)
        if error is None and ended and not self._tap.opaque_body:
            # Closed without an error after the done marker: SDKs stop reading at `[DONE]` and
            # close, leaving only the chunked terminator unread. That call ended (whole or not:
            # on_complete judges it, as it would have had the client read the terminator).
            self.on_complete()
            return
        call = self._call
        call.ended_at = monotonic()
        call.first_chunk_at = self._tap.first_chunk_at
        call.error = error
        call.outcome = "aborted"


def track(call: Call, reply: Reply) -> Reply:
    """Subscribe the call's tracker to a reply: done for every reply, whether the upstream sent it
    (the pipeline's terminal) or a policy made it (a cache hit). Must come before any other
    observer, so theirs see the call's outcome."""
    reply.tap.subscribe(ResponseTracker(call, reply))
    return reply


def _failed(call: Call, exc: BaseException) -> None:
    call.ended_at = monotonic()
    call.error = exc
    call.outcome = "error"


class Pipeline:
    """An ordered chain of policies, outermost first, and the calls running on it.

    A call holds the pipeline it started on until the call really ends: its reply's body ended
    (complete, abort, or the response garbage-collected unread), or no reply came (an exception).
    ``install()`` and ``uninstall()`` *retire* a pipeline instead of closing it: no call starts on
    it any more (one that races the swap runs on the ``successor``, or passes through when there is
    none), and its policies' resources (store connections) close when the last call in flight on
    it ends, or at once when none is. So a call never sees its cache closed under its feet, and
    install churn never closes a connection that another thread is using.
    """

    def __init__(self, policies: Sequence[Policy] = ()) -> None:
        self._set(tuple(policies))
        # Re-entrant: the garbage collector may run inside any block holding it and end a reply
        # dropped unread, whose call then leaves this pipeline from the same thread.
        self._lock = threading.RLock()
        self._calls = 0  # calls in flight on this pipeline
        self._retired = False
        self._closed = False
        self._successor: Pipeline | None = None

    @property
    def in_flight(self) -> int:
        return self._calls

    def find(self, kind: type[P]) -> P | None:
        """This pipeline's first policy of type ``kind`` (for tools and tests that read its state)."""
        return next((policy for policy in self.policies if isinstance(policy, kind)), None)

    def insert(self, policy: Policy, *, after: type | None = None) -> None:
        """Add ``policy`` just inside the first policy of type ``after`` (outermost when None or
        absent). Calls already running keep the chain they started with; the next call sees it."""
        with self._lock:
            policies = list(self.policies)
            at = next((i + 1 for i, p in enumerate(policies) if after is not None and isinstance(p, after)), 0)
            policies.insert(at, policy)
            self._set(tuple(policies))

    def _set(self, policies: tuple[Policy, ...]) -> None:
        """The chain, bound once here (not per call), and whether any policy answers without the
        upstream (then adapters must tell test doubles from the network: ``adapters._doubles``)."""
        self.policies = policies
        self.serves_answers = any(getattr(policy, "serves_answers", False) for policy in policies)
        self._handler, self._ahandler = _chain(policies), _achain(policies)

    @property
    def closed(self) -> bool:
        return self._closed

    def retire(self, successor: Pipeline | None = None) -> None:
        """No new call starts here; close when the last call in flight ends (now, if none is)."""
        with self._lock:
            if self._retired:
                return
            self._retired, self._successor = True, successor
            idle = self._calls == 0
        if idle:
            self._close()

    def close(self) -> None:
        """Retire with no successor (kept for callers that own a pipeline outright)."""
        self.retire(None)

    def _admit(self) -> Pipeline | None:
        """The pipeline a starting call runs on, with the call counted: this one, or the newest
        successor of a retired one; None when the last one was retired by ``uninstall()``."""
        pipeline: Pipeline | None = self
        while pipeline is not None:
            with pipeline._lock:
                if not pipeline._retired:
                    pipeline._calls += 1
                    return pipeline
                successor = pipeline._successor
            pipeline = successor
        return None

    def _leave(self) -> None:
        with self._lock:
            self._calls -= 1
            last = self._retired and self._calls == 0
        if last:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for policy in self.policies:
            close = getattr(policy, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:  # fail open: a resource that will not close never reaches a caller
                log.warning("llmshim: closing %s failed", type(policy).__name__, exc_info=True)

    def _held_until_end(self, reply: Reply) -> Reply:
        """Subscribed last, so every policy's own end-of-body work (a cache write) runs before."""
        reply.tap.subscribe(OnEnd(self._leave))
        reply.tap.release()  # every policy has subscribed: let held body events through
        return reply

    def run(self, call: Call, send: Handler) -> Reply:
        pipeline = self._admit()
        if pipeline is None:
            return _pass_through(call, send)
        call.send = send
        try:
            reply = pipeline._handler(call)
        except BaseException:
            pipeline._leave()
            raise
        finally:
            _unbind(call)
        return pipeline._held_until_end(reply)

    async def arun(self, call: Call, asend: AsyncHandler) -> Reply:
        if trio_calls.running():  # asyncio's waits would fail there: the synchronous chain on a thread
            return await trio_calls.run_on_worker(self.run, call, asend)
        pipeline = self._admit()
        if pipeline is None:
            return await _apass_through(call, asend)
        call.send = asend
        try:
            reply = await pipeline._ahandler(call)
        except BaseException:
            pipeline._leave()
            raise
        finally:
            _unbind(call)
        return pipeline._held_until_end(reply)


def _unbind(call: Call) -> None:
    """The chain is done with the adapter's closures: drop them. They hold the library's request,
    and aiohttp's request holds its response; the tap's observers hold the call, and the tap is
    reachable from its collection watch: a response the caller dropped unread would never be
    collected (memory), its call never ended (no hook, no span), and an identical call coalesced
    on it waited the whole bound."""
    call.send = call.replay = call.expired = None


def _pass_through(call: Call, send: Handler) -> Reply:
    """A call that began just as llmshim was uninstalled: sent as if llmshim were not there."""
    token = in_call.set(True)
    try:
        reply = send(call)
    finally:
        in_call.reset(token)
    reply.tap.release()
    return reply


async def _apass_through(call: Call, asend: AsyncHandler) -> Reply:
    token = in_call.set(True)
    try:
        reply = await asend(call)
    finally:
        in_call.reset(token)
    reply.tap.release()
    return reply


def _terminal(call: Call) -> Reply:
    """The chain's end: the adapter's send (``call.send``), outside llmshim's own call context."""
    assert call.send is not None
    token = in_call.set(True)
    try:
        reply: Reply = call.send(call)
    except BaseException as exc:
        _failed(call, exc)
        raise
    finally:
        in_call.reset(token)
    return track(call, reply)


async def _aterminal(call: Call) -> Reply:
    assert call.send is not None
    token = in_call.set(True)
    try:
        reply: Reply = await call.send(call)
    except BaseException as exc:
        _failed(call, exc)
        raise
    finally:
        in_call.reset(token)
    return track(call, reply)


def _chain(policies: Sequence[Policy]) -> Handler:
    """The policies bound outermost first around the terminal, once per pipeline (not per call)."""
    handler: Handler = _terminal
    for policy in reversed(policies):
        handler = _bind(policy, handler)
    return handler


def _achain(policies: Sequence[Policy]) -> AsyncHandler:
    handler: AsyncHandler = _aterminal
    for policy in reversed(policies):
        handler = _abind(policy, handler)
    return handler


def _bind(policy: Policy, next: Handler) -> Handler:
    return lambda call: policy.handle(call, next)


def _abind(policy: Policy, anext: AsyncHandler) -> AsyncHandler:
    return lambda call: policy.ahandle(call, anext)
