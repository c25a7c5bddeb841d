"""aiohttp: one innermost client middleware, added to every ClientSession.

aiohttp (>= 3.12) runs a session's middlewares around each wire request with a finished
``ClientRequest``, exactly the seam llmshim needs, and one that vcrpy (which replaces
``ClientSession._request``) does not touch. Sessions keep their own middleware list; the
``_middlewares`` attribute is replaced on the class by a descriptor that appends llmshim's
middleware while llmshim is active, so sessions made before ``install()`` are covered too.

The body tap works on the reading side: the response's StreamReader is switched to a subclass
that forwards each piece the caller takes (already decompressed by aiohttp) to the tap, so a body
the caller did not read to its end is never complete, even when it all arrived with the headers.
"""

from __future__ import annotations

from typing import Any

from ..call import Call, Reply, WireRequest
from ..runtime import STATE, begin
from ..tap import OnEnd, Tap
from ._doubles import _mocked, aiohttp_double, bypass_reason, mark_bypass

__all__ = ["middlewares", "seam_active", "to_wire"]

# id(StreamReader) -> tap. StreamReader has __slots__ and no weakref slot, so the tap lives here
# until the body ends or the response is collected.
_taps: dict[int, Tap] = {}


def to_wire(request: Any) -> WireRequest | None:
    from aiohttp import payload

    body = request.body
    if isinstance(body, payload.BytesPayload):
        data = body._value
    elif isinstance(body, (bytes, bytearray)):  # no data: aiohttp keeps a bare b""
        data = bytes(body)
    elif body is None or getattr(body, "size", None) == 0:
        data = b""
    else:
        return None
    headers = request.headers  # read only if a policy asks for them (WireRequest.headers)
    return WireRequest(request.method, str(request.url), lambda: tuple(headers.items()), bytes(data))


def _forget(key: int) -> None:
    _taps.pop(key, None)


def _end(key: int, error: BaseException | None, completed: bool) -> None:
    tap = _taps.pop(key, None)
    if tap is not None:
        tap.complete() if completed else tap.abort(error)


_reader_class: type | None = None


def _tap_reader_class() -> type:
    """A StreamReader that tells the tap what the *caller* takes from it.

    Every reading method of aiohttp's StreamReader (read, readany, readchunk, readexactly,
    readline/readuntil, read_nowait, the iter_* iterators, ``async for``) takes its bytes through
    one private step, ``_read_nowait_chunk``: the tap is fed there, so it sees exactly what the
    caller read, in order, whatever method it used. The body is complete when the end of stream
    has arrived and the caller has emptied the buffer; a release, close or connection error
    before that aborts it (aiohttp signals those through ``set_exception``). ``unread_data`` gives
    bytes back to be read again: the tap then cannot vouch for the whole body (``gap``)."""
    global _reader_class
    if _reader_class is None:
        from aiohttp.streams import StreamReader

        class TapStreamReader(StreamReader):
            __slots__ = ()  # same layout, so an existing reader's __class__ can be switched

            def _read_nowait_chunk(self, n: int) -> bytes:
                data: bytes = super()._read_nowait_chunk(n)
                tap = _taps.get(id(self))
                if tap is not None:
                    tap.chunk(data)
                    if self._eof and not self._buffer:
                        _end(id(self), None, completed=True)
                return data

            def feed_eof(self) -> None:
                super().feed_eof()
                if not self._buffer:  # the caller already took everything
                    _end(id(self), None, completed=True)

            def set_exception(self, exc: BaseException, *args: Any) -> None:
                super().set_exception(exc, *args)
                _end(id(self), exc, completed=False)

            def unread_data(self, data: bytes) -> None:
                tap = _taps.get(id(self))
                if tap is not None and data:
                    tap.gap()
                super().unread_data(data)

        _reader_class = TapStreamReader
    return _reader_class


