"""``opentelemetry-instrument python app.py`` traces an unmodified app through llmshim.

Registered as the ``llmshim`` entry point of the ``opentelemetry_instrumentor`` group; the
auto-instrumentation agent calls ``instrument()`` after configuring the SDK from ``OTEL_*``
variables, passing its providers. ``LLMSHIM_*`` settings apply as usual.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

import llmshim

__all__ = ["LLMShimInstrumentor"]


class LLMShimInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # llmshim patches whichever client libraries are present, none is required

    def _instrument(self, **kwargs: Any) -> None:
        llmshim.install(tracer_provider=kwargs.get("tracer_provider"), meter_provider=kwargs.get("meter_provider"))

    def _uninstrument(self, **kwargs: Any) -> None:
        llmshim.uninstall()
