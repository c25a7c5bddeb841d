"""httpx and httpx2: one adapter, parameterised by module.

Patched: ``Client._send_single_request`` and ``AsyncClient._send_single_request`` (one wire
request, after auth and before redirects are followed). The OpenAI SDK 3.x speaks through
httpx2; openai<3 and the ``ollama`` client through httpx. The response's byte stream is wrapped
so the tap sees each piece as the caller reads it; the caller's own bytes are never changed.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..call import Call, HeaderItems, Reply, WireRequest
from ..runtime import CONTROL_PREFIX, STATE, begin
from ..tap import Tap
from ._decoding import Decoder, decoder_for
from ._doubles import httpx_double, mark_bypass

__all__ = ["async_wrapper", "sync_wrapper", "to_wire"]


def to_wire(request: Any, headers: HeaderItems | Callable[[], HeaderItems] | None = None) -> WireRequest | None:
    """The request as sent; None when its body is a stream we must not consume (uploads).
    ``headers``: the request's headers decoded, or the function that decodes them when asked
    (default: :func:`header_items` now)."""
    try:
        body = request.content
    except Exception:  # RequestNotRead: a streaming body, never an LLM call we can read
        return None
    return WireRequest(request.method, str(request.url), headers if headers is not None else header_items(request),
                       body)


def header_items(request: Any) -> HeaderItems:
    """The request's headers as (name, value) strings, exactly as ``Headers.multi_items()`` gives
    them (names lower-cased as httpx keeps them, the encoding httpx would choose), decoded in a few
    C passes: ``multi_items`` decodes each header twice in Python, and a fresh ``Headers``' first
    ``encoding`` lookup tries every header as ASCII in a Python loop."""
    headers = request.headers
    try:
        entries = headers._list  # [(raw name, lower-cased name, value)]: httpx's own storage
        names_blob = b"\0".join([lowered for _, lowered, _ in entries])
        values_blob = b"\0".join([value for _, _, value in entries])
        encoding = headers._encoding or _encoding_of(names_blob, values_blob)
        # One decode of all names and one of all values, split on a byte no header holds (h11
        # refuses NUL in names and values); should one hold it, the plain per-item decode.
        names = names_blob.decode(encoding).split("\0")
        values = values_blob.decode(encoding).split("\0")
        if len(names) == len(values) == len(entries):
            return tuple(zip(names, values, strict=True))
        return tuple((lowered.decode(encoding), value.decode(encoding)) for _, lowered, value in entries)
    except Exception:  # another Headers than httpx's own, or bytes its named encoding cannot decode
        pass
    try:
        return tuple(headers.multi_items())
    except Exception:  # httpx itself cannot decode them (Headers(..., encoding="utf-8") of other bytes):
        # httpx still sends them as they are; llmshim reads them as ISO-8859-1, byte for byte
        return tuple((key.lower().decode("latin-1"), value.decode("latin-1")) for key, value in headers.raw)


def _encoding_of(names: bytes, values: bytes) -> str:
    """httpx's choice for headers that did not name one: ASCII when every name and value is,
    else UTF-8 when every one decodes so, else ISO-8859-1. Joined with NUL the answer is the same:
    a NUL neither adds a non-ASCII byte nor completes a truncated UTF-8 sequence."""
    if names.isascii() and values.isascii():
        return "ascii"
    try:
        names.decode("utf-8")
        values.decode("utf-8")
    except UnicodeDecodeError:
        return "iso-8859-1"
    return "utf-8"


class _Headers:
    """One request's headers as a call uses them: the scan for x-llmshim-* controls (over the raw
    names, decoding nothing when none is there: the usual case), their removal, and the decoded
    headers of the wire request, read only if a policy asks for them (lazily, after any strip)."""

    __slots__ = ("request",)

    def __init__(self, request: Any) -> None:
        self.request = request

    def controls(self) -> HeaderItems:
        """The headers to look for controls in: none at all unless a name starts like one."""
        try:
            names = b"\0".join([lowered for _, lowered, _ in self.request.headers._list])
            if _CONTROL_PREFIX not in names:
                return ()
        except Exception:  # another Headers than httpx's own: look at all of them
            pass
        return header_items(self.request)

    def strip(self, names: list[str]) -> None:
        headers = self.request.headers
        for name in names:
            if name in headers:
                del headers[name]

    def wire(self) -> WireRequest | None:
        request = self.request
        return to_wire(request, lambda: header_items(request))


_CONTROL_PREFIX = CONTROL_PREFIX.encode()


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


def _replayer(module: Any, client: Any, request: Any, body_class: type, stream_class: type, is_async: bool) -> Any:
    def replay(status: int, headers: list[tuple[str, str]], body: bytes) -> Reply:
        response = module.Response(status, headers=headers, stream=body_class(body), request=request)
        response.default_encoding = getattr(client, "_default_encoding", "utf-8")
        response.elapsed = datetime.timedelta(0)
        return _reply(response, stream_class, is_async)

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

        def __getattr__(self, name: str) -> Any:
            return _forwarded(self, name)

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

        def __getattr__(self, name: str) -> Any:
            return _forwarded(self, name)

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._feed.tap.abort(None)

    _stream_classes[module.__name__] = (TapSyncStream, TapAsyncStream)
    return TapSyncStream, TapAsyncStream


def _forwarded(stream: Any, name: str) -> Any:
    """An attribute the tap stream lacks is the wrapped stream's: the library reads its own stream's
    attributes through ``response.stream`` (httpx2's ``Response.elapsed`` is ``stream.elapsed``,
    set by the client's ``BoundSyncStream`` when the body closes). Only for names not found on the
    tap stream itself, so no read pays for it."""
    if name in ("_inner", "_feed"):  # not set yet: never look for them in themselves
        raise AttributeError(name)
    return getattr(stream._inner, name)


def _reply(response: Any, stream_class: type, is_async: bool) -> Reply:
    """Taps the response's byte stream. A response read at construction (``Response(json=...)``
    or ``content=`` from a mock transport) has its decoded content already: the tap gets it whole
    and ends at once, as the caller can never read that body from the stream."""
    tap = Tap()
    if _preloaded(response):
        tap.chunk(response._content)
        tap.complete()
    else:
        feed = _Feed(tap, decoder_for(response.headers.get("content-encoding")))
        response.stream = stream_class(response.stream, feed)
        tap.abort_when_collected(response)  # dropped unread: the call still ends
    if is_async:
        return Reply(response.status_code, response.headers, tap, response, adiscard=response.aclose)
    return Reply(response.status_code, response.headers, tap, response, discard=response.close, peek=response.read)


def _preloaded(response: Any) -> bool:
    """Whether httpx read the body at construction (it keeps it as ``_content``). Looked up in the
    instance's dict where there is one: ``hasattr`` of a missing attribute raises inside."""
    try:
        return "_content" in response.__dict__
    except AttributeError:  # a response type with slots
        return hasattr(response, "_content")


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
        call = begin(library, headers.wire, headers.strip, headers.controls)
        if call is None:
            return original(self, request)
        mark_bypass(call, lambda: httpx_double(module, self, request))
        call.replay = _replayer(module, self, request, sync_body, sync_stream, False)
        call.transport_errors = (module.TransportError,)
        call.timeout = _read_timeout(request)

        def send(call: Call) -> Reply:
            return _reply(original(self, request), sync_stream, False)

        return STATE.pipeline.run(call, send).native

    return _mark(_send_single_request, original)


