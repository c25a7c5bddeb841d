"""OpenTelemetry, following the GenAI semantic conventions: one CLIENT span and the client metrics
for every LLM call, whatever library made it and whatever dialect it speaks.

Flow. The observer (``observer.py``) calls ``begin`` as a call starts: the span starts as a child
of the caller's current context, with the attributes samplers look at (operation, provider, model,
server) set at start, and is current while the request is sent, so HTTP client spans of
OpenTelemetry's httpx/requests/aiohttp instrumentations nest under it. At the call's one end (the
last chunk of a stream, where usage, response model and finish reasons are known; or an early
close or garbage collection, marked ``llmshim.outcome=aborted``) the observer calls ``finish``:
the outcome and llmshim's own attributes (from ``call.facts``) go on the span, it ends, and the
metrics are recorded.

Cost. With no SDK providers configured (the API's proxies), nothing is made or recorded. Every
exporter or processor failure is caught: it becomes a warning and ``llmshim.telemetry.errors``,
never an exception in the caller's call.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import redact
from .._version import __version__
from ..call import Call
from ..clocks import monotonic
from .otel_names import (
    CONTENT_ENV,
    DURATION_BUCKETS,
    LLMSHIM_ATTRIBUTES,
    TOKEN_BUCKETS,
    Instruments,
    content_capture_mode,
)
from .span_attributes import (
    SpanKey,
    add_request_params,
    end_attributes,
    fact_attributes,
    is_genai_span_for,
    metric_attribute_sets,
    record_exception,
    span_key,
    span_start,
)

__all__ = ["CONTENT_ENV", "DURATION_BUCKETS", "LLMSHIM_ATTRIBUTES", "MEMO_LIMIT", "TOKEN_BUCKETS", "Instruments",
           "Telemetry", "content_capture_mode"]

log = logging.getLogger("llmshim")

#: Most entries each memo of attribute sets keeps. A process calls a few models on a few servers;
#: a stream of ever-new model names empties a full memo (a rebuild per call) instead of growing it.
MEMO_LIMIT = 256

_Key = TypeVar("_Key", bound=tuple[Any, ...])
_Value = TypeVar("_Value")


def _memo(memo: dict[_Key, _Value], key: _Key, build: Callable[..., _Value]) -> _Value:
    """``build(*key)``, made once per key while the memo holds at most ``MEMO_LIMIT`` entries (a
    race between threads can overshoot it by one entry per thread, never more)."""
    value = memo.get(key)
    if value is None:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        value = memo[key] = build(*key)
    return value


class Begun(NamedTuple):
    """A call's span as begun: llmshim's own (``owned``, current while sending through ``token``;
    ``key`` what its attributes were made of), or a framework's GenAI span for the same call that
    llmshim only adds its attributes to."""

    span: trace.Span
    token: Any
    owned: bool
    key: SpanKey | None = None


class Telemetry:
    """Spans and metrics for the observer (``llmshim.policies.observer``): ``begin`` a span when a
    call starts, ``finish`` it when the call ends; every failure is caught here."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None) -> None:
        self._fixed_tracer_provider = tracer_provider
        self._fixed_meter_provider = meter_provider
        self._tracer: tuple[Any, trace.Tracer] | None = None
        self._instruments: tuple[Any, Instruments] | None = None
        self._resolved: tuple[Any, Any, tuple[trace.Tracer, Instruments] | None] = (None, None, None)
        # Memos: the span's name and start attributes per SpanKey; the metric points' attribute
        # sets per SpanKey's first five fields + (response model, error.type, cache hit).
        self._starts: dict[SpanKey, tuple[str, dict[str, Any]]] = {}
        self._metric_sets: dict[tuple[Any, ...], tuple[Mapping[str, Any], ...]] = {}
        self.capture_span, self.capture_event = content_capture_mode()

    # -- providers: resolved per call, so an SDK configured after install() is picked up ---------
    def _resolve(self) -> tuple[trace.Tracer, Instruments] | None:
        tracer_provider = self._fixed_tracer_provider or trace.get_tracer_provider()
        meter_provider = self._fixed_meter_provider or metrics.get_meter_provider()
        resolved = self._resolved
        if resolved[0] is tracer_provider and resolved[1] is meter_provider:
            return resolved[2]  # the providers of the call before: what they gave then
        found = self._resolve_for(tracer_provider, meter_provider)
        self._resolved = (tracer_provider, meter_provider, found)
        return found

    def _resolve_for(self, tracer_provider: Any, meter_provider: Any) -> tuple[trace.Tracer, Instruments] | None:
        if (isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
                and isinstance(meter_provider, (metrics.NoOpMeterProvider, _ProxyMeterProvider))):
            return None  # nothing configured: near-zero cost
        if self._tracer is None or self._tracer[0] is not tracer_provider:
            self._tracer = (tracer_provider, tracer_provider.get_tracer(
                "llmshim", __version__, schema_url="https://opentelemetry.io/schemas/1.37.0"))
        if self._instruments is None or self._instruments[0] is not meter_provider:
            self._instruments = (meter_provider, Instruments(meter_provider.get_meter("llmshim", __version__)))
        return self._tracer[1], self._instruments[1]

    @property
    def instruments(self) -> Instruments | None:
        resolved = self._resolve()
        return resolved[1] if resolved else None

    # -- the start -----------------------------------------------------------------------------
    def begin(self, call: Call) -> Begun | None:
        """Start the call's span and make it current (the caller detaches it once the reply's
        headers are back); None when no SDK is configured or starting failed.

        One span per LLM call: when the current span is already a GenAI span for this very call
        (a framework's own instrumentation: openllmetry, pydantic-ai, openinference, ...), llmshim
        starts none and adds its own attributes to that one when the call ends (``owned`` False)."""
        resolved = self._resolve()
        if resolved is None:
            return None
        tracer = resolved[0]
        try:
            info = call.info
            parent = otel_context.get_current()  # read once, handed on: the SDK would read it thrice more
            current = trace.get_current_span(parent)
            if is_genai_span_for(current, info.operation, info.model):
                call.started_at = monotonic()
                return Begun(current, None, False)
            key = span_key(call)
            name, start = _memo(self._starts, key, span_start)
            span = tracer.start_span(name, parent, SpanKind.CLIENT, add_request_params(dict(start), info.params))
            call.started_at = monotonic()  # durations and time to first chunk count from here
            if span.is_recording():
                call.capture_content = self.capture_span or self.capture_event
                if info.stream:
                    call.chunk_times = []
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        except Exception:
            self._failed("starting a span")
            return None
        return Begun(span, token, True, key)

    def detach(self, begun: Begun, call: Call) -> None:
        """The reply's headers are back: llmshim's span stops being current. A framework's span
        gets llmshim's attributes now, while it surely records (a framework may end its span as the
        stream ends, before llmshim hears of that end); the outcome follows at the end if it can."""
        if begun.token is not None:
            otel_context.detach(begun.token)
        if not begun.owned:
            self._enrich(begun.span, call)

    def _enrich(self, span: trace.Span, call: Call) -> None:
        try:
            if span.is_recording():
                span.set_attributes({**fact_attributes(call), "llmshim.client.library": call.library})
        except Exception:
            self._failed("enriching a span")

    def store_failed(self, kind: str, operation: str) -> None:
        if kind != "cache":
            return
        try:
            resolved = self._instruments
            if resolved is not None:
                resolved[1].cache_errors.add(1, {"llmshim.cache.operation": operation})
        except Exception:
            self._failed("recording metrics")

    # -- the end -------------------------------------------------------------------------------
    def finish(self, begun: Begun, call: Call) -> None:
        """Set the outcome on the span, end it, record the metrics. Never raises. On a framework's
        span: llmshim's own attributes only, and only llmshim's own metrics (the framework records
        the GenAI ones; recording them again would double every dashboard)."""
        span = begun.span
        if not begun.owned:
            try:
                if span.is_recording():
                    span.set_attributes({**fact_attributes(call), "llmshim.outcome": call.outcome or "error"})
            except Exception:
                self._failed("enriching a span")
            try:
                self._record_llmshim_metrics(call)
            except Exception:
                self._failed("recording metrics")
            return
        try:
            attributes = end_attributes(call)
            if span.is_recording():
                span.set_attributes(attributes)
                if self.capture_span or self.capture_event:
                    self._content(span, call)
                if "error.type" in attributes:  # the conventions: error.type set <=> status ERROR
                    if call.error is not None:  # a stream cut mid-way (aborted) is a failure too
                        record_exception(span, call.error)
                    description = (f"{type(call.error).__name__}: {redact.scrub_text(str(call.error))}"
                                   if call.error else attributes.get("error.type"))
                    span.set_status(Status(StatusCode.ERROR, str(description)))
            span.end()
        except Exception:
            self._failed("ending a span")
        try:
            self._record_metrics(call, attributes, begun.key or span_key(call))
        except Exception:
            self._failed("recording metrics")

    def _content(self, span: trace.Span, call: Call) -> None:
        content: dict[str, Any] = {"gen_ai.input.messages": json.dumps(call.info.input_messages, ensure_ascii=False)}
        response = call.response
        if response is not None and response.output is not None:
            output = [{"role": "assistant", "parts": [{"type": "text", "content": "".join(response.output)}],
                       "finish_reason": response.finish_reasons[0] if response.finish_reasons else None}]
            content["gen_ai.output.messages"] = json.dumps(output, ensure_ascii=False)
        if self.capture_span:
            span.set_attributes(content)
        if self.capture_event:
            span.add_event("gen_ai.client.inference.operation.details", content)

    def _record_metrics(self, call: Call, end: dict[str, Any], key: SpanKey) -> None:
        """The GenAI metrics, their attribute sets from the memo: the same read-only mappings for
        every call with the same attribute values (the SDK copies what it keeps)."""
        resolved = self._instruments
        if resolved is None:
            return
        instruments = resolved[1]
        info, facts = call.info, call.facts
        attributes, input_tokens, output_tokens = _memo(
            self._metric_sets,
            (*key[:5], end.get("gen_ai.response.model"), end.get("error.type"), bool(facts.cache_hit)),
            metric_attribute_sets)
        duration = call.duration
        if duration is not None:
            instruments.duration.record(duration, attributes)
        response = call.response
        if response is not None and not facts.cache_hit:  # tokens spent: the provider produced them
            usage = response.usage
            if usage.input_tokens is not None:
                instruments.tokens.record(usage.input_tokens, input_tokens)
            if usage.output_tokens is not None:
                instruments.tokens.record(usage.output_tokens, output_tokens)
        if info.stream and call.time_to_first_chunk is not None:
            instruments.first_chunk.record(call.time_to_first_chunk, attributes)
            times = call.chunk_times or []
            for earlier, later in itertools.pairwise(times):
                instruments.per_chunk.record(later - earlier, attributes)
        self._record_llmshim_metrics(call)

    def _record_llmshim_metrics(self, call: Call) -> None:
        resolved = self._instruments
        if resolved is None:
            return
        instruments, facts = resolved[1], call.facts
        provider = {"gen_ai.provider.name": call.info.provider}
        if facts.cache_hit is not None:
            (instruments.cache_hits if facts.cache_hit else instruments.cache_misses).add(1, provider)
        if facts.retries:
            instruments.retry_attempts.add(facts.retries, provider)
        if facts.ratelimit_wait_s is not None:
            instruments.ratelimit_wait.record(facts.ratelimit_wait_s, {"llmshim.priority": facts.priority or "normal"})
        for token_type, count in (("input", facts.saved_input_tokens), ("output", facts.saved_output_tokens)):
            if count:
                instruments.tokens_saved.add(count, {**provider, "gen_ai.token.type": token_type})
        estimated = call.response.estimated if call.response is not None and not facts.cache_hit else None
        if estimated is not None and facts.estimator is not None:
            for token_type, count in (("input", estimated.input_tokens), ("output", estimated.output_tokens)):
                if count:
                    instruments.estimated_tokens.add(count, {**provider, "gen_ai.token.type": token_type})
        if facts.cost_usd is not None or facts.saved_cost_usd is not None:
            priced: dict[str, Any] = {**provider, "gen_ai.request.model": call.info.model or "",
                      "llmshim.usage.estimated": facts.estimator is not None}
            if facts.cost_usd is not None:
                instruments.cost.add(facts.cost_usd, priced)
            if facts.saved_cost_usd is not None:
                instruments.saved_cost.add(facts.saved_cost_usd, priced)

    def _failed(self, what: str) -> None:
        log.warning("llmshim: OpenTelemetry failed while %s; the call is not affected", what, exc_info=True)
        try:
            resolved = self._instruments
            if resolved is not None:
                resolved[1].telemetry_errors.add(1, {"llmshim.telemetry.stage": what})
        except Exception:
            pass


try:  # the API's proxy meter provider: "no SDK configured" for metrics
    from opentelemetry.metrics._internal import _ProxyMeterProvider
except ImportError:  # pragma: no cover - older API layouts
    class _ProxyMeterProvider:  # type: ignore[no-redef]
        pass
