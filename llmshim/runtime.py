"""Process-wide state the adapters consult on every call, and ``begin``: their common first step.

``STATE.active`` is read first by every wrapper: uninstall flips it, and at that instant every
patched method becomes a pass-through, even where another library wrapped ours and we cannot
unwrap. ``begin`` must never raise: llmshim fails open, so a bug in recognising a request means
the request passes through untouched, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .call import Call, WireRequest
from .config import Settings
from .context import in_call
from .dialects import detect
from .pipeline import Pipeline
from .policies.events import EventsPolicy
from .policies.stats import STATS, StatsPolicy

__all__ = ["STATE", "State", "begin", "build_pipeline"]

log = logging.getLogger("llmshim")


class State:
    __slots__ = ("active", "pipeline", "settings")

    def __init__(self) -> None:
        self.active = False
        self.settings = Settings()
        self.pipeline = Pipeline()


STATE = State()


def build_pipeline(settings: Settings, tracer_provider: Any = None, meter_provider: Any = None) -> Pipeline:
    """The policy chain for these settings, outermost first: telemetry wraps everything, so the
    span is current while hooks run and while every wire attempt is made."""
    policies: list[Any] = []
    if settings.telemetry:
        from .policies.telemetry import TelemetryPolicy

        policies.append(TelemetryPolicy(tracer_provider, meter_provider))
    policies += [StatsPolicy(), EventsPolicy()]
    STATS.write_to(settings.stats_file)
    return Pipeline(policies)


def begin(library: str, to_wire: Callable[[], WireRequest | None]) -> Call | None:
    """A Call for this request if llmshim should handle it, else None (the caller passes through)."""
    if not STATE.active or in_call.get():
        return None
    try:
        wire = to_wire()
        found = detect(wire) if wire is not None else None
    except Exception:
        log.warning("llmshim: could not read a %s request; passing it through", library, exc_info=True)
        return None
    if found is None or wire is None:
        return None
    dialect, info = found
    return Call(request=wire, info=info, library=library, dialect=dialect)
