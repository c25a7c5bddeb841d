"""Every ``LLMSHIM_*`` setting, declared once: a field of :class:`Settings` made by :func:`setting`.

A declaration carries the parser, the default as a user would write it, the accepted form (for
error messages), the documentation (the README's "meaning", Markdown) and whether the value may hold
a credential. The rest is derived from the fields: the environment variable (``LLMSHIM_`` and the
field name in upper case), the ``OPTIONS`` table that :func:`llmshim.config.load` walks, ``masked()``
(and so ``status()``, ``doctor`` and ``repr``), and the README's table (``llmshim settings`` prints
it; a test keeps the README equal to it). A field's default is its declared default parsed, so
``Settings()`` and ``load({})`` cannot disagree. A new setting is one field here and its wiring.

The parsers are ``values.py``'s (shared) and ``setting_parsers.py``'s (particular to one setting:
the ranges and forms of durations and counts, the libraries, the priority class).
"""

# ruff: noqa: RUF009  (setting() returns a dataclasses.field: its default is built per instance)
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from . import redact
from .setting_parsers import (
    DAY,
    ENTRY_SIZE,
    LIBRARIES,
    MAX_WAIT,
    PRIORITY_FORM,
    SIZE,
    auto_workers,
    count,
    duration,
    optional,
    parse_ignored_headers,
    parse_libraries,
    parse_model_limits,
    parse_priority,
)
from .values import (
    BOOLEAN_FORM,
    CacheMode,
    CacheScope,
    LimitStore,
    Nondeterministic,
    OtelExporter,
    PriorityClass,
    RedisURL,
    RetryMode,
    boolean,
    choice,
    hosts,
    path,
    redis_url,
    store,
)

__all__ = ["LIBRARIES", "OPTIONS", "Option", "Settings", "markdown_table", "setting", "variable"]

