"""A protocol-faithful local LLM server with fault injection, for tests, demos and benchmarks.

It speaks OpenAI (chat/completions/embeddings/responses, SSE with ``[DONE]`` and
``stream_options.include_usage``), Ollama (chat/generate/embed, NDJSON), llama.cpp
(``/completion`` SSE, ``/health``) and Anthropic (``/v1/messages``, SSE events: ``anthropic_wire.py``)
over real HTTP/1.1 on 127.0.0.1, with keep-alive and chunked streams flushed piece by piece. It
sends real ``x-ratelimit-*`` (Anthropic: ``anthropic-ratelimit-*``) headers and can be made to fail:

    server.inject(Fault(status=429, headers={"retry-after-ms": "1500"}))   # the next request
    server.inject(Fault(reset="before_headers"), times=2)                  # the next two
    server.inject(Fault(status=500), times=None)                           # every request
    server.inject(Fault(reset="after_chunks", after_chunks=2))             # mid-stream reset
    server.chunk_delay = 0.05                                              # slow streams
    server.rpm_limit = 60                                                  # 429 beyond 60/min

Every request received is recorded (``server.received``) so tests can compare what reached the
wire with and without llmshim.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from ..clocks import monotonic, wall
from . import anthropic_wire, gemini_wire
from .responses import Answer, answer_for

__all__ = ["FakeLLMServer", "Fault", "Received"]


@dataclasses.dataclass(frozen=True)
class Received:
    """One request as the server read it off the socket."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    at: float = dataclasses.field(default_factory=monotonic, compare=False)  # arrival, monotonic

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass(frozen=True)
class Fault:
    """What to do instead of (or on top of) a normal answer.

    ``status``: answer this status with ``headers`` and ``body`` (default body: the dialect's
    error shape; 503 uses llama.cpp's "Loading model" or Ollama's "server busy" per ``body``).
    ``reset``: ``"before_headers"`` closes the connection with a TCP reset after reading the
    request; ``"after_chunks"`` sends the headers and ``after_chunks`` pieces, then resets.
    ``cut`` (a streamed answer; after ``after_chunks`` pieces), a clean close instead of a reset:
    ``"close"`` ends the connection without the final chunk; ``"truncated_chunk"`` first sends
    the size line of one more piece and only half of its bytes; ``"stall"`` sends nothing more
    until the client hangs up (its read timeout), then closes.
    ``delay``: seconds to wait before answering. ``chunk_delay``: seconds between streamed pieces.
    ``path``: only requests whose path contains this string take the fault.
    """

    status: int | None = None
    headers: tuple[tuple[str, str], ...] | dict[str, str] = ()
    body: bytes | str | dict[str, Any] | None = None
    reset: Literal["before_headers", "after_chunks"] | None = None
    after_chunks: int = 0
    cut: Literal["close", "truncated_chunk", "stall"] | None = None
    delay: float = 0.0
    chunk_delay: float | None = None
    path: str | None = None


