"""Incremental body framing: Server-Sent Events, newline-delimited JSON, and whole JSON.

A body arrives in arbitrary pieces (a network read can split a line or a UTF-8 character), so
each reader keeps the unfinished tail and yields only whole messages. The readers never buffer
more than one unfinished message; a whole-JSON body is the exception and is kept until the end,
up to a limit (beyond it, only its edges are kept: see ``JsonBody``).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["JsonBody", "NdjsonReader", "SseReader", "loads_object", "salvage"]


_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner json.loads ends in, without its Python layers
_WHITESPACE = " \t\n\r"  # JSON's whitespace, all json.loads skips around a value


def loads_object(text: str | bytes) -> Any:
    """Parse JSON (UTF-8), answering None instead of raising: a body llmshim cannot read is not an
    error. What it accepts and answers is exactly ``json.loads``'s (``tests/test_hot_path.py``), but
    it calls the scanner directly: ``json.loads`` adds encoding sniffing and two regex matches
    around it, a third of parsing a typical answer, twice per call."""
    try:
        document = text.decode("utf-8") if isinstance(text, bytes) else text
        start = len(document) - len(document.lstrip(_WHITESPACE)) if document[:1] in _WHITESPACE else 0
        value, end = _scan(document, start)
        if end != len(document) and document[end:].strip(_WHITESPACE):
            return None
        return value
    except (ValueError, UnicodeDecodeError, StopIteration, RecursionError):
        return None


class _Lines:
    """Splits decoded text into lines on \\n, \\r\\n or \\r, keeping the unfinished tail.

    Only on those: ``str.splitlines`` also splits on U+2028, U+2029 and U+0085, which
    a JSON string may hold unescaped (llama.cpp, most non-Python servers): one event would become
    two broken lines, and its usage or end marker would be lost."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._tail = ""

    def feed(self, data: bytes, final: bool = False) -> list[str]:
        text = self._tail + self._decoder.decode(data, final)
        # A trailing \r may be the first half of \r\n: keep it until the next piece or the end.
        keep_cr = text.endswith("\r") and not final
        if keep_cr:
            text = text[:-1]
        if "\r" in text:  # \r\n, then a bare \r (a trailing one was kept above): each a \n
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        self._tail = lines.pop()  # what follows the last line end: "" or an unfinished line
        if final and self._tail:
            lines.append(self._tail)
            self._tail = ""
        if keep_cr:
            self._tail += "\r"
        return lines


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
    """Collects a whole (non-streamed) JSON body and parses it once at the end.

    Up to ``limit`` bytes it is kept and parsed whole. A bigger body (a huge answer, a gzip bomb)
    is not kept: only its first and last ``EDGE`` bytes are, and what a dialect reads of a whole
    body (id, model, status, finish reason, usage, Ollama's and llama.cpp's counts) is salvaged
    from them: the identity comes first in every dialect's answer, the usage last."""

    EDGE = 64 * 1024

    def __init__(self, limit: int = 8 * 1024 * 1024) -> None:
        self.limit = limit
        self._parts: list[bytes] | None = []
        self._size = 0
        self._head = b""
        self._tail = bytearray()  # the last EDGE to 2 x EDGE bytes: trimmed in amortised O(1)

    def feed(self, data: bytes, final: bool = False) -> Iterator[Any]:
        self._size += len(data)
        if self._parts is not None:
            self._parts.append(data)
            if self._size > self.limit:  # too big to keep: from now on, only its two edges
                whole = b"".join(self._parts)
                self._parts = None
                self._head, self._tail = whole[: self.EDGE], bytearray(whole[-self.EDGE:])
        else:
            self._tail += data
            if len(self._tail) > 2 * self.EDGE:
                del self._tail[: -self.EDGE]
        if not final:
            return
        if self._parts is not None:
            obj = loads_object(b"".join(self._parts))
            self._parts = []
        else:
            obj = salvage(self._head, bytes(self._tail[-self.EDGE:]))
        if obj is not None:
            yield obj


_HEAD_FIELDS = frozenset({"id", "model", "object", "status"})
_SCALAR = re.compile(rb'"(id|model|object|status|done|done_reason|finish_reason|prompt_eval_count|eval_count|'
                     rb'tokens_evaluated|tokens_predicted|stop|stop_type)"\s*:\s*'
                     rb'("(?:[^"\\]|\\.){0,256}"|-?\d{1,19}|true|false|null)')
_OBJECTS = re.compile(rb'"(usage|timings|usageMetadata)"\s*:\s*\{')  # usageMetadata: Gemini's


def salvage(head: bytes, tail: bytes) -> dict[str, Any] | None:
    """What the dialects read of a whole JSON body, from its first and last bytes only: the
    identity fields' first occurrence in ``head``, the others' last occurrence and the ``usage``
    / ``timings`` / ``usageMetadata`` objects in ``tail``. None when nothing is found."""
    found: dict[str, Any] = {}
    for match in _SCALAR.finditer(head):
        name = match.group(1).decode()
        if name in _HEAD_FIELDS and name not in found:
            found[name] = loads_object(match.group(2))
    for match in _SCALAR.finditer(tail):
        name = match.group(1).decode()
        if name not in _HEAD_FIELDS:
            found[name] = loads_object(match.group(2))
    text = tail.decode("utf-8", "replace")
    for match in _OBJECTS.finditer(tail):
        start = len(tail[: match.end() - 1].decode("utf-8", "replace"))
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            continue
        found[match.group(1).decode()] = value
    if not found:
        return None
    reason = found.pop("finish_reason", None)
    if isinstance(reason, str):
        found["choices"] = [{"index": 0, "finish_reason": reason}]
    return found
