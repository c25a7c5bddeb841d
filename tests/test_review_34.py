"""Review 34: streams abandoned, cut, slow and oddly framed, with and without llmshim.

What tests/test_bodies.py, test_failures.py, test_review_28.py, test_cache.py and test_coalescing.py
already pin is not repeated here. This file adds:

- framing: SSE and NDJSON as servers other than Python's write them (UTF-8 unescaped, so a JSON
  string may hold U+2028, U+2029 or U+0085; ``\\r\\n`` and bare ``\\r`` line ends; comments,
  ``event:`` and multi-line ``data:``; pieces split anywhere, 0-byte chunks, a 5 MB event, a last
  line without its newline), read by the readers alone (Hypothesis) and end to end: the caller's
  bytes, the usage and the cache entry;
- abandonment against a client pool of two connections: fifty abandoned streams, then one more
  call, with and without llmshim (the same outcome); descriptors and threads after many;
- cuts a reset does not cover (a clean close mid-stream, a truncated chunk, a stall past the read
  timeout): the caller's exception is unchanged, nothing is cached, the outcome is not ``ok``;
- a leader abandoned while an identical follower waits: the follower goes upstream at once;
- an asyncio task cancelled mid-stream: ``aborted``, no warning, its connection released.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.dialects._framing import NdjsonReader, SseReader
from llmshim.testing import FakeLLMServer, Fault
from llmshim.testing.responses import Answer, answer_for
from llmshim.testing.server import Received

# -- framing: how a server other than Python's writes a stream -------------------------------------

#: Characters ``str.splitlines`` treats as line ends but SSE and NDJSON do not; JSON may carry them raw.
UNICODE_LINE_ENDS = "\u2028\u2029\x85"


def _unescaped(line: bytes) -> bytes:
    """A JSON line (or SSE ``data:`` line) re-encoded as llama.cpp, Go or Node write it: UTF-8 raw."""
    head, brace, rest = line.partition(b"{")
    if not brace:
        return line
    return head + json.dumps(json.loads(brace + rest), ensure_ascii=False).encode()


def pieces(raw: bytes, cuts: tuple[int, ...] | list[int]) -> list[bytes]:
    """``raw`` cut at ``cuts`` (taken modulo its length; 0-byte pieces where two cuts coincide)."""
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def reframe(body: bytes, newline: bytes = b"\n", extras: bool = False) -> bytes:
    """``body`` (a stream the bundled server wrote) written as another server would: JSON unescaped,
    ``newline`` as the line end, and comment lines (one before each ``data:`` line) when ``extras``."""
    lines = [_unescaped(line) for line in body.split(b"\n")]
    if extras and any(line.startswith(b"data:") for line in lines):
        lines = [b": keep-alive", *[(b": ping\n" + line if line.startswith(b"data:") else line) for line in lines]]
    return newline.join(line for part in lines for line in part.split(b"\n"))


def _reference_sse(text: str) -> list[tuple[str | None, str]]:
    """What an SSE client (the WHATWG algorithm) makes of ``text``: the oracle for SseReader."""
    events, event, data = [], None, []
    for line in re.split("\r\n|\r|\n", text):
        if not line:
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
    if data:
        events.append((event, "\n".join(data)))
    return events


_TEXTS = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(UNICODE_LINE_ENDS + "\r\n")), max_size=12)
_NEWLINES = st.sampled_from(["\n", "\r\n", "\r"])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(["delta", "done"])), st.lists(_TEXTS, min_size=1,
                                                                                               max_size=3)),
                min_size=1, max_size=4),
       _NEWLINES, st.lists(st.integers(0, 10_000), max_size=6), st.booleans())
def test_sse_reader_yields_each_event_whole_however_it_is_framed_and_split(
        events: list[tuple[str | None, list[str]]], newline: str, cuts: list[int], last_newline: bool) -> None:
    """Any text (every script, the Unicode line separators) as JSON data, multi-line data,
    comments, ``event:`` lines, any line end, cut at any byte (inside a UTF-8 character too)."""
    lines: list[str] = []
    for name, datas in events:
        lines += [": keep-alive"] + ([f"event: {name}"] if name else [])
        lines += [f"data: {json.dumps(d, ensure_ascii=False)}" for d in datas] + [""]
    text = newline.join(lines) + (newline if last_newline else "")
    raw = text.encode()
    reader, seen = SseReader(), []
    for piece in pieces(raw, cuts):
        seen += list(reader.feed(piece))
    seen += list(reader.feed(b"", final=True))
    assert seen == _reference_sse(text)
    assert [[json.loads(d) for d in data.split("\n")] for _, data in seen] == [datas for _, datas in events]


@settings(max_examples=60, deadline=None)
@given(st.lists(_TEXTS, min_size=1, max_size=5), st.sampled_from(["\n", "\r\n"]),
       st.lists(st.integers(0, 10_000), max_size=6), st.booleans())
def test_ndjson_reader_yields_each_object_however_it_is_split(values: list[str], newline: str, cuts: list[int],
                                                              last_newline: bool) -> None:
    objects = [{"message": {"content": v}, "done": False} for v in values]
    text = newline.join(json.dumps(o, ensure_ascii=False) for o in objects) + (newline if last_newline else "")
    reader, seen = NdjsonReader(), []
    for piece in pieces(text.encode(), cuts):
        seen += list(reader.feed(piece))
    seen += list(reader.feed(b"", final=True))
    assert seen == objects


# -- framing end to end: the caller's bytes, the usage, the cache entry ------------------------------

class Reframed:
    """A FakeLLMServer whose streamed answers are rewritten by ``reframe`` (settings per test)."""

    def __init__(self) -> None:
        self.newline, self.extras = b"\n", False
        self.every_byte = False  # each byte its own HTTP chunk (one write and flush each)
        self.open_end = False  # the last line without its line end
        self.server = FakeLLMServer(responder=self._answer)

    def _answer(self, received: Received) -> Answer | None:
        answer = answer_for(received.method, received.path.split("?")[0], received.json())
        if answer.chunks is None:
            return None
        body = reframe(b"".join(answer.chunks), self.newline, self.extras)
        body = body.rstrip(b"\r\n") if self.open_end else body
        # Never a 0-byte piece on the wire: in chunked encoding it ends the body.
        answer.chunks = [body[i:i + 1] for i in range(len(body))] if self.every_byte else [body]
        return answer


@pytest.fixture
def reframed() -> Iterator[Reframed]:
    fake = Reframed()
    with fake.server:
        yield fake


#: (path, request body) of three stream shapes: Responses (usage and end in the event that repeats
#: the whole text), Ollama NDJSON, Chat Completions SSE with a usage chunk.
ROUTES = {
    "responses": ("/v1/responses", {"model": "gpt-4o", "stream": True}),
    "ollama": ("/api/generate", {"model": "llama3.2"}),
    "chat": ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}),
}


def _prompted(route: str, prompt: str) -> tuple[str, dict[str, Any]]:
    path, body = ROUTES[route]
    key = "input" if route == "responses" else "prompt" if route == "ollama" else "messages"
    value: Any = [{"role": "user", "content": prompt}] if key == "messages" else prompt
    return path, {**body, key: value}


def _stream_bytes(url: str, body: dict[str, Any]) -> bytes:
    with httpx.Client(timeout=10) as client, client.stream("POST", url, json=body) as response:
        return b"".join(response.iter_raw())


def _three_ways(reframed: Reframed, route: str, prompt: str, installed: Callable[..., object],
                tmp_path: Any) -> tuple[bytes, bytes, bytes]:
    """(without llmshim, a miss, a hit) of one streamed call; asserts the hit went nowhere."""
    path, body = _prompted(route, prompt)
    url = reframed.server.url + path
    plain = _stream_bytes(url, body)
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    try:
        before = len(reframed.server.received)
        miss = _stream_bytes(url, body)
        hit = _stream_bytes(url, body)
        assert len(reframed.server.received) == before + 1, "the complete stream was not cached"
    finally:
        llmshim.uninstall()
    return plain, miss, hit


LINE_ENDS = [("responses", b"\n"), ("responses", b"\r\n"), ("responses", b"\r"), ("chat", b"\r"),
             ("ollama", b"\r\n")]


@pytest.mark.parametrize(("route", "newline"), LINE_ENDS, ids=[f"{r}-{n!r}" for r, n in LINE_ENDS])
def test_unescaped_unicode_line_separators_keep_usage_and_cache(
        route: str, newline: bytes, reframed: Reframed, installed: Callable[..., object],
        records: list[llmshim.CallRecord], tmp_path: Any) -> None:
    """Before the fix the readers split lines as ``str.splitlines`` does (U+2028 too): the event
    carrying the text broke, and with it the usage and the end of the stream (not cached)."""
    reframed.newline, reframed.extras = newline, True
    prompt = f"a{UNICODE_LINE_ENDS}b é 漢字 😀 {UNICODE_LINE_ENDS}"
    plain, miss, hit = _three_ways(reframed, route, prompt, installed, tmp_path)
    assert plain == miss == hit and "\u2028".encode() in plain
    done = [r for r in records if r.event == "call_completed"]
    assert [r.cache_hit for r in done] == [False, True]
    pieces = len(f"Echo: {prompt}".split(" "))  # the bundled server's usage: a token per piece
    assert (done[0].input_tokens, done[0].output_tokens) == (len(prompt.split()), pieces), done[0]
    assert done[1].saved_output_tokens == pieces


SHAPES = [("every_byte", "responses"), ("every_byte", "ollama"), ("open_end", "chat"), ("open_end", "ollama")]


@pytest.mark.parametrize(("shape", "route"), SHAPES, ids=[f"{s}-{r}" for s, r in SHAPES])
def test_a_stream_split_at_every_byte_or_ending_without_a_newline(
        route: str, shape: str, reframed: Reframed, installed: Callable[..., object],
        records: list[llmshim.CallRecord], tmp_path: Any) -> None:
    """Each byte its own chunk on the wire (inside every UTF-8 character, of 1 to 4 bytes), or the
    last line without its line end: the same bytes, usage and cache entry as a plain stream."""
    setattr(reframed, shape, True)
    reframed.newline = b"\r\n"
    prompt = f"é ж 漢 😀 {UNICODE_LINE_ENDS}"
    plain, miss, hit = _three_ways(reframed, route, prompt, installed, tmp_path)
    assert plain == miss == hit and plain.endswith(b"\r\n") != (shape == "open_end")
    done = [r for r in records if r.event == "call_completed"]
    assert [r.cache_hit for r in done] == [False, True]
    assert done[0].output_tokens == len(f"Echo: {prompt}".split(" ")), done[0]


def test_a_5mb_single_event(reframed: Reframed, installed: Callable[..., object],
                            records: list[llmshim.CallRecord], tmp_path: Any) -> None:
    prompt = "ж" * 2_500_000 + "\u2028"  # one 5 MB word: one 5 MB delta event
    plain, miss, hit = _three_ways(reframed, "chat", prompt, installed, tmp_path)
    assert plain == miss == hit and len(plain) > 5_000_000
    done = [r for r in records if r.event == "call_completed"]
    assert [r.cache_hit for r in done] == [False, True] and done[0].output_tokens == 2


# -- abandonment: a pool of two connections, fifty streams left early, then one more call ------------

PROMPT = [{"role": "user", "content": "one two three"}]
STREAM = {"model": "m", "messages": PROMPT, "stream": True}
POOL = 2
ABANDONED = 50


def _httpx_client(module: Any = httpx) -> Any:
    return module.Client(limits=module.Limits(max_connections=POOL, max_keepalive_connections=POOL),
                         timeout=module.Timeout(10, pool=2))


def _openai(server: FakeLLMServer) -> Any:
    import httpx2
    import openai

    return openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0,
                         http_client=openai.DefaultHttpx2Client(
                             limits=httpx2.Limits(max_connections=POOL, max_keepalive_connections=POOL),
                             timeout=httpx2.Timeout(10, pool=2)))


def _requests_session() -> requests.Session:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=POOL, pool_block=True))
    return session


def _first_chunk_then(leave: str, stream: Any, first: Callable[[], Any]) -> None:
    """Read the first chunk, then leave the stream: ``drop`` (the reference goes, collected as a
    program's garbage is), ``close``, or ``with`` (its context exited)."""
    if leave == "with":
        with stream:
            first()
        return
    first()
    if leave == "close":
        stream.close()


def _sync_scenario(name: str, server: FakeLLMServer,
                   stack: contextlib.ExitStack) -> tuple[Callable[[str], None], Callable[[], Any]]:
    """(abandon one stream by ``leave``, the call after) for ``name``, over a pool of two of its own."""
    url = server.openai_base_url + "/chat/completions"
    whole = {**STREAM, "stream": False}
    if name == "httpx":
        hx = stack.enter_context(_httpx_client())

        def httpx_stream(leave: str) -> None:
            if leave == "with":  # httpx's own context: client.stream()
                with hx.stream("POST", url, json=STREAM) as response:
                    next(response.iter_lines())
                return
            response = hx.send(hx.build_request("POST", url, json=STREAM), stream=True)
            _first_chunk_then(leave, response, lambda: next(response.iter_lines()))

        return httpx_stream, lambda: hx.post(url, json=whole).json()
    if name.startswith("openai"):
        oa = stack.enter_context(_openai(server))

        def openai_stream(leave: str) -> None:
            stream = oa.chat.completions.create(model="m", messages=PROMPT, stream=True)
            _first_chunk_then(leave, stream, lambda: next(iter(stream)))

        def openai_streaming_response(leave: str) -> None:
            manager = oa.chat.completions.with_streaming_response.create(model="m", messages=PROMPT, stream=True)
            if leave == "with":
                with manager as response:
                    next(response.iter_lines())
                return
            response = manager.__enter__()
            _first_chunk_then(leave, response, lambda: next(response.iter_bytes()))

        return (openai_stream if name == "openai" else openai_streaming_response,
                lambda: oa.chat.completions.create(model="m", messages=PROMPT).model_dump())
    if name == "ollama":
        import ollama

        ol = ollama.Client(host=server.url, limits=httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL),
                           timeout=httpx.Timeout(10, pool=2))
        stack.callback(ol._client.close)

        def ollama_stream(leave: str) -> None:
            chunks = ol.chat(model="m", messages=PROMPT, stream=True)
            next(chunks)
            if leave == "close":
                chunks.close()

        return ollama_stream, lambda: ol.chat(model="m", messages=PROMPT).model_dump()
    rq = stack.enter_context(_requests_session())

    def requests_stream(leave: str) -> None:
        response = rq.post(url, json=STREAM, stream=True, timeout=10)
        read = (lambda: response.raw.read(10)) if name == "requests-raw" else lambda: next(response.iter_content(7))
        _first_chunk_then(leave, response, read)

    return requests_stream, lambda: rq.post(url, json=whole, timeout=10).json()


