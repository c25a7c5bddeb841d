"""Incremental body framing: Server-Sent Events, newline-delimited JSON, and whole JSON.

A body arrives in arbitrary pieces (a network read can split a line or a UTF-8 character), so
each reader keeps the unfinished tail and yields only whole messages. The readers never buffer
more than one unfinished message; a whole-JSON body is the exception and is kept until the end.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

__all__ = ["JsonBody", "NdjsonReader", "SseReader", "loads_object"]


_decode = json.JSONDecoder().decode  # json.loads minus its per-call encoding sniffing and dispatch


def loads_object(text: str | bytes) -> Any:
    """Parse JSON, answering None instead of raising: a body llmshim cannot read is not an error."""
    try:
        return _decode(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError):
        return None


class _Lines:
    """Splits decoded text into lines on \\n, \\r\\n or \\r, keeping the unfinished tail."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._tail = ""

    def feed(self, data: bytes, final: bool = False) -> list[str]:
        text = self._tail + self._decoder.decode(data, final)
        # A trailing \r may be the first half of \r\n: keep it until the next piece or the end.
        keep_cr = text.endswith("\r") and not final
        if keep_cr:
            text = text[:-1]
        lines = text.splitlines(keepends=True)
        self._tail = ""
        if lines and not lines[-1].endswith(("\n", "\r")) and not final:
            self._tail = lines.pop()
        if keep_cr:
            self._tail += "\r"
        return [line.rstrip("\r\n") for line in lines]


class SseReader:
    """Yields (event, data) for each complete Server-Sent Event (blank-line terminated)."""

    def __init__(self) -> None:
        self._lines = _Lines()
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, data: bytes, final: bool = False) -> Iterator[tuple[str | None, str]]:
        for line in self._lines.feed(data, final):
            if not line:
                if self._data:
                    yield self._event, "\n".join(self._data)
                self._event, self._data = None, []
                continue
            if line.startswith(":"):
                continue  # comment / keep-alive
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
        if final and self._data:  # a last event without its blank line still counts
            yield self._event, "\n".join(self._data)
            self._event, self._data = None, []


class NdjsonReader:
    """Yields each complete JSON line that parses to an object."""

    def __init__(self) -> None:
        self._lines = _Lines()

    def feed(self, data: bytes, final: bool = False) -> Iterator[Any]:
        for line in self._lines.feed(data, final):
            if line.strip():
                obj = loads_object(line)
                if obj is not None:
                    yield obj


class JsonBody:
    """Collects a whole (non-streamed) JSON body and parses it once at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes, final: bool = False) -> Iterator[Any]:
        self._parts.append(data)
        if final:
            obj = loads_object(b"".join(self._parts))
            self._parts.clear()
            if obj is not None:
                yield obj
