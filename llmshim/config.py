"""Settings: one frozen object built from ``LLMSHIM_*`` environment variables and ``install(**overrides)``.

Every setting is declared once in ``OPTIONS`` (name, environment variable, parser, default, meaning).
That table drives parsing, the error messages, ``status()`` and the README's variable list, so a
new capability adds one row and nothing else. Overrides passed to ``install()`` win over the
environment; both go through the same parser, so ``install(enabled="no")`` and
``LLMSHIM_ENABLED=no`` are judged alike. A malformed value raises :class:`ConfigError` naming the
variable, the bad value and the accepted form, at ``install()`` time and never later inside a call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LIBRARIES", "OPTIONS", "ConfigError", "Option", "Settings", "load"]

#: Client libraries llmshim can patch, in the order they are reported.
LIBRARIES: tuple[str, ...] = ("httpx", "httpx2", "requests", "aiohttp")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting has a value llmshim cannot use; the message names the variable and the accepted form."""


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("one of 1/0, true/false, yes/no, on/off")


def _parse_libraries(raw: Any) -> frozenset[str]:
    items = [str(x) for x in raw] if isinstance(raw, (list, tuple, set, frozenset)) else str(raw).split(",")
    names = {item.strip().lower() for item in items if item.strip()}
    if names == {"all"}:
        return frozenset(LIBRARIES)
    if names == {"none"}:
        return frozenset()
    unknown = names - set(LIBRARIES)
    if unknown or not names:
        raise ValueError(f"'all', 'none' or a comma-separated list of {', '.join(LIBRARIES)}")
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its field name, environment variable, parser, default and meaning."""

    name: str
    env: str
    parse: Callable[[Any], Any]
    default: str
    accepted: str
    doc: str
    secret: bool = False


OPTIONS: tuple[Option, ...] = (
    Option(
        "enabled", "LLMSHIM_ENABLED", _parse_bool, "true", "true/false (also 1/0, yes/no, on/off)",
        "Master switch. `false` makes install() a no-op: nothing is patched.",
    ),
    Option(
        "libraries", "LLMSHIM_LIBRARIES", _parse_libraries, "all",
        f"all, none, or a comma-separated subset of {', '.join(LIBRARIES)}",
        "Which client libraries to patch. The OpenAI SDK 3.x rides on httpx2; openai<3 and ollama on httpx.",
    ),
    Option(
        "telemetry", "LLMSHIM_TELEMETRY", _parse_bool, "true", "true/false (also 1/0, yes/no, on/off)",
        "OpenTelemetry spans and metrics for every LLM call, through the application's providers.",
    ),
    Option(
        "cache", "LLMSHIM_CACHE", lambda raw: _choice("off", "on", "readonly", "refresh", "replay")(raw), "on",
        "off, on, readonly, refresh or replay",
        "Response cache mode. readonly: serve hits, store nothing; refresh: never serve, store; replay: only "
        "serve from the cache, a miss answers 504 naming the request (deterministic offline tests).",
    ),
    Option(
        "cache_path", "LLMSHIM_CACHE_PATH", lambda raw: _parse_path(raw), "", "a file path, or empty for the default",
        "The SQLite cache file. Default: $XDG_CACHE_HOME/llmshim/cache.sqlite3 (~/.cache/llmshim/...).",
    ),
    Option(
        "cache_url", "LLMSHIM_CACHE_URL", lambda raw: _parse_redis_url(raw), "",
        "redis://host:port/db, rediss://..., unix:///path.sock, redis+cluster://..., redis+sentinel://..., or empty",
        "A Redis shared by every host for the cache (same keys and format). Empty: the SQLite file only.",
    ),
    Option(
        "cache_local", "LLMSHIM_CACHE_LOCAL", _parse_bool, "false", "true/false",
        "With LLMSHIM_CACHE_URL: keep a local SQLite front (LLMSHIM_CACHE_PATH) for hits, Redis behind it.",
    ),
    Option(
        "cache_ttl", "LLMSHIM_CACHE_TTL", lambda raw: _parse_duration(raw), "",
        "seconds or 90s/30m/12h/7d; empty: none",
        "How long an answer stays valid. Empty: until evicted.",
    ),
    Option(
        "cache_max_entries", "LLMSHIM_CACHE_MAX_ENTRIES", lambda raw: _parse_count(raw), "", "a number or empty",
        "Evict least recently used answers beyond this many entries. Empty: no limit.",
    ),
    Option(
        "cache_max_bytes", "LLMSHIM_CACHE_MAX_BYTES", lambda raw: _parse_count(raw, sizes=True), "1GiB",
        "a size such as 500MB or 2GiB, or empty",
        "Evict least recently used answers beyond this total size. Empty: no limit.",
    ),
    Option(
        "cache_scope", "LLMSHIM_CACHE_SCOPE", lambda raw: _choice("credential", "shared")(raw), "credential",
        "credential or shared",
        "credential: answers are shared only between callers with the same API key (an HMAC of it is in the "
        "key, never the key). shared: one answer for everyone (opt in knowingly).",
    ),
    Option(
        "cache_ignore_headers", "LLMSHIM_CACHE_IGNORE_HEADERS",
        lambda raw: __import__("llmshim.store.keys", fromlist=["keys"]).parse_ignored_headers(raw), "",
        "comma-separated header names (x-trace-* for a prefix) that are not credentials",
        "Request headers that never change the answer, besides the built-in noise list: they stay out of the "
        "cache key. Every other header is part of it; credential-like names (key/token/secret/auth/cookie/"
        "session...) are refused.",
    ),
    Option(
        "cache_nondeterministic", "LLMSHIM_CACHE_NONDETERMINISTIC", lambda raw: _choice("cache", "skip")(raw),
        "cache", "cache or skip",
        "skip: leave calls with temperature > 0 (or unset) and no seed uncached. Embeddings are always cached.",
    ),
    Option(
        "retry_mode", "LLMSHIM_RETRY_MODE", lambda raw: _choice("auto", "llmshim", "sdk", "off")(raw), "auto",
        "auto, llmshim, sdk or off",
        "auto: llmshim retries, except requests from the OpenAI SDK's own retry loop (they carry "
        "x-stainless-retry-count), so attempts never multiply. llmshim: always. sdk/off: never.",
    ),
    Option(
        "retry_max_attempts", "LLMSHIM_RETRY_MAX_ATTEMPTS", lambda raw: _parse_count(raw) or 1, "3",
        "a whole number >= 1", "Total attempts per call, the first included.",
    ),
    Option(
        "retry_max_delay", "LLMSHIM_RETRY_MAX_DELAY", lambda raw: _parse_duration(raw) or 20.0, "20",
        "seconds or 90s/2m", "Cap of one backoff (a server's retry-after is honoured as a floor even above it).",
    ),
    Option(
        "rpm", "LLMSHIM_RPM", lambda raw: _parse_count(raw), "", "a number of requests per minute, or empty",
        "Requests per minute for every (origin, credential, model) without a more specific limit. Empty: none.",
    ),
    Option(
        "tpm", "LLMSHIM_TPM", lambda raw: _parse_count(raw), "", "a number of tokens per minute (30000, 30k)",
        "Tokens per minute, likewise (input estimated, output reserved, reconciled from the real usage).",
    ),
    Option(
        "limits", "LLMSHIM_LIMITS", lambda raw: _parse_limits(raw), "", "model=NUMBERrpm,NUMBERtpm;...",
        "Per-model limits, e.g. gpt-4o=500rpm,30000tpm;llama3.2=60rpm. They replace LLMSHIM_RPM/TPM for that model.",
    ),
    Option(
        "ratelimit_burst", "LLMSHIM_RATELIMIT_BURST", lambda raw: _parse_duration(raw) or 10.0, "10",
        "seconds", "How many seconds' worth of the limit may go at once after a quiet spell.",
    ),
    Option(
        "priority", "LLMSHIM_PRIORITY", lambda raw: _parse_priority(raw), "normal",
        "critical, high, normal or low (also urgent, medium, 0-3)",
        "The default priority class; `with llmshim.priority(...)` or an x-llmshim-priority header override it.",
    ),
    Option(
        "queue_timeout", "LLMSHIM_QUEUE_TIMEOUT", lambda raw: _parse_duration(raw) or 60.0, "60",
        "seconds or 90s/5m", "How long a call may wait for a permit; then it gets a 429 (x-should-retry: false).",
    ),
    Option(
        "max_concurrency", "LLMSHIM_MAX_CONCURRENCY", lambda raw: _parse_count(raw), "", "a number, or empty",
        "At most this many calls in flight to a local server (loopback or LLMSHIM_LOCAL_HOSTS); halved on each "
        "503, regrown by one per window of successes. Empty: no limit.",
    ),
    Option(
        "local_hosts", "LLMSHIM_LOCAL_HOSTS", lambda raw: frozenset(h.strip().lower() for h in str(raw or "").split(",")
                                                                   if h.strip()), "",
        "comma-separated host names", "Hosts treated as local servers besides loopback (e.g. gpu-box,ollama.lan).",
    ),
    Option(
        "ratelimit_store", "LLMSHIM_RATELIMIT_STORE", lambda raw: _parse_store(raw), "memory",
        "memory, sqlite:///path/to/limits.sqlite3, or redis://host:port/db (or redis+cluster://, redis+sentinel://)",
        "Where the rate-limit budget lives: this process (memory), a SQLite file shared by every "
        "process on the machine, or a Redis shared by every host.",
    ),
    Option(
        "token_reservation", "LLMSHIM_TOKEN_RESERVATION", lambda raw: _parse_count(raw) or 1024, "1024",
        "a number of tokens", "Output tokens reserved for a request that sets no max_tokens-style limit.",
    ),
    Option(
        "async_workers", "LLMSHIM_ASYNC_WORKERS",
        lambda raw: _parse_count(raw) or min(32, (os.cpu_count() or 1) * 4 + 4),
        "", "a number of threads, or empty for 4 x CPUs + 4 (at most 32)",
        "Threads of llmshim.aio's shared pool (I/O-bound work: threads mostly wait on sockets).",
    ),
    Option(
        "async_queue_size", "LLMSHIM_ASYNC_QUEUE_SIZE", lambda raw: _parse_count(raw) or 0, "100",
        "a number (0: no queue beyond the running calls)",
        "Calls that may wait for a thread; beyond it, callers wait asynchronously for a slot (back-pressure).",
    ),
    Option(
        "async_timeout", "LLMSHIM_ASYNC_TIMEOUT", lambda raw: _parse_duration(raw), "", "seconds, or empty for none",
        "Per call: the awaiting task gets TimeoutError at once; the thread finishes in the background.",
    ),
    Option(
        "async_enabled", "LLMSHIM_ASYNC_ENABLED", _parse_bool, "true", "true/false",
        "false: llmshim.aio runs calls inline in the event loop's thread (for debugging).",
    ),
    Option(
        "stats_file", "LLMSHIM_STATS_FILE", lambda raw: _parse_path(raw), "", "a file path, or empty",
        "Where to write a JSON snapshot of llmshim.stats() (at most once a second and at exit), "
        "for `llmshim stats`. Empty: no file.",
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return text

    return parse


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_duration(raw: Any) -> float | None:
    """Seconds, with an optional unit (s, m, h, d); empty, 0 or 'none' mean no limit."""
    text = str(raw).strip().lower() if raw is not None else ""
    if text in ("", "0", "none", "never"):
        return None
    unit = text[-1] if text[-1] in "smhd" else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _DURATION_UNITS[unit]
    except ValueError:
        raise ValueError("seconds, optionally with a unit: 3600, 90s, 30m, 12h, 7d; or empty for none") from None
    if value <= 0:
        raise ValueError("a positive duration: 3600, 90s, 30m, 12h, 7d; or empty for none")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_count(raw: Any, sizes: bool = False) -> int | None:
    text = str(raw).strip().lower().replace(" ", "") if raw is not None else ""
    if text in ("", "0", "none"):
        return None
    number = text.rstrip("kmgib")
    unit = text[len(number):]
    try:
        value = int(float(number) * (_SIZE_UNITS[unit] if sizes else {"": 1, "k": 10**3, "m": 10**6}[unit]))
    except (ValueError, KeyError):
        raise ValueError("a size such as 500MB, 2GiB or 1000000; or empty for none" if sizes
                         else "a whole number such as 100000 or 100k; or empty for none") from None
    if value <= 0:
        raise ValueError("a positive number, or empty for none")
    return value


def _parse_limits(raw: Any) -> dict[str, Any]:
    from .policies.ratelimit import parse_limits

    return parse_limits(str(raw or ""))


def _parse_priority(raw: Any) -> str:
    from .policies.ratelimit import resolve_priority

    try:
        return resolve_priority(str(raw))
    except ValueError:
        raise ValueError("critical, high, normal or low (also urgent, medium, 0-3)") from None


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://",
                  "redis+sentinel://", "rediss+sentinel://")


def _parse_store(raw: Any) -> str:
    from .store.redis_client import parse_redis_url

    text = str(raw).strip()
    if text == "memory" or (text.startswith("sqlite:///") and len(text) > len("sqlite:///")):
        return text
    if text.startswith(_REDIS_SCHEMES) and len(text) > len("unix://"):
        parse_redis_url(text)  # ValueError (never repeating the URL) for a malformed Cluster/Sentinel URL
        return text
    raise ValueError("memory, sqlite:///path/to/limits.sqlite3, or redis://host:port/db (rediss://, unix://, "
                     "redis+cluster://host:port,..., redis+sentinel://host:port,.../service)")


def _parse_redis_url(raw: Any) -> str | None:
    from .store.redis_client import parse_redis_url

    text = str(raw or "").strip()
    if not text:
        return None
    if text.startswith(_REDIS_SCHEMES):
        parse_redis_url(text)
        return text
    raise ValueError("redis://host:port/db, rediss://..., unix:///path/redis.sock, redis+cluster://host:port,..., "
                     "redis+sentinel://host:port,.../service, or empty")


def _parse_path(raw: Any) -> str | None:
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None
    if "\0" in text:
        raise ValueError("a file path")
    return os.path.expanduser(text)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective configuration. Frozen: a new install() builds a new one and swaps it in whole."""

    enabled: bool = True
    libraries: frozenset[str] = frozenset(LIBRARIES)
    telemetry: bool = True
    cache: str = "on"
    cache_path: str | None = None
    cache_url: str | None = None
    cache_local: bool = False
    cache_ttl: float | None = None
    cache_max_entries: int | None = None
    cache_max_bytes: int | None = 2**30
    cache_scope: str = "credential"
    cache_ignore_headers: frozenset[str] = frozenset()
    cache_nondeterministic: str = "cache"
    retry_mode: str = "auto"
    retry_max_attempts: int = 3
    retry_max_delay: float = 20.0
    rpm: int | None = None
    tpm: int | None = None
    limits: Any = dataclasses.field(default_factory=dict)
    ratelimit_burst: float = 10.0
    priority: str = "normal"
    queue_timeout: float = 60.0
    token_reservation: int = 1024
    ratelimit_store: str = "memory"
    max_concurrency: int | None = None
    local_hosts: frozenset[str] = frozenset()
    async_workers: int = 8
    async_queue_size: int = 100
    async_timeout: float | None = None
    async_enabled: bool = True
    stats_file: str | None = None

    def masked(self) -> dict[str, Any]:
        """The settings as plain values for display, secrets replaced by ``***``."""
        shown: dict[str, Any] = {}
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.secret and value:
                value = "***"
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif option.name == "limits":
                value = {model: dataclasses.asdict(limit) for model, limit in value.items()}
            shown[option.name] = value
        return shown


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment, then apply ``overrides`` (keyword names are field names).

    Raises ConfigError for an unknown override name or any value its parser rejects.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in overrides:
            raw, source = overrides[option.name], f"install({option.name}=...)"
        elif option.env in env:
            raw, source = env[option.env], option.env
        else:
            raw, source = option.default, f"default of {option.env}"
        try:
            values[option.name] = option.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{source}: invalid value {raw!r} for {option.env}; expected {exc or option.accepted}"
            ) from None
    unknown = sorted(set(overrides) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"install() got unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(_BY_NAME)}"
        )
    return Settings(**values)