@pytest.fixture
def young_garbage_only() -> Iterator[None]:
    """Everything alive now is left out of collections until the test ends: a ``gc.collect()``
    after each dropped stream then costs what the test allocated, not the whole test session."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _outcome(abandon: Callable[[str], None], after: Callable[[], Any], leave: str, times: int = ABANDONED) -> str:
    """What the program saw: ``ok``, or the first exception's type and when."""
    for attempt in range(times):
        try:
            abandon(leave)
        except Exception as exc:
            return f"{type(exc).__name__} at {attempt}"
        if leave == "drop":
            gc.collect()  # the moment a program's garbage is collected: a stream in a cycle goes then
    try:
        after()
    except Exception as exc:
        return f"{type(exc).__name__} after"
    return "ok"


#: Each client once, each way of leaving at least once (CI time: the file runs in under 25 s).
SYNC_CASES = [("httpx", "drop"), ("openai", "close"), ("openai-streaming-response", "with"), ("ollama", "drop"),
              ("requests-iter_content", "drop"), ("requests-raw", "close")]


@pytest.mark.parametrize(("name", "leave"), SYNC_CASES, ids=[f"{n}-{leave}" for n, leave in SYNC_CASES])
def test_fifty_abandoned_streams_on_a_pool_of_two_then_one_more_call(
        name: str, leave: str, server: FakeLLMServer, installed: Callable[..., object], tmp_path: Any,
        records: list[llmshim.CallRecord], young_garbage_only: None) -> None:
    """The same prompt each time (with the cache on: each abandoned leader must land before the
    next identical call, which never waits on its own thread), the same outcome as without llmshim
    (there, a few more streams than the pool holds show the program's own release works)."""
    with contextlib.ExitStack() as stack:
        without = _outcome(*_sync_scenario(name, server, stack), leave, times=POOL + 3)
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    received = len(server.received)
    with contextlib.ExitStack() as stack:
        with_shim = _outcome(*_sync_scenario(name, server, stack), leave)
    assert with_shim == without == "ok"
    assert len(server.received) - received == ABANDONED + 1  # nothing abandoned was stored
    ended = [r for r in records if r.event != "call_started"]
    assert len(ended) == ABANDONED + 1 and {r.outcome for r in ended[:-1]} == {"aborted"}


