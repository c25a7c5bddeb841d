"""Process-wide state every adapter consults on every call: whether llmshim is active, its
settings, and the pipeline calls run on.

``STATE.active`` is read first by every wrapper: uninstall flips it, and at that instant every
patched method becomes a pass-through, even where another library wrapped ours and we cannot
unwrap.

Light on purpose. ``install()`` runs as every Python process starts under ``llmshim run`` or a
``.pth``, most of which never make an LLM call, so this module imports only the settings: the
pipeline, its policies and what they hold (SQLite, OpenTelemetry, asyncio...) are imported and
built the first time something needs the pipeline, a call or a tool reading ``STATE.pipeline``.
``install()`` builds at once only when it replaces a pipeline already built, so that a call racing
the swap still finds the successor (``Pipeline.retire``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .settings import Settings

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["STATE", "State"]

log = logging.getLogger("llmshim")

Build = Callable[[], "Pipeline"]


class State:
    __slots__ = ("_build", "_lock", "_pipeline", "active", "providers", "settings")

    def __init__(self) -> None:
        self.active = False
        self.settings = Settings()
        self.providers: tuple[Any, Any] = (None, None)  # the tracer and meter providers install() was given
        self._pipeline: Pipeline | None = None  # None: not built yet
        self._build: Build | None = None  # how to build it, staged by install()
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline calls run on. The first read builds the one ``install()`` staged; threads
        reading it at once wait for that one build and all get the same pipeline."""
        pipeline = self._pipeline
        return pipeline if pipeline is not None else self._first_use()

    def _first_use(self) -> Pipeline:
        from .pipeline import Pipeline

        with self._lock:
            if self._pipeline is None:
                if self._build is None:  # not installed: no policies, and nothing kept
                    return Pipeline()
                self._pipeline = _fail_open(self._build)
                self._build = None  # after the build: a fork during it leaves the child its own to do
            return self._pipeline

    def swap(self, build: Build | None) -> None:
        """``install()`` (``build``: the pipeline of its settings) or ``uninstall()`` (None).

        Nothing built yet: the build is only staged. Otherwise the successor is built now, before
        anything changes (an error leaves the state as it was), and the pipeline in place retires
        with it: calls in flight finish on it, a call racing the swap runs on the successor."""
        with self._lock:
            previous = self._pipeline
            if previous is None:
                self._build = build
                return
            successor = build() if build is not None else None
            self._pipeline, self._build = successor, None
        previous.retire(successor)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a fork while another thread was building: not held here


def _fail_open(build: Build) -> Pipeline:
    """The staged pipeline, built inside the first call that needs it: a failure there is a warning
    and a pipeline without policies (calls go through untouched), never the caller's error."""
    from .pipeline import Pipeline

    try:
        return build()
    except Exception:
        log.warning("llmshim: could not set up the cache, limits or telemetry; calls go through without them",
                    exc_info=True)
        return Pipeline()


STATE = State()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=STATE._after_fork)
