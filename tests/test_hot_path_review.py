"""Trying to break the 2026-11-29 hot-path changes (issue 15): each test is an input or a sequence
where llmshim could now behave differently from before, or from no llmshim at all.

- ``WireRequest`` is a hand-written immutable class now (it was a frozen slotted dataclass):
  copies (``copy``, ``deepcopy``, pickle's protocol, which both use) must still work and be equal,
  with headers given eagerly or as a reader.
- httpx's ``header_items`` decodes ``Headers._list`` in a few C passes and chooses httpx's encoding
  itself: it must answer exactly ``Headers.multi_items()`` whatever the bytes and encoding.
- ``redact.public_url`` remembers URLs found public: its answers must be those of a fresh scan, and
  what it remembers must never hold a credential it would have removed.
- ``store.sqlite_files``' pid is kept by a fork hook: a child forked from a thread that holds a
  connection must open its own.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmshim import redact
from llmshim.adapters.httpx import header_items
from llmshim.call import WireRequest

URL = "http://127.0.0.1:1/v1/chat/completions"
HEADERS = (("content-type", "application/json"), ("authorization", "Bearer sk-test"))


# -- WireRequest copies ----------------------------------------------------------------------------

@pytest.mark.parametrize("lazy", [False, True], ids=["headers", "reader"])
@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_wire_request_copies_equal_as_the_dataclass_did(how: str, lazy: bool) -> None:
    """Before issue 15 ``copy.copy(call.request)`` (and deepcopy, pickle) worked: a frozen slotted
    dataclass brings its own ``__getstate__``/``__setstate__``. The hand-written class answered
    FrozenInstanceError: the default copy sets each slot through the frozen ``__setattr__``."""
    reads: list[int] = []

    def reader() -> tuple[tuple[str, str], ...]:
        reads.append(1)
        return HEADERS

    request = WireRequest("POST", URL, reader if lazy else HEADERS, b'{"model":"m"}')
    copied = {"copy": copy.copy, "deepcopy": copy.deepcopy,
              "pickle": lambda r: pickle.loads(pickle.dumps(r))}[how](request)
    assert copied == request and hash(copied) == hash(request)
    assert (copied.method, copied.url, copied.headers, copied.body) == ("POST", URL, HEADERS, b'{"model":"m"}')
    assert copied.path == "/v1/chat/completions" and copied.server == ("127.0.0.1", 1)
    assert len(reads) <= 1  # the reader is still called once at most
    with pytest.raises(AttributeError):
        copied.url = "http://elsewhere/"  # type: ignore[misc]


def test_wire_request_replace_and_repr_read_the_headers_once() -> None:
    reads: list[int] = []

    def reader() -> tuple[tuple[str, str], ...]:
        reads.append(1)
        return HEADERS

    request = WireRequest("POST", URL, reader, b"{}")
    changed = request.replace(body=b"[]")
    assert changed.headers == HEADERS and changed.body == b"[]" and request.body == b"{}"
    assert repr(request) == f"WireRequest(method='POST', url={URL!r}, headers={HEADERS!r}, body=b'{{}}')"
    assert request == WireRequest("POST", URL, HEADERS, b"{}")
    assert reads == [1]


# -- httpx header decoding -------------------------------------------------------------------------

#: Header bytes: what h11 and httpx accept (no NUL, CR, LF in values) plus every other byte, since
#: a Headers object holds whatever it was given until the send.
_NAME_BYTES = st.binary(min_size=1, max_size=6).filter(lambda b: not set(b) & {0, 10, 13, 58})
_VALUE_BYTES = st.binary(max_size=8).filter(lambda b: not set(b) & {0, 10, 13})
_ASCII_NAME = st.sampled_from([b"X-LLMSHIM-Cache", b"x-llmshim-priority", b"Content-Type", b"x-kept"])
_ENCODINGS = st.sampled_from([None, "ascii", "utf-8", "iso-8859-1", "cp1252", "utf-16-le", "shift_jis"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(module=st.sampled_from([httpx, httpx2]),
       raw=st.lists(st.tuples(st.one_of(_NAME_BYTES, _ASCII_NAME), _VALUE_BYTES), max_size=6),
       encoding=_ENCODINGS)
def test_header_items_answer_multi_items(module: Any, raw: list[tuple[bytes, bytes]], encoding: str | None) -> None:
    """``header_items`` (few C passes over ``Headers._list``, httpx's encoding worked out without
    asking the Headers) answers what ``Headers.multi_items()`` does, for any bytes and any encoding
    a Headers may be given; where httpx itself cannot decode them, ISO-8859-1 byte for byte."""
    request = module.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    request.headers = module.Headers(raw, encoding=encoding)
    got = header_items(request)
    assert request.headers._encoding == encoding  # the Headers' own state untouched (multi_items sets it)
    try:
        expected = tuple(request.headers.multi_items())
    except (UnicodeDecodeError, LookupError):
        expected = tuple((k.lower().decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw)
    assert got == expected


# -- public URLs -----------------------------------------------------------------------------------

#: URL pieces; a word piece ends in a separator, so a key shape that follows one starts a word
#: (``chatsk-proj-...`` is one word, not a key, by design of the key shapes).
_URL_PIECES = st.sampled_from(["https://", "http://", "api.openai.com/", "user:pw@", "/v1/", "chat/", "key=",
                               "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789", "AIzaSyA1234567890abcdefghijklmnopqrstu",
                               "?", "#", ";", "%40", "%2F", "%3d", "@", ":8080/", "/", "api_key=", "token/", "é/"])


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_URL_PIECES, max_size=10))
def test_public_url_remembered_answers_as_a_fresh_scan(pieces: list[str]) -> None:
    """The remembered answer is the fresh one; a URL is remembered only when the scan left it
    unchanged, so what is remembered holds nothing the scan would have removed. Hypothesis found
    that the scan missed a key after a percent-escape (``https://h/v1/%40sk-proj-...`` came back
    whole, and was remembered): the escape's hex digit made ``\\b`` see no word start."""
    url = "".join(pieces)
    redact._ALREADY_PUBLIC.clear()
    fresh = redact.public_url(url)
    assert redact.public_url(url) == fresh  # from the memo, when remembered
    redact._ALREADY_PUBLIC.clear()
    assert redact.public_url(url) == fresh
    for remembered in redact._ALREADY_PUBLIC:
        assert remembered == fresh and "sk-proj-" not in remembered and "AIza" not in remembered
        assert "@" not in remembered and "?" not in remembered