# -- the declaration --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One setting as declared: ``name`` (the field) and ``env`` are filled in from the field.

    ``default`` is written as a user would write the variable; ``shown_default`` replaces it in the
    README where the text needs words. ``doc`` is the README's "meaning" (Markdown). ``secret``: the
    value may carry credentials; it is shown only through :func:`llmshim.redact.scrub_setting_url`.
    ``startup_only``: read as the interpreter starts (by ``llmshim run``), so ``install()`` refuses it."""

    parse: Callable[[Any], Any]
    default: str
    accepted: str
    doc: str
    secret: bool = False
    shown_default: str = ""
    startup_only: bool = False
    name: str = ""
    env: str = ""

    def readme_row(self) -> str:
        shown = self.shown_default or (f"`{self.default}`" if self.default else "empty")
        return f"| `{self.env}` | {shown} | {self.doc} |"


_OPTION = "llmshim.option"


def setting(parse: Callable[[Any], Any], default: str, accepted: str, doc: str, *, secret: bool = False,
            shown_default: str = "", startup_only: bool = False) -> Any:
    """A :class:`Settings` field declared with everything about it; its default is ``parse(default)``."""
    option = Option(parse, default, accepted, doc, secret, shown_default, startup_only)
    return dataclasses.field(default_factory=lambda: parse(default), metadata={_OPTION: option})


@dataclasses.dataclass(frozen=True, repr=False)  # its own __repr__ masks secrets
class Settings:
    """The effective configuration. Frozen: a new install() builds a new one and swaps it in whole."""

    enabled: bool = setting(boolean, "true", BOOLEAN_FORM,
                            "Master switch. `false` makes `install()` a no-op: nothing is patched.")
    libraries: frozenset[str] = setting(
        parse_libraries, "all", f"all, none, or a comma-separated subset of {', '.join(LIBRARIES)}",
        "Which client libraries to patch: `all`, `none`, or a comma-separated subset of "
        + ", ".join(f"`{name}`" for name in LIBRARIES) + ".")
    telemetry: bool = setting(boolean, "true", BOOLEAN_FORM,
                              "OpenTelemetry spans and metrics for every LLM call, through the application's "
                              "providers (or those passed to `install()`).")
    cache: CacheMode = setting(
        choice(CacheMode, booleans=("on", "off")), "on",
        "off, on, readonly, refresh or replay (true/1/yes mean on, false/0/no mean off)",
        "`off`, `on`, `readonly` (serve hits, store nothing), `refresh` (never serve, store), `replay` (only "
        "serve from the cache; a miss, or a cache that cannot be read, answers 504 naming it: never upstream). "
        "Booleans too: `true` = `on`, `false` = `off`.")
    cache_path: str | None = setting(
        path, "", "a file path, or empty for the default",
        "The SQLite cache file (0600; llmshim's own folder 0700, a folder you name left as it is). Empty: the "
        "default. A URL is refused (a Redis cache is `LLMSHIM_CACHE_URL`).",
        shown_default="`$XDG_CACHE_HOME/llmshim/cache.sqlite3`")
    cache_url: RedisURL | None = setting(
        redis_url, "",
        "redis://host:port/db, rediss://..., unix:///path.sock, redis+cluster://..., redis+sentinel://..., or empty",
        "A Redis for the cache, shared by every host: `redis://host:port/db`, `rediss://`, `unix://`, "
        "`redis+cluster://`, `redis+sentinel://` (see Redis above). Empty: the SQLite file only.", secret=True)
    cache_local: bool = setting(boolean, "false", BOOLEAN_FORM,
                                "With `LLMSHIM_CACHE_URL`: a local SQLite front (`LLMSHIM_CACHE_PATH`) for hits, "
                                "Redis behind it.")
    cache_ttl: float | None = setting(
        duration("0.001", Decimal(3650 * DAY), none=True), "",
        "seconds or 250ms/90s/30m/12h/7d, from 1ms to 3650d; empty or none: no expiry",
        "How long an answer stays valid: seconds or `250ms`, `90s`, `30m`, `12h`, `7d`; 1ms to 3650d. Empty, "
        "`none` or `never`: no expiry. `0` is refused.", shown_default="empty (no expiry)")
    cache_max_entries: int | None = setting(
        count(1, 10**12, none=True), "", "a whole number from 1 to 10^12, or empty/none",
        "Evict least recently used answers beyond this many (`100000`, `100k`); 1 to 10^12. Empty or `none`: no "
        "limit. `0` is refused.", shown_default="empty (no limit)")
    cache_max_bytes: int | None = setting(
        SIZE, "1GiB",
        "a size such as 512M or 1G (binary: MiB, GiB), 500MB (decimal) or 2GiB, at most 1 PiB; or empty/none",
        "Evict least recently used answers beyond this total size (`512M`, `500MB`, `2GiB`); 1 byte to 1 PiB. "
        "Empty or `none`: no limit. `0` is refused.")
    cache_max_entry_bytes: int = setting(
        ENTRY_SIZE, "32M", "a size from 1K to 1G: 512K, 32M (K, M, G = KiB, MiB, GiB), 10MB",
        "The largest answer kept (`512K`, `32M`, `10MB`); 1K to 1G. A bigger body reaches the caller as it comes, "
        "is never buffered beyond this size, and is not cached.")
    cache_scope: CacheScope = setting(
        choice(CacheScope), "credential", "credential or shared",
        "`credential`: answers shared only between callers with the same credentials (an HMAC of them is in the "
        "key). `shared`: one answer for everyone; other headers still count.")
    cache_ignore_headers: frozenset[str] = setting(
        parse_ignored_headers, "", "comma-separated header names (x-trace-* for a prefix) that are not credentials",
        "Request headers that never change the answer, left out of the key (comma-separated names, `x-trace-*` "
        "for a prefix), on top of the built-in noise list. A credential-like name is refused (`ConfigError`); no "
        "pattern can drop a credential from the scope.")
    cache_coalesce_timeout: float = setting(
        duration("0", Decimal(3600)), "30", "seconds or 90s/5m, from 0 to 1h",
        "How long an identical request waits for one already in flight in another thread or task before going "
        "upstream itself (seconds, `90s`, `5m`); 0 to 1h. `0`: never wait. A request never waits on one of its own "
        "thread or task.")
    cache_nondeterministic: Nondeterministic = setting(
        choice(Nondeterministic), "cache", "cache or skip",
        "`skip`: leave calls that sample without a seed (temperature > 0 or unset) uncached. Embeddings are always "
        "cached.")
    retry_mode: RetryMode = setting(
        choice(RetryMode), "auto", "auto, llmshim, sdk or off",
        "`auto` (retry, except the OpenAI SDK's own attempts), `llmshim` (always), `sdk` / `off` (never).")
    retry_max_attempts: int = setting(
        count(1, 100), "3", "a whole number from 1 to 100 (0 is refused: use LLMSHIM_RETRY_MODE=off for no retries)",
        "Total attempts per call, the first included; 1 to 100. `0` is refused: use `LLMSHIM_RETRY_MODE=off` for "
        "no retries.")
    retry_max_delay: float = setting(
        duration("0", MAX_WAIT), "20", "seconds or 90s/2m, from 0 to 30d",
        "Cap of one wait before a retry (seconds, `90s`, `2m`); 0 to 30d. A server that asks for longer "
        "(`retry-after`, `retry-after-ms`) gets its 429/503 handed back to the caller at once. `0`: retry at once, "
        "and hand back any 429/503 whose server asks for a delay.")
    rpm: int | None = setting(
        count(1, 10**12, none=True), "", "a whole number of requests per minute >= 1 (60, 3.5k), or empty/none",
        "Requests per minute per (origin, credential, model) without a more specific limit: a whole number from 1 "
        "(`60`, `3.5k`). Empty or `none`: no limit. `0` is refused.", shown_default="empty (no limit)")
    tpm: int | None = setting(
        count(1, 10**12, none=True), "", "a whole number of tokens per minute >= 1 (30000, 30k, 2m), or empty/none",
        "Tokens per minute, likewise (`30000`, `30k`, `2m`).", shown_default="empty (no limit)")
    limits: dict[str, Any] = setting(
        parse_model_limits, "", "model=NUMBERrpm,NUMBERtpm;...",
        "Per-model limits: `gpt-4o=500rpm,30000tpm;llama3.2=60rpm`, replacing `LLMSHIM_RPM` / `LLMSHIM_TPM` for "
        "that model. Each rate above 0 and at most 10^12 a minute; leave a dimension out for no limit on it.")
    ratelimit_burst: float = setting(
        duration("0", Decimal(DAY)), "10", "seconds, from 0 to 1d",
        "Seconds' worth of the limit that may go at once after a quiet spell; 0 to 1d. `0`: strict pacing (one "
        "request, or one call's tokens, at a time).")
    priority: PriorityClass = setting(
        parse_priority, "normal", PRIORITY_FORM,
        "Default priority class: `critical`, `high`, `normal`, `low` (also `urgent`, `medium`, `0`-`3`).")
    queue_timeout: float = setting(
        duration("0", MAX_WAIT), "60", "seconds or 90s/5m, from 0 to 30d",
        "How long a call may wait for a permit before it gets a 429 (seconds, `90s`, `5m`); 0 to 30d. `0`: never "
        "wait (with a shared `LLMSHIM_RATELIMIT_STORE`, a call still waits for the store's answer, at most 5 s).")
    max_concurrency: int | None = setting(
        count(1, 10**6, none=True), "", "a whole number from 1 to 10^6, or empty/none",
        "Calls in flight to a local server at most; halved on 503, regrown on success; 1 to 10^6. Empty or `none`: "
        "no limit. `0` is refused.", shown_default="empty (no limit)")
    local_hosts: frozenset[str] = setting(
        hosts, "", "comma-separated host names",
        "Host names treated as local servers besides loopback (`gpu-box,ollama.lan`).")
    ratelimit_store: LimitStore = setting(
        store, "memory",
        "memory, sqlite:///path/to/limits.sqlite3, or redis://host:port/db (or redis+cluster://, redis+sentinel://)",
        "`memory` (this process), `sqlite:///path` (an absolute path; every process on the machine) or a Redis "
        "URL, `redis://host:port/db`, `redis+cluster://`, `redis+sentinel://`... (every host).", secret=True)
    redis_timeout: float = setting(
        duration("0.001", Decimal(60)), "50ms", "seconds or 250ms/2s, from 1ms to 60s",
        "How long one Redis operation (connect, read or write, for the cache and the rate-limit store) may take "
        "before llmshim gives up on it and falls back locally (a cache miss, this process's share of the limit); "
        "1ms to 60s. Raise it for a Redis across a slow network or behind TLS. Asyncio programs read Redis on "
        "llmshim's own threads: a slow Redis delays the calls that read it, not the event loop.")
    token_reservation: int = setting(
        count(0, 10**8), "1024", "a whole number of tokens from 0 to 10^8 (0: reserve none)",
        "Output tokens reserved for a request that sets no `max_tokens`-style limit; 0 to 10^8. `0`: reserve none.")
    async_workers: int = setting(
        count(1, 1024, auto=auto_workers), "",
        "a number of threads from 1 to 1024, or empty/auto for 4 x CPUs + 4 (at most 32)",
        "Threads of `llmshim.aio`'s shared pool; 1 to 1024. Empty or `auto`: the default. `0` is refused.",
        shown_default="4 \u00d7 CPUs + 4, at most 32")
    async_queue_size: int = setting(
        count(0, 10**6), "100", "a whole number from 0 to 10^6 (0: no queue beyond the running calls)",
        "Calls that may wait for a thread; beyond it, callers wait asynchronously for a slot; 0 to 10^6. `0`: no "
        "queue beyond the running calls.")
    async_timeout: float | None = setting(
        duration("0.001", MAX_WAIT, none=True), "", "seconds, from 1ms to 30d, or empty/none for no timeout",
        "Per call, seconds: the awaiting task gets `TimeoutError` at once; 1ms to 30d. Empty or `none`: no "
        "timeout. `0` is refused.", shown_default="empty (none)")
    async_enabled: bool = setting(boolean, "true", BOOLEAN_FORM,
                                  "`false`: run `llmshim.aio` calls inline (debugging).")
    stats_file: str | None = setting(
        path, "", "a file path, or empty",
        "Where to write a JSON snapshot of `llmshim.stats()` (at most once a second and at exit) for "
        "`llmshim stats`; created 0600. Empty: no file.")
    run_otel_exporter: OtelExporter | None = setting(
        optional(choice(OtelExporter)), "", "console, otlp or empty",
        "Set by `llmshim run --otel-exporter`: each Python process of the program starts with a global tracer "
        "provider exporting spans to the console (`console`) or over OTLP/HTTP (`otlp`, configured by "
        "`OTEL_EXPORTER_OTLP_*`). Read as the interpreter starts, so `install()` refuses it. Empty: none.",
        startup_only=True)

    def masked(self) -> dict[str, Any]:
        """The settings as plain values for display; a secret setting's credentials are masked."""
        shown: dict[str, Any] = {}
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.secret and value is not None:
                value = redact.scrub_setting_url(str(value))
            elif isinstance(value, frozenset):
                value = sorted(value)
            elif option.name == "limits":
                value = {model: dataclasses.asdict(limit) for model, limit in value.items()}
            shown[option.name] = value
        return shown

    def __repr__(self) -> str:  # a printed or logged Settings never shows a password
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in self.masked().items())})"


def variable(name: str) -> str:
    """The environment variable of the setting ``name``: ``cache_ttl`` -> ``LLMSHIM_CACHE_TTL``."""
    return "LLMSHIM_" + name.upper()


#: Every setting, in declaration order (the README's order).
OPTIONS: tuple[Option, ...] = tuple(
    dataclasses.replace(field.metadata[_OPTION], name=field.name, env=variable(field.name))
    for field in dataclasses.fields(Settings))


def markdown_table() -> str:
    """The README's table of settings, generated from the declarations."""
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *(o.readme_row() for o in OPTIONS)])
