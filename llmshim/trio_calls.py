"""Async calls made under trio: the policies' synchronous twins on a worker thread.

httpx, httpx2 and the SDKs built on them run under trio as well as asyncio, but llmshim's async
policies wait on asyncio (futures woken from other threads, ``asyncio.sleep``, reader threads
awaited through the loop): under trio they would raise in the user's call. So a call made from a
trio task runs the whole *synchronous* chain on a trio worker thread
(``trio.to_thread.run_sync``, which copies the task's context: ``cache_control()``, priorities),
and only the library's own send comes back to the task's loop (``trio.from_thread.run``). Waiting
(the rate limiter's queue, a retry's backoff, a coalesced follower) blocks that worker, never the
loop; the response's body is read on the loop, as without llmshim.

The worker threads are llmshim's own, not counted by trio's default thread limiter (40 threads):
a worker is held until the answer's headers come, and on that limiter the 41st call in flight
waited for a thread (a cap without llmshim's), calls queued under a rate limit took every thread
from the program's own ``trio.to_thread.run_sync``, and a send to a host name, whose lookup trio
runs on that limiter, waited for a thread held by a call waiting for that very send (a deadlock,
ended only by the connect timeout). So a trio program has one thread per call in flight or queued.

A cancelled task (a cancel scope, ``move_on_after``, Ctrl-C) goes at once, as under asyncio: its
worker is abandoned (trio's ``abandon_on_cancel``) and ends alone: it sends nothing more for the
task (``Abandoned`` on that thread, which no caller sees), a place in the rate limiter's queue is
left at once (the call's ``Cancellation`` wakes it: a place kept to its turn took a permit), a
send under way is cancelled too (trio runs it as a system task, outside the task's cancel scopes:
it is given a scope of its own), and whatever the worker holds (a slot, a reply that came back
meanwhile) is released as for any failed or dropped call. A reply the chain drops on the worker (a retried attempt, one
that came back too late) is closed on the loop: an async response has no synchronous close.

trio is never imported here: a program that has not imported it is not running it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from .call import Call, Reply
from .cancellation import Abandoned, Cancellation

__all__ = ["Abandoned", "run_on_worker", "running"]

AsyncSend = Callable[[Call], Any]


def running() -> bool:
    """Whether this thread is running a trio task (and no asyncio loop: trio-asyncio's asyncio
    side keeps the asyncio path)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio._get_running_loop() is not None:
        return False
    in_trio_run = getattr(trio.lowlevel, "in_trio_run", None)  # trio >= 0.26: an attribute check
    if in_trio_run is not None:
        return bool(in_trio_run())
    try:  # older trio: the same question, answered by raising (~40x the cost, on every store write)
        trio.lowlevel.current_trio_token()
    except RuntimeError:  # not inside trio.run on this thread (a worker thread, or no trio run)
        return False
    return True


class _Unlimited:
    """A limiter (trio's ``CapacityLimiter`` protocol) that never makes a worker wait: llmshim's
    worker threads stay off trio's default limiter (the module docstring)."""

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        return None

    def release_on_behalf_of(self, borrower: object) -> None:
        return None


_UNLIMITED = _Unlimited()


async def run_on_worker(run: Callable[[Call, Callable[[Call], Reply]], Reply], call: Call,
                        asend: AsyncSend) -> Reply:
    """``run(call, send)`` (a pipeline's synchronous run) on a trio worker thread, where ``send``
    performs ``asend`` back on the caller's trio loop.

    The reply comes back in a box the task empties, not as the worker's return value: trio's
    worker still holds its return value a moment after the task went on, and a response the
    caller dropped unread would outlive the collection that ends it (keeping its rate-limit slot)."""
    trio = sys.modules["trio"]
    box: list[Reply] = []
    abandoned = Cancellation()
    if call is not None:  # (None in unit tests of this function alone)
        call.cancellation = abandoned
    lock = threading.Lock()  # the worker keeps its reply, or the task abandons it: never both, never neither
    sends: list[Any] = []  # the cancel scopes of sends running on the loop for this call

    async def send_on_loop(call: Call) -> Reply:
        # trio runs it as a system task, outside the caller's cancel scopes: the task's
        # cancellation reaches it through this scope (an upstream request is not left running).
        with trio.CancelScope() as scope:
            sends.append(scope)
            try:
                if abandoned.cancelled:
                    scope.cancel()
                return await asend(call)  # type: ignore[no-any-return]
            finally:
                sends.remove(scope)
        raise Abandoned("the trio task that made this call was cancelled during its send")

    def send(call: Call) -> Reply:
        if abandoned.cancelled:  # the task is gone: nothing is sent for it any more
            raise Abandoned("the trio task that made this call was cancelled")
        reply: Reply = trio.from_thread.run(send_on_loop, call)
        # The chain on this thread releases a reply it will not return (a retried attempt) with the
        # synchronous ``discard``: an async response is closed by ``adiscard``, on the loop.
        reply.discard = functools.partial(_on_loop, trio, reply.adiscard)
        return reply

    def work() -> None:
        reply = run(call, send)
        with lock:
            kept = not abandoned.cancelled
            if kept:
                box.append(reply)
        if not kept:  # came back for a task that is gone: released now, as a retried attempt is
            _on_loop(trio, reply.adiscard)

    try:
        await trio.to_thread.run_sync(work, limiter=_UNLIMITED, **{_abandon_keyword(trio): True})
    except BaseException:  # cancelled (or interrupted): the task goes at once, the worker ends alone
        with lock:
            abandoned.cancel()  # and a wait holding a place others need (the limiter's queue) leaves now
            late = box.pop() if box else None  # the worker ended, but the task was cancelled first
        for scope in list(sends):
            scope.cancel()
        if late is not None:
            with contextlib.suppress(BaseException):
                trio.lowlevel.spawn_system_task(_quietly, late.adiscard)
        raise
    return box.pop()


def _on_loop(trio: Any, afn: Callable[[], Any]) -> None:
    """``afn()`` run on the trio loop from a worker thread; nothing if the run has ended meanwhile
    (RunFinishedError, or the Cancelled of a run shutting down: this thread has no caller to tell)."""
    with contextlib.suppress(BaseException):
        trio.from_thread.run(_quietly, afn)


async def _quietly(afn: Callable[[], Any]) -> None:
    """``afn()``, its failure ignored (a system task's exception would end the whole trio run)."""
    with contextlib.suppress(Exception):
        await afn()


_ABANDON: list[str] = []


def _abandon_keyword(trio: Any) -> str:
    """``to_thread.run_sync``'s name for "let a cancelled task go without its thread":
    ``abandon_on_cancel`` since trio 0.23, ``cancellable`` before (deprecated since)."""
    if not _ABANDON:
        import inspect

        parameters = inspect.signature(trio.to_thread.run_sync).parameters
        _ABANDON.append("abandon_on_cancel" if "abandon_on_cancel" in parameters else "cancellable")
    return _ABANDON[0]
