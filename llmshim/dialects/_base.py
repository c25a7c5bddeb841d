"""The dialect contract: what every wire dialect answers, with the defaults most of them share.

A dialect is the only code that knows a provider's wire: its routes, its body fields, its framing,
the way its server says "quota exhausted", "still loading" or "this much budget is left". The rest
of llmshim asks the dialect (through these methods) or reads what it computed at recognition (the
fields of :class:`~llmshim.call.CallInfo`), never the body or the headers directly.

A new dialect subclasses :class:`Dialect`, sets ``name``, ``suffixes`` (derived from its own route
table) and ``param_names``, implements ``recognise`` and ``absorb``, overrides the hooks where its
wire differs from the defaults, and gets one line in ``llmshim/dialects/__init__.py``'s registry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from ..call import CallInfo, ResponseInfo, WireRequest

__all__ = ["NDJSON_TYPES", "PROMPT_FIELDS", "Dialect", "Framing", "ServerLimits", "count", "positive_int"]

Framing = Literal["sse", "ndjson", "json"]

NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")

#: The body fields whose text is the prompt, for the token estimate (in the order they are counted).
PROMPT_FIELDS = ("messages", "prompt", "input", "content", "system", "instructions")


@dataclasses.dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a response's headers say about the server's rate limits; None: not said.

    ``*_limit`` are per minute, ``*_remaining`` what is left of them now, ``*_reset`` the seconds
    until the limit is whole again (not until the next request fits)."""

    requests_limit: float | None = None
    requests_remaining: float | None = None
    requests_reset: float | None = None
    tokens_limit: float | None = None
    tokens_remaining: float | None = None
    tokens_reset: float | None = None

    def limit(self, dimension: Literal["requests", "tokens"]) -> float | None:
        return self.requests_limit if dimension == "requests" else self.tokens_limit

    def remaining(self, dimension: Literal["requests", "tokens"]) -> float | None:
        return self.requests_remaining if dimension == "requests" else self.tokens_remaining


def positive_int(value: Any) -> int | None:
    """``value`` if it is a positive integer (a JSON ``true`` is not one), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def count(value: Any) -> int | None:
    """A count or an index as lenient servers read it: an integer, an integral float, or a
    string of ASCII digits (vLLM's pydantic models read ``"n": "2"`` and ``2.0`` as 2, Google's
    proto3 JSON reads ``"candidateCount": "2"`` so). None for anything else (a JSON ``true`` too)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if isinstance(content, list):
        return [{"type": "text", "content": part.get("text", "")} for part in content
                if isinstance(part, dict) and "text" in part]
    return []


