"""Review 28's harness: a tiny local LLM server whose answers take every body shape (gzip, deflate,
raw deflate, chunked, empty, big, 100k tiny chunks), and the client programs that read them in
every way their library offers, run in a fresh interpreter with and without llmshim.

``python review28_harness.py MODE URL`` (MODE: ``none``, ``off``, ``cache``) prints one JSON line
per (scenario, attempt): what the program saw (a digest of the bytes, their size, the headers,
status and attribute types). The tests compare the lines across modes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT = "Hello from a shaped answer. " * 4


def completion(content: str = CONTENT) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode()


def sse_events(count: int) -> list[bytes]:
    events = []
    for i in range(count):
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    final = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 3 + count}}
    events.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def shaped(shape: str) -> tuple[list[tuple[str, str]], list[bytes] | bytes]:
    """(headers, body): bytes for a Content-Length answer, a list for a chunked one."""
    json_type = [("Content-Type", "application/json")]
    sse_type = [("Content-Type", "text/event-stream")]
    if shape == "plain":
        return json_type, completion()
    if shape == "gzip":
        return [*json_type, ("Content-Encoding", "gzip")], gzip.compress(completion(), mtime=0)
    if shape == "deflate":
        return [*json_type, ("Content-Encoding", "deflate")], zlib.compress(completion())
    if shape == "rawdeflate":
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return [*json_type, ("Content-Encoding", "deflate")], raw.compress(completion()) + raw.flush()
    if shape == "empty":
        return json_type, b""
    if shape == "big":
        return json_type, completion("x" * (20 * 2**20))
    if shape == "sse":
        return sse_type, sse_events(50)
    if shape == "sse_gzip":  # one gzip stream, cut in small pieces on the wire
        data = gzip.compress(b"".join(sse_events(50)), mtime=0)
        return [*sse_type, ("Content-Encoding", "gzip")], [data[i:i + 97] for i in range(0, len(data), 97)]
    if shape == "tiny":  # 100k pieces of one byte on the wire
        data = b"".join(sse_events(2000))
        return sse_type, [data[i:i + 1] for i in range(min(len(data), 100_000))] + [data[100_000:]]
    raise ValueError(shape)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    break
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:
        body = self._body()
        if (self.headers.get("Content-Encoding") or "") == "gzip":
            body = gzip.decompress(body)
        self.server.received.append((self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        try:
            shape = str(json.loads(body)["model"]).removeprefix("shape-")
        except Exception:
            shape = "plain"
        headers, answer = shaped(shape)
        self.send_response(200)
        for name, value in headers:
            self.send_header(name, value)
        if isinstance(answer, bytes):
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        else:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in answer if piece))
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class ShapeServer:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.received = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"

    @property
    def received(self) -> list[tuple[str, dict[str, str], bytes]]:
        return self.httpd.received  # type: ignore[attr-defined,no-any-return]

    def __enter__(self) -> ShapeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- what a program saw ---------------------------------------------------------------------------------

def digest(data: bytes | str | list[Any]) -> dict[str, Any]:
    if isinstance(data, list):
        return {"n": len(data), "sha": hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]}
    raw = data.encode() if isinstance(data, str) else data
    return {"type": type(data).__name__, "len": len(raw), "sha": hashlib.sha256(raw).hexdigest()[:16]}


_VOLATILE = {"date", "x-llmshim-cache", "age", "server", "connection", "keep-alive"}


def headers_of(items: Any) -> list[tuple[str, str]]:
    return sorted((str(k).lower(), str(v)) for k, v in items if str(k).lower() not in _VOLATILE)


#: The scenario running: its name is the prompt, so no two scenarios share a cache entry.
CURRENT = ["hi"]


def body_of(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": CURRENT[0]}], "stream": stream}


# -- the read methods -------------------------------------------------------------------------------

def _httpx_module(name: str) -> Any:
    return __import__(name)


def _httpx_reads(library: str) -> dict[str, Any]:
    def send(url: str, shape: str, read: Any) -> dict[str, Any]:
        httpx = _httpx_module(library)
        with httpx.Client() as client:
            with client.stream("POST", url, json=body_of("shape-" + shape)) as response:
                seen = read(response)
                return {"status": response.status_code, "headers": headers_of(response.headers.multi_items()),
                        "elapsed": type(response.elapsed).__name__, "history": len(response.history),
                        "read": seen, "closed": response.is_closed}

    methods: dict[str, Any] = {
        "read": lambda r: digest(r.read()),
        "bytes1": lambda r: digest(b"".join(r.iter_bytes(chunk_size=1))),
        "bytes7": lambda r: digest(b"".join(r.iter_bytes(chunk_size=7))),
        "bytes": lambda r: digest(b"".join(r.iter_bytes())),
        "text": lambda r: digest("".join(r.iter_text())),
        "lines": lambda r: digest(list(r.iter_lines())),
        "raw": lambda r: digest(b"".join(r.iter_raw())),
        "raw5": lambda r: digest(b"".join(r.iter_raw(5))),
        "json2": lambda r: (r.read(), [r.json(), r.json()] if r.content else "empty")[1],
        "partial_close": lambda r: (next(r.iter_bytes(3), b""), r.close(), r.is_closed)[2],
    }
    scenarios = {}
    for shape in ("plain", "gzip", "deflate", "rawdeflate", "empty", "sse", "sse_gzip"):
        for method, read in methods.items():
            scenarios[f"{library}-{shape}-{method}"] = (lambda s, m: lambda url: send(url, s, m))(shape, read)
    return scenarios


def _httpx_async_reads(library: str) -> dict[str, Any]:
    import asyncio

    async def collect(iterator: Any) -> list[Any]:
        return [piece async for piece in iterator]

    methods: dict[str, Any] = {
        "aread": lambda r: r.aread(),
        "abytes1": lambda r: collect(r.aiter_bytes(1)),
        "atext": lambda r: collect(r.aiter_text()),
        "alines": lambda r: collect(r.aiter_lines()),
        "araw": lambda r: collect(r.aiter_raw()),
    }

    def send(url: str, shape: str, method: str) -> dict[str, Any]:
        httpx = _httpx_module(library)

        async def go() -> dict[str, Any]:
            async with httpx.AsyncClient() as client:
                async with client.stream("POST", url, json=body_of("shape-" + shape)) as response:
                    got = await methods[method](response)
                    if isinstance(got, list):
                        got = "".join(got) if got and isinstance(got[0], str) else b"".join(got) \
                            if method != "alines" else got
                    seen = digest(got)
                    return {"status": response.status_code, "headers": headers_of(response.headers.multi_items()),
                            "read": seen}

        return asyncio.run(go())

    return {f"a{library}-{shape}-{method}": (lambda s, m: lambda url: send(url, s, m))(shape, method)
            for shape in ("plain", "gzip", "sse", "sse_gzip", "empty") for method in methods}


def _requests_reads() -> dict[str, Any]:
    def send(url: str, shape: str, read: Any) -> dict[str, Any]:
        import requests

        with requests.Session() as session:
            response = session.post(url, json=body_of("shape-" + shape), stream=True)
            seen = read(response)
            response.close()
            return {"status": response.status_code, "headers": headers_of(response.headers.items()),
                    "elapsed": type(response.elapsed).__name__, "history": len(response.history), "read": seen}

    def raw_stream(r: Any) -> Any:
        return digest(b"".join(r.raw.stream(3)))

    def raw_n(r: Any) -> Any:
        pieces = []
        while piece := r.raw.read(5):
            pieces.append(piece)
        return digest(b"".join(pieces))

    def content_after_partial(r: Any) -> Any:
        first = next(r.iter_content(4), b"")
        try:
            rest = r.content
        except Exception as exc:
            return {"raised": type(exc).__name__, "first": digest(first)}
        return digest(first + (rest or b""))

    methods: dict[str, Any] = {
        "content": lambda r: digest(r.content),
        "text": lambda r: digest(r.text),
        "iter1": lambda r: digest(b"".join(r.iter_content(1))),
        "iternone_text": lambda r: digest("".join(r.iter_content(None, decode_unicode=True))),
        "lines": lambda r: digest([line.decode() for line in r.iter_lines()]),
        "lines_delim": lambda r: digest([line.decode() for line in r.iter_lines(delimiter=b"\n\n")]),
        "raw_n": raw_n,
        "raw_stream": raw_stream,
        "raw_decoded": lambda r: digest(r.raw.read(decode_content=True)),
        "raw_undecoded": lambda r: digest(r.raw.read()),
        "content_after_partial": content_after_partial,
        "json2": lambda r: [r.json(), r.json()] if r.content else "empty",
    }
    return {f"requests-{shape}-{method}": (lambda s, m: lambda url: send(url, s, m))(shape, read)
            for shape in ("plain", "gzip", "deflate", "rawdeflate", "empty", "sse", "sse_gzip")
            for method, read in methods.items()}


def _aiohttp_reads() -> dict[str, Any]:
    import asyncio

    async def read_n(r: Any) -> bytes:
        pieces = []
        while piece := await r.content.read(5):
            pieces.append(piece)
        return b"".join(pieces)

    async def readlines(r: Any) -> list[str]:
        lines = []
        while line := await r.content.readline():
            lines.append(line.decode())
        return lines

    async def readuntil(r: Any) -> list[str]:
        parts = []
        while part := await r.content.readuntil(b"\n\n"):
            parts.append(part.decode())
        return parts

    async def chunked(r: Any) -> bytes:
        return b"".join([piece async for piece in r.content.iter_chunked(7)])

    async def anyp(r: Any) -> bytes:
        return b"".join([piece async for piece in r.content.iter_any()])

    async def readany(r: Any) -> bytes:
        pieces = []
        while piece := await r.content.readany():
            pieces.append(piece)
        return b"".join(pieces)

    async def exactly(r: Any) -> Any:
        first = await r.content.readexactly(10) if r.content_length != 0 else b""
        return first + await r.content.read()

    async def json2(r: Any) -> Any:
        await r.read()
        return [await r.json(), await r.json()] if r._body else "empty"

    methods: dict[str, Any] = {
        "read": lambda r: r.read(), "text": lambda r: r.text(), "json2": json2, "read_n": read_n,
        "readline": readlines, "readuntil": readuntil, "chunked": chunked, "any": anyp, "readany": readany,
        "exactly": exactly,
    }

    def send(url: str, shape: str, method: str) -> dict[str, Any]:
        import aiohttp

        async def go() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.post(url, json=body_of("shape-" + shape)) as response:
                    got = await methods[method](response)
                    return {"status": response.status, "headers": headers_of(response.headers.items()),
                            "read": digest(got) if isinstance(got, (bytes, str, list)) else got}

        return asyncio.run(go())

    return {f"aiohttp-{shape}-{method}": (lambda s, m: lambda url: send(url, s, m))(shape, method)
            for shape in ("plain", "gzip", "deflate", "empty", "sse", "sse_gzip") for method in methods}


SCENARIOS: dict[str, Any] = {**_httpx_reads("httpx"), **_httpx_reads("httpx2"), **_httpx_async_reads("httpx"),
                             **_requests_reads(), **_aiohttp_reads()}


def main(mode: str, url: str, scenarios: list[str]) -> None:
    if mode != "none":
        import llmshim

        llmshim.install(cache="on" if mode == "cache" else "off", telemetry=False)
    for name in scenarios:
        CURRENT[0] = name
        for attempt in range(2):
            try:
                seen = SCENARIOS[name](url)
            except Exception as exc:  # the exception is what the program saw
                seen = {"raised": f"{type(exc).__module__}.{type(exc).__name__}"}
            print(json.dumps({"scenario": name, "attempt": attempt, "seen": seen}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