# -- SQLite connections across a fork from a thread ---------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_from_a_thread_opens_its_own_connection(tmp_path: Path) -> None:
    """The pid compared with each slot's is kept by an at-fork hook, not asked per use: a child
    forked from a thread that holds a connection must still get a connection of its own."""
    from llmshim.store import sqlite_files

    connections = sqlite_files.Connections(str(tmp_path / "db.sqlite3"), lambda conn, read_only: conn,
                                           own_directory=False, busy_timeout_ms=1000)
    results: dict[str, Any] = {}

    def worker() -> None:
        parent_slot = connections.enter()
        connections.leave(parent_slot)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one thread, this one, with the parent's slot in its thread-local
            try:
                child_slot = connections.enter()
                same = child_slot is parent_slot or child_slot.conn is parent_slot.conn
                connections.leave(child_slot)
                os.write(write, b"same" if same else b"own")
            finally:
                os._exit(0)
        os.close(write)
        results["child"] = os.read(read, 16)
        os.close(read)
        os.waitpid(pid, 0)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert results["child"] == b"own"


# -- WireRequest.headers read from two threads ---------------------------------------------------------

def test_headers_read_by_another_thread_meanwhile_are_not_lost() -> None:
    """Thread A finds no headers yet; before it looks for the reader, thread B reads them (the memo
    set, the reader let go). A must answer B's headers, not ``()`` (it wrote ``()`` over B's memo,
    so every later read, the cache key's and the limiter's credential among them, saw no headers).
    The thread switch is made deterministic: a trace function runs B's read at A's line that
    fetches the reader."""
    import inspect
    import sys

    request = WireRequest("POST", URL, lambda: HEADERS, b"{}")
    getter = WireRequest.headers.fget  # type: ignore[attr-defined]
    source, first = inspect.getsourcelines(getter)
    fetch_line = first + next(i for i, line in enumerate(source) if "self._read_headers" in line)
    switched: list[bool] = []

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is getter.__code__:
            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "line" and frame.f_lineno == fetch_line and not switched:
                    switched.append(True)
                    assert request.headers == HEADERS  # "thread B", run at this point of A's read
                return local
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        seen_by_a = request.headers
    finally:
        sys.settrace(previous)
    assert switched == [True]
    assert seen_by_a == HEADERS and request.headers == HEADERS


