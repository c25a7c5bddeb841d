"""Incremental Content-Encoding decoding for taps that see raw wire bytes (httpx's stream).

The caller still gets the raw bytes, decoded by its own library; this only lets llmshim read the
body alongside. An encoding we cannot decode yields None, and the tap is then marked opaque.
Decoding yields pieces of at most ``PIECE`` bytes, one at a time: a small compressed chunk can
inflate to hundreds of megabytes (a gzip bomb), and llmshim never holds more than a piece of it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

__all__ = ["PIECE", "Decoder", "decoder_for"]

PIECE = 256 * 1024


class Decoder(Protocol):
    def decode(self, data: bytes) -> Iterable[bytes]: ...
    def flush(self) -> bytes: ...


class _Identity:
    def decode(self, data: bytes) -> Iterable[bytes]:
        return (data,)  # per chunk of every stream: a tuple, not a generator

    def flush(self) -> bytes:
        return b""


def _bounded(obj: Any, data: bytes) -> Iterator[bytes]:
    """zlib output in pieces of at most PIECE bytes, each made only when the last was taken."""
    piece = obj.decompress(data, PIECE)
    while True:
        if piece:
            yield bytes(piece)
        if not obj.unconsumed_tail:
            return
        piece = obj.decompress(obj.unconsumed_tail, PIECE)


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._obj: Any = zlib.decompressobj(wbits)

    def decode(self, data: bytes) -> Iterator[bytes]:
        return _bounded(self._obj, data)

    def flush(self) -> bytes:
        return bytes(self._obj.flush())


class _Deflate:
    """'deflate' is zlib-wrapped by the spec and raw deflate in practice: try one, then the other."""

    def __init__(self) -> None:
        self._obj: Any = zlib.decompressobj()
        self._first = True

    def decode(self, data: bytes) -> Iterator[bytes]:
        if self._first:
            self._first = False
            try:
                self._obj.decompress(data[:2])  # the zlib header, or an error for raw deflate
                self._obj = zlib.decompressobj()
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return _bounded(self._obj, data)

    def flush(self) -> bytes:
        return bytes(self._obj.flush())


class _Brotli:
    def __init__(self, module: Any) -> None:
        self._obj = module.Decompressor()

    def decode(self, data: bytes) -> Iterator[bytes]:
        method = getattr(self._obj, "process", None) or self._obj.decompress
        yield bytes(method(data))  # brotli bindings offer no output bound: one piece per input

    def flush(self) -> bytes:
        return b""


def decoder_for(content_encoding: str | None) -> Decoder | None:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _Deflate()
    if encoding == "br":
        for name in ("brotli", "brotlicffi"):
            try:
                return _Brotli(__import__(name))
            except ImportError:
                continue
    return None
