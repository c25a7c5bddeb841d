"""The floor: the least any shim must do to report an LLM call to a hook, written by hand.

For ``benchmarks/overhead.py``'s "floor" mode. It patches the same seams as llmshim (httpx2's
``Client``/``AsyncClient._send_single_request``, requests' ``HTTPAdapter.send``) with plain
functions that: read the request's URL and body, parse the body's JSON to recognise a chat call,
send, wrap the response's byte stream (httpx2) to see the body as the caller reads it, parse the
answer's JSON at its end for the model and usage, and hand one dict to a hook. No settings, no
policies, no error handling, no credential scoping, no header controls, no streaming formats, no
fail-open: what llmshim adds above this floor is the price of those.

With ``install(cache=path)`` it is also the floor of a cache hit (httpx2, sync): the key is SHA-256
of the URL, the authorization header and the body bytes as sent (no canonical JSON), a hit is one
primary-key read of a SQLite file and a response built from the stored bytes, reported to the hook
as the body is read; a miss is stored when its body ends. No expiry, no scoping rules, no test-double
check, no coalescing, no counters."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

HOOK: list[Callable[[dict[str, Any]], None]] = [lambda record: None]


def _recognise(url: str, body: bytes) -> dict[str, Any] | None:
    if not url.endswith(("/chat/completions", "/api/chat")) or not body:
        return None
    request = json.loads(body)
    return {"model": request.get("model"), "started": time.perf_counter()}


def _report(record: dict[str, Any], body: bytes) -> None:
    answer = json.loads(body) if body else {}
    usage = answer.get("usage") or {}
    record.update(response_model=answer.get("model"),
                  input_tokens=usage.get("prompt_tokens", answer.get("prompt_eval_count")),
                  output_tokens=usage.get("completion_tokens", answer.get("eval_count")),
                  duration=time.perf_counter() - record["started"])
    HOOK[0](record)


def install(cache: str | None = None) -> None:
    import httpx2
    import requests.adapters

    store = sqlite3.connect(cache, check_same_thread=False) if cache else None
    if store is not None:
        store.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, status INTEGER, headers TEXT, "
                      "body BLOB)")
        store.commit()

    sync_original = httpx2.Client._send_single_request
    async_original = httpx2.AsyncClient._send_single_request

    class Seen(httpx2.SyncByteStream):
        def __init__(self, inner: Any, record: dict[str, Any], keep: Callable[[bytes], None] | None = None) -> None:
            self.inner, self.record, self.keep = inner, record, keep

        def __iter__(self) -> Iterator[bytes]:
            parts = []
            for chunk in self.inner:
                parts.append(chunk)
                yield chunk
            body = b"".join(parts)
            _report(self.record, body)
            if self.keep is not None:
                self.keep(body)

        def close(self) -> None:
            self.inner.close()

    class Stored(httpx2.SyncByteStream):
        def __init__(self, body: bytes) -> None:
            self.body = body

        def __iter__(self) -> Iterator[bytes]:
            yield self.body

    class ASeen(httpx2.AsyncByteStream):
        def __init__(self, inner: Any, record: dict[str, Any]) -> None:
            self.inner, self.record = inner, record

        async def __aiter__(self) -> AsyncIterator[bytes]:
            parts = []
            async for chunk in self.inner:
                parts.append(chunk)
                yield chunk
            _report(self.record, b"".join(parts))

        async def aclose(self) -> None:
            await self.inner.aclose()

    def send(self: Any, request: Any) -> Any:
        url, body = str(request.url), request.content
        record = _recognise(url, body)
        if record is None or store is None:
            response = sync_original(self, request)
            if record is not None:
                response.stream = Seen(response.stream, record)
            return response
        key = hashlib.sha256(b"\n".join((url.encode(), request.headers.get("authorization", "").encode(),
                                          body))).hexdigest()
        row = store.execute("SELECT status, headers, body FROM entries WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return httpx2.Response(row[0], headers=json.loads(row[1]), request=request,
                                   stream=Seen(Stored(row[2]), record))
        response = sync_original(self, request)
        headers = json.dumps(response.headers.multi_items())  # the body is kept as it came, encoded or not

        def keep(answer: bytes) -> None:
            store.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)",
                          (key, response.status_code, headers, answer))
            store.commit()

        response.stream = Seen(response.stream, record, keep)
        return response

    async def asend(self: Any, request: Any) -> Any:
        record = _recognise(str(request.url), request.content)
        response = await async_original(self, request)
        if record is not None:
            response.stream = ASeen(response.stream, record)
        return response

    requests_original = requests.adapters.HTTPAdapter.send

    def requests_send(self: Any, request: Any, **kwargs: Any) -> Any:
        body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
        record = _recognise(request.url, body)
        response = requests_original(self, request, **kwargs)
        if record is not None:
            _report(record, response.content)  # read here: a floor, not a stream-faithful shim
        return response

    httpx2.Client._send_single_request = send
    httpx2.AsyncClient._send_single_request = asend
    requests.adapters.HTTPAdapter.send = requests_send