# -- aiohttp: a response dropped unread is collected, and its call ends ------------------------------

async def _aiohttp_dropped(url: str) -> weakref.ref[Any]:
    """Opens a stream, reads its first line, drops the response (no close, no release): a weak
    reference to it."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        response = await session.post(url, json=STREAM)
        assert (await response.content.readline()).startswith(b"data: ")
        await _body_arrived(response)
        gone = weakref.ref(response)
        del response
    return gone


async def _body_arrived(response: Any) -> None:
    """Until the whole body is in the response's buffer: before, aiohttp's connection holds the
    response (its end-of-body callback), with or without llmshim, and a collection cannot take it."""
    while not response.content.is_eof():
        await asyncio.sleep(0)  # a yield to the loop, which reads the socket


@pytest.mark.parametrize("mode", ["without", "features-off", "cache"])
def test_a_dropped_aiohttp_response_is_collected_and_its_call_ends(
        mode: str, server: FakeLLMServer, installed: Callable[..., object], tmp_path: Any,
        records: list[llmshim.CallRecord]) -> None:
    """Before the fix the call kept its adapter's closures over aiohttp's ClientRequest, which holds
    its ClientResponse; the tap (reachable from its collection watch) held the call: a dropped
    response was never collected (memory), its call never ended (no hook, no span)."""
    if mode != "without":
        installed(**({"cache": "on", "cache_path": str(tmp_path / "c.sqlite3")} if mode == "cache" else {}))
    gone = asyncio.run(_aiohttp_dropped(server.openai_base_url + "/chat/completions"))
    gc.collect()
    assert gone() is None
    if mode != "without":
        assert [r.event for r in records] == ["call_started", "call_failed"]
        assert records[-1].outcome == "aborted"


def test_an_identical_aiohttp_call_after_a_dropped_one_does_not_wait_for_it(
        server: FakeLLMServer, installed: Callable[..., object], tmp_path: Any) -> None:
    """The dropped leader's flight lands when its response is collected: the next identical call
    (another task, another loop) goes upstream at once instead of waiting the coalescing bound
    (30 s, beyond the session's 5 s total timeout)."""
    import aiohttp

    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"), cache_coalesce_timeout="30")
    url = server.openai_base_url + "/chat/completions"
    gone = asyncio.run(_aiohttp_dropped(url))
    gc.collect()
    assert gone() is None

    async def again() -> bytes:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.post(url, json=STREAM) as response:
            return await response.read()

    assert asyncio.run(again()).endswith(b"data: [DONE]\n\n")
    assert len(server.received) == 2


# -- cuts: a clean close, a truncated chunk, a stall past the read timeout -----------------------------

READ_TIMEOUT = 0.15


def _cut_readers() -> dict[str, Callable[[FakeLLMServer], Any]]:
    """name -> a program that reads one whole stream its library's way and returns what it got."""
    import aiohttp
    import httpx2
    import ollama
    import openai

    def openai_sdk(server: FakeLLMServer) -> Any:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0,
                           timeout=httpx2.Timeout(10, read=READ_TIMEOUT)) as client:
            return [c.model_dump() for c in client.chat.completions.create(model="m", messages=PROMPT, stream=True)]

    def ollama_client(server: FakeLLMServer) -> Any:
        client = ollama.Client(host=server.url, timeout=httpx.Timeout(10, read=READ_TIMEOUT))
        try:
            return [c.model_dump() for c in client.chat(model="m", messages=PROMPT, stream=True)]
        finally:
            client._client.close()

    def httpx_lines(server: FakeLLMServer) -> Any:
        with httpx.Client(timeout=httpx.Timeout(10, read=READ_TIMEOUT)) as client, client.stream(
                "POST", server.url + "/api/generate", json={"model": "m", "prompt": "one two three"}) as response:
            return list(response.iter_lines())

    def requests_lines(server: FakeLLMServer) -> Any:
        with requests.post(server.openai_base_url + "/chat/completions", json=STREAM, stream=True,
                           timeout=(10, READ_TIMEOUT)) as response:
            return list(response.iter_lines())

    def aiohttp_any(server: FakeLLMServer) -> Any:
        async def read() -> Any:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=READ_TIMEOUT)) as session, \
                    session.post(server.openai_base_url + "/chat/completions", json=STREAM) as response:
                return [piece async for piece in response.content.iter_any()]
        return asyncio.run(read())

    return {"openai": openai_sdk, "ollama": ollama_client, "httpx": httpx_lines, "requests": requests_lines,
            "aiohttp": aiohttp_any}


