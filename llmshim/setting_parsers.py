"""The parsers particular to one setting, and the forms they accept; the shared parsers are in
``values.py``. ``settings.py`` declares each setting with one of these or one of those.

``duration`` and ``count`` make a :class:`~.values.Number` with the range and the accepted form a
setting documents (so the error text and the README say the same); the others parse one value
each: the libraries to patch, the priority class, the per-model limits, the ignored headers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from .values import COUNT_UNITS, DURATION_UNITS, SIZE_UNITS, Number, parse_limits, resolve_priority, text, word

__all__ = ["DAY", "ENTRY_SIZE", "LIBRARIES", "MAX_WAIT", "PRIORITY_FORM", "SIZE", "auto_workers", "count", "duration",
           "optional", "parse_ignored_headers", "parse_libraries", "parse_model_limits", "parse_priority"]

#: Client libraries llmshim can patch, in the order they are reported.
LIBRARIES: tuple[str, ...] = ("httpx", "httpx2", "requests", "aiohttp")

DAY = 86400
MAX_WAIT = Decimal(30 * DAY)  # the longest a call may be made to wait for anything


def parse_libraries(raw: Any) -> frozenset[str]:
    items = [str(x) for x in raw] if isinstance(raw, (list, tuple, set, frozenset)) else text(raw).split(",")
    names = {word(item) for item in items if item.strip()}
    if names == {"all"}:
        return frozenset(LIBRARIES)
    if names == {"none"}:
        return frozenset()
    unknown = names - set(LIBRARIES)
    if unknown or not names:
        raise ValueError(f"'all', 'none' or a comma-separated list of {', '.join(LIBRARIES)}")
    return frozenset(names)


def duration(low: str, high: Decimal, *, none: bool = False) -> Number:
    return Number(DURATION_UNITS, Decimal(low), high, "seconds, or a number with a unit: 250ms, 90s, 30m, 12h, 7d",
                  none=frozenset({"none", "never"}) if none else None)


def count(low: int, high: int, *, none: bool = False, auto: Callable[[], int] | None = None) -> Number:
    return Number(COUNT_UNITS, Decimal(low), Decimal(high),
                  "a whole number such as 30000 or 30k (k = thousand, m = million)", whole=True,
                  none=frozenset({"none"}) if none else frozenset({"auto"}) if auto else None, auto=auto)


def auto_workers() -> int:
    return min(32, (os.cpu_count() or 1) * 4 + 4)


SIZE = Number(SIZE_UNITS, Decimal(1), Decimal(2**50),
               "bytes, or a size: 512M or 1G (M, G = MiB, GiB), 500MB (MB = 10^6 bytes), 2GiB", whole=True,
               none=frozenset({"none"}))
ENTRY_SIZE = Number(SIZE_UNITS, Decimal(1024), Decimal(2**30),
                     "a size from 1K to 1G: 512K, 32M (K, M, G = KiB, MiB, GiB), 10MB", whole=True)
PRIORITY_FORM = "critical, high, normal or low (also urgent, medium, 0-3)"


def parse_model_limits(raw: Any) -> dict[str, Any]:
    return parse_limits(text(raw or ""))


def parse_priority(raw: Any) -> str:
    try:
        return resolve_priority(word(raw))
    except ValueError:
        raise ValueError(PRIORITY_FORM) from None


def parse_ignored_headers(raw: Any) -> frozenset[str]:
    if not raw:  # none ignored (the default): nothing to check, so the cache key code is not imported
        return frozenset()
    from .store import cache_keys

    return cache_keys.parse_ignored_headers(raw)


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse``, except that an empty value (or None) means None."""
    return lambda raw: None if raw is None or text(raw) == "" else parse(raw)
