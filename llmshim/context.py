"""Context variables llmshim keeps per task/thread.

``in_call`` is the re-entrancy guard: while llmshim sends one wire request, a nested patched
library underneath (a client built on another client) passes straight through instead of
counting the same call twice.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["in_call"]

in_call: ContextVar[bool] = ContextVar("llmshim_in_call", default=False)
