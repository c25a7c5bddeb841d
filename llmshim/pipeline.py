"""The pipeline: one Call through the policy chain to the library's original send.

Each policy has the same seam, sync and async twins side by side::

    handle(call, next) -> Reply          ahandle(call, anext) -> Reply

The chain ends in ``send``/``asend``, the adapter's call of the original library method. Right
after it returns, the pipeline subscribes a :class:`ResponseTracker` to the reply's tap *first*,
so when any policy's own observer hears the end, the call already carries status, usage, model,
timings and ``call.outcome``. Observers judge by ``call.outcome`` ("ok" | "error" | "aborted"),
not by which callback fired: a stream closed right after its done marker is "ok".
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .call import Call, Reply
from .context import in_call
from .dialects import BodyParser

__all__ = ["AsyncHandler", "Handler", "Pipeline", "Policy", "ResponseTracker", "track"]

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
            self._call.chunk_times.append(time.perf_counter())
        if self._parser is not None:
            self._parser.feed(data)

    def on_complete(self) -> None:
        call = self._call
        call.ended_at = time.perf_counter()
        call.first_chunk_at = self._tap.first_chunk_at
        if self._parser is None:
            call.outcome = "error"
            return
        if self._tap.opaque_body:
            call.outcome = "ok"  # status says success; the body could not be read for details
            return
        call.response = info = self._parser.finish()
        call.outcome = "error" if info.error else "ok"

    def on_abort(self, error: BaseException | None) -> None:
        parser = self._parser
        if error is None and parser is not None and parser.result.done and not self._tap.opaque_body:
            # Closed without an error after the done marker: SDKs stop reading at `[DONE]` and
            # close, leaving only the chunked terminator unread. That call completed.
            self.on_complete()
            return
        call = self._call
        call.ended_at = time.perf_counter()
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
    call.ended_at = time.perf_counter()
    call.error = exc
    call.outcome = "error"


class Pipeline:
    """An ordered chain of policies, outermost first."""

    def __init__(self, policies: Sequence[Policy] = ()) -> None:
        self.policies = tuple(policies)

    def close(self) -> None:
        """Release what policies hold (store connections, pending counters)."""
        for policy in self.policies:
            close = getattr(policy, "close", None)
            if close is not None:
                close()

    def run(self, call: Call, send: Handler) -> Reply:
        def terminal(call: Call) -> Reply:
            token = in_call.set(True)
            try:
                reply = send(call)
            except BaseException as exc:
                _failed(call, exc)
                raise
            finally:
                in_call.reset(token)
            return track(call, reply)

        handler: Handler = terminal
        for policy in reversed(self.policies):
            handler = _bind(policy, handler)
        reply = handler(call)
        reply.tap.release()  # every policy has subscribed: let held body events through
        return reply

    async def arun(self, call: Call, asend: AsyncHandler) -> Reply:
        async def terminal(call: Call) -> Reply:
            token = in_call.set(True)
            try:
                reply = await asend(call)
            except BaseException as exc:
                _failed(call, exc)
                raise
            finally:
                in_call.reset(token)
            return track(call, reply)

        handler: AsyncHandler = terminal
        for policy in reversed(self.policies):
            handler = _abind(policy, handler)
        reply = await handler(call)
        reply.tap.release()
        return reply


def _bind(policy: Policy, next: Handler) -> Handler:
    return lambda call: policy.handle(call, next)


def _abind(policy: Policy, anext: AsyncHandler) -> AsyncHandler:
    return lambda call: policy.ahandle(call, anext)
