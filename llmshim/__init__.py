"""llmshim: every LLM call in the process cached, rate-limited by priority, retried and traced.

    import llmshim
    llmshim.install()          # configuration from LLMSHIM_* environment variables

``install()`` patches the HTTP client libraries the LLM SDKs speak through (see
``llmshim.adapters.PATCHES``), before or after they are imported. Each recognised LLM request
then flows as one ``Call`` through the policy pipeline; anything else passes through untouched.

PYTEST_DONT_REWRITE: pytest marks every top-level package of a distribution that declares a
``pytest11`` plugin for assertion rewriting, and warns when one was imported before it started
(``llmshim run -- pytest``, a ``.pth``, a ``sitecustomize``); this marker in the docstring is how
pytest is told that this package has no assertions to rewrite, so that warning never stops a run
configured with ``filterwarnings = error``.

Importing the package and calling ``install()`` costs a process little (``llmshim run`` and a
``.pth`` do it in every Python process, most of which never make an LLM call): settings are parsed
and checked, import hooks set; the rest of llmshim is imported when a patched library is, and the
pipeline (cache file, limits, telemetry) is built on the first LLM call. The names below that live
elsewhere (``priority``, ``on``, ``__version__``...) are imported on first use (``__getattr__``).
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import TYPE_CHECKING, Any

from . import adapters, config
from .config import ConfigError, Settings
from .state import STATE

if TYPE_CHECKING:
    from ._version import __version__
    from .knobs import cache_control, priority
    from .pipeline import Pipeline
    from .policies.events import CallRecord, off, on

__all__ = [
    "CallRecord",
    "ConfigError",
    "Settings",
    "__version__",
    "cache_control",
    "install",
    "is_installed",
    "off",
    "on",
    "priority",
    "stats",
    "status",
    "uninstall",
]

_lock = threading.Lock()

#: Public names imported on first use, and the module each comes from.
_LAZY = {"__version__": "._version", "cache_control": ".knobs", "priority": ".knobs",
         "CallRecord": ".policies.events", "off": ".policies.events", "on": ".policies.events"}


def __getattr__(name: str) -> Any:
    """A lazy public name, or a submodule: ``llmshim.runtime`` works after ``import llmshim`` alone,
    as it did when the package imported everything."""
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("__"):  # probes such as __wrapped__: never a submodule
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{__name__}.{name}")  # the import sets it on the package
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later reads find the module attribute
    return value


def install(*, tracer_provider: Any = None, meter_provider: Any = None, **overrides: Any) -> Settings:
    """Patch the client libraries and start handling LLM calls. Idempotent and thread-safe.

    Settings come from ``LLMSHIM_*`` environment variables; keyword ``overrides`` (field names of
    :class:`Settings`) win. A malformed value raises :class:`ConfigError` here, never later. A
    second call applies the new settings in place: calls already in flight finish on the settings
    they started with, and the resources they hold close when the last of them ends, so install
    and uninstall are safe while other threads and tasks are mid-call. ``tracer_provider`` / ``meter_provider``:
    OpenTelemetry providers to use instead of the global ones. Returns the effective settings.
    """
    settings = config.load(**overrides)
    _apply(settings, tracer_provider, meter_provider)
    return settings


def _apply(settings: Settings, tracer_provider: Any, meter_provider: Any) -> None:
    """``install()`` once its settings are loaded (the pytest plugin puts a user's install back
    with it: the same settings and providers, a pipeline built anew)."""
    with _lock:
        if not settings.enabled:
            _uninstall_locked()
            STATE.settings = settings
            return
        if STATE.active and settings.libraries != STATE.settings.libraries:
            _uninstall_locked()  # a different set of libraries: re-patch from scratch
        STATE.swap(lambda: _build(settings, tracer_provider, meter_provider))  # built on first use
        _write_stats_to(settings.stats_file)
        STATE.settings, STATE.providers = settings, (tracer_provider, meter_provider)
        STATE.active = True
        adapters.apply_all()


def uninstall() -> None:
    """Stop handling calls at once, then restore every method llmshim still wraps outermost."""
    with _lock:
        _uninstall_locked()


def _uninstall_locked() -> None:
    STATE.active = False  # every wrapper is a pass-through from this instant
    adapters.remove_all()
    STATE.swap(None)  # calls in flight finish on the pipeline; its stores close when the last one ends


def _build(settings: Settings, tracer_provider: Any, meter_provider: Any) -> Pipeline:
    from .runtime import build_pipeline

    return build_pipeline(settings, tracer_provider, meter_provider)


def _write_stats_to(path: str | None) -> None:
    """Where ``stats()`` snapshots go (as calls end, and at exit). The counters come with the first
    call: only a file to write, or one to stop writing, imports them now."""
    if path is not None or "llmshim.policies.stats" in sys.modules:
        from .policies.stats import STATS

        STATS.write_to(path)


def is_installed() -> bool:
    return STATE.active


def stats(reset: bool = False) -> dict[str, Any]:
    """In-process counters since start (or the last reset): calls, outcomes, cache, throttling,
    retries, average latency, tokens in/out and saved, per provider/model."""
    from .policies.stats import STATS

    snapshot = STATS.snapshot()
    if reset:
        STATS.reset()
    return snapshot


def status() -> dict[str, Any]:
    """What is patched (library, version, attributes) and the active settings, secrets masked."""
    import importlib.metadata

    from ._version import __version__

    libraries: dict[str, Any] = {}
    applied = adapters.patched()
    for library in config.LIBRARIES:
        modules = {p.module for p in adapters.PATCHES if p.library == library}
        imported = any(name in sys.modules for name in modules)
        try:
            version: str | None = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = None
        libraries[library] = {
            "version": version,
            "imported": imported,
            "enabled": library in STATE.settings.libraries,
            "patched": [f"{p.module}.{p.owner}.{p.attribute}" for p in applied if p.library == library],
        }
    return {
        "installed": STATE.active,
        "version": __version__,
        "libraries": libraries,
        "settings": STATE.settings.masked(),
    }
