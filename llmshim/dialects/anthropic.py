"""Anthropic's Messages API: ``POST .../v1/messages`` and ``.../v1/messages/count_tokens``.

A request is recognised by its route and shape: a string ``model`` and ``messages`` (a list of role
objects); ``"stream": true`` streams. Anthropic's own SDK, and the gateways that speak its wire
(OpenRouter, LiteLLM, Ollama's Anthropic routes), all end the path so, whatever prefix they put
before it; OpenAI's ``/v1/threads/{id}/messages`` does not.

``count_tokens`` is recognised too, but it is not a generation: the model does not run, the answer
is the prompt's size. ``generates`` says so, and the pipeline then neither caches it nor counts it
against the generation rate limits (Anthropic limits it apart); its ``input_tokens`` are not usage
either (nothing was spent), so none is reported.

A whole answer is one ``message`` object; a stream is SSE of typed events: ``message_start`` (id,
model, the usage so far), ``content_block_start`` / ``_delta`` / ``_stop`` (text, tool use, thinking),
``message_delta`` (the stop reason and cumulative usage), ``message_stop`` (the end), ``ping``, and
``error`` (a failure after the 200: overloaded, ...). Usage counts follow the SDK's accumulation: a
later usage object's field replaces an earlier one's, a null or absent field keeps it.

Usage is mapped as OpenTelemetry's own Anthropic instrumentation maps it: ``input_tokens`` is the
whole prompt, Anthropic's uncached ``input_tokens`` plus ``cache_creation_input_tokens`` plus
``cache_read_input_tokens`` (OpenAI's convention, which ``llmshim.cost`` prices), and
``cached_input_tokens`` is the cache read. Stop reasons are normalised the same way
(``end_turn`` / ``stop_sequence`` -> ``stop``, ``max_tokens`` -> ``length``, ``tool_use`` ->
``tool_calls``; others, ``pause_turn`` or ``refusal``, as sent).

The server states its limits in ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
{limit,remaining,reset}`` headers, the reset as an RFC 3339 time. Its 529 ``overloaded_error`` is
retried as any 52x is; a 429 carries ``retry-after``, which the limiter already reads. A 429 whose
``error.details.error_code`` is a spend limit (``contract_spend_limit_reached``,
``enforced_spend_limit_reached``: the anthropic SDK's error table names them) is an exhausted
quota: waiting cannot help, so it is not retried. Its ``ramp_limit_exceeded`` is load, and is.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from typing import Any

from ..call import CallInfo, ResponseInfo, Usage
from ..clocks import wall
from . import _shapes as shapes
from ._base import Dialect, ServerLimits
from ._framing import loads_object
from .openai import header_number

__all__ = ["ANTHROPIC", "FINISH_REASONS", "SPEND_LIMITS", "AnthropicDialect", "absorb_usage", "parse_time",
           "server_limits_at"]

# path suffix, endpoint, operation. count_tokens first: both end in a route of this table.
_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("/v1/messages/count_tokens", "messages/count_tokens", "count_tokens"),
    ("/v1/messages", "messages", "chat"),
)
_COUNT_TOKENS = "messages/count_tokens"

# request body field -> gen_ai.request.* attribute suffix (Anthropic has no seed)
PARAMS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop_sequences": "stop_sequences",
}

#: Anthropic's stop reasons -> the names OpenTelemetry's Anthropic instrumentation reports
#: (``normalize_finish_reason`` in opentelemetry-instrumentation-anthropic); others pass as sent.
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}

#: 429 error codes (``error.details.error_code``) that mean a spend limit, not load.
SPEND_LIMITS = frozenset({"contract_spend_limit_reached", "enforced_spend_limit_reached"})

_INPUT_PARTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def absorb_usage(usage: Any, into: Usage) -> None:
    """Fold one Anthropic usage object (cumulative counts) into ``into``.

    The whole prompt is the three input parts summed; ``cached_input_tokens`` is the cache read.
    A part null or absent keeps its earlier value: message_start's usage states all three, a
    message_delta's restates them (the API's newer deltas) or only ``output_tokens`` (older ones).
    The cache read is known apart (``cached_input_tokens``); the uncached and cache-creation parts
    are known only as their sum, so a delta restating one of those two without the other keeps the
    earlier sum (the API restates all or none)."""
    if not isinstance(usage, dict):
        return
    output = _count(usage.get("output_tokens"))
    if output is not None:
        into.output_tokens = output
    uncached, created, read = (_count(usage.get(part)) for part in _INPUT_PARTS)
    if uncached is None and created is None and read is None:
        return
    known_read = into.cached_input_tokens or 0
    rest = (into.input_tokens - known_read) if into.input_tokens is not None else None
    if uncached is not None and (created is not None or rest is None):
        rest = uncached + (created or 0)
    elif created is not None and rest is None:
        rest = created
    if read is not None:
        into.cached_input_tokens = read
        known_read = read
    if created is not None:
        into.cache_write_tokens = created
    into.input_tokens = (rest or 0) + known_read


_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:\d\d)")


def parse_time(raw: str | None) -> float | None:
    """An RFC 3339 time (``2025-06-12T18:30:00Z``, ``...00.5+02:00``) as a Unix timestamp, or None."""
    if not raw or not raw.isascii():
        return None
    match = _RFC3339.fullmatch(raw.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        offset = _dt.timedelta(0) if zone in ("Z", "z") else _dt.timedelta(
            hours=int(zone[1:3]), minutes=int(zone[4:6])) * (1 if zone[0] == "+" else -1)
        moment = _dt.datetime(int(year), int(month), int(day), int(hour), int(minute), min(int(second), 59),
                              tzinfo=_dt.timezone(offset))
    except ValueError:
        return None
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


def _reset(raw: str | None, now: float) -> float | None:
    at = parse_time(raw)
    return None if at is None else max(0.0, at - now)


def _tokens(headers: Mapping[str, str], field: str) -> float | None:
    """The token dimension's ``field`` (limit / remaining): ``anthropic-ratelimit-tokens-*`` (the
    most restrictive limit in effect, Anthropic says), else the lower of the input and output
    token limits. llmshim's one token bucket charges input plus output, so the lower of the two
    never lets more through than either limit allows."""
    said = header_number(headers.get(f"anthropic-ratelimit-tokens-{field}"))
    if said is not None:
        return said
    parts = [header_number(headers.get(f"anthropic-ratelimit-{kind}-tokens-{field}")) for kind in ("input", "output")]
    known = [part for part in parts if part is not None]
    return min(known) if known else None


def server_limits_at(headers: Mapping[str, str], now: float) -> ServerLimits:
    """``anthropic-ratelimit-*`` headers at Unix time ``now`` (pure): limits are per minute, the
    reset an RFC 3339 time, turned into seconds from ``now``."""
    reset_tokens = headers.get("anthropic-ratelimit-tokens-reset")
    if reset_tokens is None:
        resets = [_reset(headers.get(f"anthropic-ratelimit-{kind}-tokens-reset"), now) for kind in ("input", "output")]
        known = [seconds for seconds in resets if seconds is not None]
        tokens_reset = max(known) if known else None
    else:
        tokens_reset = _reset(reset_tokens, now)
    return ServerLimits(
        requests_limit=header_number(headers.get("anthropic-ratelimit-requests-limit")),
        requests_remaining=header_number(headers.get("anthropic-ratelimit-requests-remaining")),
        requests_reset=_reset(headers.get("anthropic-ratelimit-requests-reset"), now),
        tokens_limit=_tokens(headers, "limit"),
        tokens_remaining=_tokens(headers, "remaining"),
        tokens_reset=tokens_reset,
    )


def _error_type(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("type") or "error")
    return "error"


class AnthropicDialect(Dialect):
    name = "anthropic"
    suffixes = tuple(route[0] for route in _ROUTES)
    param_names = PARAMS
    quota_statuses = frozenset({429})

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        for suffix, endpoint, operation in _ROUTES:
            if not path.endswith(suffix):
                continue
            if not isinstance(body.get("model"), str) or not shapes.messages(body.get("messages")):
                return None
            if not shapes.flag_ok(body):
                return None
            stream = endpoint != _COUNT_TOKENS and body.get("stream") is True
            return self.call_info(operation=operation, endpoint=endpoint, model=body["model"], stream=stream,
                                  body=body)
        return None

    def generates(self, info: CallInfo) -> bool:
        """count_tokens only measures a prompt."""
        return info.endpoint != _COUNT_TOKENS

    def server_limits(self, headers: Mapping[str, str]) -> ServerLimits:
        return server_limits_at(headers, wall())

    def prompt_extras(self, info: CallInfo) -> list[Any]:
        """The system prompt and tool definitions: the model reads them as tokens."""
        return [info.body[field] for field in ("system", "tools") if info.body.get(field) is not None]

    def quota_exhausted(self, status: int, body: bytes) -> str | None:
        """A 429 for a spend limit (its ``error.details.error_code``): billing, not load."""
        if status != 429 or b"spend_limit" not in body:
            return None
        answer = loads_object(body)
        error = answer.get("error") if isinstance(answer, dict) else None
        details = error.get("details") if isinstance(error, dict) else None
        code = details.get("error_code") if isinstance(details, dict) else None
        return code if code in SPEND_LIMITS else None

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "error" or (kind is None and message.get("error")):  # a gateway's {"error": ...} too
            into.error = _error_type(message.get("error"))
            return
        if info.endpoint == _COUNT_TOKENS:  # {"input_tokens": n}: a measure, not tokens spent
            into.done = True
            return
        if kind == "message" or (kind is None and not info.stream):  # a whole answer (or its salvaged edges)
            self._message(message, into)
            for block in message.get("content") or ():
                if isinstance(block, dict) and block.get("type") == "text":
                    into.add_text(block.get("text"))
            into.done = True
        elif kind == "message_start":
            start = message.get("message")
            if isinstance(start, dict):
                self._message(start, into)
        elif kind == "content_block_start":
            block = message.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text":
                into.add_text(block.get("text"))
        elif kind == "content_block_delta":
            delta = message.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                into.add_text(delta.get("text"))
            elif isinstance(delta, dict) and delta.get("type") == "input_json_delta":  # a tool call's input
                into.add_generated(delta.get("partial_json"))
        elif kind == "message_delta":
            delta = message.get("delta")
            if isinstance(delta, dict):
                self._stop(delta.get("stop_reason"), into)
            absorb_usage(message.get("usage"), into.usage)
        elif kind == "message_stop":
            into.done = True

    def _message(self, message: dict[str, Any], into: ResponseInfo) -> None:
        if isinstance(message.get("model"), str):
            into.model = message["model"]
        if isinstance(message.get("id"), str):
            into.id = message["id"]
        self._stop(message.get("stop_reason"), into)
        usage = message.get("usage")
        absorb_usage(usage, into.usage)
        if isinstance(usage, dict) and isinstance(usage.get("service_tier"), str):
            into.service_tier = usage["service_tier"]

    @staticmethod
    def _stop(reason: Any, into: ResponseInfo) -> None:
        if isinstance(reason, str):
            into.finish_reasons = [FINISH_REASONS.get(reason, reason)]


ANTHROPIC = AnthropicDialect()
