"""What a cache miss records: the response headers an entry keeps (``stored_headers``), and the
tee that copies the decoded body as the caller reads it and, at the body's one end, says whether
that copy may be stored.

The recorder subscribes to the reply's body tap (``call.py``); it never reads the body itself, so
the caller's bytes and timing are untouched. It keeps at most ``max_bytes`` (past that it stops
buffering and the answer is not stored), and at the end (complete or aborted: the tracker has
judged the call's outcome by then) hands ``finish`` the body to store, or None. Whether an ended
call is storable is ``storable``, pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import redact
from ..call import Call
from ..tap import Tap

__all__ = ["DROPPED_HEADERS", "Recorder", "storable", "stored_headers"]

#: Response headers never stored: hop-by-hop, the body's encoding (we store it decoded), cookies,
#: and the ones a hit gets anew (``x-llmshim-cache``, the cache policy's ``HEADER``; ``age``).
DROPPED_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection", "keep-alive",
                             "set-cookie", "date", "x-llmshim-cache", "age"})


def stored_headers(headers: Any) -> list[tuple[str, str]]:
    """The response headers an entry keeps: not hop-by-hop ones, and never a credential (a
    gateway echoing a key or a session token must not write it into the cache file)."""
    items = headers.multi_items() if hasattr(headers, "multi_items") else list(headers.items())
    return [(str(k), str(v)) for k, v in items
            if str(k).lower() not in DROPPED_HEADERS and not redact.is_secret_header(str(k))]


def storable(call: Call, opaque: bool) -> bool:
    """Whether an ended call's answer may be stored: complete, successful, readable (``opaque``:
    bytes were read where the tap could not see them)."""
    response = call.response
    return (call.outcome == "ok" and call.status is not None and 200 <= call.status < 300 and not opaque
            and response is not None and response.done and not response.error)


class Recorder:
    """Tees the decoded body of a miss; at the end, ``finish(body)`` with the body to store or None."""

    __slots__ = ("_call", "_chunks", "_finish", "_max_bytes", "_size", "_tap")

    def __init__(self, call: Call, tap: Tap, max_bytes: int, finish: Callable[[bytes | None], None]) -> None:
        self._call, self._tap, self._max_bytes, self._finish = call, tap, max_bytes, finish
        self._chunks: list[bytes] | None = []
        self._size = 0

    def on_chunk(self, data: bytes) -> None:
        if self._chunks is None:
            return
        self._size += len(data)
        if self._size > self._max_bytes:  # too big to keep: stop buffering, never store
            self._chunks = None
            return
        self._chunks.append(data)

    def on_complete(self) -> None:
        self._end()

    def on_abort(self, error: BaseException | None) -> None:
        self._end()  # the tracker judged it: a close after the done marker is still "ok"

    def _end(self) -> None:
        chunks, self._chunks = self._chunks, None
        # missed: bytes were read where the tap could not see them; None: more than max_bytes
        keep = chunks is not None and storable(self._call, self._tap.opaque_body or self._tap.missed)
        self._finish(b"".join(chunks) if keep and chunks is not None else None)
