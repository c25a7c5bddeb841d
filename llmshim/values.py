"""Parsers of setting values: pure functions from what a user wrote to a checked value.

Each parser takes the raw value (an environment string, or whatever was passed to ``install()``)
and returns the value or raises ``ValueError`` whose text is the accepted form; ``config.load``
turns that into a ``ConfigError`` naming the variable. The rules, the same for every option:

- Text is trimmed of ASCII whitespace; a NUL anywhere is refused.
- Keywords (booleans, modes, units) are ASCII and case-insensitive. Non-ASCII is refused before
  lower-casing, so the KELVIN SIGN, which lower-cases to ``k``, cannot pass for a unit.
- Numbers are ASCII digits with an optional decimal part: no sign, exponent, underscore,
  ``nan``/``inf`` or other scripts' digits. They are read as exact decimals, so a huge value is
  refused by its range instead of overflowing, and checked against a documented closed range.
- Units: durations ``ms s m h d``; counts ``k`` (thousand) and ``m`` (million); sizes ``k m g t``
  = KiB MiB GiB TiB (as Docker and the JVM read ``512M``), ``kb mb gb tb`` = powers of 1000 and
  ``kib mib gib tib`` = powers of 1024.

The modes are ``Literal`` types (``CacheMode``, ``RetryMode``, ...) shared by the settings, the
command line and the policies, so a mode is spelled in one place. Store locations parse into typed
values (``Memory``, ``SQLiteFile``, ``RedisURL``) that remain the text the user wrote.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Literal, TypeAlias, get_args
from urllib.parse import urlsplit

__all__ = ["BOOLEAN_FORM", "COUNT_UNITS", "DURATION_UNITS", "PRIORITIES", "SIZE_UNITS", "CacheMode", "CacheScope",
           "LimitStore", "Memory", "Nondeterministic", "Number", "OtelExporter", "PriorityClass", "RedisURL",
           "RetryMode", "SQLiteFile", "StoreURL", "boolean", "choice", "hosts", "path", "redis_url", "resolve_priority",
           "store", "text", "word"]

CacheMode: TypeAlias = Literal["off", "on", "readonly", "refresh", "replay"]
CacheScope: TypeAlias = Literal["credential", "shared"]
Nondeterministic: TypeAlias = Literal["cache", "skip"]
RetryMode: TypeAlias = Literal["auto", "llmshim", "sdk", "off"]
PriorityClass: TypeAlias = Literal["critical", "high", "normal", "low"]
OtelExporter: TypeAlias = Literal["console", "otlp"]

PRIORITIES: tuple[str, ...] = get_args(PriorityClass)  # highest first
_PRIORITY_ALIASES = {"urgent": "critical", "medium": "normal", "0": "critical", "1": "high", "2": "normal", "3": "low"}


def resolve_priority(value: str) -> str:
    """A priority name from its name or alias (``urgent``, ``medium``, ``0``-``3``); ValueError otherwise."""
    name = _PRIORITY_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if name not in PRIORITIES:
        raise ValueError(f"priority {value!r}: expected one of {', '.join(PRIORITIES)} (or urgent, medium, 0-3)")
    return name


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
BOOLEAN_FORM = "true/false, 1/0, yes/no or on/off (any case)"

DURATION_UNITS: Mapping[str, Decimal] = {"": Decimal(1), "s": Decimal(1), "ms": Decimal("0.001"), "m": Decimal(60),
                                         "h": Decimal(3600), "d": Decimal(86400)}
COUNT_UNITS: Mapping[str, Decimal] = {"": Decimal(1), "k": Decimal(10**3), "m": Decimal(10**6)}
SIZE_UNITS: Mapping[str, Decimal] = {
    "": Decimal(1), "b": Decimal(1),
    **{p: Decimal(1024**i) for i, p in enumerate("kmgt", 1)},
    **{p + "b": Decimal(1000**i) for i, p in enumerate("kmgt", 1)},
    **{p + "ib": Decimal(1024**i) for i, p in enumerate("kmgt", 1)},
}

_NUMBER = re.compile(r"(?P<number>[0-9]{1,30}(?:\.[0-9]{1,30})?|\.[0-9]{1,30}) ?(?P<unit>[a-z]{0,3})", re.ASCII)


def text(raw: Any) -> str:
    """The value as text without surrounding ASCII whitespace; NUL refused."""
    value = str(raw).strip(" \t\r\n\f\v")
    if "\0" in value:
        raise ValueError("text without NUL characters")
    return value


def word(raw: Any) -> str:
    """A keyword: ASCII, lower-cased."""
    value = text(raw)
    if not value.isascii():
        raise ValueError("ASCII letters and digits")
    return value.lower()


def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    value = word(raw) if isinstance(raw, (str, int)) else ""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(BOOLEAN_FORM)


def choice(kind: Any, booleans: tuple[str, str] | None = None) -> Callable[[Any], str]:
    """One of the words of the ``Literal`` type ``kind``; with ``booleans=(on, off)`` the boolean
    words map to those two too."""
    choices: tuple[str, ...] = get_args(kind)
    form = f"one of {', '.join(choices)}" + (f" (or {BOOLEAN_FORM})" if booleans else "")

    def parse(raw: Any) -> str:
        if booleans is not None and isinstance(raw, bool):
            return booleans[0] if raw else booleans[1]
        try:
            value = word(raw)
        except ValueError:
            raise ValueError(form) from None
        if booleans is not None and value in _TRUE | _FALSE:
            return booleans[0] if value in _TRUE else booleans[1]
        if value not in choices:
            raise ValueError(form)
        return value

    return parse


def _show(number: Decimal) -> str:
    return f"{number:f}".rstrip("0").rstrip(".") if "." in f"{number:f}" else f"{number:f}"


@dataclasses.dataclass(frozen=True)
class Number:
    """A number with an optional unit, in ``[low, high]``.

    ``none``: the spellings (besides empty) meaning "no limit", which give None; None of them
    if empty must be a number. ``auto``: what an empty value means when it is computed.
    """

    units: Mapping[str, Decimal]
    low: Decimal
    high: Decimal
    form: str
    whole: bool = False
    none: frozenset[str] | None = None
    auto: Callable[[], int] | None = None

    def range_text(self) -> str:
        return f"from {_show(self.low)} to {_show(self.high)}"

    def _problem(self) -> str:
        meaning = "the default" if self.auto is not None else "none"
        empty = ("; empty or " + "/".join(sorted(self.none - {""})) + f" for {meaning}") if self.none else ""
        return f"{self.form}, {self.range_text()}{empty}"

    def __call__(self, raw: Any) -> int | float | None:
        value = self._decimal(raw)
        if value is None:
            return None if self.auto is None else self.auto()
        if not self.low <= value <= self.high:
            raise ValueError(self._problem())
        if self.whole:
            if value != value.to_integral_value():
                raise ValueError(f"a whole number: {self._problem()}")
            return int(value)
        return float(value)

    def _decimal(self, raw: Any) -> Decimal | None:
        if isinstance(raw, bool):
            raise ValueError(self._problem())
        if raw is None and (self.none is not None or self.auto is not None):  # install(cache_ttl=None)
            return None
        if isinstance(raw, int):
            return Decimal(raw)
        if isinstance(raw, float):
            if raw != raw or raw in (float("inf"), float("-inf")):
                raise ValueError(self._problem())
            return Decimal(raw)
        value = text(raw)
        if not value and raw != "":  # only a truly empty value means "none": blank is a mistake
            raise ValueError(self._problem())
        if (self.none is not None or self.auto is not None) and value.lower() in (self.none or frozenset()) | {""}:
            return None
        match = _NUMBER.fullmatch(value.lower()) if value.isascii() else None
        if match is None or match.group("unit") not in self.units:
            raise ValueError(self._problem())
        return Decimal(match.group("number")) * self.units[match.group("unit")]


def hosts(raw: Any) -> frozenset[str]:
    items = [str(x) for x in raw] if isinstance(raw, (list, tuple, set, frozenset)) else text(raw or "").split(",")
    names = frozenset(word(h) for h in items if h.strip())
    if not all(_HOST.fullmatch(name) for name in names):
        raise ValueError("comma-separated host names or addresses (ASCII letters, digits, '.', '-', ':')")
    return names


_HOST = re.compile(r"[a-z0-9._:\-\[\]]+", re.ASCII)


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://", "redis+sentinel://", "rediss+sentinel://")
_REDIS_FORM = ("redis://host:port/db (credentials before an @), rediss://..., unix:///path/redis.sock, "
               "redis+cluster://host:port,host2:port2, redis+sentinel://host:port,host2:port2/service")


class StoreURL(str):
    """A store location, still the text the user wrote (it compares, prints and masks as that text);
    its class says which store it names."""

    __slots__ = ()


class Memory(StoreURL):
    """``memory``: this process only."""

    __slots__ = ()


class SQLiteFile(StoreURL):
    """``sqlite:///path``: a file shared by every process on the machine."""

    __slots__ = ()

    @property
    def path(self) -> str:
        return "/" + self[len("sqlite:///"):].lstrip("/")


