"""A truncated body is never stored (issue 11, item 4).

Every way requests/urllib3, httpx (sync and async) and aiohttp let a caller read a response body
is driven over a real socket against a big answer from the bundled server (a long prompt is echoed:
a ~100 KB SSE stream of ~1,500 events, or a ~15 KB JSON body), with the cache on. The promise:
the answer is stored if and only if the caller read the whole body, and a later hit replays
exactly the full bytes. A read path llmshim does not know of (a private file below urllib3's
response) must make the entry unstorable rather than truncated.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests

import llmshim
from llmshim.testing import FakeLLMServer

PROMPT = " ".join(f"word{i}" for i in range(1500))


def _body(stream: bool) -> dict[str, Any]:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "stream": stream}




def _check(server: FakeLLMServer, first: bytes | None, full: bytes, whole: bool) -> None:
    """After the first call read ``first`` (None: a partial read), a second identical call that reads
    everything gets ``full``: from the cache iff the first read was whole, else from the server.
    Line readers drop the terminators; they are joined back with one (a last line may lack it)."""
    assert len(server.received) == 2 - whole, "stored although not read to the end" if not whole else "not stored"
    if first is not None:
        if first.endswith(LINES_MARK):
            first, full = first[: -len(LINES_MARK)].rstrip(b"\n"), full.rstrip(b"\n")
        assert len(first) == len(full) and first == full


LINES_MARK = b"<joined lines>"
#: Partial reads that are whole on a one-line JSON body (it has no newline to stop at).
ONE_LINE_WHOLE = {"raw.readline", "iter_lines-break"}


def _partial_reads(table: dict[str, object]) -> list[object]:
    """(read, streamed body) pairs of ``table`` where the read is partial: a one-line JSON body is
    read whole by a line reader, so those pairs are left out rather than skipped."""
    return [pytest.param(path, stream, id=f"{path}-{'sse' if stream else 'json'}")
            for path in sorted(table) for stream in (True, False) if stream or path not in ONE_LINE_WHOLE]


# -- requests ----------------------------------------------------------------------------------

def _r_lines(r: requests.Response) -> bytes:
    return b"\n".join(r.iter_lines()) + LINES_MARK


def _r_read_amt(r: requests.Response) -> bytes:
    out = []
    while piece := r.raw.read(777):
        out.append(piece)
    return b"".join(out)


def _r_read1(r: requests.Response) -> bytes:
    out = []
    while piece := r.raw.read1(1000):
        out.append(piece)
    return b"".join(out)


def _r_readinto(r: requests.Response) -> bytes:
    out, buffer = [], bytearray(999)
    while n := r.raw.readinto(buffer):
        out.append(bytes(buffer[:n]))
    return b"".join(out)


def _r_copyfileobj(r: requests.Response) -> bytes:
    sink = io.BytesIO()
    shutil.copyfileobj(r.raw, sink)
    return sink.getvalue()


def _r_read1_then_read(r: requests.Response) -> bytes:
    """The issue's case: read1 first, then read() for the rest."""
    return bytes(r.raw.read1(300)) + bytes(r.raw.read())


def _r_read_then_read1(r: requests.Response) -> bytes:
    head = r.raw.read(123)
    return head + _r_read1(r)


def _r_readline(r: requests.Response) -> bytes:
    out = []
    while line := r.raw.readline():
        out.append(line)
    return b"".join(out)


REQUESTS_WHOLE: dict[str, Callable[[requests.Response], bytes]] = {
    "content": lambda r: r.content,
    "iter_content": lambda r: b"".join(r.iter_content(512)),
    "iter_content-none": lambda r: b"".join(r.iter_content(None)),
    "iter_lines": _r_lines,
    "raw.read": lambda r: r.raw.read(),
    "raw.read(amt)": _r_read_amt,
    "raw.read1": _r_read1,
    "raw.readinto": _r_readinto,
    "raw.stream": lambda r: b"".join(r.raw.stream(1024)),
    "raw.read_chunked": lambda r: b"".join(r.raw.read_chunked(2048)),
    "raw.readline": _r_readline,
    "raw.readlines": lambda r: b"".join(r.raw.readlines()),
    "iter(raw)": lambda r: b"".join(iter(r.raw)),
    "raw.data": lambda r: r.raw.data,
    "BufferedReader(raw)": lambda r: io.BufferedReader(r.raw).read(),  # type: ignore[arg-type]
    "shutil.copyfileobj": _r_copyfileobj,
    "read1-then-read": _r_read1_then_read,
    "read-then-read1": _r_read_then_read1,
}


