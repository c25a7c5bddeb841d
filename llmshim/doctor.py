"""``llmshim doctor``: what is installed, what is patched and why not, the effective settings, the
cache and rate-limit store health, the OpenTelemetry providers, and known conflicts.

Exit code: 0 healthy (warnings allowed), 1 something is broken (cache unreadable, store
unreachable), 2 a setting is invalid.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Mapping
from typing import TextIO

from . import config, doctor_checks, redact
from .values import RedisURL

__all__ = ["main"]

TESTED = {"openai": (1, 3), "httpx": (0, 0), "httpx2": (2, 2), "requests": (2, 2), "aiohttp": (3, 3)}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(out: TextIO) -> int:
    """Write the report to ``out``; the exit code. Called inside a program (``llmshim.doctor.main(sys.stdout)``)
    it also lists the client libraries that program has imported."""
    before = dict(sys.modules)
    broken = False

    def line(text: str = "") -> None:
        out.write(text + "\n")

    from ._version import __version__

    line(f"llmshim {__version__} on Python {sys.version.split()[0]}")
    try:
        settings = config.load()
    except config.ConfigError as exc:
        line(f"\nSETTINGS ERROR: {exc}")
        return 2

    line("\nclient libraries:")
    for name in ("openai", "ollama", *config.LIBRARIES):
        version = _version(name)
        if version is None:
            line(f"  {name:<9} not installed")
            continue
        note = ""
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else None
        tested = TESTED.get(name)
        if tested and major is not None and not tested[0] <= major <= tested[1]:
            note = f"  WARNING: outside the tested range ({tested[0]}.x-{tested[1]}.x)"
        if name == "aiohttp" and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (3, 12):
            note = "  WARNING: < 3.12 has no client middlewares; aiohttp calls will not be seen"
        line(f"  {name:<9} {version}{note}")

    import llmshim

    for module in ("httpx", "httpx2", "requests.adapters", "aiohttp.client"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    was_installed = llmshim.is_installed()
    llmshim.install()
    try:
        status = llmshim.status()
    finally:
        if not was_installed:
            llmshim.uninstall()
    line("\npatched (install() in this process):")
    for name, info in status["libraries"].items():
        if info["patched"]:
            line(f"  {name:<9} {', '.join(info['patched'])}")
        elif not info["enabled"]:
            line(f"  {name:<9} not patched: left out by LLMSHIM_LIBRARIES")
        elif info["version"] is None:
            line(f"  {name:<9} not patched: not installed")
        else:
            line(f"  {name:<9} not patched: import failed or unsupported version")

    line("\nsettings (secrets masked):")
    for key, value in settings.masked().items():
        if key == "cache_path" and value is None:
            from .store.cache_sqlite import default_path

            value = f"{default_path()}  (the default: LLMSHIM_CACHE_PATH is unset)"
        line(f"  {key:<24} {value}")

    line("\ncache:")
    if settings.cache == "off":
        line("  off")
    else:
        broken |= _check_cache(settings, line)

    line("\nrate-limit store:")
    broken |= _check_limits(settings, line)

    from opentelemetry import metrics, trace

    line("\nOpenTelemetry:")
    line(f"  tracer provider  {type(trace.get_tracer_provider()).__name__}"
         + ("  (no SDK configured: llmshim emits no spans)"
            if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider" else ""))
    line(f"  meter provider   {type(metrics.get_meter_provider()).__name__}")
    _report_libraries(line, before)
    line("\n" + ("BROKEN: see above" if broken else "ok"))
    return 1 if broken else 0


def _check_cache(settings: config.Settings, line: Callable[[str], None]) -> bool:
    import os

    from .store.cache_sqlite import SQLiteStore, default_path

    path = settings.cache_path or default_path()
    line(f"  mode {settings.cache}, file {path}" + ("" if settings.cache_path else "  (the default)"))
    if settings.cache_nondeterministic == "cache":
        line("  sampled calls (temperature > 0 or unset, no seed) are cached too: LLMSHIM_CACHE_NONDETERMINISTIC=skip "
             "leaves them out, LLMSHIM_CACHE=off turns the cache off")
    if settings.cache_url:
        line(f"  redis {redact.scrub_setting_url(settings.cache_url)}"
             + (" (behind a local SQLite front)" if settings.cache_local else ""))
        try:
            from .store.cache_redis import RedisCacheStore

            RedisCacheStore(settings.cache_url, timeout=max(1.0, settings.redis_timeout)).client.ping()
            line("  redis reachable")
        except Exception as exc:
            line(f"  BROKEN: redis unreachable: {_error(exc)}")
            return True
    if not settings.cache_url or settings.cache_local:  # the SQLite file is in use
        problem = doctor_checks.judge_cache_path(doctor_checks.probe_path(path),
                                                 needs_write=settings.cache not in ("readonly", "replay"))
        if problem is not None:
            line(f"  BROKEN: {problem}")
            return True
    if not os.path.exists(path):
        line("  not created yet (it will be on the first cached call)")
        return False
    try:
        store = SQLiteStore(path)
        try:
            stats = store.stats()
            check = store._conn().execute("PRAGMA quick_check").fetchone()[0]
        finally:
            store.close()
    except Exception as exc:
        line(f"  BROKEN: cannot read the cache: {type(exc).__name__}: {_error(exc)}")
        return True
    rate = "-" if stats["hit_rate"] is None else f"{stats['hit_rate']:.1%}"
    line(f"  {stats['entries']} entries, {stats['bytes']} bytes, hit rate {rate}, integrity {check}")
    return bool(check != "ok")


def _check_limits(settings: config.Settings, line: Callable[[str], None]) -> bool:
    store = settings.ratelimit_store
    limited = settings.rpm or settings.tpm or settings.limits or settings.max_concurrency
    line(f"  {redact.scrub_setting_url(store)}" + ("" if limited else "  (no limits configured: the limiter is off)"))
    if isinstance(store, RedisURL):  # every Redis form: one, Cluster, Sentinel
        try:
            from .store.limits_redis import RedisLimitStore

            RedisLimitStore(store, timeout=max(1.0, settings.redis_timeout)).client.ping()
            line("  redis reachable")
        except Exception as exc:
            line(f"  BROKEN: redis unreachable: {_error(exc)}")
            return True
    return False


def _report_libraries(line: Callable[[str], None], imported: Mapping[str, object]) -> None:
    """Client libraries llmshim cannot see, and other GenAI instrumentations (spans may double).

    ``imported``: the modules the process had before doctor imported anything itself (doctor's own
    imports of requests would otherwise always show urllib3)."""
    blind = doctor_checks.found(doctor_checks.BLIND_SPOTS, imported, doctor_checks.versions(doctor_checks.BLIND_SPOTS))
    line("\nclient libraries llmshim cannot see (their LLM calls are not cached, limited, retried or traced):")
    for library, how in blind:
        line(f"  {library.module:<13} {how}: {library.what}; {library.why}")
    if not blind:
        line("  none found")
    table = doctor_checks.INSTRUMENTATIONS
    others = doctor_checks.found(table, imported, doctor_checks.versions(table))
    active = doctor_checks.active_instrumentors()
    line("\nconflicts: other GenAI instrumentations")
    for library, how in others:
        state = "ACTIVE" if any(m.startswith(library.module) for m in active) else how
        line(f"  WARNING: {library.what} ({library.distribution}) {state}: {library.why}; with it on, the same "
             "calls get two GenAI spans and dashboards may count them twice")
    if not others:
        line("  none found")


def _error(exc: BaseException) -> str:
    """An exception's text as doctor prints it: a Redis error can quote the URL, password included."""
    return redact.scrub_text(str(exc))