class RedisURL(StoreURL):
    """A Redis, a Redis Cluster or a Sentinel-managed Redis, shared by every host. May hold a password."""

    __slots__ = ()


LimitStore: TypeAlias = Memory | SQLiteFile | RedisURL


def redis_url(raw: Any) -> RedisURL | None:
    value = text(raw or "")
    if not value:
        return None
    if value.startswith(_CLUSTER_SCHEMES):
        from .store.redis_url import parse_redis_url

        parse_redis_url(value)  # ValueError naming the form, never repeating the URL
        return RedisURL(value)
    if not value.startswith(_REDIS_SCHEMES):
        raise ValueError(f"{_REDIS_FORM}, or empty")
    try:
        parts = urlsplit(value)
        port_ok = parts.scheme == "unix" or parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    db = parts.path.strip("/") if port_ok and parts.scheme != "unix" else ""
    if (not port_ok or (parts.scheme == "unix" and not parts.path)
            or (parts.scheme != "unix" and not (parts.hostname and (not db or (db.isascii() and db.isdigit()))))):
        raise ValueError(f"{_REDIS_FORM} (a host, a port from 1 to 65535, a database number)")
    return RedisURL(value)


def store(raw: Any) -> LimitStore:
    value = text(raw)
    if value == "memory":
        return Memory(value)
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return SQLiteFile(value)
    if value.startswith(_REDIS_SCHEMES + _CLUSTER_SCHEMES):
        url = redis_url(value)
        if url is not None:
            return url
    raise ValueError(f"memory, sqlite:///path/to/limits.sqlite3, or {_REDIS_FORM}")