def _r_partial_iter(r: requests.Response) -> None:
    for _ in r.iter_content(256):
        break


REQUESTS_PARTIAL: dict[str, Callable[[requests.Response], None]] = {
    "raw.read(100)": lambda r: r.raw.read(100) and None,
    "raw.read1(100)": lambda r: r.raw.read1(100) and None,
    "raw.readinto": lambda r: r.raw.readinto(bytearray(100)) and None,
    "iter_content-break": _r_partial_iter,
    "raw.readline": lambda r: r.raw.readline() and None,
    "nothing": lambda r: None,
}


def _requests_call(server: FakeLLMServer, stream_body: bool) -> requests.Response:
    return requests.post(server.openai_base_url + "/chat/completions", json=_body(stream_body), stream=True,
                         timeout=30)


@pytest.mark.parametrize("path", sorted(REQUESTS_WHOLE))
def test_requests_whole_body_is_stored_and_replayed_whole(path: str, server: FakeLLMServer, cached: Path) -> None:
    with _requests_call(server, stream_body=True) as r:
        first = REQUESTS_WHOLE[path](r)
    assert len(first) > 50_000 and b"data: [DONE]" in first[-40:]
    with _requests_call(server, stream_body=True) as r:
        full = r.content
    _check(server, first, full, whole=True)


@pytest.mark.parametrize("path", ["content", "raw.read", "raw.read1", "raw.readinto", "read1-then-read",
                                  "raw.stream", "BufferedReader(raw)"])
def test_requests_whole_json_body_is_stored_and_replayed_whole(path: str, server: FakeLLMServer,
                                                                cached: Path) -> None:
    with _requests_call(server, stream_body=False) as r:
        first = REQUESTS_WHOLE[path](r)
    assert json.loads(first)["choices"][0]["message"]["content"].startswith("Echo: word0")
    with _requests_call(server, stream_body=False) as r:
        full = r.content
    _check(server, first, full, whole=True)


@pytest.mark.parametrize(("path", "stream_body"), _partial_reads(REQUESTS_PARTIAL))
def test_requests_partial_read_is_never_stored(path: str, stream_body: bool, server: FakeLLMServer,
                                               cached: Path) -> None:
    with _requests_call(server, stream_body) as r:
        REQUESTS_PARTIAL[path](r)
    with _requests_call(server, stream_body) as r:
        full = r.content
    _check(server, None, full, whole=False)


@pytest.mark.parametrize("stream_body", [True, False], ids=["sse", "json"])
def test_requests_bytes_read_below_the_tap_make_the_entry_unstorable(stream_body: bool, server: FakeLLMServer,
                                                                     cached: Path) -> None:
    """By construction, not by a list of methods: bytes taken from the connection by a path
    llmshim does not shadow (here http.client's file under urllib3's response) are noticed."""
    with _requests_call(server, stream_body) as r:
        r.raw._fp.read(200)
        rest = r.raw.read()
    assert rest
    with _requests_call(server, stream_body) as r:
        full = r.content
    _check(server, None, full, whole=False)


def test_requests_gzip_body_read_decoded_is_stored(tmp_path: Path) -> None:
    with FakeLLMServer(compress=True) as server:
        llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
        try:
            with _requests_call(server, stream_body=False) as r:
                assert r.headers["content-encoding"] == "gzip"
                first = b"".join(r.iter_content(100))
            with _requests_call(server, stream_body=False) as r:
                full = r.content
        finally:
            llmshim.uninstall()
        _check(server, first, full, whole=True)


