"""The bundled server's Gemini answers, framed as Google's servers frame them.

Routes are ``POST .../models/{model}:{action}`` (the Gemini API's ``/v1beta/models/M`` and Vertex
AI's ``/v1/projects/P/locations/L/publishers/google/models/M`` alike): ``generateContent``,
``streamGenerateContent`` (SSE with ``?alt=sse``, events ending in ``\\r\\n\\r\\n``; without it a
JSON array sent piece by piece), ``embedContent``, ``batchEmbedContents`` and ``countTokens``.
Answers echo the last prompt as the other dialects' do, token counts are whitespace words, and
``usageMetadata`` shows every count Gemini reports: a ``cachedContent`` request reads 4 cached
tokens, a ``thinkingConfig`` with a budget spends 3 thinking tokens, and a request with function
declarations gets a ``functionCall`` of the first one. Errors are Google's
``{"error": {"code", "message", "status"}}``; a 429 carries a ``RetryInfo`` detail.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .responses import Answer, _digest, _vector, words

__all__ = ["answer", "error_body", "is_gemini", "rate_limited"]

_ROUTE = re.compile(r"/(?:models|tunedModels)/([^/:]+):([A-Za-z]+)$")
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                501: "NOT_IMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_MESSAGES = {429: "Resource has been exhausted (e.g. check quota).",
             503: "The model is overloaded. Please try again later.",
             500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"}
_JSON = [("Content-Type", "application/json; charset=UTF-8")]
CACHED_TOKENS, THOUGHT_TOKENS = 4, 3


def is_gemini(path: str) -> bool:
    """Whether ``path`` (without its query) is a Gemini model action."""
    return _ROUTE.search(path) is not None


def error_body(status: int, body: Any = None, retry_delay: str | None = None) -> bytes:
    """Google's error shape: ``body`` as the message (a dict or bytes: sent as they are)."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, dict):
        return json.dumps(body).encode()
    message = body or _MESSAGES.get(status, f"The server had an error ({status})")
    error: dict[str, Any] = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
    if retry_delay is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return json.dumps({"error": error}, indent=2).encode()


def _error(status: int, message: str | None = None) -> Answer:
    return Answer(status, list(_JSON), error_body(status, message))


def rate_limited(wait: float) -> Answer:
    """The server's own RPM limit, as Gemini says it: RetryInfo in the body, no retry-after header."""
    return Answer(429, list(_JSON), error_body(429, None, f"{max(1, round(wait))}s"))


def _text(parts: Any) -> str:
    return " ".join(part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)) \
        if isinstance(parts, list) else ""


def _config(body: dict[str, Any]) -> dict[str, Any]:
    config = body.get("generationConfig", body.get("generation_config"))
    return config if isinstance(config, dict) else {}


def _usage(body: dict[str, Any], answer_tokens: int | None) -> dict[str, Any]:
    contents = body.get("contents") or []
    prompt = sum(words(_text(c.get("parts"))) for c in contents if isinstance(c, dict))
    system = body.get("systemInstruction", body.get("system_instruction"))
    prompt += words(_text(system.get("parts"))) if isinstance(system, dict) else 0
    usage: dict[str, Any] = {}
    cached = CACHED_TOKENS if body.get("cachedContent", body.get("cached_content")) else 0
    usage["promptTokenCount"] = prompt + cached
    if answer_tokens is not None:
        usage["candidatesTokenCount"] = answer_tokens
    thinking = _config(body).get("thinkingConfig") or {}
    thoughts = THOUGHT_TOKENS if answer_tokens is not None and isinstance(thinking, dict) \
        and thinking.get("thinkingBudget", 1) != 0 and thinking else 0
    usage["totalTokenCount"] = prompt + cached + (answer_tokens or 0) + thoughts
    if cached:
        usage["cachedContentTokenCount"] = cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt + cached}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _reply(body: dict[str, Any]) -> tuple[list[str], str, dict[str, Any] | None]:
    """(text pieces, finish reason, a function call or None) for a generateContent request."""
    contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
    last = contents[-1] if contents else {}
    declarations = [d for tool in body.get("tools") or [] if isinstance(tool, dict)
                    for d in tool.get("functionDeclarations", tool.get("function_declarations")) or []
                    if isinstance(d, dict)]
    answered = any(isinstance(p, dict) and ("functionResponse" in p or "function_response" in p)
                   for p in last.get("parts") or [])
    prompt = _text(last.get("parts"))
    if declarations and not answered:
        return [], "STOP", {"name": declarations[0].get("name"), "args": {"text": prompt}}
    tokens = f"Echo: {prompt or 'hello'}".split(" ")
    pieces = [tokens[0]] + [" " + t for t in tokens[1:]]
    limit = _config(body).get("maxOutputTokens", _config(body).get("max_output_tokens"))
    if isinstance(limit, int) and 0 <= limit < len(pieces):
        return pieces[:limit], "MAX_TOKENS", None
    return pieces, "STOP", None


