"""requests: ``HTTPAdapter.send`` is patched (Sessions made before install are covered).

requests reads the body after the adapter returns, through ``response.raw`` (a urllib3
response): ``raw.stream()`` for ``iter_content``/``.content``, ``raw.read()`` for direct use. The
tap shadows ``read``, ``stream`` and ``close`` on that one raw object, so it sees exactly the
bytes the caller reads, decoded by urllib3, and ends when the caller reaches the end or closes.
"""

from __future__ import annotations

import functools
import http
import io
from collections.abc import Iterator
from typing import Any

from ..call import Call, Reply, Tap, WireRequest
from ..runtime import STATE, begin

__all__ = ["send_wrapper", "to_wire"]


@functools.cache
def _str_body_encoding() -> str:
    """How a str body goes on the wire: urllib3 2.x encodes it as strict UTF-8 (``to_bytes``);
    urllib3 1.x hands it to http.client, which encodes it as strict ISO-8859-1."""
    import urllib3

    return "iso-8859-1" if str(getattr(urllib3, "__version__", "2")).startswith("1.") else "utf-8"


def to_wire(request: Any) -> WireRequest | None:
    """The request as it goes on the wire, or None when its exact bytes cannot be known here.

    A str body is encoded exactly as the library below will encode it; one that library would fail
    to encode (a lone surrogate) is left alone, so the caller gets the library's own error and the
    cache never answers it with another body's entry."""
    body = request.body
    if body is None:
        body = b""
    elif isinstance(body, str):
        try:
            body = body.encode(_str_body_encoding())
        except UnicodeEncodeError:
            return None
    elif isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    elif not isinstance(body, bytes):
        return None  # a generator or file upload: never an LLM call we can read
    return WireRequest(request.method or "GET", request.url or "", tuple(request.headers.items()), body)


class _RawTap:
    """Shadows read/stream/close on one urllib3 response. ``stream()`` calls ``self.read()``
    internally; ``_streaming`` keeps those inner reads from being counted twice."""

    __slots__ = ("_close", "_encoded", "_read", "_stream", "_streaming", "raw", "tap")

    def __init__(self, raw: Any, tap: Tap) -> None:
        self.raw, self.tap, self._streaming = raw, tap, False
        self._read, self._stream, self._close = raw.read, raw.stream, raw.close
        encoding = (raw.headers.get("content-encoding") or "identity").strip().lower()
        self._encoded = encoding not in ("identity", "")
        raw.read, raw.stream, raw.close = self.read, self.stream, self.close

    def _decoded(self, decode_content: Any) -> bool:
        return bool(getattr(self.raw, "decode_content", True) if decode_content is None else decode_content)

    def read(self, *args: Any, **kwargs: Any) -> Any:
        """urllib3's read(amt=None, decode_content=None, ...); arguments are forwarded exactly as
        given, because the raw object may be another library's stand-in (vcrpy's, for one)."""
        if self._streaming:
            return self._read(*args, **kwargs)
        amt = args[0] if args else kwargs.get("amt")
        decode_content = args[1] if len(args) > 1 else kwargs.get("decode_content")
        try:
            data = self._read(*args, **kwargs)
        except BaseException as exc:
            self.tap.abort(exc)
            raise
        if self._encoded and not self._decoded(decode_content):
            self.tap.opaque()
        self.tap.chunk(data)
        if amt is None or not data:
            self.tap.complete()
        return data

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        decode_content = args[1] if len(args) > 1 else kwargs.get("decode_content")
        if self._encoded and not self._decoded(decode_content):
            self.tap.opaque()
        self._streaming = True
        try:
            for chunk in self._stream(*args, **kwargs):
                self.tap.chunk(chunk)
                yield chunk
        except GeneratorExit:
            self.tap.abort(None)
            raise
        except BaseException as exc:
            self.tap.abort(exc)
            raise
        finally:
            self._streaming = False
        self.tap.complete()

    def close(self) -> None:
        try:
            self._close()
        finally:
            self.tap.abort(None)  # no-op when the body already completed


def _reply(response: Any) -> Reply:
    tap = Tap()
    _RawTap(response.raw, tap)
    tap.abort_when_collected(response)  # dropped unread: the call still ends
    return Reply(response.status_code, response.headers, tap, response, discard=response.close,
                 peek=lambda: response.content)


def _strip(request: Any) -> Any:
    def strip(names: list[str]) -> None:
        for name in names:
            request.headers.pop(name, None)

    return strip


class _ReplayBody(io.BytesIO):
    """A stored body that closes itself at its end, as a socket-backed response's file does:
    urllib3's ``stream()`` reads until its file reports closed."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if size is None or size < 0 or len(data) < size:
            self.close()
        return data


def _replayer(adapter: Any, request: Any) -> Any:
    """Builds requests' own Response around a urllib3 response over the stored bytes, exactly as
    HTTPAdapter.send does around a live one."""
    def replay(status: int, headers: list[tuple[str, str]], body: bytes) -> Reply:
        from urllib3 import HTTPHeaderDict, HTTPResponse

        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        raw = HTTPResponse(body=_ReplayBody(body), headers=HTTPHeaderDict(headers), status=status, reason=reason,
                           preload_content=False, decode_content=False, request_method=request.method,
                           request_url=request.url)
        return _reply(adapter.build_response(request, raw))

    return replay


def send_wrapper(module: Any, original: Any) -> Any:
    from requests import exceptions

    transport_errors = (exceptions.ConnectionError, exceptions.Timeout)

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        call = begin("requests", lambda: to_wire(request), _strip(request), request.headers.items)
        if call is None:
            return original(self, request, *args, **kwargs)
        call.replay = _replayer(self, request)
        call.transport_errors = transport_errors

        def send_wire(call: Call) -> Reply:
            return _reply(original(self, request, *args, **kwargs))

        return STATE.pipeline.run(call, send_wire).native

    send.__wrapped__ = original  # type: ignore[attr-defined]
    send.__qualname__ = getattr(original, "__qualname__", "send")
    send.__llmshim__ = True  # type: ignore[attr-defined]
    return send
