"""What the policies learned about one call, as typed values, and the incidents outside any call.

Policies decide; they do not report. The cache, retry and rate-limit policies write what they did
onto ``call.facts`` (a hit and its age, the tokens a hit saved, retries, the time waited for
permits, the priority class) and nothing else. One observer (``llmshim.policies.observer``) reads
these facts once, when the call ends, and fans them out to the span, the metrics, ``stats()`` and
the hooks: so a new span attribute is one field here and one line there, and no policy imports
OpenTelemetry or the stats counters.

A store failure may happen outside any call (a cache write made in the background after the call
ended), so it is an *incident*, reported through :func:`store_failed` to whoever listens (the
observer counts it in ``stats()`` and the ``llmshim.cache.errors`` metric). A listener that raises
is ignored: reporting never affects a call.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from .redact import scrub_text

if TYPE_CHECKING:
    from .call import Call

__all__ = ["Facts", "StoreKind", "error_type", "listen_store_failures", "store_failed"]

StoreKind = Literal["cache", "limits"]


@dataclasses.dataclass(slots=True)
class Facts:
    """Filled by policies while the call runs; read once by the observer when it ends."""

    cache_hit: bool | None = None  # None: the cache was not consulted
    cache_age_s: float | None = None  # a hit's age
    saved_input_tokens: int | None = None  # a hit's tokens, as the provider reported them when paid
    saved_output_tokens: int | None = None
    cost_usd: float | None = None  # what the provider charged for this call (None: no honest price)
    saved_cost_usd: float | None = None  # a cache hit's price, not paid again
    retries: int = 0  # wire attempts llmshim retried
    ratelimit_wait_s: float | None = None  # None: no limit applied; else seconds queued for permits
    priority: str | None = None  # the priority class a limit applied with
    # How llmshim counted the call's tokens (spent, or a hit's saved) when the provider reported
    # none: "tiktoken:<encoding>" or "approximation" (llmshim.tokens). None: the provider's counts.
    estimator: str | None = None

    @property
    def tokens_saved(self) -> int:
        """A hit's input + output tokens: spent once, when the answer was paid for, not again."""
        return (self.saved_input_tokens or 0) + (self.saved_output_tokens or 0)

    @property
    def throttled(self) -> bool:
        """Waited for permits for longer than scheduling noise."""
        return self.ratelimit_wait_s is not None and self.ratelimit_wait_s > 0.001


StoreListener = Callable[[StoreKind, str], None]
_listener: list[StoreListener | None] = [None]


def listen_store_failures(listener: StoreListener | None) -> None:
    """Hear every store failure from now on (``kind``: cache or limits, ``operation``: what failed),
    instead of the previous listener: the observer of the newest pipeline is the one that reports."""
    _listener[0] = listener


def store_failed(kind: StoreKind, operation: str) -> None:
    """Report a store failure that the caller already failed open from. Never raises."""
    listener = _listener[0]
    if listener is not None:
        with contextlib.suppress(Exception):
            listener(kind, operation)


def error_type(call: Call) -> str | None:
    """The one definition of a call's ``error.type``: None for a call that succeeded (even after a
    retried attempt failed) or has not ended; else the exception's class, ``aborted`` for a body
    abandoned without one, the HTTP status of an error answer, the error a 2xx body carried (the
    server's own words, scrubbed: they may echo a key), ``_OTHER`` for an error with no detail."""
    if call.outcome == "ok":
        return None
    if call.error is not None:
        return type(call.error).__qualname__
    if call.outcome is None:
        return None
    if call.outcome == "aborted":
        return "aborted"
    if call.status is not None and call.status >= 400:
        return str(call.status)
    if call.response is not None and call.response.error:
        return scrub_text(call.response.error)
    return "_OTHER"
