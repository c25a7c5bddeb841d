"""The one data model that flows through llmshim: a wire request, the call made of it, the reply.

Adapters turn a library's request into a :class:`WireRequest` (``to_wire``), dialects say what it
is (:class:`CallInfo`), and the pipeline carries a :class:`Call` through the policies. What comes
back is a :class:`Reply`: status and headers at once, the body later through its
:class:`~llmshim.tap.Tap` (``tap.py``), because at the seams llmshim patches every body, streamed or
not, is still unread when the library hands the response back. Policies learn how the body ended by
subscribing to the tap. What policies learn about the call is on ``call.facts`` (``facts.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload
from urllib.parse import urlsplit

from .clocks import monotonic
from .facts import Facts
from .tap import OnEnd, Tap, TapObserver

if TYPE_CHECKING:
    from .cancellation import Cancellation
    from .dialects import Dialect
    from .tokens import TextTally

__all__ = ["INCOMPLETE_STREAM", "Call", "CallInfo", "HeaderItems", "OnEnd", "Reply", "ResponseInfo", "Tap",
           "TapObserver", "Usage", "WireRequest"]


#: A request's headers as (name, value) strings, in sent order.
HeaderItems = tuple[tuple[str, str], ...]


class WireRequest:
    """A request as it goes on the wire: method, absolute URL, headers in sent order, body bytes.

    Immutable, compared by those four values. ``headers`` may be given as a function that reads
    them: an adapter then decodes the library's headers only if a policy asks (the cache key, the
    limiter's credential, retry's SDK marker); with those features off no call pays for it.
    ``path`` and ``server`` are worked out once, on first use: several policies ask every call."""

    method: str
    url: str
    body: bytes
    # Memos and the reader start as these class-level Nones: an instance holds only what it was given.
    _headers: HeaderItems | None = None
    _read_headers: Callable[[], HeaderItems] | None = None
    _path: str | None = None
    _server: tuple[str, int | None] | None = None

    def __init__(self, method: str, url: str,
                 headers: HeaderItems | Callable[[], HeaderItems],
                 body: bytes) -> None:
        # Stored in the instance's dict past the frozen __setattr__ (object.__setattr__ per field
        # cost seven calls on every request of every call).
        fields = self.__dict__
        fields["method"], fields["url"], fields["body"] = method, url, body
        fields["_read_headers" if callable(headers) else "_headers"] = headers

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    @property
    def headers(self) -> HeaderItems:
        headers = self._headers
        if headers is None:
            read = self._read_headers
            if read is None:  # another thread read them meanwhile: its memo, set before the reader went
                return self._headers or ()
            headers = read()
            memo = self.__dict__
            memo["_headers"] = headers  # a memo, not a change: read once
            memo["_read_headers"] = None  # and the library's request let go
        return headers

    def _values(self) -> tuple[Any, ...]:
        return self.method, self.url, self.headers, self.body

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, WireRequest) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (f"WireRequest(method={self.method!r}, url={self.url!r}, headers={self.headers!r}, "
                f"body={self.body!r})")

    def __reduce__(self) -> tuple[type[WireRequest], tuple[str, str, HeaderItems, bytes]]:
        """Copies (``copy.copy``/``deepcopy``) rebuilt through ``__init__`` from the four values, as the
        frozen dataclass this class replaced allowed: the default, field by field, would assign
        through the frozen ``__setattr__`` and a reader could not be copied without its request."""
        return WireRequest, (self.method, self.url, self.headers, self.body)

    def replace(self, **changes: Any) -> WireRequest:
        """A copy with ``changes`` (method, url, headers, body) applied."""
        values: dict[str, Any] = {"method": self.method, "url": self.url, "headers": self.headers, "body": self.body}
        values.update(changes)
        return WireRequest(**values)

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
        path = self._path
        if path is None:
            path = _path_of(self.url)
            self.__dict__["_path"] = path  # frozen to its users; a memo is not a change
        return path

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
        """(host, port) with the scheme's default port filled in. Worked out once per origin
        (scheme://authority): several policies ask for every call."""
        server = self._server
        if server is None:
            url = self.url
            start = url.find("//")
            end = url.find("/", start + 2) if start >= 0 else -1
            server = _server_of(url if end < 0 else url[:end])
            self.__dict__["_server"] = server
        return server


def _path_of(url: str) -> str:
    start = url.find("/", url.find("//") + 2) if "//" in url else url.find("/")
    if start < 0:
        return "/"
    end = len(url)
    for mark in ("?", "#"):
        found = url.find(mark, start)
        if found >= 0:
            end = min(end, found)
    return url[start:end]


T = TypeVar("T")


class _memo(Generic[T]):  # lower-case: used as a decorator, like the property it replaces
    """``functools.cached_property`` without its lock (Python 3.11 takes one on every first read,
    half the cost of a telemetry call's ``params``): the value is worked out on first read and kept
    in the instance's ``__dict__``, where the next read finds it first. Two threads reading at once
    may both work it out: the values are equal, from the same frozen fields."""

    def __init__(self, function: Callable[[Any], T]) -> None:
        self.function, self.name = function, function.__name__
        self.__doc__ = function.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _memo[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> T | _memo[T]:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.function(instance)
        return value


@dataclasses.dataclass(frozen=True)
class CallInfo:
    """What a dialect recognised in a request: everything the policies need to know of its wire.

    The dialect fills it at recognition with what a few dict lookups give (``max_output_tokens``,
    ``temperature``, ``seed``); what walks the body is worked out on first use from the dialect
    that recognised it (``input_chars``, ``input_messages``), and ``params`` (gen_ai.request.*
    names) from ``param_source`` (the request body, or Ollama's ``options``) and the dialect's
    ``param_names`` table: most calls never need them, and every call pays for what is eager here.
    """

    # gen_ai.provider.name: who serves the call, named from a known host (groq, azure.ai.openai...,
    # llmshim.providers), else the dialect's name (openai | ollama | llama_cpp). The wire itself is
    # ``dialect.name``: the cache key uses that, never this.
    provider: str
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

    @_memo
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

    @_memo
    def input_chars(self) -> int:
        """Characters of the prompt's text (the token estimate's input); 0 without a dialect."""
        return self.dialect.input_chars(self) if self.dialect is not None else 0

    @_memo
    def input_messages(self) -> list[dict[str, Any]]:
        """The prompt in the GenAI spec's message shape (telemetry's gen_ai.input.messages)."""
        return self.dialect.input_messages(self) if self.dialect is not None else []


@dataclasses.dataclass(slots=True)
class Usage:
    input_tokens: int | None = None  # all of the prompt's tokens, cached ones included
    output_tokens: int | None = None
    cached_input_tokens: int | None = None  # of input_tokens, those read from the provider's prompt cache
    cache_write_tokens: int | None = None  # of input_tokens, those written to it (Anthropic bills them higher)


#: The error of a stream whose body ended cleanly before its answer did (no finish, no end marker).
INCOMPLETE_STREAM = "incomplete_stream"


@dataclasses.dataclass(slots=True)
class ResponseInfo:
    """What a dialect read from a response body (streamed or whole)."""

    model: str | None = None
    id: str | None = None
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    # The indices of the choices (candidates) that finished, where the wire numbers them: a stream
    # asking n choices is whole when n distinct ones have (a server may repeat a finish).
    finished_choices: set[int] | None = None
    usage: Usage = dataclasses.field(default_factory=Usage)  # what the provider reported, nothing else
    done: bool = False  # the dialect's done marker was seen ([DONE], "done": true, "stop": true, ...)
    # ``data: [DONE]`` came, whether or not the answer was whole by then (``done`` needs every choice):
    # a client may close at it (the OpenAI SDK does), and the call has ended all the same.
    marker: bool = False
    error: str | None = None  # an error event inside a 2xx body (mid-stream error)
    output: list[str] | None = None  # the answer's text pieces, collected only when content is captured
    chunks: int = 0  # messages read (SSE events, NDJSON lines; 1 for a whole body)
    service_tier: str | None = None  # the tier the provider says it served (OpenAI: default, flex, priority...)
    # The generated text, held to be counted only if the provider reports no usage (llmshim.tokens).
    tally: TextTally | None = dataclasses.field(default=None, repr=False, compare=False)
    # When the provider reported no usage: llmshim's estimate and how it was made (llmshim.tokens).
    estimated: Usage | None = None
    estimator: str | None = None

    @property
    def wants_text(self) -> bool:
        """Whether the answer's text is wanted (captured content, or a tally): dialects skip
        looking for it otherwise."""
        return self.output is not None or self.tally is not None

    def finish_choice(self, index: int | None, reason: str) -> None:
        """A choice (candidate) numbered ``index`` (None: the wire did not number it, the first)
        finished for ``reason``."""
        self.finish_reasons.append(reason)
        if self.finished_choices is None:
            self.finished_choices = set()
        self.finished_choices.add(0 if index is None else index)

    def add_text(self, text: Any) -> None:
        """A piece of the answer's text: captured (when content is) and tallied."""
        if isinstance(text, str) and text:
            if self.output is not None:
                self.output.append(text)
            if self.tally is not None:
                self.tally.add(text)

    def add_generated(self, text: Any) -> None:
        """Generated text that is not the answer's prose (a tool call's arguments): tallied only."""
        if self.tally is not None and isinstance(text, str) and text:
            self.tally.add(text)

    @property
    def tokens(self) -> Usage | None:
        """The usage to account for this answer: the provider's, else llmshim's estimate (then
        ``estimator`` is set), else None."""
        usage = self.usage
        if usage.input_tokens is not None or usage.output_tokens is not None:
            return usage
        return self.estimated


@functools.lru_cache(maxsize=512)
def _server_of(origin: str) -> tuple[str, int | None]:
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: as urlsplit's callers saw before, no port
        port = None
    return parts.hostname or "", port or {"http": 80, "https": 443}.get(parts.scheme)


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
    dialect: Dialect
    started_at: float = dataclasses.field(default_factory=monotonic)
    status: int | None = None
    response: ResponseInfo | None = None
    ended_at: float | None = None
    first_chunk_at: float | None = None
    error: BaseException | None = None
    outcome: str | None = None  # "ok" | "error" | "aborted"
    capture_content: bool = False  # set by telemetry before sending: read the answer's text too
    chunk_times: list[float] | None = None  # arrival of each body piece, kept when telemetry asks
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
    # Whether the caller's deadline for the whole call has passed (aiohttp's total timeout fired:
    # its next step raises TimeoutError at once), so no retry or queue wait is started for it.
    expired: Callable[[], bool] | None = dataclasses.field(default=None, repr=False, compare=False)
    # Why the cache must neither look up nor store this call, set by the adapter: a test double or a
    # recorder answers it, not the network (llmshim.adapters._doubles). None: the real network.
    cache_bypass: str | None = None
    # The adapter's send of this request through its library's original method (sync or async to
    # match the chain it runs on): the pipeline's chain, built once, ends by calling it.
    send: Callable[[Call], Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    # Set when the caller went away while this call's chain runs on another thread (a trio task
    # cancelled): waits that hold a place others need leave at once (llmshim.cancellation).
    cancellation: Cancellation | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def time_to_first_chunk(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started_at