def _failure(program: Callable[[FakeLLMServer], Any], server: FakeLLMServer) -> tuple[str, str]:
    try:
        program(server)
    except Exception as exc:
        return type(exc).__qualname__, str(exc)
    return "ok", ""


#: Every reader for a clean close; a truncated chunk and a stall for each HTTP parser (h11, urllib3, aiohttp).
CUTS = [(reader, "close") for reader in ("openai", "ollama", "httpx", "requests", "aiohttp")] + [
    (reader, cut) for cut in ("truncated_chunk", "stall") for reader in ("httpx", "requests", "aiohttp")]


@pytest.mark.parametrize(("reader", "cut"), CUTS, ids=[f"{r}-{c}" for r, c in CUTS])
def test_a_cut_stream_raises_as_without_llmshim_is_not_cached_and_not_ok(
        reader: str, cut: str, server: FakeLLMServer, installed: Callable[..., object], tmp_path: Any,
        records: list[llmshim.CallRecord]) -> None:
    program = _cut_readers()[reader]
    fault = Fault(cut=cut, after_chunks=2)  # type: ignore[arg-type]
    server.inject(fault)
    without = _failure(program, server)
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    server.inject(fault)
    assert _failure(program, server) == without and without[0] != "ok"
    received = len(server.received)
    assert _failure(program, server) == ("ok", "")  # the next identical call: a miss, upstream
    assert len(server.received) == received + 1
    ended = [r for r in records if r.event != "call_started"]
    assert [r.outcome != "ok" for r in ended] == [True, False] and ended[0].cache_hit is False


