"""The one data model that flows through llmshim: a wire request, the call made of it, the reply.

Adapters turn a library's request into a :class:`WireRequest` (``to_wire``), dialects say what it
is (:class:`CallInfo`), and the pipeline carries a :class:`Call` through the policies. What comes
back is a :class:`Reply`: status and headers at once, the body later through its :class:`Tap`,
because at the seams llmshim patches every body, streamed or not, is still unread when the
library hands the response back. Policies learn how the body ended by subscribing to the tap.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from .facts import Facts

if TYPE_CHECKING:
    from .dialects import Dialect

log = logging.getLogger("llmshim")

__all__ = ["Call", "CallInfo", "OnEnd", "Reply", "ResponseInfo", "Tap", "TapObserver", "Usage", "WireRequest"]


@dataclasses.dataclass(frozen=True, slots=True)
class WireRequest:
    """A request as it goes on the wire: method, absolute URL, headers in sent order, body bytes."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def path(self) -> str:
        """The URL's path, by string slicing: it runs for every request a patched library sends."""
        url = self.url
        start = url.find("/", url.find("//") + 2) if "//" in url else url.find("/")
        if start < 0:
            return "/"
        end = len(url)
        for mark in ("?", "#"):
            found = url.find(mark, start)
            if found >= 0:
                end = min(end, found)
        return url[start:end]

    @property
    def public_url(self) -> str:
        """scheme://host:port/path: no user info, no query string (keys can hide in either)."""
        url = self.url
        cut = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
        head = url[:cut]
        if "@" not in head:
            return head
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        return f"{parts.scheme}://{netloc}{parts.path}"

    @property
    def server(self) -> tuple[str, int | None]:
        """(host, port) with the scheme's default port filled in."""
        parts = urlsplit(self.url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        return parts.hostname or "", port


@dataclasses.dataclass(frozen=True)
class CallInfo:
    """What a dialect recognised in a request: everything the policies need to know of its wire.

    The dialect fills it at recognition with what a few dict lookups give (``max_output_tokens``,
    ``temperature``, ``seed``); what walks the body is worked out on first use from the dialect
    that recognised it (``input_chars``, ``input_messages``), and ``params`` (gen_ai.request.*
    names) from ``param_source`` (the request body, or Ollama's ``options``) and the dialect's
    ``param_names`` table: most calls never need them, and every call pays for what is eager here.
    """

    provider: str  # gen_ai.provider.name: openai | ollama | llama_cpp
    operation: str  # gen_ai.operation.name: chat | text_completion | embeddings
    endpoint: str  # the dialect's route, e.g. "chat/completions", "api/generate", "completion"
    model: str | None
    stream: bool
    param_source: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    param_names: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    body: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    max_output_tokens: int | None = None  # the request's max_tokens-style field: a positive int, or None
    temperature: float | None = None  # a number, or None when absent or not a number
    seed: Any | None = None
    dialect: Dialect | None = dataclasses.field(default=None, repr=False, compare=False)

    @functools.cached_property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        source = self.param_source
        for field, attr in self.param_names.items():
            value = source.get(field)
            if value is None or attr in params:
                continue
            if attr in ("stop_sequences", "encoding_formats") and isinstance(value, str):
                value = [value]
            params[attr] = value
        return params

    @functools.cached_property
    def input_chars(self) -> int:
        """Characters of the prompt's text (the token estimate's input); 0 without a dialect."""
        return self.dialect.input_chars(self) if self.dialect is not None else 0

    @functools.cached_property
    def input_messages(self) -> list[dict[str, Any]]:
        """The prompt in the GenAI spec's message shape (telemetry's gen_ai.input.messages)."""
        return self.dialect.input_messages(self) if self.dialect is not None else []


@dataclasses.dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclasses.dataclass(slots=True)
class ResponseInfo:
    """What a dialect read from a response body (streamed or whole)."""

    model: str | None = None
    id: str | None = None
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    usage: Usage = dataclasses.field(default_factory=Usage)
    done: bool = False  # the dialect's done marker was seen ([DONE], "done": true, "stop": true, ...)
    error: str | None = None  # an error event inside a 2xx body (mid-stream error)
    output: list[str] | None = None  # the answer's text pieces, collected only when content is captured
    chunks: int = 0  # messages read (SSE events, NDJSON lines; 1 for a whole body)

    def add_text(self, text: Any) -> None:
        if self.output is not None and isinstance(text, str) and text:
            self.output.append(text)


_WATCHED: set[weakref.ref[Any]] = set()  # see Tap.abort_when_collected


class TapObserver(Protocol):
    """Receives a body's bytes as the caller gets them, then exactly one of complete/abort."""

    def on_chunk(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...
    def on_abort(self, error: BaseException | None) -> None: ...


class OnEnd:
    """A tap observer that only cares that the body ended (completed or aborted): it calls ``fn``.
    Judge the outcome from ``call.outcome``, which the tracker set before this runs."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn

    def on_chunk(self, data: bytes) -> None:
        pass

    def on_complete(self) -> None:
        self._fn()

    def on_abort(self, error: BaseException | None) -> None:
        self._fn()


class Tap:
    """Fan-out of one response body to the observers that policies subscribe.

    The adapter feeds it decoded body bytes as the caller reads them (``chunk``) and ends it once
    (``complete`` when the body was read to its end, ``abort`` on an error, an early close or
    garbage collection). ``opaque()`` says the bytes could not be decoded (an unknown
    content-encoding): observers then get no chunks but still get the end. ``gap()`` says some of
    the body reached the caller by a path the tap did not see: what it holds is not the whole body
    (``missed``), so it must never be stored. An observer that raises is logged and dropped; it
    never reaches the caller.

    Until ``release()`` the tap holds what it is fed: a body can arrive whole together with its
    headers (aiohttp reads it before handing the response back), before the policies on the
    way out of the pipeline have subscribed. The pipeline releases the tap once all have.
    """

    __slots__ = ("_held", "_observers", "_ref", "ended", "first_chunk_at", "missed", "opaque_body")

    def __init__(self) -> None:
        self._ref: weakref.ref[Any] | None = None
        self._observers: list[TapObserver] = []
        self._held: list[bytes | tuple[BaseException | None, bool]] | None = []
        self.ended = False
        self.opaque_body = False
        self.missed = False
        self.first_chunk_at: float | None = None

    def subscribe(self, observer: TapObserver) -> None:
        self._observers.append(observer)

    def abort_when_collected(self, owner: Any) -> None:
        """Abort this tap if ``owner`` (the library's response) is garbage-collected unread.

        The weak reference lives in a module-level registry until the body ends or the response
        dies: a weakref that is itself garbage (say, stored on an object in the response's own
        reference cycle) is cleared by the cyclic collector *without* calling its callback. This is
        weakref.finalize's idea, without its per-call bookkeeping."""
        ref = weakref.ref(owner, self._collected)
        self._ref = ref
        _WATCHED.add(ref)

    def _collected(self, ref: weakref.ref[Any]) -> None:
        _WATCHED.discard(ref)
        self.abort(None)

    def release(self) -> None:
        """Deliver what was held, then pass everything straight through."""
        held, self._held = self._held, None
        for item in held or ():
            if isinstance(item, bytes):
                self._deliver(item)
            else:
                self._finish(*item)

    def opaque(self) -> None:
        self.opaque_body = True

    def gap(self) -> None:
        """Some body bytes went to the caller unseen: what the tap saw is not the whole body."""
        self.missed = True

    def chunk(self, data: bytes) -> None:
        if self.ended or not data:
            return
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        if self.opaque_body:
            return
        if self._held is not None:
            self._held.append(data)
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        for observer in list(self._observers):
            try:
                observer.on_chunk(data)
            except Exception:  # an observer must never break the caller's read
                log.warning("llmshim: body observer failed; detaching it", exc_info=True)
                self._observers.remove(observer)

    def complete(self) -> None:
        self._end(None, completed=True)

    def abort(self, error: BaseException | None = None) -> None:
        self._end(error, completed=False)

    def _end(self, error: BaseException | None, *, completed: bool) -> None:
        if self.ended:
            return
        self.ended = True
        if self._ref is not None:
            _WATCHED.discard(self._ref)
            self._ref = None
        if self._held is not None:
            self._held.append((error, completed))
            return
        self._finish(error, completed)

    def _finish(self, error: BaseException | None, completed: bool) -> None:
        for observer in self._observers:
            try:
                if completed:
                    observer.on_complete()
                else:
                    observer.on_abort(error)
            except Exception:
                log.warning("llmshim: body observer failed at end of body", exc_info=True)
        self._observers.clear()


async def _nothing() -> None:
    return None


@dataclasses.dataclass(slots=True)
class Reply:
    """What one wire attempt returned: status and headers now, the body through ``tap``.

    ``discard``/``adiscard`` release an attempt that will not reach the caller (a retried one);
    ``peek`` reads a small error body synchronously where the library can (None where it cannot)."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    tap: Tap
    native: Any  # the library's own response object, handed back to the caller unchanged
    discard: Callable[[], None] = lambda: None
    adiscard: Callable[[], Awaitable[None]] = _nothing
    peek: Callable[[], bytes] | None = None


@dataclasses.dataclass(slots=True)
class Call:
    """One logical LLM call as it flows through the pipeline; outcome fields are filled as it ends."""

    request: WireRequest
    info: CallInfo
    library: str
    dialect: Any  # llmshim.dialects.Dialect (typed loosely: dialects import this module)
    started_at: float = dataclasses.field(default_factory=time.perf_counter)
    status: int | None = None
    response: ResponseInfo | None = None
    ended_at: float | None = None
    first_chunk_at: float | None = None
    error: BaseException | None = None
    outcome: str | None = None  # "ok" | "error" | "aborted"
    capture_content: bool = False  # set by telemetry before sending: read the answer's text too
    chunk_times: list[float] | None = None  # arrival of each body piece, kept when telemetry asks
    span_attributes: dict[str, Any] = dataclasses.field(default_factory=dict)  # llmshim.* set by policies
    facts: Facts = dataclasses.field(default_factory=Facts)  # what the policies did (llmshim.facts)
    controls: dict[str, str] = dataclasses.field(default_factory=dict)  # x-llmshim-* request headers, stripped
    # The adapter's builder of its library's own response type from (status, headers, body), for
    # answers that do not come from the upstream (cache hits, synthetic errors). None: not supported.
    replay: Callable[[int, list[tuple[str, str]], bytes], Reply] | None = None
    # Exceptions of the adapter's library that mean "no response arrived" (retryable).
    transport_errors: tuple[type[BaseException], ...] = ()
    # The caller's read timeout in seconds (None: none known): no wait llmshim makes between
    # attempts (a backoff, a server's retry-after) is as long as the silence the caller tolerates.
    timeout: float | None = None
    # Why the cache must neither look up nor store this call, set by the adapter: a test double or a
    # recorder answers it, not the network (llmshim.adapters._doubles). None: the real network.
    cache_bypass: str | None = None

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def time_to_first_chunk(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started_at