def _generate(model: str, body: dict[str, Any], stream: bool, sse: bool) -> Answer:
    pieces, finish, call = _reply(body)
    ident = _digest("gemini", model, body)[:22]
    answer_tokens = 1 if call is not None else len(pieces)

    def response(parts: list[dict[str, Any]], reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if reason is not None:
            candidate["finishReason"] = reason
        candidate["index"] = 0
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": ident}

    final_usage = _usage(body, answer_tokens)
    whole: list[dict[str, Any]] = [{"functionCall": call}] if call is not None else [{"text": "".join(pieces)}]
    if not stream:
        return Answer(200, list(_JSON), json.dumps(response(whole, finish, final_usage), indent=2).encode())
    running = _usage(body, None)
    events = [response([{"text": piece}], None, running) for piece in pieces[:-1]]
    events.append(response([{"text": pieces[-1]}] if pieces else whole, finish, final_usage))
    if sse:
        chunks = [b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\r\n\r\n" for event in events]
        return Answer(200, [("Content-Type", "text/event-stream"), ("Content-Disposition", "attachment")],
                      chunks=chunks)
    texts = [json.dumps(event, indent=2) for event in events]
    chunks = [("[" if index == 0 else "\n,\r\n").encode() + text.encode() for index, text in enumerate(texts)]
    return Answer(200, list(_JSON), chunks=[*chunks, b"\n]"])


def _embedding(content: Any, body: dict[str, Any]) -> dict[str, Any]:
    dims = body.get("outputDimensionality", body.get("output_dimensionality"))
    text = _text(content.get("parts")) if isinstance(content, dict) else ""
    return {"values": _vector(text, dims if isinstance(dims, int) and 0 < dims <= 3072 else 8)}


def answer(path: str, query: str, body: Any) -> Answer:
    """The answer to ``POST path?query`` with JSON ``body`` (None: not JSON)."""
    route = _ROUTE.search(path)
    if route is None:
        return _error(404, f"Unknown route POST {path}")
    model, action = route.groups()
    if not isinstance(body, dict):
        return _error(400, "Invalid JSON payload received.")
    if action in ("generateContent", "streamGenerateContent"):
        if not isinstance(body.get("contents"), list):
            return _error(400, "* GenerateContentRequest.contents: contents is not specified")
        sse = "alt=sse" in query.split("&")
        return _generate(model, body, action == "streamGenerateContent", sse)
    if action == "countTokens":
        inner = body.get("generateContentRequest", body.get("generate_content_request"))
        request = inner if isinstance(inner, dict) and "contents" not in body else body
        total = _usage(request, None)["promptTokenCount"]
        return Answer(200, list(_JSON), json.dumps(
            {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]},
            indent=2).encode())
    if action == "embedContent":
        return Answer(200, list(_JSON), json.dumps({"embedding": _embedding(body.get("content"), body)}).encode())
    if action == "batchEmbedContents":
        requests = [r for r in body.get("requests") or [] if isinstance(r, dict)]
        return Answer(200, list(_JSON), json.dumps(
            {"embeddings": [_embedding(r.get("content"), r) for r in requests]}).encode())
    return _error(404, f"Method not found: {action}")
