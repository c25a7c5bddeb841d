"""What the rate limiter needs to know about the wire, in one place until the dialects answer it.

The scheduler decides over plain numbers; these functions turn a call or a reply into those
numbers. Each is today's code and each maps to one dialect hook (issue 13 item 4), so the switch
is one line per function:

- ``reservation(call, default_output)`` → ``call.info.input_chars`` / ``call.info.max_output_tokens``
- ``server_limits(headers)``            → ``call.dialect.server_limits(headers)``
- ``loading(reply)``                    → ``call.dialect.loading(status, body)``
- ``health_url(call)``                  → ``call.dialect.health_url(call.request)``
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from ..call import Call, Reply

__all__ = ["ServerLimits", "estimate_tokens", "health_url", "loading", "parse_reset", "reservation",
           "server_limits"]


def estimate_tokens(body: Mapping[str, Any], default_output: int) -> tuple[int, int]:
    """(input estimate, output reservation) for a request body: characters / 4 of its text, and
    its max_tokens-style field (or the configured default)."""
    text = json.dumps([body.get(k) for k in ("messages", "prompt", "input", "content", "system", "instructions")
                       if body.get(k) is not None], ensure_ascii=False)
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    output = None
    for value in (body.get("max_completion_tokens"), body.get("max_tokens"), body.get("max_output_tokens"),
                  body.get("n_predict"), (options or {}).get("num_predict")):
        if isinstance(value, int) and value > 0:
            output = value
            break
    return max(1, len(text) // 4), output if output is not None else default_output


def reservation(call: Call, default_output: int) -> tuple[int, int]:
    """The tokens a call reserves before it is sent: (input estimate, output reservation)."""
    return estimate_tokens(call.info.body, default_output)


_RESET = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` durations: ``6m0s``, ``1.5s``, ``12ms`` → seconds."""
    if not value:
        return None
    parts = _RESET.findall(value.strip())
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _header_number(raw: str | None) -> float | None:
    """A finite, non-negative number from a rate-limit header, or None."""
    if not raw or not raw.strip().isascii():
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 <= value < float("inf") else None


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What a server said about its own limits in one answer (None: it did not say)."""

    limit_requests: float | None = None  # per minute
    remaining_requests: float | None = None
    reset_requests: float | None = None  # seconds until the limit is whole again (not a block)
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None


def server_limits(headers: Mapping[str, str]) -> ServerLimits:
    """OpenAI-style ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers."""
    def number(name: str) -> float | None:
        return _header_number(headers.get(name))

    return ServerLimits(number("x-ratelimit-limit-requests"), number("x-ratelimit-remaining-requests"),
                        parse_reset(headers.get("x-ratelimit-reset-requests")),
                        number("x-ratelimit-limit-tokens"), number("x-ratelimit-remaining-tokens"),
                        parse_reset(headers.get("x-ratelimit-reset-tokens")))


def loading(reply: Reply) -> bool:
    """llama.cpp answers 503 "Loading model" while it loads; its body says so."""
    if reply.status != 503 or reply.peek is None:
        return False
    try:
        return b"Loading model" in reply.peek()
    except Exception:
        return False


def health_url(call: Call) -> str:
    """Where the server says it is ready (llama.cpp's ``/health``, polled: it has no push)."""
    host, port = call.request.server
    return f"http://{host}:{port}/health"
