"""The names llmshim's telemetry promises: metric instruments, their buckets, llmshim's own span
attributes, and the content-capture switch. Each name is part of the contract with dashboards and
alerts; tests pin them. ``telemetry.py`` is what writes them."""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import metrics

__all__ = ["CONTENT_ENV", "DURATION_BUCKETS", "FIRST_CHUNK_BUCKETS", "LLMSHIM_ATTRIBUTES", "PER_CHUNK_BUCKETS",
           "TOKEN_BUCKETS", "Instruments", "content_capture_mode"]

CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

#: llmshim's own span attributes. The names are a contract: the cache, retry and rate-limit
#: policies record ``call.facts`` and telemetry writes them onto the span at its end.
LLMSHIM_ATTRIBUTES = {
    "llmshim.cache.hit": "bool: the answer came from llmshim's cache",
    "llmshim.cache.age_s": "float: age of the cached answer, seconds",
    "llmshim.cache.saved.input_tokens": "int: a hit's input tokens, not spent again (gen_ai.usage.* is absent)",
    "llmshim.cache.saved.output_tokens": "int: a hit's output tokens, not spent again",
    "llmshim.cache.saved.cost_usd": "float: a hit's price in US dollars, not paid again",
    "llmshim.cost.usd": "float: what the provider charged for this call, US dollars (genai-prices)",
    "llmshim.usage.estimator": "str: how llmshim counted tokens the provider did not report: tiktoken:<encoding> | "
                               "approximation (the cost and saved tokens are then estimates too)",
    "llmshim.usage.estimated.input_tokens": "int: llmshim's estimate of the prompt's tokens (no gen_ai.usage.*)",
    "llmshim.usage.estimated.output_tokens": "int: llmshim's estimate of the answer's tokens",
    "llmshim.cache.bypass": "str: why the cache stood aside (a test double or recorder answered)",
    "llmshim.retry.count": "int: wire attempts retried by llmshim for this call",
    "llmshim.ratelimit.wait_s": "float: time waited for rate-limit permits, seconds",
    "llmshim.priority": "str: the call's priority class",
    "llmshim.client.library": "str: the patched library that made the call",
    "llmshim.outcome": "str: ok | error | aborted",
}

# Explicit bucket boundaries from the GenAI metrics conventions.
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
FIRST_CHUNK_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
PER_CHUNK_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]


def content_capture_mode(environ: Mapping[str, str] | None = None) -> tuple[bool, bool]:
    """(on the span, as a span event) from OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT:
    ``true``/``SPAN_ONLY`` → span attributes, ``EVENT_ONLY`` → an event, ``SPAN_AND_EVENT`` → both;
    unset, ``false`` or ``NO_CONTENT`` → nothing (the default: prompts can be sensitive)."""
    value = (environ if environ is not None else os.environ).get(CONTENT_ENV, "").strip().upper()
    return value in ("TRUE", "1", "SPAN_ONLY", "SPAN_AND_EVENT"), value in ("EVENT_ONLY", "SPAN_AND_EVENT")


class Instruments:
    """The metric instruments, created once per meter provider. Names are part of the contract."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=FIRST_CHUNK_BUCKETS)
        self.per_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk", unit="s",
            description="Time between consecutive chunks of a streamed response.",
            explicit_bucket_boundaries_advisory=PER_CHUNK_BUCKETS)
        # llmshim's own, named now so that the cache, retry and rate-limit policies fill them in.
        self.cache_hits = meter.create_counter("llmshim.cache.hits", unit="{call}", description="Cache hits.")
        self.cache_misses = meter.create_counter("llmshim.cache.misses", unit="{call}", description="Cache misses.")
        self.tokens_saved = meter.create_counter(
            "llmshim.cache.tokens_saved", unit="{token}",
            description="Tokens a cache hit did not spend again (by gen_ai.token.type).")
        self.cost = meter.create_counter(
            "llmshim.cost", unit="USD", description="What LLM calls cost, from the provider's reported usage.")
        self.estimated_tokens = meter.create_counter(
            "llmshim.usage.estimated_tokens", unit="{token}",
            description="Tokens llmshim estimated for calls whose provider reported none (by gen_ai.token.type).")
        self.saved_cost = meter.create_counter(
            "llmshim.cache.saved_cost", unit="USD", description="What cache hits did not pay again.")
        self.cache_errors = meter.create_counter(
            "llmshim.cache.errors", unit="{error}", description="Cache store failures (the call went on).")
        self.retry_attempts = meter.create_counter(
            "llmshim.retry.attempts", unit="{attempt}", description="Retried wire attempts.")
        self.ratelimit_wait = meter.create_histogram(
            "llmshim.ratelimit.wait", unit="s", description="Time a call waited for rate-limit permits.",
            explicit_bucket_boundaries_advisory=FIRST_CHUNK_BUCKETS)
        self.telemetry_errors = meter.create_counter(
            "llmshim.telemetry.errors", unit="{error}",
            description="Failures of span processors or exporters, caught by llmshim.")