def _reply(response: Any) -> Reply:
    from aiohttp.streams import StreamReader

    tap = Tap()
    reader = response.content
    encoding = (response.headers.get("content-encoding") or "identity").lower()
    if encoding not in ("identity", "") and not getattr(response, "_auto_decompress", True):
        tap.opaque()
    if reader.exception() is not None:
        tap.abort(reader.exception())
    elif reader.at_eof():  # an empty body (aiohttp's EmptyStreamReader among them)
        tap.complete()
    elif type(reader) is StreamReader:
        key = id(reader)
        _taps[key] = tap
        tap.abort_when_collected(response)
        tap.subscribe(OnEnd(lambda: _forget(key)))  # however the tap ends, drop its entry
        reader.__class__ = _tap_reader_class()
    else:  # a reader of another kind: its reads cannot be seen, so its body is never stored
        tap.gap()
        tap.abort_when_collected(response)

    async def discard() -> None:
        response.close()

    return Reply(response.status, response.headers, tap, response, adiscard=discard)


def _strip(request: Any) -> Any:
    def strip(names: list[str]) -> None:
        for name in names:
            request.headers.popall(name, None)

    return strip


class _NoConnection:
    """Stands in for the protocol a StreamReader expects: a replayed body has no connection."""

    _reading_paused = False
    connected = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        pass


def _replayer(request: Any) -> Any:
    """Builds aiohttp's own ClientResponse over stored bytes: status, headers, and a real
    StreamReader holding the body, so every reading method behaves as aiohttp's own."""
    def replay(status: int, headers: list[tuple[str, str]], body: bytes) -> Reply:
        import asyncio
        import http
        import inspect
        import types

        from aiohttp import ClientResponse
        from aiohttp.streams import StreamReader
        from multidict import CIMultiDict, CIMultiDictProxy

        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if "stream_writer" in inspect.signature(ClientResponse.__init__).parameters:
            extra["stream_writer"] = types.SimpleNamespace(output_size=0)
        extra.update(writer=None, continue100=None, timer=None, request_info=request.request_info, traces=[],
                     loop=loop, session=getattr(request, "_session", None))
        response = ClientResponse(request.method, request.url, **extra)
        response.status = status
        try:
            response.reason = http.HTTPStatus(status).phrase
        except ValueError:
            response.reason = ""
        response._headers = CIMultiDictProxy(CIMultiDict(headers))
        response._raw_headers = tuple((k.encode(), v.encode()) for k, v in headers)
        reader = StreamReader(_NoConnection(), max(len(body), 2**16), loop=loop)  # type: ignore[arg-type]
        reader.feed_data(body)
        reader.feed_eof()
        response.content = reader
        return _reply(response)

    return replay


async def _middleware(request: Any, handler: Any) -> Any:
    call = begin("aiohttp", lambda: to_wire(request), _strip(request), request.headers.items)
    if call is None:
        return await handler(request)
    mark_bypass(call, lambda: aiohttp_double(request))
    call.replay = _replayer(request)
    session_timeout = getattr(getattr(request, "_session", None), "timeout", None)
    call.timeout = getattr(session_timeout, "sock_read", None) or getattr(session_timeout, "total", None)
    timer = getattr(request, "_timer", None)  # the session's or the request's total timeout
    call.expired = lambda: getattr(timer, "_cancelled", False) is True
    import asyncio

    import aiohttp

    call.transport_errors = (aiohttp.ClientConnectionError, asyncio.TimeoutError)

    async def send(call: Call) -> Any:
        return _reply(await handler(request))

    return (await STATE.pipeline.arun(call, send)).native


class _SessionMiddlewares:
    """Data descriptor for ClientSession._middlewares: the session's own tuple, plus llmshim's."""

    def __get__(self, session: Any, owner: Any = None) -> Any:
        if session is None:
            return self
        own = session.__dict__.get("_middlewares", ())
        return (*own, _middleware) if STATE.active else own

    def __set__(self, session: Any, value: Any) -> None:
        session.__dict__["_middlewares"] = value


def middlewares(module: Any, original: Any) -> Any:
    return _SessionMiddlewares()


def seam_active() -> bool:
    """Whether llmshim sees the requests of aiohttp sessions now: installed, its middleware
    descriptor on ``ClientSession`` (not left out by ``LLMSHIM_LIBRARIES``, not removed), and
    ``ClientSession._request`` aiohttp's own: middlewares run inside it, so under a replacement
    (aioresponses, vcrpy) no request reaches llmshim's."""
    import aiohttp.client

    session = aiohttp.client.ClientSession
    return (STATE.active and isinstance(vars(session).get("_middlewares"), _SessionMiddlewares)
            and not bypass_reason(lambda: _mocked(session._request, "aiohttp")))