class _Schedule:
    """Faults queued for upcoming requests; each with a remaining count (None: forever)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[list[Any]] = []  # [fault, remaining]

    def push(self, fault: Fault, times: int | None) -> None:
        with self._lock:
            self._items.append([fault, times])

    def take(self, path: str) -> Fault | None:
        with self._lock:
            for item in self._items:
                fault, remaining = item
                if fault.path is not None and fault.path not in path:
                    continue
                if remaining is not None:
                    item[1] = remaining - 1
                    if item[1] <= 0:
                        self._items.remove(item)
                return fault  # type: ignore[no-any-return]
        return None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _error_body(path: str, status: int, body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        body = {"error": body} if path.startswith("/api/") else {"error": {"message": body, "code": status}}
    if body is None:
        if status == 429:
            body = {"error": {"message": "Rate limit reached for requests", "type": "requests",
                              "param": None, "code": "rate_limit_exceeded"}}
        elif path.startswith("/api/"):
            body = {"error": "server busy, please try again. maximum pending requests exceeded"
                    if status == 503 else f"server error {status}"}
        elif status == 503:
            body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
        else:
            body = {"error": {"message": f"The server had an error ({status})", "type": "server_error",
                              "param": None, "code": None}}
    return json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Streams are many small writes: without NODELAY, Nagle + delayed ACK add ~40 ms stalls.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read .received instead
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0]
        received = Received(self.command, self.path, tuple(self.headers.items()), raw)
        owner._record(received)
        fault = owner._schedule.take(path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.reset == "before_headers":
            self._reset()
            return
        answer = owner._answer(received, path, fault)
        if answer is None:
            self._reset()
            return
        chunk_delay = fault.chunk_delay if fault and fault.chunk_delay is not None else owner.chunk_delay
        reset_after = fault.after_chunks if fault and (fault.reset == "after_chunks" or fault.cut) else None
        self._write(answer, chunk_delay, reset_after, fault.cut if fault else None)

    def _write(self, answer: Answer, chunk_delay: float, reset_after: int | None, cut: str | None = None) -> None:
        self.send_response(answer.status)
        names = {k.lower() for k, _ in answer.headers}
        for key, value in answer.headers:
            self.send_header(key, value)
        if not answer.streamed:
            body = answer.body
            if (self.server.owner.compress and "content-encoding" not in names
                    and "gzip" in (self.headers.get("Accept-Encoding") or "") and len(body) > 0):
                body = gzip.compress(body, mtime=0)
                self.send_header("Content-Encoding", "gzip")
            if reset_after is not None:  # headers promise the whole body; half of it arrives
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._reset()
                return
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for index, piece in enumerate(answer.chunks or ()):
            if reset_after is not None and index >= reset_after:
                if cut == "truncated_chunk":
                    self.wfile.write(b"%x\r\n%s" % (len(piece), piece[: len(piece) // 2]))
                elif cut == "stall":
                    self._until_the_client_leaves()
                self._reset() if cut is None else self._close()
                return
            if chunk_delay:
                time.sleep(chunk_delay)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        if reset_after is not None:
            self._reset() if cut is None else self._close()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _until_the_client_leaves(self) -> None:
        self.wfile.flush()
        self.connection.settimeout(60)
        try:
            while self.connection.recv(4096):
                pass
        except OSError:
            pass

    def _close(self) -> None:
        """A clean end of the connection (FIN) in the middle of a chunked body."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client left first
            pass
        self.connection.close()

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees a reset, not a clean end of stream."""
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        self.connection.close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    owner: FakeLLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that hung up mid-answer: routine in tests of early close and resets
        super().handle_error(request, client_address)


class FakeLLMServer:
    """The local LLM server. Use as a context manager, or start()/stop().

    ``responder``, when given, answers instead of the built-in dialects (return None to fall back
    to them): tests use it to replay recorded traffic through the same real HTTP plumbing.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chunk_delay: float = 0.0,
        rpm_limit: int | None = None,
        rpm_window: float = 60.0,
        rpm_style: str = "window",
        compress: bool = False,
        responder: Callable[[Received], Answer | None] | None = None,
    ) -> None:
        self.chunk_delay = chunk_delay
        self.rpm_limit = rpm_limit
        self.rpm_window = rpm_window  # the limit counts requests in a sliding window this long
        # "window": a sliding log of rpm_window seconds. "bucket": OpenAI's shape, a bucket of
        # rpm_limit requests refilled continuously at rpm_limit per minute; its reset header is
        # the time until the bucket is full again. bucket_level: requests in it now.
        self.rpm_style = rpm_style
        self.bucket_level: float | None = None
        self._bucket_at = monotonic()
        self.compress = compress
        self.responder = responder
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque()
        self._schedule = _Schedule()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> FakeLLMServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="llmshim-fake-llm",
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control -----------------------------------------------------------------------------
    def inject(self, fault: Fault, times: int | None = 1) -> None:
        """Apply ``fault`` to the next ``times`` matching requests (None: to all of them)."""
        self._schedule.push(fault, times)

    def reset(self) -> None:
        """Forget faults, received requests and the RPM window."""
        self._schedule.clear()
        with self._lock:
            self.received.clear()
            self._recent.clear()

    # -- internals ---------------------------------------------------------------------------
    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def _rate(self) -> tuple[bool, int, float, float]:
        """(allowed, remaining, seconds until a request would be allowed, seconds until the limit is
        whole again) under the configured RPM limit."""
        now = monotonic()
        with self._lock:
            limit = self.rpm_limit
            if limit is None:
                self._recent.append(now)
                while self._recent and now - self._recent[0] >= self.rpm_window:
                    self._recent.popleft()
                return True, 9999, 0.0, 0.0
            if self.rpm_style == "bucket":
                return self._take_from_bucket(now, limit)
            while self._recent and now - self._recent[0] >= self.rpm_window:
                self._recent.popleft()
            if len(self._recent) >= limit:
                wait = self.rpm_window - (now - self._recent[0])
                return False, 0, wait, wait
            self._recent.append(now)
            return True, limit - len(self._recent), 0.0, 0.0

    def _per_minute(self) -> int:
        """The limit the headers state, per minute as the real APIs state it: a limit of 10 in a
        1 s window is 600 a minute (a client that believes the headers must not slow to 10)."""
        if self.rpm_limit is None:
            return 10000
        window = 60.0 if self.rpm_style == "bucket" else self.rpm_window
        return max(1, round(self.rpm_limit * 60.0 / window))

    def _take_from_bucket(self, now: float, limit: int) -> tuple[bool, int, float, float]:
        rate = limit / 60.0
        level = float(limit) if self.bucket_level is None else self.bucket_level
        level = min(float(limit), level + (now - self._bucket_at) * rate)
        self._bucket_at = now
        allowed = level >= 1.0
        if allowed:
            level -= 1.0
        self.bucket_level = level
        return allowed, int(level), 0.0 if allowed else (1.0 - level) / rate, (limit - level) / rate

    def _answer(self, received: Received, path: str, fault: Fault | None) -> Answer | None:
        if anthropic_wire.speaks(received.method, path):
            return self._answer_anthropic(received, path, fault)
        gemini = gemini_wire.is_gemini(path)  # Google's routes: its own error shape, no x-ratelimit-*
        openai_route = not path.startswith("/api/") and received.method == "POST" and not gemini
        allowed, remaining, wait, reset = self._rate()
        limit_headers = [
            ("x-ratelimit-limit-requests", str(self._per_minute())),
            ("x-ratelimit-remaining-requests", str(remaining)),
            ("x-ratelimit-reset-requests", _duration(reset)),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-tokens", "1999000"),
            ("x-ratelimit-reset-tokens", "30ms"),
        ] if openai_route else []
        if not allowed and gemini:
            return gemini_wire.rate_limited(wait)
        if not allowed:
            wait_ms = max(1, int(wait * 1000))
            return Answer(429, [("Content-Type", "application/json"), ("retry-after-ms", str(wait_ms)),
                                ("retry-after", str(max(1, round(wait)))), *limit_headers],
                          _error_body(path, 429, None))
        if fault is not None and fault.status is not None:
            headers = _fault_headers(fault)
            error = gemini_wire.error_body(fault.status, fault.body) if gemini else \
                _error_body(path, fault.status, fault.body)
            return Answer(fault.status, headers + limit_headers, error)
        answer = self.responder(received) if self.responder is not None else None
        if answer is None:
            body = _request_json(received)
            answer = gemini_wire.answer(path, received.path.partition("?")[2], body) if gemini else \
                answer_for(received.method, path, body)
            answer.headers = [*answer.headers, *limit_headers, ("x-request-id", f"req_{len(self.received)}")]
        return answer

    def _answer_anthropic(self, received: Received, path: str, fault: Fault | None) -> Answer:
        """Anthropic's routes: its rate-limit headers and error shape, the same faults and RPM limit."""
        allowed, remaining, wait, reset = self._rate()
        request_id = f"req_{len(self.received)}"
        headers = [("request-id", request_id),
                   *anthropic_wire.limit_headers(self._per_minute(), remaining, reset, wall())]
        json_type = ("Content-Type", "application/json")
        if not allowed:
            return Answer(429, [json_type, ("retry-after", str(max(1, math.ceil(wait)))), *headers],
                          anthropic_wire.error_body(429, None, request_id))
        if fault is not None and fault.status is not None:
            error = anthropic_wire.error_body(fault.status, fault.body, request_id)
            return Answer(fault.status, _fault_headers(fault) + headers, error)
        answer = self.responder(received) if self.responder is not None else None
        if answer is None:
            answer = anthropic_wire.answer(path, _request_json(received))
            answer.headers = [*answer.headers, *headers]
        return answer


def _fault_headers(fault: Fault) -> list[tuple[str, str]]:
    """An injected fault's headers, with a JSON content type unless it names one."""
    headers = list(fault.headers.items()) if isinstance(fault.headers, dict) else list(fault.headers)
    if "content-type" not in {name.lower() for name, _ in headers}:
        headers.insert(0, ("Content-Type", "application/json"))
    return headers


def _request_json(received: Received) -> Any:
    """The request's JSON body, or None (no body, or not JSON)."""
    try:
        return json.loads(received.body) if received.body else None
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``6m0s``, ``1.5s``, ``12ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"
