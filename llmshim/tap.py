"""The tap: one response body, fanned out to the policies that observe it, ended exactly once.

Adapters feed it the decoded body bytes as the caller reads them and end it once: ``complete``
when the body was read to its end, ``abort`` on an error, an early close, or when the library's
response is garbage-collected unread (``abort_when_collected``). Policies subscribe observers:
the tracker that reads the body through the dialect, the cache's recorder, the rate limiter's
slot release, the observer's report. Every "exactly once" promise llmshim makes about a call's end
rests on this class.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .clocks import monotonic

__all__ = ["OnEnd", "Tap", "TapObserver"]

log = logging.getLogger("llmshim")

_WATCHED: set[weakref.ref[Any]] = set()  # see Tap.abort_when_collected


class TapObserver(Protocol):
    """Receives a body's bytes as the caller gets them, then exactly one of complete/abort."""

    def on_chunk(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...
    def on_abort(self, error: BaseException | None) -> None: ...


class OnEnd:
    """A tap observer that only cares that the body ended (completed or aborted): it calls ``fn``.
    Judge the outcome from ``call.outcome``, which the tracker set before this runs."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn

    def on_chunk(self, data: bytes) -> None:
        pass

    def on_complete(self) -> None:
        self._fn()

    def on_abort(self, error: BaseException | None) -> None:
        self._fn()


class Tap:
    """Fan-out of one response body to the observers that policies subscribe.

    The adapter feeds it decoded body bytes as the caller reads them (``chunk``) and ends it once
    (``complete`` when the body was read to its end, ``abort`` on an error, an early close or
    garbage collection). ``opaque()`` says the bytes could not be decoded (an unknown
    content-encoding): observers then get no chunks but still get the end. ``gap()`` says some of
    the body reached the caller by a path the tap did not see: what it holds is not the whole body
    (``missed``), so it must never be stored. An observer that raises is logged and dropped; it
    never reaches the caller.

    Until ``release()`` the tap holds what it is fed: a body can arrive whole together with its
    headers (aiohttp reads it before handing the response back), before the policies on the
    way out of the pipeline have subscribed. The pipeline releases the tap once all have.
    """

    __slots__ = ("_held", "_observers", "_ref", "ended", "first_chunk_at", "missed", "opaque_body")

    def __init__(self) -> None:
        self._ref: weakref.ref[Any] | None = None
        self._observers: list[TapObserver] = []
        self._held: list[bytes | tuple[BaseException | None, bool]] | None = []
        self.ended = False
        self.opaque_body = False
        self.missed = False
        self.first_chunk_at: float | None = None

    def subscribe(self, observer: TapObserver) -> None:
        self._observers.append(observer)

    def abort_when_collected(self, owner: Any) -> None:
        """Abort this tap if ``owner`` (the library's response) is garbage-collected unread.

        The weak reference lives in a module-level registry until the body ends or the response
        dies: a weakref that is itself garbage (say, stored on an object in the response's own
        reference cycle) is cleared by the cyclic collector *without* calling its callback. This is
        weakref.finalize's idea, without its per-call bookkeeping."""
        ref = weakref.ref(owner, self._collected)
        self._ref = ref
        _WATCHED.add(ref)

    def _collected(self, ref: weakref.ref[Any]) -> None:
        _WATCHED.discard(ref)
        self.abort(None)

    def release(self) -> None:
        """Deliver what was held, then pass everything straight through."""
        held, self._held = self._held, None
        for item in held or ():
            if isinstance(item, bytes):
                self._deliver(item)
            else:
                self._finish(*item)

    def opaque(self) -> None:
        self.opaque_body = True

    def gap(self) -> None:
        """Some body bytes went to the caller unseen: what the tap saw is not the whole body."""
        self.missed = True

    def chunk(self, data: bytes) -> None:
        if self.ended or not data:
            return
        if self.first_chunk_at is None:
            self.first_chunk_at = monotonic()
        if self.opaque_body:
            return
        if self._held is not None:
            self._held.append(data)
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        failed = None
        for observer in self._observers:  # runs per chunk of every stream: no copy of the list
            try:
                observer.on_chunk(data)
            except Exception:  # an observer must never break the caller's read
                log.warning("llmshim: body observer failed; detaching it", exc_info=True)
                failed = [*(failed or ()), observer]
        for observer in failed or ():
            self._observers.remove(observer)

    def complete(self) -> None:
        self._end(None, completed=True)

    def abort(self, error: BaseException | None = None) -> None:
        self._end(error, completed=False)

    def _end(self, error: BaseException | None, *, completed: bool) -> None:
        if self.ended:
            return
        self.ended = True
        if self._ref is not None:
            _WATCHED.discard(self._ref)
            self._ref = None
        if self._held is not None:
            self._held.append((error, completed))
            return
        self._finish(error, completed)

    def _finish(self, error: BaseException | None, completed: bool) -> None:
        # Every observer gets the end, once (``ended`` is already set): one interrupted by Ctrl-C
        # or SystemExit (a signal during a cache write is raised right after it) must not skip
        # the rest (a flight's landing, a slot's release, the call's report); the first such
        # interruption goes on to the caller once all have run.
        interrupted: BaseException | None = None
        for observer in self._observers:
            try:
                if completed:
                    observer.on_complete()
                else:
                    observer.on_abort(error)
            except Exception:
                log.warning("llmshim: body observer failed at end of body", exc_info=True)
            except BaseException as exc:
                interrupted = interrupted or exc
        self._observers.clear()
        if interrupted is not None:
            raise interrupted
