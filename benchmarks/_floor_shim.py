"""The floor: the least any shim must do to report an LLM call to a hook, written by hand.

For ``benchmarks/overhead.py``'s "floor" mode. It patches the same seams as llmshim (httpx2's
``Client``/``AsyncClient._send_single_request``, requests' ``HTTPAdapter.send``) with plain
functions that: read the request's URL and body, parse the body's JSON to recognise a chat call,
send, wrap the response's byte stream (httpx2) to see the body as the caller reads it, parse the
answer's JSON at its end for the model and usage, and hand one dict to a hook. No settings, no
policies, no error handling, no credential scoping, no header controls, no streaming formats, no
fail-open: what llmshim adds above this floor is the price of those."""

from __future__ import annotations

import json
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


def install() -> None:
    import httpx2
    import requests.adapters

    sync_original = httpx2.Client._send_single_request
    async_original = httpx2.AsyncClient._send_single_request

    class Seen(httpx2.SyncByteStream):
        def __init__(self, inner: Any, record: dict[str, Any]) -> None:
            self.inner, self.record = inner, record

        def __iter__(self) -> Iterator[bytes]:
            parts = []
            for chunk in self.inner:
                parts.append(chunk)
                yield chunk
            _report(self.record, b"".join(parts))

        def close(self) -> None:
            self.inner.close()

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
        record = _recognise(str(request.url), request.content)
        response = sync_original(self, request)
        if record is not None:
            response.stream = Seen(response.stream, record)
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