# -- a follower coalesced on a leader that is then abandoned ---------------------------------------

@pytest.fixture
def coalescing(installed: Callable[..., object], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The cache on, a follower waiting up to 30 s; the event is set once a follower starts waiting."""
    from llmshim.singleflight import Flights

    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"), cache_coalesce_timeout="30")
    waiting = threading.Event()
    wait, await_landing = Flights.wait, Flights.await_landing

    def observed_wait(self: Flights, flight: Any) -> bool:
        waiting.set()
        return wait(self, flight)

    async def observed_await_landing(self: Flights, flight: Any) -> bool:
        waiting.set()
        return await await_landing(self, flight)

    monkeypatch.setattr(Flights, "wait", observed_wait)
    monkeypatch.setattr(Flights, "await_landing", observed_await_landing)
    return waiting


@pytest.mark.parametrize("leave", ["close", "drop"])
def test_a_follower_goes_upstream_as_soon_as_its_leader_is_abandoned(
        leave: str, server: FakeLLMServer, coalescing: threading.Event, young_garbage_only: None) -> None:
    url = server.openai_base_url + "/chat/completions"
    got: list[bytes] = []
    with httpx.Client(timeout=10) as client:
        response = client.send(client.build_request("POST", url, json=STREAM), stream=True)  # leads
        lines = response.iter_lines()  # kept: a discarded iterator would end the body (httpx: StreamConsumed)
        next(lines)
        follower = threading.Thread(target=lambda: got.append(httpx.post(url, json=STREAM, timeout=10).content))
        follower.start()
        assert coalescing.wait(10)
        if leave == "close":
            response.close()
        del response, lines
        gc.collect()
        follower.join(10)  # a hang detector: released at once, not after the 30 s bound
        assert not follower.is_alive()
    assert got[0].endswith(b"data: [DONE]\n\n") and len(server.received) == 2


def test_an_aiohttp_follower_goes_upstream_as_soon_as_its_leader_task_drops_its_response(
        server: FakeLLMServer, coalescing: threading.Event, young_garbage_only: None) -> None:
    import aiohttp

    url = server.openai_base_url + "/chat/completions"

    async def main() -> bytes:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async def follow() -> bytes:
                async with session.post(url, json=STREAM) as response:
                    return await response.read()

            response = await session.post(url, json=STREAM)  # this task leads
            await response.content.readline()
            await _body_arrived(response)
            follower = asyncio.ensure_future(follow())  # another task: it may wait for this one
            while not (coalescing.is_set() or follower.done()):
                await asyncio.sleep(0)  # yields until the follower waits (or, wrongly, is done)
            del response  # dropped: no close, no release
            gc.collect()
            return await asyncio.wait_for(follower, 5)  # not the 30 s bound

    assert asyncio.run(main()).endswith(b"data: [DONE]\n\n")
    assert len(server.received) == 2


# -- an asyncio task cancelled mid-stream ---------------------------------------------------------

def _async_client(library: str, server: FakeLLMServer) -> tuple[Any, Callable[[asyncio.Event], Any],
                                                                  Callable[[], Any]]:
    """(the client, a stream that sets the event after its first chunk and then reads on, a whole call)
    over a pool of one connection."""
    import aiohttp
    import httpx2
    import openai

    url = server.openai_base_url + "/chat/completions"
    if library == "openai":
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0,
                                    http_client=openai.DefaultAsyncHttpx2Client(
                                        limits=httpx2.Limits(max_connections=1), timeout=httpx2.Timeout(10, pool=2)))

        async def openai_stream(first: asyncio.Event) -> None:
            async for _chunk in await client.chat.completions.create(model="m", messages=PROMPT, stream=True):
                first.set()

        return client, openai_stream, lambda: client.chat.completions.create(model="m", messages=PROMPT)
    if library == "httpx":
        hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=httpx.Timeout(10, pool=2))

        async def httpx_stream(first: asyncio.Event) -> None:
            async with hx.stream("POST", url, json=STREAM) as response:
                async for _line in response.aiter_lines():
                    first.set()

        async def whole() -> Any:
            return (await hx.post(url, json={**STREAM, "stream": False})).json()

        return hx, httpx_stream, whole
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=10))

    async def aiohttp_stream(first: asyncio.Event) -> None:
        async with session.post(url, json=STREAM) as response:
            async for _piece in response.content.iter_any():
                first.set()

    async def aiohttp_whole() -> Any:
        async with session.post(url, json={**STREAM, "stream": False}) as response:
            return await response.json()

    return session, aiohttp_stream, aiohttp_whole


async def _cancelled_mid_stream(library: str, server: FakeLLMServer) -> list[dict[str, Any]]:
    """Cancels a task blocked in the middle of a stream (the server stalls after two pieces), then
    makes one whole call on the same pool of one: the loop's unhandled-error reports."""
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    client, stream, whole = _async_client(library, server)
    try:
        first = asyncio.Event()
        server.inject(Fault(cut="stall", after_chunks=2))
        task = asyncio.ensure_future(stream(first))
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await asyncio.wait_for(whole(), 5)) is not None  # the connection came back to the pool
    finally:
        await (client.close() if library != "httpx" else client.aclose())
    del task
    gc.collect()
    return reports


