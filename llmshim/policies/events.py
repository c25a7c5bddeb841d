"""Event hooks: ``llmshim.on("call_started" | "call_completed" | "call_failed", fn)``.

The seed projects' users wired callbacks for started/completed/failed; this is that, for every
LLM call in the process. A hook receives a :class:`CallRecord` (plain values, no headers, no
secrets). ``call_completed``/``call_failed`` fire when the call really ends: for a stream, when
its last chunk was read, not when the headers arrived. A hook that raises is logged and the call
goes on untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, Literal, overload

from .. import redact
from ..call import Call
from ..facts import error_type

__all__ = ["EVENTS", "CallRecord", "emit", "emit_end", "off", "on"]

log = logging.getLogger("llmshim")

Event = Literal["call_started", "call_completed", "call_failed"]
EVENTS: tuple[str, ...] = ("call_started", "call_completed", "call_failed")
Hook = Callable[["CallRecord"], Any]


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """What a hook sees of one LLM call. Durations are seconds; None where not (yet) known."""

    event: str
    provider: str
    operation: str
    model: str | None
    stream: bool
    library: str
    url: str  # scheme://host:port/path, no query string and no user info (llmshim.redact.public_url)
    status: int | None = None
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    input_tokens: int | None = None  # spent: what the provider produced for this call (None on a cache hit)
    output_tokens: int | None = None  # (estimated by llmshim when ``estimator`` is set)
    duration: float | None = None
    time_to_first_chunk: float | None = None
    error_type: str | None = None
    outcome: str | None = None  # ok | error | aborted
    cache_hit: bool | None = None  # None: the cache was not consulted
    saved_input_tokens: int | None = None  # a cache hit's tokens, not spent again
    saved_output_tokens: int | None = None
    cost_usd: float | None = None  # what the provider charged (genai-prices); None: no honest price
    saved_cost_usd: float | None = None  # a cache hit's price, not paid again
    # How llmshim counted the tokens (and so the cost) when the provider reported none:
    # "tiktoken:<encoding>" or "approximation". None: the provider's own counts.
    estimator: str | None = None

    @classmethod
    def of(cls, event: str, call: Call) -> CallRecord:
        """The record of ``call`` now. Every field is given, so the frozen dataclass's ``__init__``
        (one ``object.__setattr__`` per field: a third of a hook's cost) is skipped: the values go
        straight into the new record's ``__dict__``; ``tests/test_hot_path.py`` pins that the
        result equals the one ``__init__`` makes."""
        info, response, facts = call.info, call.response, call.facts
        spent = response.tokens if response is not None and not facts.cache_hit else None
        record = object.__new__(cls)
        record.__dict__.update(
            event=event, provider=info.provider, operation=info.operation, model=info.model,
            stream=info.stream, library=call.library, url=redact.public_url(call.request.url),
            status=call.status,
            response_model=response.model if response else None,
            response_id=response.id if response else None,
            finish_reasons=tuple(response.finish_reasons) if response else (),
            input_tokens=spent.input_tokens if spent else None,
            output_tokens=spent.output_tokens if spent else None,
            duration=call.duration, time_to_first_chunk=call.time_to_first_chunk,
            error_type=error_type(call), outcome=call.outcome,
            cache_hit=facts.cache_hit, saved_input_tokens=facts.saved_input_tokens,
            saved_output_tokens=facts.saved_output_tokens, cost_usd=facts.cost_usd,
            saved_cost_usd=facts.saved_cost_usd, estimator=facts.estimator,
        )
        return record


_lock = threading.Lock()
_hooks: dict[str, tuple[Hook, ...]] = {event: () for event in EVENTS}


@overload
def on(event: Event, fn: None = None) -> Callable[[Hook], Hook]: ...
@overload
def on(event: Event, fn: Hook) -> Hook: ...
def on(event: Event, fn: Hook | None = None) -> Hook | Callable[[Hook], Hook]:
    """Register ``fn`` for ``event``; usable as ``on(event, fn)`` or as ``@on(event)``."""
    if event not in EVENTS:
        raise ValueError(f"unknown llmshim event {event!r}; expected one of {', '.join(EVENTS)}")
    if fn is None:
        return lambda f: on(event, f)
    with _lock:  # copy-on-write: emitters read the tuple without a lock
        _hooks[event] = (*_hooks[event], fn)
    return fn


def off(event: Event, fn: Hook | None = None) -> None:
    """Remove ``fn`` from ``event`` (every hook of the event when ``fn`` is None)."""
    with _lock:
        _hooks[event] = () if fn is None else tuple(h for h in _hooks[event] if h is not fn)


def emit(event: str, call: Call) -> None:
    hooks = _hooks[event]
    if not hooks:
        return
    record = CallRecord.of(event, call)
    for hook in hooks:
        try:
            hook(record)
        except Exception:
            log.exception("llmshim: %s hook %r raised; the call is not affected", event, hook)


def emit_end(call: Call) -> None:
    emit("call_completed" if call.outcome == "ok" else "call_failed", call)