# -- httpx (sync and async) --------------------------------------------------------------------

def _x_lines(r: httpx.Response) -> bytes:
    return "\n".join(r.iter_lines()).encode() + LINES_MARK


HTTPX_WHOLE: dict[str, Callable[[httpx.Response], bytes]] = {
    "read": lambda r: r.read(),
    "iter_bytes": lambda r: b"".join(r.iter_bytes()),
    "iter_bytes(n)": lambda r: b"".join(r.iter_bytes(333)),
    "iter_raw": lambda r: b"".join(r.iter_raw()),
    "iter_raw(n)": lambda r: b"".join(r.iter_raw(444)),
    "iter_text": lambda r: "".join(r.iter_text()).encode(),
    "iter_lines": _x_lines,
}


def _x_break(r: httpx.Response) -> None:
    for _ in r.iter_bytes(100):
        break


def _x_break_then_read(r: httpx.Response) -> None:
    _x_break(r)
    with pytest.raises(httpx.StreamConsumed):  # httpx forbids reading on after a partial iteration
        r.read()


HTTPX_PARTIAL: dict[str, Callable[[httpx.Response], None]] = {
    "iter_bytes-break": _x_break,
    "iter_raw-break": lambda r: next(iter(r.iter_raw(100))) and None,
    "iter_lines-break": lambda r: next(iter(r.iter_lines())) and None,
    "break-then-read": _x_break_then_read,
    "nothing": lambda r: None,
}


def _httpx_call(client: httpx.Client, server: FakeLLMServer, stream_body: bool) -> Any:
    return client.stream("POST", server.openai_base_url + "/chat/completions", json=_body(stream_body))