async def _whole_stream(library: str, server: FakeLLMServer) -> None:
    client, stream, _ = _async_client(library, server)
    try:
        await stream(asyncio.Event())
    finally:
        await (client.close() if library != "httpx" else client.aclose())


@pytest.mark.parametrize("library", ["openai", "httpx", "aiohttp"])
def test_a_task_cancelled_mid_stream_is_aborted_and_releases_its_connection(
        library: str, server: FakeLLMServer, installed: Callable[..., object], tmp_path: Any,
        records: list[llmshim.CallRecord]) -> None:
    assert asyncio.run(_cancelled_mid_stream(library, server)) == []
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    assert asyncio.run(_cancelled_mid_stream(library, server)) == []
    ended = [r for r in records if r.event != "call_started"]
    assert [r.outcome for r in ended] == ["aborted", "ok"]
    received = len(server.received)
    asyncio.run(_whole_stream(library, server))
    assert len(server.received) == received + 1  # the cancelled stream was not stored: a miss


# -- nothing accumulates over many abandoned streams ---------------------------------------------------

def _client_side(server: FakeLLMServer) -> tuple[int, int]:
    """(open descriptors, threads) of this process but the in-process server's: its sockets
    (local port: the server's) and its threads end on their own time after a client hangs up."""
    import os

    port = f"{server.port:04X}"
    server_inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[1].rsplit(":", 1)[1] == port:
                    server_inodes.add(fields[9])
    descriptors = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            descriptors += not (target.startswith("socket:[") and target[8:-1] in server_inodes)
    threads = sum(1 for t in threading.enumerate() if not t.name.startswith("llmshim-fake-llm")
                  and "process_request_thread" not in t.name)
    return descriptors, threads


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_two_hundred_abandoned_streams_leave_no_descriptor_thread_or_tap_behind(
        server: FakeLLMServer, installed: Callable[..., object], tmp_path: Any, young_garbage_only: None) -> None:
    """Half dropped unread, half closed after the first chunk, the cache on: between the 100th and
    the 200th, no descriptor, thread or watched response more (the first hundred open what is
    kept for good: the cache file's connection, the pool's sockets)."""
    import aiohttp

    from llmshim import tap

    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    url = server.openai_base_url + "/chat/completions"

    async def abandon(session: aiohttp.ClientSession, index: int) -> None:
        response = await session.post(url, json=STREAM)
        await response.content.readline()
        if index % 2:
            response.close()
        else:
            await _body_arrived(response)

    async def close(session: aiohttp.ClientSession) -> None:
        await session.close()
        await asyncio.sleep(0)  # the transports' connection_lost: their sockets close then

    def hundred(loop: asyncio.AbstractEventLoop) -> tuple[int, int]:
        """Fifty streams of each library on fresh pools, then the pools closed: what is left open."""
        session = loop.run_until_complete(_session())
        with _httpx_client() as client:
            for index in range(50):
                response = client.send(client.build_request("POST", url, json=STREAM), stream=True)
                lines = response.iter_lines()
                next(lines)
                if index % 2:
                    response.close()
                del response, lines
                loop.run_until_complete(abandon(session, index))
                gc.collect()
        loop.run_until_complete(close(session))
        gc.collect()
        return _client_side(server)

    loop = asyncio.new_event_loop()
    try:
        assert hundred(loop) == hundred(loop)
        assert not tap._WATCHED
    finally:
        loop.close()
    assert len(server.received) == 200


async def _session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=POOL), timeout=aiohttp.ClientTimeout(total=10))
