"""What goes on a GenAI span, as pure functions of the call: the attributes samplers see at the
start, the outcome and llmshim's own attributes at the end (from ``call.facts``), the GenAI metric
points' attribute sets, the scrubbed exception event, and whether a span someone else started is
already the GenAI span of this very call (then llmshim adds to it instead of starting a second one).

The span's name, its start attributes (but the request's parameters) and the metric attribute sets
are functions of a few plain values (``span_key``, plus the response model, error type and cache
hit for the metrics): telemetry memoises them, so most calls build none of them again."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from .. import redact
from ..call import Call
from ..facts import error_type

__all__ = ["SpanKey", "add_request_params", "end_attributes", "fact_attributes", "is_genai_span_for",
           "metric_attribute_sets", "record_exception", "span_key", "span_start"]


#: What a call's span name, start attributes and metric attribute sets are worked out from: the
#: same for every call to one model of one server through one library, so telemetry memoises them.
SpanKey = tuple[str, str, str, int | None, str | None, bool, str]


def span_key(call: Call) -> SpanKey:
    """(operation, provider, host, port, model, stream, library) of the call."""
    info = call.info
    host, port = call.request.server
    return info.operation, info.provider, host, port, info.model, info.stream, call.library


def span_start(operation: str, provider: str, host: str, port: int | None, model: str | None, stream: bool,
               library: str) -> tuple[str, dict[str, Any]]:
    """The span's name and the start attributes samplers see, but the request's parameters."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "server.address": host,
        "gen_ai.request.stream": stream,
        "llmshim.client.library": library,
    }
    if port is not None:
        attributes["server.port"] = port
    if model:
        attributes["gen_ai.request.model"] = model
    return (f"{operation} {model}" if model else operation), attributes