@pytest.mark.parametrize("stream_body", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("path", sorted(HTTPX_WHOLE))
def test_httpx_whole_body_is_stored_and_replayed_whole(path: str, stream_body: bool, server: FakeLLMServer,
                                                       cached: Path) -> None:
    with httpx.Client() as client:
        with _httpx_call(client, server, stream_body) as r:
            first = HTTPX_WHOLE[path](r)
        with _httpx_call(client, server, stream_body) as r:
            full = r.read()
    _check(server, first, full, whole=True)


@pytest.mark.parametrize(("path", "stream_body"), _partial_reads(HTTPX_PARTIAL))
def test_httpx_partial_read_is_never_stored(path: str, stream_body: bool, server: FakeLLMServer,
                                            cached: Path) -> None:
    with httpx.Client() as client:
        with _httpx_call(client, server, stream_body) as r:
            HTTPX_PARTIAL[path](r)
        with _httpx_call(client, server, stream_body) as r:
            full = r.read()
    _check(server, None, full, whole=False)


async def _ax_collect(iterator: Any) -> bytes:
    out = []
    async for piece in iterator:
        out.append(piece if isinstance(piece, bytes) else piece.encode())
    return b"".join(out)


async def _ax_lines(r: httpx.Response) -> bytes:
    return "\n".join([line async for line in r.aiter_lines()]).encode() + LINES_MARK


ASYNC_HTTPX_WHOLE: dict[str, Callable[[httpx.Response], Awaitable[bytes]]] = {
    "aread": lambda r: r.aread(),
    "aiter_bytes": lambda r: _ax_collect(r.aiter_bytes(321)),
    "aiter_raw": lambda r: _ax_collect(r.aiter_raw()),
    "aiter_text": lambda r: _ax_collect(r.aiter_text()),
    "aiter_lines": _ax_lines,
}


async def _ax_break(r: httpx.Response) -> bytes | None:
    async for _ in r.aiter_bytes(100):
        break
    return None


@pytest.mark.parametrize("stream_body", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("path", [*sorted(ASYNC_HTTPX_WHOLE), "aiter_bytes-break"])
def test_async_httpx_body_is_stored_iff_read_whole(path: str, stream_body: bool, server: FakeLLMServer,
                                                   cached: Path) -> None:
    read = ASYNC_HTTPX_WHOLE.get(path, _ax_break)

    async def go() -> tuple[bytes | None, bytes]:
        async with httpx.AsyncClient() as client:
            async with client.stream("POST", server.openai_base_url + "/chat/completions",
                                     json=_body(stream_body)) as r:
                first = await read(r)
            async with client.stream("POST", server.openai_base_url + "/chat/completions",
                                     json=_body(stream_body)) as r:
                full = await r.aread()
        return first, full

    first, full = asyncio.run(go())
    _check(server, first, full, whole=path in ASYNC_HTTPX_WHOLE)


# -- aiohttp -----------------------------------------------------------------------------------

async def _a_loop(read: Callable[[], Awaitable[bytes]]) -> bytes:
    out = []
    while piece := await read():
        out.append(piece)
    return b"".join(out)


async def _a_readchunk(r: aiohttp.ClientResponse) -> bytes:
    out = []
    while True:
        data, end = await r.content.readchunk()
        if not data and not end:
            return b"".join(out)
        out.append(data)


async def _a_iter(iterator: Any) -> bytes:
    return b"".join([piece async for piece in iterator])


async def _a_iter_chunks(r: aiohttp.ClientResponse) -> bytes:
    return b"".join([data async for data, _ in r.content.iter_chunks()])


async def _a_readexactly_then_read(r: aiohttp.ClientResponse) -> bytes:
    return await r.content.readexactly(1000) + await r.content.read()


AIOHTTP_WHOLE: dict[str, Callable[[aiohttp.ClientResponse], Awaitable[bytes]]] = {
    "read": lambda r: r.read(),
    "text": lambda r: _encode(r.text()),
    "content.read": lambda r: r.content.read(),
    "content.read(n)": lambda r: _a_loop(lambda: r.content.read(700)),
    "readany": lambda r: _a_loop(r.content.readany),
    "readline": lambda r: _a_loop(r.content.readline),
    "readchunk": _a_readchunk,
    "iter_chunked": lambda r: _a_iter(r.content.iter_chunked(512)),
    "iter_any": lambda r: _a_iter(r.content.iter_any()),
    "iter_chunks": _a_iter_chunks,
    "async-for-lines": lambda r: _a_iter(r.content),
    "readexactly-then-read": _a_readexactly_then_read,
}


async def _encode(text: Awaitable[str]) -> bytes:
    return (await text).encode()


async def _a_partial_release(r: aiohttp.ClientResponse) -> None:
    await r.content.read(100)
    r.release()


async def _a_partial_readexactly(r: aiohttp.ClientResponse) -> None:
    await r.content.readexactly(100)


async def _a_nothing(r: aiohttp.ClientResponse) -> None:
    return None


AIOHTTP_PARTIAL: dict[str, Callable[[aiohttp.ClientResponse], Awaitable[None]]] = {
    "read(100)-release": _a_partial_release,
    "readexactly(100)": _a_partial_readexactly,
    "nothing": _a_nothing,
}


@pytest.mark.parametrize("stream_body", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("path", [*sorted(AIOHTTP_WHOLE), *(f"partial:{p}" for p in sorted(AIOHTTP_PARTIAL))])
def test_aiohttp_body_is_stored_iff_read_whole(path: str, stream_body: bool, server: FakeLLMServer,
                                               cached: Path) -> None:
    whole = not path.startswith("partial:")

    async def go() -> tuple[bytes | None, bytes]:
        url = server.openai_base_url + "/chat/completions"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=_body(stream_body)) as r:
                if whole:
                    first: bytes | None = await AIOHTTP_WHOLE[path](r)
                else:
                    first = await AIOHTTP_PARTIAL[path.partition(":")[2]](r)
            async with session.post(url, json=_body(stream_body)) as r:
                full = await r.read()
        return first, full

    first, full = asyncio.run(go())
    _check(server, first, full, whole=whole)
