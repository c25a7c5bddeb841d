"""The per-call knobs a program turns: a call's priority and its cache behaviour.

Each knob has two forms that mean the same: a context manager / decorator for the code around the
call (a context variable, so it follows awaits and threads that copy the context), and a request
header for programs that build requests themselves (the adapter strips ``x-llmshim-*`` headers
before the request leaves; the policies read them from ``call.controls``):

- ``with llmshim.priority("high"):`` or ``x-llmshim-priority: high`` — read by the rate limiter
  (``policies/ratelimit.py``) to choose who goes next when calls must wait.
- ``with llmshim.cache_control(mode="refresh", ttl=60):`` or ``x-llmshim-cache: refresh, ttl=60``
  — read by the cache's ``plan`` (``policies/cache.py``).

Pure values and parsers only: nothing here does I/O or knows a policy's internals.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, get_args

from .values import PRIORITIES, CacheMode, resolve_priority

__all__ = ["CACHE_HEADER", "MODES", "PRIORITIES", "PRIORITY_HEADER", "CacheControl", "cache_control",
           "current_cache_control", "current_priority", "header_cache_control", "priority", "resolve_priority"]

F = TypeVar("F", bound=Callable[..., Any])

# -- priority (its names, aliases and resolve_priority are values.py's: the settings parse them) -------
PRIORITY_HEADER = "x-llmshim-priority"


_priority: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmshim_priority", default=None)


def current_priority() -> str | None:
    """The priority set by the innermost ``priority`` block around this code, if any."""
    return _priority.get()


class priority(contextlib.ContextDecorator):  # used like a function: `with llmshim.priority("high"):`
    """Priority for LLM calls made inside the block or decorated function (contextvar: follows
    awaits, and threads that copy the context)."""

    def __init__(self, name: str) -> None:
        self.name = resolve_priority(name)
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> priority:
        self._tokens.append(_priority.set(self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        _priority.reset(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        import asyncio  # on decorating, not when the settings parse a priority as a process starts

        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                with priority(self.name):
                    return await fn(*args, **kwargs)
            return wrapper  # type: ignore[return-value]
        return super().__call__(fn)


# -- cache control -----------------------------------------------------------------------------------
MODES: tuple[str, ...] = get_args(CacheMode)
CACHE_HEADER = "x-llmshim-cache"


@dataclasses.dataclass(frozen=True)
class CacheControl:
    mode: str | None = None
    ttl: float | None = None


_control: contextvars.ContextVar[CacheControl | None] = contextvars.ContextVar("llmshim_cache_control", default=None)


def current_cache_control() -> CacheControl | None:
    """The cache behaviour set by the innermost ``cache_control`` block around this code, if any."""
    return _control.get()


@contextlib.contextmanager
def cache_control(mode: str | None = None, ttl: float | None = None) -> Iterator[None]:
    """Per-call cache behaviour for calls made inside the block (also across await and threads
    that copy the context): ``mode`` one of off/on/readonly/refresh/replay, ``ttl`` seconds."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"cache mode {mode!r}: expected one of {', '.join(MODES)}")
    if ttl is not None and ttl <= 0:
        raise ValueError(f"cache ttl {ttl!r}: expected a positive number of seconds")
    token = _control.set(CacheControl(mode, ttl))
    try:
        yield
    finally:
        _control.reset(token)


def header_cache_control(value: str | None) -> tuple[str | None, float | None]:
    """``x-llmshim-cache: no-store | refresh | only-if-cached | ttl=N`` → (mode, ttl)."""
    if not value:
        return None, None
    mode, ttl = None, None
    for part in value.split(","):
        part = part.strip().lower()
        if part == "no-store":
            mode = "readonly"
        elif part == "refresh":
            mode = "refresh"
        elif part == "only-if-cached":
            mode = "replay"
        elif part.startswith("ttl="):
            with contextlib.suppress(ValueError):
                ttl = float(part[4:]) if float(part[4:]) > 0 else None
    return mode, ttl
