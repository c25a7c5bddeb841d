"""Dialects: what the wire says. Recognise a call by path and body shape, read its response.

``detect`` is the only entry point adapters use: it answers a :class:`~llmshim.dialects.Dialect`
and the :class:`~llmshim.call.CallInfo` for an LLM request, or None for anything else (which then
passes through untouched). Recognition never looks at host or port: one llama.cpp port serves
native and OpenAI-compatible routes, and OpenAI-compatible servers live anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from ..call import CallInfo, ResponseInfo, WireRequest
from ._framing import JsonBody, NdjsonReader, SseReader, loads_object

__all__ = ["BodyParser", "Dialect", "detect"]


class Dialect(Protocol):
    """One wire dialect: recognise a request, fold each response message into a ResponseInfo."""

    name: str

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None: ...

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None: ...


_NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")


class BodyParser:
    """Feeds a response body, piece by piece, through its framing into the dialect's ``absorb``.

    The framing comes from the response's content type, not from the request, because servers
    answer errors as plain JSON even to a streamed request.
    """

    def __init__(self, dialect: Dialect, info: CallInfo, content_type: str | None, capture: bool = False) -> None:
        self.dialect, self.call_info, self.result = dialect, info, ResponseInfo()
        if capture:
            self.result.output = []
        kind = (content_type or "").split(";")[0].strip().lower()
        self._reader: SseReader | NdjsonReader | JsonBody
        if kind == "text/event-stream":
            self._reader = SseReader()
        elif kind in _NDJSON_TYPES or (info.provider == "ollama" and info.stream and kind != "application/json"):
            self._reader = NdjsonReader()
        else:
            self._reader = JsonBody()

    def feed(self, data: bytes) -> None:
        self._absorb(self._reader.feed(data))

    def finish(self) -> ResponseInfo:
        self._absorb(self._reader.feed(b"", final=True))
        return self.result

    def _absorb(self, messages: Iterator[Any]) -> None:
        for message in messages:
            event: str | None = None
            if isinstance(message, tuple):  # SSE: (event, data)
                event, data = message
                if data.strip() == "[DONE]":
                    self.result.done = True
                    continue
                message = loads_object(data)
                if message is None:
                    continue
            self.result.chunks += 1
            self.dialect.absorb(self.call_info, message, event, self.result)


def _dialects() -> tuple[Dialect, ...]:
    from .llamacpp import LLAMACPP
    from .ollama import OLLAMA
    from .openai import OPENAI

    return (OLLAMA, LLAMACPP, OPENAI)


_ALL: tuple[Dialect, ...] = ()
_SUFFIXES = (
    "/chat/completions", "/completions", "/completion", "/embeddings", "/embedding", "/responses",
    "/infill", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
)


def detect(request: WireRequest) -> tuple[Dialect, CallInfo] | None:
    """The dialect and call info of an LLM request, or None. Cheap for non-LLM traffic:
    the path is checked before the body is parsed."""
    global _ALL
    if request.method.upper() != "POST":
        return None
    path = request.path.rstrip("/")
    if not path.endswith(_SUFFIXES):
        return None
    body = loads_object(request.body) if request.body else None
    if not isinstance(body, dict):
        return None
    if not _ALL:
        _ALL = _dialects()
    for dialect in _ALL:
        info = dialect.recognise(path, body)
        if info is not None:
            return dialect, info
    return None
