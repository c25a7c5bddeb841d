"""Settings: one frozen object built from ``LLMSHIM_*`` environment variables and ``install(**overrides)``.

Every setting is declared once in ``OPTIONS`` (name, environment variable, parser, default, meaning).
That table drives parsing, the error messages, ``status()`` and the README's variable list, so a
new capability adds one row and nothing else. Overrides passed to ``install()`` win over the
environment; both go through the same parser, so ``install(enabled="no")`` and
``LLMSHIM_ENABLED=no`` are judged alike. A malformed value raises :class:`ConfigError` naming the
variable, the bad value (scrubbed of credentials) and the accepted form, at ``install()`` time and
never later inside a call. Numbers are finite and inside a documented range (``llmshim.values``);
an ``LLMSHIM_*`` variable that is no setting is warned about, naming the nearest one.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from . import redact
from .values import (
    COUNT_UNITS,
    DURATION_UNITS,
    SIZE_UNITS,
    Number,
    boolean,
    choice,
    hosts,
    path,
    redis_url,
    store,
    text,
    word,
)

__all__ = ["LIBRARIES", "OPTIONS", "OTHER_VARIABLES", "ConfigError", "Option", "Settings", "load",
           "unknown_variables"]

log = logging.getLogger("llmshim")
redact.protect_logger()  # every llmshim log record is scrubbed of credentials from here on

#: Client libraries llmshim can patch, in the order they are reported.
LIBRARIES: tuple[str, ...] = ("httpx", "httpx2", "requests", "aiohttp")

#: ``LLMSHIM_*`` variables that are not settings but are read elsewhere (never warned about).
OTHER_VARIABLES = frozenset({"LLMSHIM_RUN_OTEL_EXPORTER"})  # llmshim run -> _boot/sitecustomize.py

DAY = 86400
_MAX_WAIT = Decimal(30 * DAY)  # the longest a call may be made to wait for anything


class ConfigError(ValueError):
    """A setting has a value llmshim cannot use; the message names the variable and the accepted form."""


_parse_bool = boolean


def _parse_libraries(raw: Any) -> frozenset[str]:
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


def _duration(low: str, high: Decimal, *, none: bool = False) -> Number:
    return Number(DURATION_UNITS, Decimal(low), high, "seconds, or a number with a unit: 250ms, 90s, 30m, 12h, 7d",
                  none=frozenset({"none", "never"}) if none else None)


def _count(low: int, high: int, *, none: bool = False, auto: Callable[[], int] | None = None) -> Number:
    return Number(COUNT_UNITS, Decimal(low), Decimal(high),
                  "a whole number such as 30000 or 30k (k = thousand, m = million)", whole=True,
                  none=frozenset({"none"}) if none else frozenset({"auto"}) if auto else None, auto=auto)


def _auto_workers() -> int:
    return min(32, (os.cpu_count() or 1) * 4 + 4)


_SIZE = Number(SIZE_UNITS, Decimal(1), Decimal(2**50),
               "bytes, or a size: 512M or 1G (M, G = MiB, GiB), 500MB (MB = 10^6 bytes), 2GiB", whole=True,
               none=frozenset({"none"}))
_ENTRY_SIZE = Number(SIZE_UNITS, Decimal(1024), Decimal(2**30),
                     "a size from 1K to 1G: 512K, 32M (K, M, G = KiB, MiB, GiB), 10MB", whole=True)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its field name, environment variable, parser, default and meaning.

    ``secret``: the value may carry credentials; it is shown only through
    :func:`llmshim.redact.scrub_setting_url` (userinfo and query values masked)."""

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
        "cache", "LLMSHIM_CACHE", choice("off", "on", "readonly", "refresh", "replay", booleans=("on", "off")), "on",
        "off, on, readonly, refresh or replay (true/1/yes mean on, false/0/no mean off)",
        "Response cache mode. readonly: serve hits, store nothing; refresh: never serve, store; replay: only "
        "serve from the cache, a miss answers 504 naming the request (deterministic offline tests).",
    ),
    Option(
        "cache_path", "LLMSHIM_CACHE_PATH", path, "", "a file path, or empty for the default",
        "The SQLite cache file. Default: $XDG_CACHE_HOME/llmshim/cache.sqlite3 (~/.cache/llmshim/...).",
    ),
    Option(
        "cache_url", "LLMSHIM_CACHE_URL", redis_url, "",
        "redis://host:port/db, rediss://..., unix:///path.sock, redis+cluster://..., redis+sentinel://..., or empty",
        "A Redis shared by every host for the cache (same keys and format). Empty: the SQLite file only.",
        secret=True,
    ),
    Option(
        "cache_local", "LLMSHIM_CACHE_LOCAL", _parse_bool, "false", "true/false",
        "With LLMSHIM_CACHE_URL: keep a local SQLite front (LLMSHIM_CACHE_PATH) for hits, Redis behind it.",
    ),
    Option(
        "cache_ttl", "LLMSHIM_CACHE_TTL", _duration("0.001", Decimal(3650 * DAY), none=True), "",
        "seconds or 250ms/90s/30m/12h/7d, from 1ms to 3650d; empty or none: no expiry",
        "How long an answer stays valid. Empty: until evicted.",
    ),
    Option(
        "cache_max_entries", "LLMSHIM_CACHE_MAX_ENTRIES", _count(1, 10**12, none=True), "",
        "a whole number from 1 to 10^12, or empty/none", "Evict least recently used answers beyond this many "
        "entries. Empty: no limit.",
    ),
    Option(
        "cache_max_bytes", "LLMSHIM_CACHE_MAX_BYTES", _SIZE, "1GiB",
        "a size such as 512M or 1G (binary: MiB, GiB), 500MB (decimal) or 2GiB, at most 1 PiB; or empty/none",
        "Evict least recently used answers beyond this total size. Empty: no limit.",
    ),
    Option(
        "cache_max_entry_bytes", "LLMSHIM_CACHE_MAX_ENTRY_BYTES", _ENTRY_SIZE, "32M",
        "a size from 1K to 1G: 512K, 32M (K, M, G = KiB, MiB, GiB), 10MB",
        "The largest answer the cache keeps. A bigger body is passed to the caller as it comes, never buffered "
        "beyond this size, and not cached.",
    ),
    Option(
        "cache_scope", "LLMSHIM_CACHE_SCOPE", choice("credential", "shared"), "credential",
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
        "cache_coalesce_timeout", "LLMSHIM_CACHE_COALESCE_TIMEOUT", _duration("0", Decimal(3600)), "30",
        "seconds or 90s/5m, from 0 to 1h",
        "How long an identical request waits for one already in flight in another thread or task (its answer "
        "then comes from the cache) before it goes upstream itself. 0: never wait.",
    ),
    Option(
        "cache_nondeterministic", "LLMSHIM_CACHE_NONDETERMINISTIC", choice("cache", "skip"),
        "cache", "cache or skip",
        "skip: leave calls with temperature > 0 (or unset) and no seed uncached. Embeddings are always cached.",
    ),
    Option(
        "retry_mode", "LLMSHIM_RETRY_MODE", choice("auto", "llmshim", "sdk", "off"), "auto",
        "auto, llmshim, sdk or off",
        "auto: llmshim retries, except requests from the OpenAI SDK's own retry loop (they carry "
        "x-stainless-retry-count), so attempts never multiply. llmshim: always. sdk/off: never.",
    ),
    Option(
        "retry_max_attempts", "LLMSHIM_RETRY_MAX_ATTEMPTS", _count(1, 100), "3",
        "a whole number from 1 to 100 (0 is refused: use LLMSHIM_RETRY_MODE=off for no retries)",
        "Total attempts per call, the first included.",
    ),
    Option(
        "retry_max_delay", "LLMSHIM_RETRY_MAX_DELAY", _duration("0", _MAX_WAIT), "20",
        "seconds or 90s/2m, from 0 to 30d", "Cap of one wait before a retry; a server asking for longer (retry-after) "
        "gets its 429/503 handed back to the caller at once. 0: retry at once, never wait for a server.",
    ),
    Option(
        "rpm", "LLMSHIM_RPM", _count(1, 10**12, none=True), "",
        "a whole number of requests per minute >= 1 (60, 3.5k), or empty/none",
        "Requests per minute for every (origin, credential, model) without a more specific limit. Empty: none.",
    ),
    Option(
        "tpm", "LLMSHIM_TPM", _count(1, 10**12, none=True), "",
        "a whole number of tokens per minute >= 1 (30000, 30k, 2m), or empty/none",
        "Tokens per minute, likewise (input estimated, output reserved, reconciled from the real usage).",
    ),
    Option(
        "limits", "LLMSHIM_LIMITS", lambda raw: _parse_limits(raw), "", "model=NUMBERrpm,NUMBERtpm;...",
        "Per-model limits, e.g. gpt-4o=500rpm,30000tpm;llama3.2=60rpm. They replace LLMSHIM_RPM/TPM for that model.",
    ),
    Option(
        "ratelimit_burst", "LLMSHIM_RATELIMIT_BURST", _duration("0", Decimal(DAY)), "10",
        "seconds, from 0 to 1d", "How many seconds' worth of the limit may go at once after a quiet spell; "
        "0: strict pacing (one request, or one call's tokens, at a time).",
    ),
    Option(
        "priority", "LLMSHIM_PRIORITY", lambda raw: _parse_priority(raw), "normal",
        "critical, high, normal or low (also urgent, medium, 0-3)",
        "The default priority class; `with llmshim.priority(...)` or an x-llmshim-priority header override it.",
    ),
    Option(
        "queue_timeout", "LLMSHIM_QUEUE_TIMEOUT", _duration("0", _MAX_WAIT), "60",
        "seconds or 90s/5m, from 0 to 30d", "How long a call may wait for a permit; then it gets a 429 "
        "(x-should-retry: false). 0: never wait.",
    ),
    Option(
        "max_concurrency", "LLMSHIM_MAX_CONCURRENCY", _count(1, 10**6, none=True), "",
        "a whole number from 1 to 10^6, or empty/none",
        "At most this many calls in flight to a local server (loopback or LLMSHIM_LOCAL_HOSTS); halved on each "
        "503, regrown by one per window of successes. Empty: no limit.",
    ),
    Option(
        "local_hosts", "LLMSHIM_LOCAL_HOSTS", hosts, "",
        "comma-separated host names", "Hosts treated as local servers besides loopback (e.g. gpu-box,ollama.lan).",
    ),
    Option(
        "ratelimit_store", "LLMSHIM_RATELIMIT_STORE", store, "memory",
        "memory, sqlite:///path/to/limits.sqlite3, or redis://host:port/db (or redis+cluster://, redis+sentinel://)",
        "Where the rate-limit budget lives: this process (memory), a SQLite file shared by every "
        "process on the machine, or a Redis shared by every host.",
        secret=True,
    ),
    Option(
        "token_reservation", "LLMSHIM_TOKEN_RESERVATION", _count(0, 10**8), "1024",
        "a whole number of tokens from 0 to 10^8 (0: reserve none)",
        "Output tokens reserved for a request that sets no max_tokens-style limit.",
    ),
    Option(
        "async_workers", "LLMSHIM_ASYNC_WORKERS", _count(1, 1024, auto=_auto_workers),
        "", "a number of threads from 1 to 1024, or empty/auto for 4 x CPUs + 4 (at most 32)",
        "Threads of llmshim.aio's shared pool (I/O-bound work: threads mostly wait on sockets).",
    ),
    Option(
        "async_queue_size", "LLMSHIM_ASYNC_QUEUE_SIZE", _count(0, 10**6), "100",
        "a whole number from 0 to 10^6 (0: no queue beyond the running calls)",
        "Calls that may wait for a thread; beyond it, callers wait asynchronously for a slot (back-pressure).",
    ),
    Option(
        "async_timeout", "LLMSHIM_ASYNC_TIMEOUT", _duration("0.001", _MAX_WAIT, none=True), "",
        "seconds, from 1ms to 30d, or empty/none for no timeout",
        "Per call: the awaiting task gets TimeoutError at once; the thread finishes in the background.",
    ),
    Option(
        "async_enabled", "LLMSHIM_ASYNC_ENABLED", _parse_bool, "true", "true/false",
        "false: llmshim.aio runs calls inline in the event loop's thread (for debugging).",
    ),
    Option(
        "stats_file", "LLMSHIM_STATS_FILE", path, "", "a file path, or empty",
        "Where to write a JSON snapshot of llmshim.stats() (at most once a second and at exit), "
        "for `llmshim stats`. Empty: no file.",
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def _parse_limits(raw: Any) -> dict[str, Any]:
    from .values import parse_limits

    return parse_limits(text(raw or ""))


def _parse_priority(raw: Any) -> str:
    from .policies.ratelimit import resolve_priority

    try:
        return resolve_priority(word(raw))
    except ValueError:
        raise ValueError("critical, high, normal or low (also urgent, medium, 0-3)") from None


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
    cache_max_entry_bytes: int = 32 * 2**20
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
    cache_coalesce_timeout: float = 30.0
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
        """The settings as plain values for display, credentials in secret options masked."""
        shown: dict[str, Any] = {}
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.secret and isinstance(value, str):
                value = redact.scrub_setting_url(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif option.name == "limits":
                value = {model: dataclasses.asdict(limit) for model, limit in value.items()}
            shown[option.name] = value
        return shown

    def __repr__(self) -> str:  # a printed or logged Settings never shows a password
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in self.masked().items())})"


