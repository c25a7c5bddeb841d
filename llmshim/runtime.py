"""What the adapters do on every call, ``begin`` (their common first step), and ``build_pipeline``.

``STATE`` (``llmshim.state``: whether llmshim is active, its settings, its pipeline) is re-exported
here for the adapters. ``begin`` must never raise: llmshim fails open, so a bug in recognising a
request means the request passes through untouched, with a warning. Imported when the first
patched library is, never by ``install()`` alone: this module brings the calls, dialects and
policies with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .call import Call, WireRequest
from .config import Settings
from .context import in_call
from .dialects import detect
from .pipeline import Pipeline, Policy
from .policies.observer import ObserverPolicy
from .state import STATE, State
from .values import RedisURL, SQLiteFile

if TYPE_CHECKING:
    from .store.base import CacheStore, LimitStore

__all__ = ["STATE", "State", "begin", "build_pipeline", "control_headers"]

log = logging.getLogger("llmshim")


#: Policies every pipeline built from now on holds just inside the observer: the pytest plugin's
#: cassette for the length of a test, so an ``install()`` made by the code under test keeps it.
PINNED: list[Policy] = []


def build_pipeline(settings: Settings, tracer_provider: Any = None, meter_provider: Any = None) -> Pipeline:
    """The policy chain for these settings, outermost first: the observer wraps everything, so the
    span is current while hooks run and while every wire attempt is made, and it alone reports."""
    telemetry = None
    if settings.telemetry:
        from .policies.telemetry import Telemetry

        telemetry = Telemetry(tracer_provider, meter_provider)
    policies: list[Policy] = [ObserverPolicy(telemetry), *PINNED]
    if settings.cache != "off":
        from .policies.cache import CachePolicy
        from .store.cache_sqlite import SQLiteStore, default_path

        local = SQLiteStore(settings.cache_path or default_path(), max_entries=settings.cache_max_entries,
                            max_bytes=settings.cache_max_bytes)
        store: CacheStore = local
        if settings.cache_url:
            from .store.cache_redis import RedisCacheStore, TieredStore

            redis_store = RedisCacheStore(settings.cache_url, timeout=settings.redis_timeout)
            store = TieredStore(local, redis_store) if settings.cache_local else redis_store
        policies.append(CachePolicy(
            store, mode=settings.cache, ttl=settings.cache_ttl, shared=settings.cache_scope == "shared",
            ignored_headers=settings.cache_ignore_headers,
            nondeterministic=settings.cache_nondeterministic, coalesce_timeout=settings.cache_coalesce_timeout,
            max_entry_bytes=settings.cache_max_entry_bytes))
    if settings.retry_mode != "off":
        from .policies.retry import RetryPolicy

        policies.append(RetryPolicy(
            mode=settings.retry_mode, max_attempts=settings.retry_max_attempts, max_delay=settings.retry_max_delay))
    if settings.rpm or settings.tpm or settings.limits or settings.max_concurrency:
        from .policies.ratelimit import RateLimitPolicy

        shared: LimitStore | None = None
        store_url = settings.ratelimit_store
        if isinstance(store_url, SQLiteFile):
            from .store.limits_sqlite import SQLiteLimitStore

            shared = SQLiteLimitStore(store_url.path)
        elif isinstance(store_url, RedisURL):
            from .store.limits_redis import RedisLimitStore

            shared = RedisLimitStore(store_url, timeout=settings.redis_timeout)
        policies.append(RateLimitPolicy(shared=shared, max_concurrency=settings.max_concurrency,
                                        local_hosts=settings.local_hosts,
            rpm=settings.rpm, tpm=settings.tpm, per_model=settings.limits, burst=settings.ratelimit_burst,
            default_priority=settings.priority, queue_timeout=settings.queue_timeout,
            default_output_tokens=settings.token_reservation))
    return Pipeline(policies)


CONTROL_PREFIX = "x-llmshim-"
_PREFIX_LENGTH = len(CONTROL_PREFIX)


def control_headers(headers: Iterable[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """Pure: llmshim's per-call controls among request headers, as ({lower-case name: value},
    [names as spelled]). A quick scan of names: it runs for every request while llmshim is active."""
    controls: dict[str, str] = {}
    names: list[str] = []
    pairs = headers if isinstance(headers, (tuple, list)) else list(headers)
    if CONTROL_PREFIX not in "\0".join([name for name, _ in pairs]).lower():  # one C pass: the usual case
        return controls, names
    for name, value in pairs:
        if len(name) > _PREFIX_LENGTH and name[:_PREFIX_LENGTH].lower() == CONTROL_PREFIX:
            controls[name.lower()] = value
            names.append(name)
    return controls, names


def begin(library: str, to_wire: Callable[[], WireRequest | None],
          strip: Callable[[list[str]], None] | None = None,
          headers: Callable[[], Iterable[tuple[str, str]]] | None = None) -> Call | None:
    """A Call for this request if llmshim should handle it, else None (the caller passes through).

    ``x-llmshim-*`` request headers are llmshim's per-call controls, never the upstream's business:
    while llmshim is active they are removed from *every* request (through ``strip``; ``headers``
    lists the request's headers), LLM call or not, before anything else is decided, and kept on
    ``call.controls`` when the request becomes a call. Stripping a request that is not an LLM call
    costs one scan of its header names."""
    if not STATE.active:
        return None
    controls: dict[str, str] = {}
    if strip is not None and headers is not None:
        try:
            controls, names = control_headers(headers())
            if names:
                strip(names)
        except Exception:
            log.warning("llmshim: could not strip x-llmshim-* headers from a %s request", library, exc_info=True)
    if in_call.get():
        return None
    try:
        wire = to_wire()
        found = detect(wire) if wire is not None else None
        if found is None or wire is None:
            return None
    except Exception:
        log.warning("llmshim: could not read a %s request; passing it through", library, exc_info=True)
        return None
    dialect, info = found
    return Call(request=wire, info=info, library=library, dialect=dialect, controls=controls)