#: transport class -> whether it sends through an aiohttp session, worked out once per class.
_THROUGH_AIOHTTP: dict[type, bool] = {}
#: Where an ``AiohttpTransport`` that sends an httpx request with aiohttp is defined: httpx-aiohttp,
#: also vendored by the OpenAI SDK (``openai.DefaultAioHttpClient``), and LiteLLM's (``acompletion``).
_AIOHTTP_TRANSPORT_MODULES = ("httpx_aiohttp", "litellm")


def _through_aiohttp(client: Any, request: Any) -> bool:
    """Whether this request goes out through an aiohttp session that llmshim's aiohttp seam sees
    (``openai.DefaultAioHttpClient``, LiteLLM's ``acompletion``, httpx-aiohttp's client): then the
    call is that seam's, which can verify what answers it, and this one passes it through. Left
    here, the transport (neither httpx's own nor one llmshim can look through) would count as a
    test double: never cached."""
    kind = type(getattr(client, "_transport", None))
    through = _THROUGH_AIOHTTP.get(kind)
    if through is None:
        through = _THROUGH_AIOHTTP[kind] = any(
            cls.__name__ == "AiohttpTransport"
            and not set(cls.__module__.split(".")).isdisjoint(_AIOHTTP_TRANSPORT_MODULES) for cls in kind.__mro__)
    if not through or type(client._transport_for_url(request.url)) is not kind:  # a mount decides otherwise
        return False
    from .aiohttp import seam_active

    return seam_active()


def async_wrapper(module: Any, original: Any) -> Any:
    async_stream = _streams(module)[1]
    async_body = _bodies(module)[1]
    library = module.__name__

    async def _send_single_request(self: Any, request: Any) -> Any:
        if _through_aiohttp(self, request):
            return await original(self, request)
        headers = _Headers(request)
        call = begin(library, headers.wire, headers.strip, headers.controls)
        if call is None:
            return await original(self, request)
        mark_bypass(call, lambda: httpx_double(module, self, request))
        call.replay = _replayer(module, self, request, async_body, async_stream, True)
        call.transport_errors = (module.TransportError,)
        call.timeout = _read_timeout(request)

        async def send(call: Call) -> Reply:
            return _reply(await original(self, request), async_stream, True)

        return (await STATE.pipeline.arun(call, send)).native

    return _mark(_send_single_request, original)


def _mark(function: Any, original: Any) -> Any:
    function.__wrapped__ = original
    function.__qualname__ = getattr(original, "__qualname__", function.__qualname__)
    return function