def _shown(option: Option, raw: Any) -> str:
    """The rejected value as the error message shows it: scrubbed, and short."""
    try:
        value = raw if isinstance(raw, str) else repr(raw)
    except ValueError:  # an int too long to print
        return "(a number too long to show)"
    value = redact.scrub_setting_url(value) if option.secret else redact.scrub_text(value)
    return repr(value if len(value) <= 80 else value[:77] + "...")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``LLMSHIM_*`` variable (any case) that is no setting, naming the nearest one."""
    known = sorted({option.env for option in OPTIONS} | OTHER_VARIABLES)
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith("LLMSHIM_") or name in known:
            continue
        nearest = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"did you mean {nearest[0]}?" if nearest else "see the list of LLMSHIM_* settings in the README"
        warnings.append(f"llmshim: unknown variable {name} is ignored; {hint}")
    return warnings


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment, then apply ``overrides`` (keyword names are field names).

    Raises ConfigError for an unknown override name or any value its parser rejects; logs a warning
    (``llmshim`` logger) for each unknown ``LLMSHIM_*`` variable.
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
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise ConfigError(  # the value is shown scrubbed; the rest is llmshim's own text
                f"{source}: invalid value {_shown(option, raw)} for {option.env}; expected "
                f"{option.accepted if isinstance(option.parse, Number) else exc or option.accepted}"
            ) from None
    unknown = sorted(set(overrides) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"install() got unknown setting(s) {redact.scrub_text(', '.join(unknown))}; "
            f"known settings: {', '.join(_BY_NAME)}")
    for warning in unknown_variables(env):
        log.warning("%s", warning)
    return Settings(**values)
