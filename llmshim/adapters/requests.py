"""requests: ``HTTPAdapter.send`` is patched (Sessions made before install are covered).

The flow of one call: :func:`to_wire` gives the request's exact bytes (a str body encoded as
urllib3 will encode it), the adapter's own ``send`` goes to the network, and :func:`_reply` hands
the pipeline requests' own ``Response`` with a tap over its urllib3 body (how the reads are
watched is ``_requests_raw.py``). A cached answer is replayed through the same path: a urllib3
response over the stored bytes, made into a ``Response`` by the adapter's ``build_response``.
"""

from __future__ import annotations

import functools
import http
import io
from typing import Any

from ..call import Call, Reply, WireRequest
from ..runtime import STATE, begin
from ..tap import Tap
from ._doubles import mark_bypass, requests_double
from ._requests_raw import RawTap

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
    headers = request.headers  # read only if a policy asks for them (WireRequest.headers)
    return WireRequest(request.method or "GET", request.url or "", lambda: tuple(headers.items()), body)


def _reply(response: Any) -> Reply:
    """Taps the urllib3 response under requests' Response. A Response made with its content
    already set (a stand-in adapter's) gets it whole and ends at once; one whose body cannot be
    watched is never stored."""
    tap = Tap()
    content = getattr(response, "_content", False)
    if isinstance(content, bytes):
        tap.chunk(content)
        tap.complete()
        return Reply(response.status_code, response.headers, tap, response, discard=response.close,
                     peek=lambda: response.content)
    try:
        RawTap(response.raw, tap)
    except Exception:  # not a urllib3 response: its reads cannot be seen
        tap.gap()
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


def _read_timeout(timeout: Any) -> float | None:
    """The read timeout of requests' ``timeout`` argument: a number, a (connect, read) pair, or
    urllib3's Timeout; None when there is none (or it is not a plain number)."""
    if isinstance(timeout, tuple):
        timeout = timeout[1] if len(timeout) > 1 else None
    timeout = getattr(timeout, "read_timeout", timeout)
    return float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None


def send_wrapper(module: Any, original: Any) -> Any:
    from requests import exceptions

    transport_errors = (exceptions.ConnectionError, exceptions.Timeout)

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        call = begin("requests", lambda: to_wire(request), _strip(request), request.headers.items)
        if call is None:
            return original(self, request, *args, **kwargs)
        mark_bypass(call, lambda: requests_double(self, original))
        call.replay = _replayer(self, request)
        call.transport_errors = transport_errors
        call.timeout = _read_timeout(kwargs["timeout"] if "timeout" in kwargs else args[1] if len(args) > 1 else None)

        def send_wire(call: Call) -> Reply:
            return _reply(original(self, request, *args, **kwargs))

        return STATE.pipeline.run(call, send_wire).native

    send.__wrapped__ = original  # type: ignore[attr-defined]
    send.__qualname__ = getattr(original, "__qualname__", "send")
    return send
