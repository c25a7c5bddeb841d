"""Incremental Content-Encoding decoding for taps that see raw wire bytes (httpx's stream).

The caller still gets the raw bytes, decoded by its own library; this only lets llmshim read the
body alongside. An encoding we cannot decode yields None, and the tap is then marked opaque.
"""

from __future__ import annotations

import zlib
from typing import Any, Protocol

__all__ = ["Decoder", "decoder_for"]


class Decoder(Protocol):
    def decode(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def decode(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._obj: Any = zlib.decompressobj(wbits)

    def decode(self, data: bytes) -> bytes:
        return bytes(self._obj.decompress(data))

    def flush(self) -> bytes:
        return bytes(self._obj.flush())


class _Deflate:
    """'deflate' is zlib-wrapped by the spec and raw deflate in practice: try one, then the other."""

    def __init__(self) -> None:
        self._obj: Any = zlib.decompressobj()
        self._first = True

    def decode(self, data: bytes) -> bytes:
        if self._first:
            self._first = False
            try:
                return bytes(self._obj.decompress(data))
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(self._obj.decompress(data))

    def flush(self) -> bytes:
        return bytes(self._obj.flush())


class _Brotli:
    def __init__(self, module: Any) -> None:
        self._obj = module.Decompressor()

    def decode(self, data: bytes) -> bytes:
        method = getattr(self._obj, "process", None) or self._obj.decompress
        return bytes(method(data))

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
