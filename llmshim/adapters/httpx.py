"""httpx and httpx2: one adapter, parameterised by module.

Patched: ``Client._send_single_request`` and ``AsyncClient._send_single_request`` (one wire
request, after auth and before redirects are followed). The OpenAI SDK 3.x speaks through
httpx2; openai<3 and the ``ollama`` client through httpx. The response's byte stream is wrapped
so the tap sees each piece as the caller reads it; the caller's own bytes are never changed.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..call import Call, Reply, WireRequest
from ..runtime import STATE, begin
from ..tap import Tap
from ._decoding import Decoder, decoder_for
from ._doubles import httpx_double, mark_bypass

__all__ = ["async_wrapper", "sync_wrapper", "to_wire"]


def to_wire(request: Any, headers: tuple[tuple[str, str], ...] | None = None) -> WireRequest | None:
    """The request as sent; None when its body is a stream we must not consume (uploads).
    ``headers``: the request's headers already decoded (:func:`header_items`)."""
    try:
        body = request.content
    except Exception:  # RequestNotRead: a streaming body, never an LLM call we can read
        return None
    return WireRequest(request.method, str(request.url), headers if headers is not None else header_items(request),
                       body)


def header_items(request: Any) -> tuple[tuple[str, str], ...]:
    """The request's headers as (name, value) strings, as ``Headers.multi_items()`` gives them (same
    encoding, names lower-cased as httpx does), decoded in one pass: ``multi_items`` looks up the
    encoding twice per header."""
    headers = request.headers
    try:
        encoding, raw = headers.encoding, headers.raw
        # One decode of all names and one of all values (C loops), split on a byte no header holds
        # (h11 refuses NUL in names and values); should one hold it, the plain per-item decode.
        names = b"\0".join([key for key, _ in raw]).lower().decode(encoding).split("\0")
        values = b"\0".join([value for _, value in raw]).decode(encoding).split("\0")
        if len(names) == len(values) == len(raw):
            return tuple(zip(names, values, strict=True))
        return tuple((key.lower().decode(encoding), value.decode(encoding)) for key, value in raw)
    except Exception:  # another Headers than httpx's own: its public view
        return tuple(headers.multi_items())


class _Headers:
    """One request's decoded headers, decoded once for both uses a call makes of them (the scan
    for x-llmshim-* controls and the wire request), and again only after controls were stripped."""

    __slots__ = ("items", "request")

    def __init__(self, request: Any) -> None:
        self.request, self.items = request, header_items(request)

    def strip(self, names: list[str]) -> None:
        headers = self.request.headers
        for name in names:
            if name in headers:
                del headers[name]
        self.items = header_items(self.request)

    def listed(self) -> tuple[tuple[str, str], ...]:
        return self.items

    def wire(self) -> WireRequest | None:
        return to_wire(self.request, self.items)


class _Feed:
    """Shared by the sync and async stream wrappers: decode alongside, feed the tap, end it once."""

    def __init__(self, tap: Tap, decoder: Decoder | None) -> None:
        self.tap, self.decoder = tap, decoder
        if decoder is None:
            tap.opaque()

    def chunk(self, data: bytes) -> None:
        if not data:
            return
        if self.decoder is None:
            self.tap.chunk(data)  # opaque: only the first-chunk time is recorded
            return
        try:
            for piece in self.decoder.decode(data):
                self.tap.chunk(piece)
        except Exception:  # a body we cannot decode is a body we do not read
            self.decoder = None
            self.tap.opaque()

    def done(self) -> None:
        if self.decoder is not None:
            try:
                self.tap.chunk(self.decoder.flush())
            except Exception:
                self.tap.opaque()
        self.tap.complete()


_stream_classes: dict[str, tuple[type, type]] = {}
_body_classes: dict[str, tuple[type, type]] = {}


def _bodies(module: Any) -> tuple[type, type]:
    """Byte streams for replayed bodies. Not ``ByteStream``: httpx reads those at construction,
    and a replayed body must flow through the tap like a live one."""
    cached = _body_classes.get(module.__name__)
    if cached is None:
        class ReplaySyncBody(module.SyncByteStream):  # type: ignore[misc]
            def __init__(self, body: bytes) -> None:
                self._body = body

            def __iter__(self) -> Iterator[bytes]:
                yield self._body

        class ReplayAsyncBody(module.AsyncByteStream):  # type: ignore[misc]
            def __init__(self, body: bytes) -> None:
                self._body = body

            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield self._body

        cached = _body_classes[module.__name__] = (ReplaySyncBody, ReplayAsyncBody)
    return cached


