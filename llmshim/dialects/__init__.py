"""Dialects: what the wire says. Recognise a call by path and body shape, read its response.

``detect`` is the only entry point adapters use: it answers a :class:`Dialect` and the
:class:`~llmshim.call.CallInfo` for an LLM request, or None for anything else (which then passes
through untouched). Recognition never looks at host or port: one llama.cpp port serves native and
OpenAI-compatible routes, and OpenAI-compatible servers live anywhere. Only once a dialect has
recognised a request does the host name who serves it (``CallInfo.provider``, from
``llmshim.providers``: ``groq``, ``azure.ai.openai``...); a host not known keeps the dialect's name.

``DIALECTS`` is the registry: a new dialect is one module (a :class:`Dialect` subclass, see
``_base.py``) and one line here. Nothing else in llmshim names a dialect's routes or fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..call import CallInfo, ResponseInfo, WireRequest
from ..providers import known_provider
from ..tokens import tally_for
from ._base import Dialect, Framing, ServerLimits
from ._framing import JsonBody, NdjsonReader, SseReader, loads_object
from .anthropic import ANTHROPIC
from .gemini import GEMINI
from .llamacpp import LLAMACPP
from .ollama import OLLAMA
from .openai import OPENAI

__all__ = ["DIALECTS", "BodyParser", "Dialect", "Framing", "ServerLimits", "detect"]

#: Every dialect llmshim speaks, asked in this order (the first that recognises a request wins).
DIALECTS: tuple[Dialect, ...] = (
    OLLAMA,
    LLAMACPP,  # root routes only; before OpenAI, whose suffixes also end llama.cpp's /completions
    OPENAI,
    ANTHROPIC,
    GEMINI,
)


class BodyParser:
    """Feeds a response body, piece by piece, through its framing into the dialect's ``absorb``.

    The dialect names the framing from the response's content type (``Dialect.framing``)."""

    _READERS: dict[Framing, Callable[[], SseReader | NdjsonReader | JsonBody]] = {
        "sse": SseReader, "ndjson": NdjsonReader, "json": JsonBody}

    def __init__(self, dialect: Dialect, info: CallInfo, content_type: str | None, capture: bool = False) -> None:
        self.dialect, self.call_info, self.result = dialect, info, ResponseInfo()
        if capture:
            self.result.output = []
        self.result.tally = tally_for(info)
        self._reader: SseReader | NdjsonReader | JsonBody = self._READERS[dialect.framing(content_type, info)]()

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
                if data.strip() == "[DONE]":  # ends the stream; a gateway that lost its upstream sends it too
                    self.result.marker = True
                    self.result.done = self.dialect.finished(self.call_info, self.result)
                    continue
                message = loads_object(data)
                if message is None:
                    continue
            self.result.chunks += 1
            self.dialect.absorb(self.call_info, message, event, self.result)


_suffixes: tuple[tuple[Dialect, ...], tuple[str, ...]] = ((), ())


def _route_suffixes() -> tuple[str, ...]:
    """The union of the registered dialects' route suffixes, for the registry as it is now."""
    global _suffixes
    suffixes = tuple(dict.fromkeys(suffix for dialect in DIALECTS for suffix in dialect.suffixes))
    _suffixes = (DIALECTS, suffixes)
    return suffixes


def detect(request: WireRequest) -> tuple[Dialect, CallInfo] | None:
    """The dialect and call info of an LLM request, or None. Cheap for non-LLM traffic:
    the path is checked before the body is parsed."""
    if request.method.upper() != "POST":
        return None
    path = request.path.rstrip("/")
    registry, suffixes = _suffixes
    if registry is not DIALECTS:  # worked out again only when the registry is replaced (a new tuple)
        suffixes = _route_suffixes()
    if not path.endswith(suffixes):
        return None
    body = loads_object(request.body) if request.body else None
    if not isinstance(body, dict):
        return None
    for dialect in DIALECTS:
        if not path.endswith(dialect.suffixes):  # one C call instead of asking a dialect without the route
            continue
        info = dialect.recognise(path, body)
        if info is not None:
            provider = known_provider(request.server[0], path)
            if provider is not None and provider != info.provider:
                # the info was made just now and nobody holds it yet: set the field in place, as a
                # frozen dataclass' __post_init__ would (dataclasses.replace costs 5x detect's rest)
                object.__setattr__(info, "provider", provider)
            return dialect, info
    return None