def add_request_params(attributes: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``gen_ai.request.<name>`` for each request parameter an attribute can hold (a scalar or a
    non-empty list of scalars)."""
    for name, value in params.items():
        if isinstance(value, (str, bool, int, float)) or (
                isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value)):
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


def metric_attribute_sets(operation: str, provider: str, host: str, port: int | None, model: str | None,
                          response_model: str | None, error: str | None, cache_hit: bool,
                          ) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """The GenAI metric points' attribute sets: (the call's, its input tokens', its output
    tokens'). Never to be changed: telemetry hands the same ones to every call with the same values
    (the SDK copies what it keeps). Plain dicts, not ``MappingProxyType``: the SDK's
    ``isinstance(attributes, Mapping)`` misses the ABC cache for a mapping proxy, every time."""
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                                  "server.address": host}
    if port is not None:
        attributes["server.port"] = port
    if model:
        attributes["gen_ai.request.model"] = model
    if response_model is not None:
        attributes["gen_ai.response.model"] = response_model
    if error is not None:
        attributes["error.type"] = error
    attributes["llmshim.cache.hit"] = cache_hit  # so a histogram can be split: hits vs paid calls
    return attributes, {**attributes, "gen_ai.token.type": "input"}, {**attributes, "gen_ai.token.type": "output"}


#: Operation names that are one model call (not an agent run or a tool execution span).
_CALL_OPERATIONS = frozenset({"chat", "text_completion", "embeddings", "generate_content", "completion"})


def is_genai_span_for(span: trace.Span, operation: str, model: str | None) -> bool:
    """Whether ``span`` (the current one as a call starts) is another instrumentation's GenAI span
    for this very call: recording, not llmshim's, marked as one model call by the GenAI conventions
    (``gen_ai.operation.name``, or the older ``gen_ai.system``) or OpenInference (``LLM``), and for
    the same model when both name one. A parent that wraps many calls (an agent run, a workflow)
    has another operation name and is left alone."""
    if not span.is_recording():  # first: the usual current span is none at all (INVALID_SPAN)
        return False
    attributes = getattr(span, "attributes", None)
    if not isinstance(attributes, Mapping):
        return False
    scope = getattr(span, "instrumentation_scope", None)
    if scope is not None and getattr(scope, "name", None) == "llmshim":
        return False
    named = attributes.get("gen_ai.operation.name")
    if named is not None:
        if named not in _CALL_OPERATIONS and named != operation:
            return False
    elif "gen_ai.system" not in attributes and attributes.get("openinference.span.kind") != "LLM":
        return False
    theirs = attributes.get("gen_ai.request.model", attributes.get("llm.model_name"))
    return theirs is None or model is None or theirs == model


#: llmshim's span attribute -> the ``Facts`` field it reports, written when the field is not None:
#: a new fact on the span is one line here.
_FACT_ATTRIBUTES = (
    ("llmshim.cache.hit", "cache_hit"),
    ("llmshim.cache.age_s", "cache_age_s"),
    ("llmshim.cache.saved.input_tokens", "saved_input_tokens"),
    ("llmshim.cache.saved.output_tokens", "saved_output_tokens"),
    ("llmshim.cost.usd", "cost_usd"),
    ("llmshim.cache.saved.cost_usd", "saved_cost_usd"),
    ("llmshim.usage.estimator", "estimator"),
    ("llmshim.ratelimit.wait_s", "ratelimit_wait_s"),
    ("llmshim.priority", "priority"),
)


def fact_attributes(call: Call) -> dict[str, Any]:
    """llmshim's own span attributes (``LLMSHIM_ATTRIBUTES``) from what the policies recorded."""
    facts = call.facts
    attributes: dict[str, Any] = {}
    if call.cache_bypass:
        attributes["llmshim.cache.bypass"] = call.cache_bypass
    for name, field in _FACT_ATTRIBUTES:  # getattr in a loop: faster than one attrgetter and a zip, measured
        value = getattr(facts, field)
        if value is not None:
            attributes[name] = value
    if facts.estimator is not None and call.response is not None and not facts.cache_hit:
        estimated = call.response.estimated
        if estimated is not None:
            attributes["llmshim.usage.estimated.input_tokens"] = estimated.input_tokens
            attributes["llmshim.usage.estimated.output_tokens"] = estimated.output_tokens
    if facts.retries:
        attributes["llmshim.retry.count"] = facts.retries
    return attributes


def record_exception(span: trace.Span, error: BaseException) -> None:
    """The spec's exception event, as the SDK's ``record_exception`` writes it, with the message and
    the stack trace scrubbed: an exception text can quote a URL with its key (``?key=...``)."""
    kind = type(error)
    module = kind.__module__
    span.add_event("exception", {
        "exception.type": kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}",
        "exception.message": redact.scrub_text(str(error)),
        "exception.stacktrace": redact.scrub_text("".join(traceback.format_exception(error))),
    })


def end_attributes(call: Call) -> dict[str, Any]:
    attributes: dict[str, Any] = {**fact_attributes(call), "llmshim.outcome": call.outcome or "error"}
    response = call.response
    if response is not None:
        if response.model:
            attributes["gen_ai.response.model"] = response.model
        if response.id:
            attributes["gen_ai.response.id"] = response.id
        if response.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(response.finish_reasons)
        if not call.facts.cache_hit:  # gen_ai.usage.* is what the provider produced for this call
            if response.usage.input_tokens is not None:
                attributes["gen_ai.usage.input_tokens"] = response.usage.input_tokens
            if response.usage.output_tokens is not None:
                attributes["gen_ai.usage.output_tokens"] = response.usage.output_tokens
    if call.status is not None:
        attributes["http.response.status_code"] = call.status
    if call.info.stream and call.time_to_first_chunk is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = call.time_to_first_chunk
    if call.outcome != "aborted" or call.error is not None:  # an abandoned body is not an error
        kind = error_type(call) or ("_OTHER" if call.outcome is None else None)  # None: a policy raised
        if kind is not None:
            attributes["error.type"] = kind
    return attributes
