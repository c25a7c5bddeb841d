"""The hot path's shortcuts give exactly what the slow ways gave (issue 15): headers decoded in
one pass equal ``Headers.multi_items()``, for either httpx and any header bytes; a call's server,
worked out once per origin, equals ``urlsplit``'s answer for any URL."""

from __future__ import annotations

from types import ModuleType
from urllib.parse import urlsplit

import httpx
import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmshim.adapters.httpx import header_items
from llmshim.call import WireRequest

NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1,
                max_size=20)
VALUES = st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
                   st.text(st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF), max_size=10),
                   st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))


@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(NAMES, VALUES), max_size=12))
def test_headers_decoded_in_one_pass_are_multi_items(module: ModuleType, pairs: list[tuple[str, object]]) -> None:
    raw = [(name.encode(), value if isinstance(value, bytes) else str(value).encode("utf-8")) for name, value in pairs]
    request = module.Request("POST", "http://127.0.0.1:1/v1/chat/completions", headers=raw, content=b"{}")
    assert header_items(request) == tuple(request.headers.multi_items())


URLS = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}{path}{query}",
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(["127.0.0.1", "api.openai.com", "[::1]", "user:pw@host", "Host.Example", "xn--bcher-kva.ch"]),
    st.sampled_from(["", ":8080", ":443", ":80", ":0"]),
    st.sampled_from(["", "/", "/v1/chat/completions", "/a//b"]),
    st.sampled_from(["", "?key=s3cret", "#frag", "?a=1#b"]))


@settings(max_examples=300, deadline=None)
@given(url=URLS)
def test_the_server_of_a_request_is_urlsplits(url: str) -> None:
    parts = urlsplit(url)
    expected = (parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(parts.scheme))
    assert WireRequest("POST", url, (), b"").server == expected


def test_an_acquire_looks_at_its_own_key_only_however_many_are_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change on one key (a waiter comes, a call ends, a block) cannot make another key's waiter
    due: keys are separate budgets. So the limiter's pass after it looks at that key alone, and an
    acquire costs the same with 1 or 100 keys busy (benchmarks/limits.py: 12 us p50 both; before,
    1.4 ms with 100). The timer's pass still looks at every key."""
    import threading

    from llmshim.policies.limiter import Limiter
    from llmshim.policies.scheduler import Key, Waiter
    from llmshim.values import Limits

    fired: list[tuple[float, object]] = []
    limiter = Limiter(burst=10.0, schedule=lambda delay, fn: fired.append((delay, fn)))
    for index in range(100):
        busy = limiter.key(f"busy-{index}", Limits(rpm=1.0))
        for _ in range(2):  # one granted, one left waiting about a minute
            limiter.enqueue(busy, Waiter("normal", 1, 0, 0.0, event=threading.Event()))
    looked: list[str] = []
    real = Key.next_waiter
    monkeypatch.setattr(Key, "next_waiter", lambda self: (looked.append(self.name), real(self))[1])
    key = limiter.key("bench", Limits(rpm=1e12))
    waiter = Waiter("normal", 1, 0, 0.0, event=threading.Event())
    limiter.enqueue(key, waiter)
    assert waiter.event is not None and waiter.event.is_set()
    assert set(looked) == {"bench"}
    looked.clear()
    limiter.pump()  # the timer's pass: every key, each still waiting
    assert len(set(looked)) == 101 and fired


@settings(max_examples=300, deadline=None)
@given(url=URLS)
def test_a_requests_path_is_worked_out_once_and_stays_urlsplits(url: str) -> None:
    request = WireRequest("POST", url, (), b"")
    expected = urlsplit(url).path or "/"
    assert request.path == expected and request.path == expected  # the memo answers the same
    moved = request.replace(url="http://other:1/v1/embeddings?x=1")
    assert (moved.path, moved.server) == ("/v1/embeddings", ("other", 1))  # a replaced request is not the memo's
    assert request == WireRequest("POST", url, (), b"")  # the memo is not part of equality