# -- control headers among non-ASCII neighbours, over real sockets ---------------------------------------

_NEIGHBOURS = {
    "latin-1": [(b"X-Cafe", b"cr\xe8me br\xfbl\xe9e"), (b"x-kept", b"yes")],
    "utf-8": [(b"X-Note", "d\u00e9j\u00e0 vu \u2713".encode()), (b"x-kept", b"yes")],
    "ascii": [(b"x-kept", b"yes")],
}


@pytest.mark.parametrize("neighbours", sorted(_NEIGHBOURS))
@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
def test_controls_in_odd_cases_among_non_ascii_headers(module: Any, neighbours: str, server: Any,
                                                       installed: Any, tmp_path: Path) -> None:
    """The raw-name scan for x-llmshim-* (``_Headers.controls``) and the lazily decoded headers: a
    control spelled in mixed case, next to headers whose bytes are not ASCII, is obeyed and
    removed; every other header reaches the server byte for byte as it does without llmshim."""
    body = b'{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}]}'
    controls = [(b"X-LlmShim-CACHE", b"no-store"), (b"x-LLMSHIM-priority", b"high")]

    def send() -> None:
        with module.Client() as client:
            request = client.build_request("POST", server.url + "/v1/chat/completions", content=body,
                                           headers={"content-type": "application/json"})
            for name, value in [*_NEIGHBOURS[neighbours], *controls]:
                request.headers._list.append((name, name.lower(), value))  # raw bytes, as httpx keeps them
            client.send(request).read()

    send()  # without llmshim: what the server receives then
    without = [name.lower() for name, _ in server.received[0].headers]
    baseline = [(n, v) for n, v in server.received[0].headers if not n.lower().startswith("x-llmshim-")]
    assert "x-llmshim-cache" in without  # without llmshim the controls are just headers
    server.received.clear()
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    send()
    send()  # no-store obeyed: the second call is not answered from the cache
    assert len(server.received) == 2
    for received in server.received:
        assert list(received.headers) == baseline


# -- a stored description broken before its outcome ---------------------------------------------------

def test_a_description_broken_before_its_outcome_is_served_and_reads_as_unreadable(tmp_path: Path) -> None:
    """Since issue 15 a lookup decodes only the description's trailing status/usage/estimator (what
    a hit needs). A row damaged before them is served (its answer and usage are intact) and its
    ``meta`` reads as unreadable, never raising: not in a copy to another store, not in ``cache show``."""
    from llmshim.store.base import UNREADABLE, Entry
    from llmshim.store.cache_sqlite import SQLiteStore

    broken = '{"provider": "openai", "url": "http://h/v1/chat/co\x00\x00 garbage, "status": 200, ' \
             '"usage": {"input_tokens": 1, "output_tokens": 2}, "estimator": null}'
    entry = Entry.stored("k", 200, [], b"{}", 0.0, None, broken)
    assert entry.outcome["usage"] == {"input_tokens": 1, "output_tokens": 2}
    assert entry.meta == UNREADABLE
    store = SQLiteStore(str(tmp_path / "copy.sqlite3"))
    try:
        store.put(entry, now=0.0)  # a copy reads the description: it must not raise
        copied = store.get("k", now=0.0)
        assert copied is not None and copied.body == b"{}" and copied.meta == UNREADABLE
    finally:
        store.close()
