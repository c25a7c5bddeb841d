"""Each adapter's ``to_wire`` as a unit: the library's own request object in, the WireRequest out.

Method, absolute URL (query included), headers in the order the library sends them, and the exact
body bytes for each way a caller can give a body: JSON, bytes, str, a form, no body. A body whose
bytes cannot be known without consuming it (a generator, a file, an async iterable, httpx's
multipart stream) answers None: the call then passes through untouched. No sockets here; that
these bytes are what reaches the server is tests/test_wire_bytes.py's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import requests
from yarl import URL

from llmshim.adapters import aiohttp as aiohttp_adapter
from llmshim.adapters import httpx as httpx_adapter
from llmshim.adapters import requests as requests_adapter
from llmshim.call import WireRequest

URL_IN = "http://h:1/v1/chat/completions"
URL_OUT = "http://h:1/v1/chat/completions?q=a+b"
PARAMS = {"q": "a b"}
HEADERS = {"Authorization": "Bearer k", "X-A": "1"}
JSON = {"a": "é"}


def _httpx_modules() -> list[ModuleType]:
    found = [importlib.import_module("httpx")]
    with contextlib.suppress(ImportError):
        found.append(importlib.import_module("httpx2"))
    return found


# -- requests: a PreparedRequest, as HTTPAdapter.send gets it ---------------------------------

def _prepared(**body: Any) -> Any:
    return requests.Request("POST", URL_IN, headers=HEADERS, params=PARAMS, **body).prepare()


@pytest.mark.parametrize(("body", "wire_body", "extra_headers"), [
    ({"json": JSON}, b'{"a": "\\u00e9"}', (("Content-Length", "15"), ("Content-Type", "application/json"))),
    ({"data": b"raw"}, b"raw", (("Content-Length", "3"),)),
    ({"data": "h\u00e9llo"}, "h\u00e9llo".encode(), (("Content-Length", "6"),)),  # urllib3 2 sends str as UTF-8
    ({"data": {"k": "v w"}}, b"k=v+w",
     (("Content-Length", "5"), ("Content-Type", "application/x-www-form-urlencoded"))),
    ({}, b"", (("Content-Length", "0"),)),
], ids=["json", "bytes", "str", "form", "none"])
def test_requests_to_wire(body: dict[str, Any], wire_body: bytes, extra_headers: tuple[tuple[str, str], ...]) -> None:
    import urllib3

    if body.get("data") == "h\u00e9llo" and urllib3.__version__.startswith("1."):
        pytest.skip("urllib3 1.x sends a str body as ISO-8859-1")
    assert requests_adapter.to_wire(_prepared(**body)) == WireRequest(
        "POST", URL_OUT, (("Authorization", "Bearer k"), ("X-A", "1"), *extra_headers), wire_body)


def test_requests_multipart_is_the_prepared_bytes() -> None:
    prepared = _prepared(files={"f": ("a.txt", b"x")})
    wire = requests_adapter.to_wire(prepared)
    assert wire is not None and wire.body == prepared.body and b'filename="a.txt"\r\n\r\nx\r\n' in wire.body


@pytest.mark.parametrize("make", [
    lambda: _prepared(data=iter([b"a", b"b"])),
    lambda: _prepared(data=io.BytesIO(b"file")),
], ids=["generator", "file"])
def test_requests_streamed_bodies_are_not_read(make: Any) -> None:
    prepared = make()
    assert requests_adapter.to_wire(prepared) is None
    if isinstance(prepared.body, io.BytesIO):
        assert prepared.body.tell() == 0  # nothing consumed


def test_requests_unencodable_str_and_buffer_types() -> None:
    prepared = _prepared(data=b"")
    prepared.body = "\ud800"  # a lone surrogate: the library below fails on it, so llmshim stays out
    assert requests_adapter.to_wire(prepared) is None
    for buffer in (bytearray(b"xy"), memoryview(b"xy")):
        prepared.body = buffer
        wire = requests_adapter.to_wire(prepared)
        assert wire is not None and wire.body == b"xy" and type(wire.body) is bytes
    prepared.method, prepared.url, prepared.body = None, None, None
    assert requests_adapter.to_wire(prepared) == WireRequest("GET", "", prepared_headers(prepared), b"")


def prepared_headers(prepared: Any) -> tuple[tuple[str, str], ...]:
    return tuple(prepared.headers.items())


# -- httpx and httpx2: an httpx.Request, as Client._send_single_request gets it -----------------

@pytest.mark.parametrize("module", _httpx_modules(), ids=lambda m: m.__name__)
@pytest.mark.parametrize(("body", "wire_body", "extra_headers"), [
    ({"json": JSON}, '{"a":"\u00e9"}'.encode(), (("content-length", "10"), ("content-type", "application/json"))),
    ({"content": b"raw"}, b"raw", (("content-length", "3"),)),
    ({"content": "h\u00e9llo"}, "h\u00e9llo".encode(), (("content-length", "6"),)),
    ({"data": {"k": "v w"}}, b"k=v+w",
     (("content-length", "5"), ("content-type", "application/x-www-form-urlencoded"))),
], ids=["json", "bytes", "str", "form"])
def test_httpx_to_wire(module: ModuleType, body: dict[str, Any], wire_body: bytes,
                       extra_headers: tuple[tuple[str, str], ...]) -> None:
    request = module.Request("POST", URL_IN, headers=HEADERS, params=PARAMS, **body)
    assert httpx_adapter.to_wire(request) == WireRequest(
        "POST", URL_OUT, (("host", "h:1"), ("authorization", "Bearer k"), ("x-a", "1"), *extra_headers), wire_body)


@pytest.mark.parametrize("module", _httpx_modules(), ids=lambda m: m.__name__)
def test_httpx_without_body_and_repeated_headers(module: ModuleType) -> None:
    request = module.Request("GET", URL_IN, headers=[("X-A", "1"), ("x-a", "2")])
    assert httpx_adapter.to_wire(request) == WireRequest(
        "GET", URL_IN, (("host", "h:1"), ("x-a", "1"), ("x-a", "2")), b"")  # both values, in order


@pytest.mark.parametrize("module", _httpx_modules(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("body", [
    lambda: {"content": iter([b"a", b"b"])},
    lambda: {"files": {"f": ("a.txt", b"x")}},
], ids=["iterator", "multipart"])
def test_httpx_unread_streams_are_not_consumed(module: ModuleType, body: Any) -> None:
    request = module.Request("POST", URL_IN, **body())
    assert httpx_adapter.to_wire(request) is None
    assert b"".join(request.stream) != b""  # the body is still there for the library to send


# -- aiohttp: a ClientRequest, as a client middleware gets it ----------------------------------

AIOHTTP_AUTO = (("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate"))


def _aiohttp_wire(data: Any) -> tuple[WireRequest | None, Any]:
    async def build() -> tuple[WireRequest | None, Any]:
        body = data() if callable(data) else data
        request = aiohttp.ClientRequest("POST", URL(URL_IN), params=PARAMS, headers=HEADERS, data=body,
                                        loop=asyncio.get_running_loop())
        return aiohttp_adapter.to_wire(request), request

    return asyncio.run(build())


@pytest.mark.parametrize(("data", "wire_body", "content_type"), [
    (lambda: aiohttp.payload.JsonPayload(JSON), b'{"a": "\\u00e9"}', "application/json"),  # session(json=...)
    (b"raw", b"raw", "application/octet-stream"),
    ("h\u00e9llo", "h\u00e9llo".encode(), "text/plain; charset=utf-8"),
    ({"k": "v w"}, b"k=v+w", "application/x-www-form-urlencoded"),
], ids=["json", "bytes", "str", "form"])
def test_aiohttp_to_wire(data: Any, wire_body: bytes, content_type: str) -> None:
    wire, request = _aiohttp_wire(data)
    assert wire is not None
    assert (wire.method, wire.url, wire.body) == ("POST", URL_OUT, wire_body)
    assert wire.headers == tuple(request.headers.items())  # every header, in the order aiohttp sends them
    names = [name for name, _ in wire.headers]
    assert names[:3] == ["Host", "Authorization", "X-A"] and dict(wire.headers)["Authorization"] == "Bearer k"
    assert set(AIOHTTP_AUTO) <= set(wire.headers)
    assert dict(wire.headers)["Content-Type"] == content_type
    assert dict(wire.headers)["Content-Length"] == str(len(wire_body))


def test_aiohttp_without_data_is_an_empty_body() -> None:
    """aiohttp keeps a bare ``b""`` for a request without data: its bytes are known (none)."""
    wire, _ = _aiohttp_wire(None)
    assert wire is not None and wire.body == b"" and wire.url == URL_OUT


async def _chunks() -> AsyncIterator[bytes]:
    yield b"a"


@pytest.mark.parametrize("data", [_chunks, lambda: io.BytesIO(b"file")], ids=["async-generator", "file"])
def test_aiohttp_streamed_bodies_are_not_read(data: Any) -> None:
    wire, request = _aiohttp_wire(data)
    assert wire is None
    if isinstance(request.body, aiohttp.payload.BytesIOPayload):
        assert request.body._value.tell() == 0