def _replayer(module: Any, client: Any, request: Any, body_class: type, stream_class: type) -> Any:
    def replay(status: int, headers: list[tuple[str, str]], body: bytes) -> Reply:
        response = module.Response(status, headers=headers, stream=body_class(body), request=request)
        response.default_encoding = getattr(client, "_default_encoding", "utf-8")
        response.elapsed = datetime.timedelta(0)
        return _reply(response, stream_class)

    return replay


def _streams(module: Any) -> tuple[type, type]:
    """Tap stream classes subclassing this module's SyncByteStream/AsyncByteStream (httpx checks)."""
    cached = _stream_classes.get(module.__name__)
    if cached is not None:
        return cached

    class TapSyncStream(module.SyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, feed: _Feed) -> None:
            self._inner, self._feed = inner, feed

        def __iter__(self) -> Iterator[bytes]:
            try:
                for chunk in self._inner:
                    self._feed.chunk(chunk)
                    yield chunk
            except GeneratorExit:
                self._feed.tap.abort(None)
                raise
            except BaseException as exc:
                self._feed.tap.abort(exc)
                raise
            self._feed.done()

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._feed.tap.abort(None)  # no-op when the body already completed

    class TapAsyncStream(module.AsyncByteStream):  # type: ignore[misc]
        def __init__(self, inner: Any, feed: _Feed) -> None:
            self._inner, self._feed = inner, feed

        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._inner:
                    self._feed.chunk(chunk)
                    yield chunk
            except GeneratorExit:
                self._feed.tap.abort(None)
                raise
            except BaseException as exc:
                self._feed.tap.abort(exc)
                raise
            self._feed.done()

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._feed.tap.abort(None)

    _stream_classes[module.__name__] = (TapSyncStream, TapAsyncStream)
    return TapSyncStream, TapAsyncStream


def _reply(response: Any, stream_class: type) -> Reply:
    """Taps the response's byte stream. A response read at construction (``Response(json=...)``
    or ``content=`` from a mock transport) has its decoded content already: the tap gets it whole
    and ends at once, as the caller can never read that body from the stream."""
    tap = Tap()
    if hasattr(response, "_content"):
        tap.chunk(response._content)
        tap.complete()
    else:
        feed = _Feed(tap, decoder_for(response.headers.get("content-encoding")))
        response.stream = stream_class(response.stream, feed)
        tap.abort_when_collected(response)  # dropped unread: the call still ends
    if hasattr(response.stream, "aclose"):
        return Reply(response.status_code, response.headers, tap, response, adiscard=response.aclose)
    return Reply(response.status_code, response.headers, tap, response, discard=response.close, peek=response.read)


def _read_timeout(request: Any) -> float | None:
    """The request's read timeout (httpx keeps the client's or the call's in its extensions)."""
    timeout = (request.extensions.get("timeout") or {}).get("read")
    return float(timeout) if isinstance(timeout, (int, float)) else None


def sync_wrapper(module: Any, original: Any) -> Any:
    sync_stream = _streams(module)[0]
    sync_body = _bodies(module)[0]
    library = module.__name__

    def _send_single_request(self: Any, request: Any) -> Any:
        headers = _Headers(request)
        call = begin(library, headers.wire, headers.strip, headers.listed)
        if call is None:
            return original(self, request)
        mark_bypass(call, lambda: httpx_double(module, self, request))
        call.replay = _replayer(module, self, request, sync_body, sync_stream)
        call.transport_errors = (module.TransportError,)
        call.timeout = _read_timeout(request)

        def send(call: Call) -> Reply:
            return _reply(original(self, request), sync_stream)

        return STATE.pipeline.run(call, send).native

    return _mark(_send_single_request, original)


def async_wrapper(module: Any, original: Any) -> Any:
    async_stream = _streams(module)[1]
    async_body = _bodies(module)[1]
    library = module.__name__

    async def _send_single_request(self: Any, request: Any) -> Any:
        headers = _Headers(request)
        call = begin(library, headers.wire, headers.strip, headers.listed)
        if call is None:
            return await original(self, request)
        mark_bypass(call, lambda: httpx_double(module, self, request))
        call.replay = _replayer(module, self, request, async_body, async_stream)
        call.transport_errors = (module.TransportError,)
        call.timeout = _read_timeout(request)

        async def send(call: Call) -> Reply:
            return _reply(await original(self, request), async_stream)

        return (await STATE.pipeline.arun(call, send)).native

    return _mark(_send_single_request, original)


def _mark(function: Any, original: Any) -> Any:
    function.__wrapped__ = original
    function.__qualname__ = getattr(original, "__qualname__", function.__qualname__)
    return function
