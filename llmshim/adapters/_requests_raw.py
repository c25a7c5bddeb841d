"""requests' body reads, watched: a tap over the urllib3 response under a requests ``Response``.

requests reads the body after the adapter returns, through ``response.raw`` (a urllib3
response): ``raw.stream()`` for ``iter_content``/``.content``, ``raw.read()``/``read1()``/
``readinto()``/``read_chunked()`` for direct use. :class:`RawTap` shadows those and ``close`` on
that one raw object, so the tap sees exactly the bytes the caller reads, decoded by urllib3, and
ends when the caller reaches the end or closes. To know that nothing was read past it, the bytes
taken from the connection are counted underneath (:class:`_CountingFile`): bytes taken any other
way are a gap, and keep the answer out of the cache.
"""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator
from typing import Any

from ..tap import Tap

__all__ = ["RawTap"]


class _CountingFile:
    """Stands in for the socket file under http.client's response and counts every byte any
    reader takes from it: http.client's own read paths and urllib3's ``read_chunked``, which
    reads this file directly. ``peek`` takes nothing, so it is not counted."""

    __slots__ = ("_file", "taken")

    def __init__(self, file: Any) -> None:
        self._file, self.taken = file, 0

    def _took(self, data: Any) -> Any:
        self.taken += len(data) if data else 0
        return data

    def read(self, *args: Any) -> Any:
        return self._took(self._file.read(*args))

    def read1(self, *args: Any) -> Any:
        return self._took(self._file.read1(*args))

    def readline(self, *args: Any) -> Any:
        return self._took(self._file.readline(*args))

    def readinto(self, buffer: Any) -> Any:
        count = self._file.readinto(buffer)
        self.taken += count or 0
        return count

    def readinto1(self, buffer: Any) -> Any:
        count = self._file.readinto1(buffer)
        self.taken += count or 0
        return count

    def readlines(self, *args: Any) -> Any:
        lines = self._file.readlines(*args)
        self.taken += sum(len(line) for line in lines)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        for line in self._file:
            yield self._took(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _count_wire_bytes(raw: Any) -> _CountingFile | None:
    """Put a counter under a live urllib3 response (its http.client response's socket file)."""
    inner = getattr(raw, "_fp", None)
    file = getattr(inner, "fp", None)
    if isinstance(inner, http.client.HTTPResponse) and isinstance(file, io.BufferedIOBase):
        counter = _CountingFile(file)
        inner.fp = counter  # type: ignore[assignment]
        return counter
    return None


class RawTap:
    """Shadows every reading method of one urllib3 response (read, read1, readinto, stream,
    read_chunked; readline, readlines, iteration, ``data`` and io wrappers go through these), so
    the tap sees exactly the bytes the caller reads, decoded by urllib3.

    Complete *by construction*, not by this list: the bytes taken from the connection are counted
    (below http.client, see :class:`_CountingFile`; urllib3's own ``tell()`` where there is no
    socket), and each outermost shadowed call accounts for what it took. Bytes taken by any other
    path, between or after those calls, leave a difference: the tap is marked ``gap()`` and its
    body is never stored. Inner calls (``stream()`` calls ``read()``) pass straight through."""

    __slots__ = ("_close", "_counter", "_depth", "_encoded", "_originals", "_seen", "raw", "tap")

    SHADOWED = ("read", "read1", "readinto", "stream", "read_chunked")

    def __init__(self, raw: Any, tap: Tap) -> None:
        self.raw, self.tap, self._depth = raw, tap, 0
        self._originals = {name: getattr(raw, name) for name in self.SHADOWED if hasattr(raw, name)}
        self._close = raw.close
        encoding = (raw.headers.get("content-encoding") or "identity").strip().lower()
        self._encoded = encoding not in ("identity", "")
        self._counter = _count_wire_bytes(raw)
        self._seen = self._taken()
        for name in self._originals:
            setattr(raw, name, getattr(self, name))
        raw.close = self.close

    # -- accounting ------------------------------------------------------------------------------
    def _taken(self) -> int | None:
        if self._counter is not None:
            return self._counter.taken
        try:
            taken = self.raw.tell()
        except Exception:  # another library's stand-in without tell(): nothing to account against
            return None
        return taken if isinstance(taken, int) else None

    def _enter(self) -> None:
        if self._taken() != self._seen:
            self.tap.gap()  # bytes left the connection between our calls, unseen
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1
        self._seen = self._taken()

    def _complete(self) -> None:
        if self._taken() != self._seen:
            self.tap.gap()
        self.tap.complete()

    def _decoded(self, decode_content: Any) -> None:
        if self._encoded and not bool(getattr(self.raw, "decode_content", True)
                                      if decode_content is None else decode_content):
            self.tap.opaque()

    def _outer(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._enter()
        try:
            return self._originals[name](*args, **kwargs)
        except BaseException as exc:
            self.tap.abort(exc)
            raise
        finally:
            self._leave()

    # -- the shadowed methods: arguments are forwarded exactly as given, because the raw object
    # may be another library's stand-in (vcrpy's, for one) ----------------------------------------
    def read(self, *args: Any, **kwargs: Any) -> Any:
        """urllib3's read(amt=None, decode_content=None, cache_content=False)."""
        if self._depth:
            return self._originals["read"](*args, **kwargs)
        amt = args[0] if args else kwargs.get("amt")
        data = self._outer("read", args, kwargs)
        self._decoded(args[1] if len(args) > 1 else kwargs.get("decode_content"))
        self.tap.chunk(data)
        if amt is None or amt < 0 or (not data and amt != 0):
            self._complete()
        return data

    def read1(self, *args: Any, **kwargs: Any) -> Any:
        """read1(amt=None, decode_content=None): whatever is available; the end is an empty read."""
        if self._depth:
            return self._originals["read1"](*args, **kwargs)
        amt = args[0] if args else kwargs.get("amt")
        data = self._outer("read1", args, kwargs)
        self._decoded(args[1] if len(args) > 1 else kwargs.get("decode_content"))
        if data:
            self.tap.chunk(data)
        elif amt != 0:
            self._complete()
        return data

    def readinto(self, buffer: Any) -> Any:
        if self._depth:
            return self._originals["readinto"](buffer)
        count = self._outer("readinto", (buffer,), {})
        self._decoded(None)
        if count:
            self.tap.chunk(bytes(memoryview(buffer)[:count]))
        elif len(buffer):
            self._complete()
        return count

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        return self._iterate("stream", args, kwargs)

    def read_chunked(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        return self._iterate("read_chunked", args, kwargs)

    def _iterate(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[bytes]:
        """A generator method, shadowed piece by piece: only the step that makes a piece counts as
        inside; between pieces the caller may read by other paths, which must be accounted."""
        if self._depth:  # called from inside another shadowed method: theirs to account
            yield from self._originals[name](*args, **kwargs)
            return
        self._decoded(args[1] if len(args) > 1 else kwargs.get("decode_content"))
        inner = self._originals[name](*args, **kwargs)
        try:
            while True:
                self._enter()
                try:
                    chunk = next(inner)
                except StopIteration:
                    break
                finally:
                    self._leave()
                self.tap.chunk(chunk)
                yield chunk
        except GeneratorExit:
            self.tap.abort(None)
            raise
        except BaseException as exc:
            self.tap.abort(exc)
            raise
        self._complete()

    def close(self) -> None:
        try:
            self._close()
        finally:
            self.tap.abort(None)  # no-op when the body already completed
