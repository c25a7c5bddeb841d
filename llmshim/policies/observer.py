"""The observer: the one outermost policy that reports what happened to a call.

Every other policy only decides and records typed facts on the call (``llmshim.facts``). The
observer brackets the whole chain: when the call starts it begins the span (current while the
request is sent, so HTTP client spans nest under it), counts the call and fires ``call_started``;
at the call's one end (the last byte of the body, an early close or a garbage-collected reply —
the tap guarantees exactly once — or an exception instead of a reply) it fans the outcome and the
facts out, in this order: ``stats()``, then the span and the metrics, then the hooks, so a hook
already sees this call in ``llmshim.stats()``.

Store failures that happen outside any call (a background cache write) reach the newest
observer through ``llmshim.facts.store_failed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..call import Call, Reply
from ..cost import cost_of
from ..facts import StoreKind, listen_store_failures
from ..pipeline import AsyncHandler, Handler
from ..providers import known_provider
from . import events
from .stats import STATS, Stats

if TYPE_CHECKING:
    from .telemetry import Begun, Instruments, Telemetry

__all__ = ["ObserverPolicy"]


class ObserverPolicy:
    """Outermost: one span, one stats update and the hooks per call, fed by ``call.facts``."""

    def __init__(self, telemetry: Telemetry | None = None, stats: Stats = STATS) -> None:
        self.telemetry, self.stats = telemetry, stats
        listen_store_failures(self.store_failed)

    @property
    def instruments(self) -> Instruments | None:
        return self.telemetry.instruments if self.telemetry is not None else None

    def store_failed(self, kind: StoreKind, operation: str) -> None:
        self.stats.add(store_errors=1, cache_errors=int(kind == "cache"))
        if self.telemetry is not None:
            self.telemetry.store_failed(kind, operation)

    def _start(self, call: Call) -> Begun | None:
        if not _warming and known_provider(call.request.server[0], call.request.path) is not None:
            _warm_prices()
        begun = self.telemetry.begin(call) if self.telemetry is not None else None
        self.stats.call_started()
        events.emit("call_started", call)  # nothing to do, at once, without such a hook
        return begun

    def _detach(self, begun: Begun | None, call: Call) -> None:
        """The span stops being current once the reply's headers are back (the body may be read
        anywhere, later); it ends with the call."""
        if begun is not None and self.telemetry is not None:
            self.telemetry.detach(begun, call)

    def _end(self, call: Call, begun: Begun | None) -> None:
        _account(call)
        self.stats.call_ended(call)
        if begun is not None and self.telemetry is not None:
            self.telemetry.finish(begun, call)
        events.emit_end(call)

    def handle(self, call: Call, next: Handler) -> Reply:
        begun = self._start(call)
        try:
            reply = next(call)
        except BaseException:
            self._detach(begun, call)
            self._end(call, begun)
            raise
        self._detach(begun, call)
        reply.tap.subscribe(_Ending(self, call, begun))
        return reply

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        begun = self._start(call)
        try:
            reply = await anext(call)
        except BaseException:
            self._detach(begun, call)
            self._end(call, begun)
            raise
        self._detach(begun, call)
        reply.tap.subscribe(_Ending(self, call, begun))
        return reply


class _Ending:
    """The observer's tap observer: at the body's one end (complete or abort, as ``call.outcome``
    says) the call is reported. One object per call, no closure."""

    __slots__ = ("begun", "call", "observer")

    def __init__(self, observer: ObserverPolicy, call: Call, begun: Begun | None) -> None:
        self.observer, self.call, self.begun = observer, call, begun

    def on_chunk(self, data: bytes) -> None:
        pass

    def on_complete(self) -> None:
        self.observer._end(self.call, self.begun)

    def on_abort(self, error: BaseException | None) -> None:
        self.observer._end(self.call, self.begun)


_warming: list[bool] = []


def _warm_prices() -> None:
    """Load the price list (``llmshim[cost]``: ~0.3 s) on a thread as the process's first call to a
    priced provider starts: it overlaps that call's own network time, so the call does not pay for
    it at its end; a process that never calls one never loads it. Nothing when it is not installed.
    The thread is joined at exit: an interpreter that ends while a daemon thread is inside an
    extension module's import can abort ("FATAL: exception not rethrown")."""
    _warming.append(True)
    import importlib.util

    if importlib.util.find_spec("genai_prices") is None:
        return
    import atexit
    import threading

    from ..cost import warm_up

    thread = threading.Thread(target=warm_up, name="llmshim-prices", daemon=True)
    thread.start()
    atexit.register(thread.join, 10.0)


def _account(call: Call) -> None:
    """The call's tokens and price on its facts. Tokens the provider did not report but llmshim
    estimated (``llmshim.tokens``) are flagged with their ``estimator``: for a paid call they are
    what it spent; for a cache hit whose entry kept no counts, what it saved. Then the price in US
    dollars (``llmshim.cost``): spent, or for a hit saved; None where there is no honest price (an
    unknown model, a local server, no tokens)."""
    response = call.response
    if response is None:
        return
    facts = call.facts
    estimated = response.estimated
    if estimated is not None and response.tokens is estimated:
        if not facts.cache_hit:
            facts.estimator = response.estimator
        elif facts.saved_input_tokens is None and facts.saved_output_tokens is None:
            facts.saved_input_tokens, facts.saved_output_tokens = estimated.input_tokens, estimated.output_tokens
            facts.estimator = response.estimator
    cost = cost_of(call)
    if cost is None:
        return
    if call.facts.cache_hit:
        call.facts.saved_cost_usd = float(cost)
    else:
        call.facts.cost_usd = float(cost)