def path(raw: Any) -> str | None:
    """A file path (``~`` expanded), or None when empty. A URL is refused: it is a value meant for
    another setting (a Redis URL in ``LLMSHIM_CACHE_PATH``), and as a path it would be shown as is."""
    value = text(raw) if raw is not None else ""
    if "://" in value:
        raise ValueError("a file path, not a URL (a Redis cache is LLMSHIM_CACHE_URL), or empty")
    return os.path.expanduser(value) if value else None


# -- rate limits per model (LLMSHIM_LIMITS) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Limits:
    """A key's limits per minute (None: no limit on that dimension)."""

    rpm: float | None = None
    tpm: float | None = None


#: ASCII digits only (``\d`` would take other scripts' digits), no exponent: nan, inf and 1e400 cannot match.
_LIMIT_PART = re.compile(r"^\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*(k?)\s*(rpm|tpm)\s*$", re.IGNORECASE | re.ASCII)
MAX_RATE = 1e12  # per minute: far above any real limit, and finite


def parse_limits(spec: str) -> dict[str, Limits]:
    """``"gpt-4o=500rpm,30000tpm;llama3=60rpm"`` → {model: Limits}. Raises ValueError on bad input;
    every rate is finite and in (0, MAX_RATE] (leave a dimension out for no limit on it)."""
    form = "model=NUMBERrpm,NUMBERtpm;... such as gpt-4o=500rpm,30000tpm (rates > 0 and <= 10^12 per minute)"
    out: dict[str, Limits] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        model, sep, rest = item.partition("=")
        if not sep or not model.strip() or "\0" in model:
            raise ValueError(form)
        rpm = tpm = None
        for part in rest.split(","):
            match = _LIMIT_PART.match(part)
            if not match:
                raise ValueError(form)
            value = float(match.group(1)) * (1000 if match.group(2) else 1)
            if not 0 < value <= MAX_RATE:
                raise ValueError(form)
            if match.group(3).lower() == "rpm":
                rpm = value
            else:
                tpm = value
        out[model.strip()] = Limits(rpm, tpm)
    return out
