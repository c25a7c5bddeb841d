"""The bundled server's Anthropic Messages answers, framed as api.anthropic.com frames them.

``POST /v1/messages`` answers one ``message`` object, or with ``"stream": true`` the SSE events
(``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``...,
``content_block_stop``, ``message_delta``, ``message_stop``); ``POST /v1/messages/count_tokens``
answers ``{"input_tokens": n}``. As on the other routes the answer echoes the last prompt
(``"Echo: <text>"``), tokens are whitespace words, and the same request always gets the same bytes:

- ``max_tokens`` cuts the answer (``stop_reason: max_tokens``); a ``stop_sequences`` entry found
  in it cuts it there (``stop_sequence``);
- ``tool_choice`` ``{"type": "any"}`` or ``{"type": "tool", "name": ...}`` with ``tools`` answers a
  ``tool_use`` block (the tool named, else the first) whose input is ``{"text": <prompt>}``
  (``stop_reason: tool_use``; streamed as ``input_json_delta`` pieces);
- the words of the system and message blocks up to the last one marked ``cache_control`` are
  reported as ``cache_read_input_tokens`` (a warm prompt cache), the rest as ``input_tokens``.

Errors use Anthropic's shape ``{"type": "error", "error": {"type", "message"}, "request_id"}`` with
its error types per status (529 ``overloaded_error``, 429 ``rate_limit_error``...), and every answer
carries ``request-id`` and the ``anthropic-ratelimit-*`` headers (resets as RFC 3339 times).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

from .responses import Answer, _digest, _json, _sse, _text_of, words

__all__ = ["ROUTES", "answer", "error_body", "limit_headers", "speaks"]

ROUTES = ("/v1/messages/count_tokens", "/v1/messages")

#: Anthropic's error type per HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
_MESSAGES = {429: "Number of request tokens has exceeded your per-minute rate limit", 529: "Overloaded"}
_USAGE_ZERO = {"cache_creation_input_tokens": 0}


def speaks(method: str, path: str) -> bool:
    """Whether a request is one of the Anthropic routes this module answers."""
    return method == "POST" and path.endswith(ROUTES)


def _rfc3339(at: float) -> str:
    moment = _dt.datetime.fromtimestamp(math.ceil(at), _dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def limit_headers(requests_limit: int, remaining: int, reset: float, now: float) -> list[tuple[str, str]]:
    """The ``anthropic-ratelimit-*`` headers: requests as the server's RPM window has them, tokens
    generous and constant; each reset is the moment (``now`` + seconds) the limit is whole again."""
    whole = _rfc3339(now + reset)
    headers = [("anthropic-ratelimit-requests-limit", str(requests_limit)),
               ("anthropic-ratelimit-requests-remaining", str(remaining)),
               ("anthropic-ratelimit-requests-reset", whole)]
    for kind, limit in (("tokens", 2_000_000), ("input-tokens", 1_600_000), ("output-tokens", 400_000)):
        headers += [(f"anthropic-ratelimit-{kind}-limit", str(limit)),
                    (f"anthropic-ratelimit-{kind}-remaining", str(limit - 1000)),
                    (f"anthropic-ratelimit-{kind}-reset", _rfc3339(now))]
    return headers


def error_body(status: int, body: Any, request_id: str = "req_llmshim") -> bytes:
    """An error answer's body in Anthropic's shape; ``body`` as a fault gives it (bytes are sent as
    they are, a string is the message, None the status's usual message)."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, dict):
        return json.dumps(body).encode()
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = body if isinstance(body, str) else _MESSAGES.get(status, f"The server had an error ({status})")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}).encode()


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [block for block in content if isinstance(block, dict)] if isinstance(content, list) else []


def _prompt(body: dict[str, Any]) -> tuple[str, int, int]:
    """(the last message's text, uncached prompt words, words up to the last cache_control mark)."""
    blocks = _blocks(body.get("system"))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            blocks += _blocks(message.get("content"))
    counts = [words(_text_of(block.get("text", block.get("content", "")))) for block in blocks]
    marked = max((i + 1 for i, block in enumerate(blocks) if block.get("cache_control")), default=0)
    last = ""
    for message in reversed([m for m in body.get("messages") or () if isinstance(m, dict)]):
        last = " ".join(_text_of(b.get("text", b.get("content", ""))) for b in _blocks(message.get("content")))
        if last:
            break
    read = sum(counts[:marked])
    return last, sum(counts) - read, read


def _tool(body: dict[str, Any]) -> str | None:
    """The tool the request forces (``tool_choice`` any / tool), or None."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list) or not tools:
        return None
    names = [tool.get("name") for tool in tools if isinstance(tool, dict) and isinstance(tool.get("name"), str)]
    if choice.get("type") == "tool" and choice.get("name") in names:
        return str(choice["name"])
    return names[0] if choice.get("type") == "any" and names else None


def _text_answer(body: dict[str, Any], prompt: str) -> tuple[list[str], str, str | None]:
    """(pieces, stop reason, the stop sequence met)."""
    text, reason, met = f"Echo: {prompt or 'hello'}", "end_turn", None
    for sequence in body.get("stop_sequences") or ():
        if isinstance(sequence, str) and sequence and sequence in text:
            text, reason, met = text[: text.index(sequence)], "stop_sequence", sequence
            break
    tokens = text.split(" ")
    pieces = [tokens[0]] + [" " + t for t in tokens[1:]]
    limit = body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(pieces):
        return pieces[:limit], "max_tokens", None
    return pieces, reason, met


def messages(body: dict[str, Any]) -> Answer:
    model = body.get("model", "claude-fake")
    prompt, uncached, read = _prompt(body)
    ident = "msg_" + _digest("anthropic", body)
    tool = _tool(body)
    if tool is not None:
        arguments = json.dumps({"text": prompt})
        pieces = [arguments[i:i + 8] for i in range(0, len(arguments), 8)]
        reason, met = "tool_use", None
        block: dict[str, Any] = {"type": "tool_use", "id": "toolu_" + ident[4:], "name": tool,
                                 "input": {"text": prompt}}
    else:
        pieces, reason, met = _text_answer(body, prompt)
        block = {"type": "text", "text": "".join(pieces)}
    usage = {"input_tokens": uncached, **_USAGE_ZERO, "cache_read_input_tokens": read, "output_tokens": len(pieces)}
    whole = {"id": ident, "type": "message", "role": "assistant", "model": model, "content": [block],
             "stop_reason": reason, "stop_sequence": met, "usage": {**usage, "service_tier": "standard"}}
    if body.get("stream") is not True:
        return _json(200, whole)
    start = {**whole, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1, "service_tier": "standard"}}
    opening = {**block, "input": {}} if tool is not None else {**block, "text": ""}
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": opening}),
        ("ping", {"type": "ping"}),
    ]
    for piece in pieces:
        delta = {"type": "input_json_delta", "partial_json": piece} if tool is not None else {
            "type": "text_delta", "text": piece}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": met},
                           "usage": usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return _sse(events, done=False)


def count_tokens(body: dict[str, Any]) -> Answer:
    _, uncached, read = _prompt(body)
    return _json(200, {"input_tokens": uncached + read})


def answer(path: str, body: Any) -> Answer:
    """The answer to a POST on an Anthropic route (``speaks``); a body that is not a JSON object
    gets Anthropic's 400."""
    if not isinstance(body, dict):
        return Answer(400, [("Content-Type", "application/json")],
                      error_body(400, "messages: Input should be a valid JSON object"))
    if path.endswith("/count_tokens"):
        return count_tokens(body)
    return messages(body)