class Dialect:
    """One wire dialect. Subclasses set the class attributes and implement ``recognise`` and
    ``absorb``; every other method has a default that says "this wire has no such thing"."""

    #: The wire's name (``openai``, ``ollama``, ``llama_cpp``): the cache key's, and the provider's
    #: name for a host ``llmshim.providers`` does not know (``detect`` names known hosts' providers).
    name: ClassVar[str]
    #: The path endings this dialect may recognise, derived from its route table: ``detect``'s cheap
    #: pre-check (before any body is parsed) is the union of every registered dialect's suffixes, and a
    #: dialect is asked to ``recognise`` only a path that ends in one of its own.
    suffixes: ClassVar[tuple[str, ...]]
    #: request body field (or options field) -> gen_ai.request.* suffix, in order of precedence
    param_names: ClassVar[Mapping[str, str]] = {}
    prompt_fields: ClassVar[tuple[str, ...]] = PROMPT_FIELDS
    messages_field: ClassVar[str] = "messages"
    prompt_text_fields: ClassVar[tuple[str, ...]] = ("prompt", "input", "content")
    #: The statuses whose error body ``quota_exhausted`` / ``loading`` read: a reply's body is
    #: peeked (read before the caller gets it) only for these.
    quota_statuses: ClassVar[frozenset[int]] = frozenset()
    loading_statuses: ClassVar[frozenset[int]] = frozenset()

    def __init__(self) -> None:
        def fields(attribute: str) -> tuple[str, ...]:
            return tuple(field for field, named in self.param_names.items() if named == attribute)

        self._max_tokens_fields = fields("max_tokens")
        self._temperature_fields = fields("temperature")
        self._seed_fields = fields("seed")

    # -- recognition -------------------------------------------------------------------------

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        """The call info of a request to ``path`` (no trailing slash) with this JSON ``body``, or
        None when it is not this dialect's request (then the next dialect is asked)."""
        raise NotImplementedError

    def call_info(self, *, operation: str, endpoint: str, model: str | None, stream: bool,
                  body: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> CallInfo:
        """The CallInfo of a recognised request. ``params``: where the sampling parameters sit
        (default: the body itself). Computes here only what a few dict lookups give; what walks
        the body (``input_chars``, ``input_messages``) is computed on first use."""
        source = body if params is None else params
        max_output = temperature = seed = None
        for field in self._max_tokens_fields:
            value = source.get(field)
            if value is not None:
                max_output = positive_int(value)
                if max_output is not None:
                    break
        for field in self._temperature_fields:
            value = source.get(field)
            if value is not None:
                temperature = _number(value)
                if temperature is not None:
                    break
        for field in self._seed_fields:
            seed = source.get(field)
            if seed is not None:
                break
        # Every field given, straight into the frozen dataclass's __dict__: its __init__ sets each
        # through object.__setattr__, a fifth of recognising a request (tests/test_hot_path.py
        # pins the result equal to the __init__'s).
        info = object.__new__(CallInfo)
        info.__dict__.update(
            provider=self.name, operation=operation, endpoint=endpoint, model=model, stream=stream,
            param_source=source, param_names=self.param_names, body=body, max_output_tokens=max_output,
            temperature=temperature, seed=seed, dialect=self,
        )
        return info

    def input_chars(self, info: CallInfo) -> int:
        """Characters of the prompt's text as JSON (``len(json.dumps(...))``): the token estimate's
        input. Counted over ``prompt_fields`` of the body, as they are present."""
        body = info.body
        return len(json.dumps([body[k] for k in self.prompt_fields if body.get(k) is not None], ensure_ascii=False))

    def input_messages(self, info: CallInfo) -> list[dict[str, Any]]:
        """The prompt in the GenAI spec's message shape: [{"role", "parts": [{"type": "text",
        "content"}]}], from a chat ``messages`` list or else the first prompt text field."""
        body = info.body
        messages = body.get(self.messages_field)
        if isinstance(messages, list):
            return [{"role": str(message.get("role", "user")), "parts": _text_parts(message.get("content"))}
                    for message in messages if isinstance(message, dict)]
        prompt = None
        for field in self.prompt_text_fields:
            if field in body:
                prompt = body[field]
                break
        if isinstance(prompt, str):
            return [{"role": "user", "parts": [{"type": "text", "content": prompt}]}]
        if isinstance(prompt, list):
            return [{"role": "user", "parts": [{"type": "text", "content": p}]} for p in prompt if isinstance(p, str)]
        return []

    def prompt_extras(self, info: CallInfo) -> list[Any]:
        """What the prompt carries besides its messages that the model reads as tokens (tool
        definitions, a response schema), for the token estimate. Default: nothing."""
        return []

    def reports_usage(self, info: CallInfo) -> bool:
        """Whether this request's answer will carry the provider's token counts. When it will not,
        llmshim prepares to estimate them (``llmshim.tokens``). Default: it will."""
        return True

    def cache_ignored_fields(self, info: CallInfo) -> frozenset[str]:
        """The top-level request fields that cannot change this call's answer nor what the server
        keeps, left out of its cache key. Default: none (everything is in the key)."""
        return frozenset()

    # -- responses ---------------------------------------------------------------------------

    def framing(self, content_type: str | None, info: CallInfo) -> Framing:
        """How the response body is framed. From the response's content type, not the request:
        servers answer errors as plain JSON even to a streamed request."""
        kind = (content_type or "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            return "sse"
        if kind in NDJSON_TYPES:
            return "ndjson"
        return "json"

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        """Fold one response message (a parsed SSE event's data, NDJSON line or whole JSON body;
        ``event``: the SSE event name) into ``into``."""
        raise NotImplementedError

    def finished(self, info: CallInfo, into: ResponseInfo) -> bool:
        """Whether the answer read so far has ended: every choice the request asked for has a
        finish reason. It is whole (``into.done``, cacheable) when its end marker came too. Default:
        one answer, ended at its done marker or its finish reason."""
        return into.done or bool(into.finish_reasons)

    # -- what the server says about itself ---------------------------------------------------

    def quota_exhausted(self, status: int, body: bytes) -> str | None:
        """The error code when this answer means "out of quota": retrying cannot help. None: not."""
        return None

    def loading(self, status: int, body: bytes) -> bool:
        """Whether this answer means "the model is still loading": wait for ``health_url``."""
        return False

    def health_url(self, request: WireRequest) -> str | None:
        """Where to poll until the server is ready (200), for a request to it. None: nowhere."""
        return None

    def server_limits(self, headers: Mapping[str, str]) -> ServerLimits:
        """The server's rate limits as its response ``headers`` (case-insensitive) state them."""
        return ServerLimits()

    # -- what the call is --------------------------------------------------------------------

    def generates(self, info: CallInfo) -> bool:
        """Whether this call runs the model (generates or embeds: the default), or only asks the
        server about a request without running it (Anthropic's ``count_tokens``, Gemini's
        ``countTokens``). A call that does not generate is never cached and does not take a permit
        from the generation rate limits (its answer is a measure, and providers limit such calls
        apart)."""
        return True

    def retry_delay(self, status: int, body: bytes) -> float | None:
        """Seconds the error ``body`` of a ``quota_statuses`` answer asks to wait before a retry
        (Google's ``RetryInfo``), for servers that say it in the body rather than in
        ``retry-after``. None: the body says nothing (headers still count)."""
        return None