def test_a_call_record_has_every_field_and_is_frozen() -> None:
    """``CallRecord.of`` fills the record's ``__dict__`` directly: every declared field must be there,
    equal to what the dataclass's own ``__init__`` would make, and the record still frozen."""
    import dataclasses

    from llmshim.call import Call, CallInfo, ResponseInfo, Usage
    from llmshim.dialects.openai import OPENAI
    from llmshim.policies.events import CallRecord

    info = CallInfo(provider="openai", operation="chat", endpoint="chat/completions", model="m", stream=False)
    call = Call(request=WireRequest("POST", "https://api.openai.com/v1/chat/completions", (), b"{}"), info=info,
                library="httpx2", dialect=OPENAI, status=200, outcome="ok", ended_at=10.0**9,
                response=ResponseInfo(model="m-1", id="c1", finish_reasons=["stop"], usage=Usage(3, 4)))
    call.facts.cache_hit, call.facts.cost_usd = False, 0.5
    record = CallRecord.of("call_completed", call)
    assert set(vars(record)) == {field.name for field in dataclasses.fields(CallRecord)}
    assert record == CallRecord(**vars(record)) and hash(record) == hash(CallRecord(**vars(record)))
    assert (record.input_tokens, record.output_tokens, record.cost_usd, record.response_model) == (3, 4, 0.5, "m-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.model = "other"  # type: ignore[misc]


KEYED_URLS = st.builds(lambda host, path: f"https://{host}{path}", st.sampled_from(["api.openai.com", "127.0.0.1:8"]),
                       st.sampled_from(["/v1/chat/completions", "/v1/sk-proj-" + "a" * 40 + "/x",
                                        "/key/AIza" + "b" * 35, "/v1/" + "é" * 3]))


@settings(max_examples=100, deadline=None)
@given(url=KEYED_URLS)
def test_a_public_url_is_the_same_remembered_or_not_and_no_key_is_remembered(url: str) -> None:
    from llmshim import redact

    redact._ALREADY_PUBLIC.clear()
    first = redact.public_url(url)
    assert redact.public_url(url) == first  # the second time from the memo, if at all
    assert all(redact.public_url(kept) == kept for kept in redact._ALREADY_PUBLIC)
    assert not any("sk-proj-" in kept or "AIza" in kept for kept in redact._ALREADY_PUBLIC)


def test_a_recognised_calls_info_has_every_field_as_its_init_makes() -> None:
    """``Dialect.call_info`` fills the frozen CallInfo's ``__dict__`` directly: every field must be
    there, equal to the dataclass's own ``__init__`` result, and still frozen."""
    import dataclasses
    import json

    from llmshim.call import CallInfo
    from llmshim.dialects import DIALECTS, detect

    bodies = {"/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 3,
                                       "temperature": 0.5, "max_tokens": 9},
              "/api/chat": {"model": "m", "messages": [], "options": {"temperature": 1}},
              "/completion": {"prompt": "hi"}, "/v1/messages": {"model": "m", "messages": [], "max_tokens": 5},
              "/v1beta/models/m:generateContent": {"contents": []}}
    seen = set()
    for path, body in bodies.items():
        found = detect(WireRequest("POST", "http://127.0.0.1:1" + path, (), json.dumps(body).encode()))
        assert found is not None, path
        dialect, info = found
        seen.add(dialect.name)
        fields = {field.name: getattr(info, field.name) for field in dataclasses.fields(CallInfo)}
        assert info == CallInfo(**fields)
        assert set(fields) <= set(vars(info))
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.model = "other"  # type: ignore[misc]
    assert seen == {dialect.name for dialect in DIALECTS}


@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(NAMES, VALUES), max_size=12), encoding=st.sampled_from([None, "latin-1", "utf-8"]))
def test_headers_with_any_encoding_decode_as_multi_items(module: ModuleType, pairs: list[tuple[str, object]],
                                                         encoding: str | None) -> None:
    """Whatever encoding a Headers was given, or none (httpx then chooses ASCII, UTF-8 or ISO-8859-1
    from the bytes), the one-pass decode equals ``multi_items()``; and it leaves the caller's Headers'
    own choice unmade (``_encoding`` still unset)."""
    raw = [(name.encode(), value if isinstance(value, bytes) else str(value).encode("utf-8")) for name, value in pairs]
    request = module.Request("POST", "http://127.0.0.1:1/v1/chat/completions", content=b"{}")
    request.headers = module.Headers(raw, encoding=encoding)
    items = header_items(request)
    assert request.headers._encoding == encoding  # the caller's Headers: no choice made for it
    try:
        expected = tuple(request.headers.multi_items())
    except UnicodeDecodeError:  # bytes the named encoding cannot decode: httpx still sends them,
        # and llmshim reads them byte for byte instead of failing the caller's request
        expected = tuple((name.lower().decode("latin-1"), value.decode("latin-1")) for name, value in raw)
    assert items == expected



JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)
PADDING = st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\ufeffx,]}"), max_size=3)


@settings(max_examples=400, deadline=None)
@given(document=st.one_of(
    st.builds(lambda value, indent, before, after: before + __import__("json").dumps(value, indent=indent) + after,
              JSON_VALUES, st.sampled_from([None, 0, 2]), PADDING, PADDING),
    st.text(max_size=30), st.binary(max_size=30)))
def test_the_json_llmshim_reads_is_what_json_loads_reads(document: str | bytes) -> None:
    """``loads_object`` calls json's scanner directly: it must accept exactly what ``json.loads``
    accepts (of UTF-8) and answer the same value; anything else is None, never an exception."""
    import json

    from llmshim.dialects._framing import loads_object

    try:
        text = document.decode("utf-8") if isinstance(document, bytes) else document
        expected = json.loads(text)
    except (ValueError, RecursionError):
        expected = None
    assert json.dumps(loads_object(document)) == json.dumps(expected)


def test_a_calls_derived_values_are_worked_out_once_per_call() -> None:
    """``CallInfo``'s derived values (params, input_chars, input_messages) are memos without a lock:
    worked out on first read, the same object after, and each call its own."""
    from llmshim.call import CallInfo
    from llmshim.dialects.openai import OPENAI, OpenAIDialect

    asked: list[str] = []

    class Counting(OpenAIDialect):
        def input_messages(self, info: CallInfo) -> list[dict[str, object]]:
            asked.append("messages")
            return OPENAI.input_messages(info)

    dialect = Counting()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "stop": "x"}
    first = dialect.recognise("/v1/chat/completions", body)
    second = dialect.recognise("/v1/chat/completions", {**body, "temperature": 0.9})
    assert first is not None and second is not None
    assert first.params is first.params and first.params == {"temperature": 0.2, "stop_sequences": ["x"]}
    assert second.params["temperature"] == 0.9  # its own, not the first call's
    assert first.input_messages is first.input_messages and asked == ["messages"]
    assert first.input_chars == first.input_chars > 0
    assert type(CallInfo.params).__name__ == "_memo"  # the class attribute is the descriptor itself
