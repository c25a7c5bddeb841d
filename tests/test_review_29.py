"""Review 29: can the cache answer the WRONG request?

Two requests that differ in anything a server reads must never share an entry; two that differ
only in noise should share one; an answer that is not a whole, successful one must never become an
entry. Pure tests go through ``detect`` and ``cache_key`` as a real call does; end-to-end tests send
real ``requests`` calls to the bundled server, which counts what reaches it (a wrong hit: the server
saw fewer requests than there were distinct requests).

Bugs this file found (each test named below fails without its fix):

- A JSON integer and the same value written with a fraction or an exponent shared a key
  (``"max_tokens": 100`` and ``100.0``): servers typed in Go, Rust or C++ answer the first and refuse
  the second, so the cache served a 200 where the server would have answered 400.
- A 200 whose whole body is an error object was stored as an answer on the routes where the
  dialect did not know that error's shape: llama.cpp's embeddings (its own ``{"error": {...}}``),
  Ollama's embeddings with a gateway's ``{"error": {...}}``, Anthropic's Messages with a gateway's
  ``{"error": ...}`` (no ``"type": "error"``), Gemini with ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmshim.call import Call, WireRequest
from llmshim.dialects import detect
from llmshim.store import cache_keys
from llmshim.testing import FakeLLMServer, Fault
from llmshim.testing.responses import Answer

SALT = b"review-29-salt.."
PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = "https://api.test"
GEMINI = "/v1beta/models/gemini-2.0-flash:generateContent"

# -- every dialect's routes, with a minimal body each -----------------------------------------------

ROUTES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "m", "prompt": "hi"},
    "/v1/embeddings": {"model": "m", "input": "hi"},
    "/v1/responses": {"model": "m", "input": "hi"},
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    "/api/generate": {"model": "m", "prompt": "hi", "stream": False},
    "/api/embed": {"model": "m", "input": "hi"},
    "/api/embeddings": {"model": "m", "prompt": "hi"},
    "/completion": {"prompt": "hi"},
    "/embedding": {"content": "hi"},
    "/v1/messages": {"model": "claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
    GEMINI: {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
}
#: The top-level fields a dialect leaves out of the key (it proves they cannot change the answer).
IGNORED = {"/v1/chat/completions": {"prompt_cache_key"}, "/api/chat": {"keep_alive"}, "/api/generate": {"keep_alive"},
           "/api/embed": {"keep_alive"}, "/api/embeddings": {"keep_alive"}}


def call_for(path: str, raw: bytes, headers: tuple[tuple[str, str], ...] = (), base: str = BASE) -> Call:
    wire = WireRequest("POST", base + path, headers, raw)
    found = detect(wire)
    assert found is not None, (path, raw)
    return Call(request=wire, info=found[1], library="test", dialect=found[0])


def key(path: str, raw: bytes, headers: tuple[tuple[str, str], ...] = (), base: str = BASE,
        shared: bool = False) -> str:
    return cache_keys.cache_key(call_for(path, raw, headers, base), SALT, shared)


def with_field(path: str, raw_value: str, field: str = "x_field") -> bytes:
    """The route's body with one more top-level field, its value spelled exactly ``raw_value``."""
    body = json.dumps(ROUTES[path], separators=(",", ":"))
    return (body[:-1] + f',"{field}":{raw_value}}}').encode()


# -- numbers: what a typed server reads apart ------------------------------------------------------

DISTINCT_NUMBERS = [
    ("100", "100.0"), ("1", "1e0"), ("1", "1E+0"), ("0", "0.0"), ("0", "-0.0"), ("0.0", "-0.0"), ("16", "1.6e1"),
    ("1" + "0" * 50, "1e50"), ("1", "true"), ("0", "false"), ("1", '"1"'), ("null", "0"), ("1.0000000000000001", "1.0"),
]


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize(("first", "second"), DISTINCT_NUMBERS)
def test_an_integer_and_a_number_written_with_a_fraction_or_exponent_never_share_a_key(
        path: str, first: str, second: str) -> None:
    """TGI (Rust), Ollama's ``dimensions`` (Go) and C++ servers checking ``is_number_integer`` answer
    ``100`` and refuse ``100.0``: the cache must not hand the first's answer to the second."""
    for field in ("max_tokens", "x_field"):
        assert key(path, with_field(path, first, field)) != key(path, with_field(path, second, field))


@pytest.mark.parametrize(("first", "second"), [
    ("1.0", "10e-1"), ("1.5", "15E-1"), ("100.0", "1e2"), ("0.0", "0e9"), ("-0.0", "-0e1"), ("0", "-0"),
    ("1" + "0" * 50, "1" + "0" * 50),
])
def test_one_number_spelled_two_ways_of_its_kind_shares_a_key(first: str, second: str) -> None:
    path = "/v1/chat/completions"
    assert key(path, with_field(path, first)) == key(path, with_field(path, second))


def _strict_integer_server(received: Any) -> Answer | None:
    """A typed server (TGI, MindIE...): ``max_tokens`` must be a JSON integer, else 400."""
    if b'"max_tokens":' not in received.body:
        return None
    raw = received.body.split(b'"max_tokens":', 1)[1].lstrip().split(b",", 1)[0].split(b"}", 1)[0].strip()
    if raw.isdigit():
        return None
    return Answer(400, [("Content-Type", "application/json")],
                  json.dumps({"error": {"message": f"invalid type: floating point `{raw.decode()}`, expected u32",
                                        "type": "invalid_request_error"}}).encode())


def test_the_cache_never_answers_100_0_with_the_answer_to_100(
        server: FakeLLMServer, installed_cached: Callable[..., object]) -> None:
    installed_cached()
    server.responder = _strict_integer_server
    prefix = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"max_tokens":'
    first = requests.post(server.url + "/v1/chat/completions", data=prefix + b"100}",
                          headers={"content-type": "application/json"}, timeout=10)
    again = requests.post(server.url + "/v1/chat/completions", data=prefix + b"100}",
                          headers={"content-type": "application/json"}, timeout=10)
    floated = requests.post(server.url + "/v1/chat/completions", data=prefix + b"100.0}",
                            headers={"content-type": "application/json"}, timeout=10)
    assert (first.status_code, again.status_code, again.headers.get("x-llmshim-cache")) == (200, 200, "hit")
    assert floated.status_code == 400 and "expected u32" in floated.text
    assert len(server.received) == 2


# -- one server-relevant difference anywhere in the body: never one key ----------------------------

def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


#: Strings a server reads apart though they look alike: NFC/NFD, joiners, lone surrogates, escapes.
LOOKALIKES = ["é", "e\u0301", "👨\u200d👩", "👨👩", "\ud83d", "\ude00", "😀", "Å", "Å", "ﬁ", "fi", "a\u00a0b", "a b",
              "\u200b", "", "İ", "i̇", "\x00", "\ufeff"]
leaf_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e300, 2**70]),
    st.sampled_from(LOOKALIKES), st.text(max_size=6),
)
json_values = st.recursive(leaf_values, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "type", "ключ"]), inner, max_size=3)),
    max_leaves=8)


def _replace_somewhere(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with exactly one leaf, array order or member changed to something JSON-distinct."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(value)))
        choice = draw(st.integers(0, 2))
        if choice == 0:  # null vs missing
            changed = dict(value)
            if changed[name] is None:
                del changed[name]
            else:
                changed[name] = None
            return changed
        return {**value, name: _replace_somewhere(draw, value[name])}
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        if len(value) > 1 and value[0] != value[-1] and draw(st.booleans()):
            return value[::-1]  # array order
        return [*value[:index], _replace_somewhere(draw, value[index]), *value[index + 1:]]
    while True:
        other = draw(json_values)
        if not _same_json(other, value):
            return other


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality as a server sees values: types apart (True is not 1, 1.0 is not 1), -0.0 not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return json.dumps(a) == json.dumps(b)
    return bool(a == b)


def _wire(body: dict[str, Any], ascii_only: bool, spaced: bool) -> bytes:
    text = json.dumps(body, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":"))
    return text.encode("utf-8", "surrogatepass") if not ascii_only and _has_surrogate(text) else text.encode()


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@PROPERTIES
@given(st.data())
def test_bodies_that_differ_in_one_place_never_share_a_key(data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(list(ROUTES)))
    extra = data.draw(st.dictionaries(st.sampled_from(["tools", "response_format", "stop", "seed", "n", "x", "é"]),
                                      json_values, max_size=3))
    body = {**ROUTES[path], **extra}
    field = data.draw(st.sampled_from(sorted(body)))
    changed = {**body, field: _replace_somewhere(data.draw, body[field])}
    if field in IGNORED.get(path, ()) or detect(WireRequest("POST", BASE + path, (), json.dumps(changed).encode())) \
            is None:
        return  # an ignored field, or no longer a request of this route
    ascii_only = data.draw(st.booleans()) or _has_surrogate(json.dumps(body, ensure_ascii=False) +
                                                             json.dumps(changed, ensure_ascii=False))
    assert key(path, _wire(body, ascii_only, False)) != key(path, _wire(changed, ascii_only, True)), (body, changed)


@PROPERTIES
@given(st.data())
def test_a_string_and_its_other_normal_form_or_joiner_never_share_a_key(data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=st.sampled_from("eéÅåöﬁ가각\u0301\u200d👨👩ñ"), min_size=1, max_size=8))
    other = data.draw(st.sampled_from([_nfd(text), unicodedata.normalize("NFC", text), text + "\u200d",
                                       text.replace("\u200d", ""), unicodedata.normalize("NFKC", text)]))
    if other == text:
        return
    for path in ("/v1/chat/completions", "/v1/messages", GEMINI, "/api/embed"):
        first, second = json.loads(json.dumps(ROUTES[path])), json.loads(json.dumps(ROUTES[path]))
        if path == GEMINI:
            first["contents"][0]["parts"][0]["text"], second["contents"][0]["parts"][0]["text"] = text, other
        elif "messages" in first:
            first["messages"][0]["content"], second["messages"][0]["content"] = text, other
        else:
            first["input"], second["input"] = text, other
        assert key(path, json.dumps(first).encode()) != key(path, json.dumps(second, ensure_ascii=False).encode())


def test_an_escaped_surrogate_pair_is_the_character_and_a_lone_one_is_not() -> None:
    path = "/v1/messages"
    assert key(path, with_field(path, '"\\ud83d\\ude00"')) == key(path, with_field(path, '"😀"'))
    assert key(path, with_field(path, '"\\ud83d"')) != key(path, with_field(path, '"\\ude00"'))
    assert key(path, with_field(path, '"\\ud83d"')) != key(path, with_field(path, '"\\ufffd"'))


# -- noise: one key -----------------------------------------------------------------------------------

NOISE = [("User-Agent", "OpenAI/Python 1.2"), ("X-Stainless-Retry-Count", "2"), ("x-stainless-timeout", "600"),
         ("Idempotency-Key", "stainless-python-retry-1"), ("traceparent", "00-ab-cd-01"), ("Accept-Encoding", "gzip"),
         ("x-goog-api-client", "google-genai-sdk/1.0"), ("Connection", "keep-alive"), ("x-request-id", "r1")]
SELECTING = [("anthropic-version", "2023-06-01"), ("anthropic-beta", "prompt-caching-2024-07-31"),
             ("OpenAI-Beta", "assistants=v2"), ("OpenAI-Organization", "org-1"), ("x-goog-user-project", "p")]


@PROPERTIES
@given(st.sampled_from(list(ROUTES)), st.lists(st.sampled_from(NOISE), max_size=5, unique=True), st.booleans(),
       st.booleans(), st.randoms(use_true_random=False))
def test_requests_that_differ_only_in_noise_share_a_key(path: str, noise: list[tuple[str, str]], ascii_only: bool,
                                                        spaced: bool, rng: Any) -> None:
    content = [("content-type", "application/json"), ("anthropic-version", "2023-06-01")]
    plain = key(path, _wire({**ROUTES[path], "x": "é \u200d"}, True, False), tuple(content))
    headers = [(name.upper() if rng.random() < 0.5 else name, value) for name, value in [*content, *noise]]
    rng.shuffle(headers)
    assert key(path, _wire({**ROUTES[path], "x": "é \u200d"}, ascii_only, spaced), tuple(headers)) == plain


@pytest.mark.parametrize("header", SELECTING)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", GEMINI])
def test_a_header_that_selects_the_answer_is_in_the_key(path: str, header: tuple[str, str]) -> None:
    raw = json.dumps(ROUTES[path]).encode()
    assert key(path, raw) != key(path, raw, (header,))
    assert key(path, raw, (header,)) != key(path, raw, ((header[0], header[1] + "x"),))


# -- credentials and places ---------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_places_never_share_a_key_and_credentials_only_when_sharing_is_opted_into(shared: bool) -> None:
    chat = json.dumps(ROUTES["/v1/chat/completions"]).encode()
    azure = "/openai/deployments/{}/chat/completions?api-version={}"
    keys = {
        "azure a": key(azure.format("a", "2024-10-21"), chat, shared=shared),
        "azure b": key(azure.format("b", "2024-10-21"), chat, shared=shared),
        "azure a, other version": key(azure.format("a", "2025-01-01-preview"), chat, shared=shared),
        "other host": key("/v1/chat/completions", chat, base="https://other.test", shared=shared),
        "other port": key("/v1/chat/completions", chat, base="https://api.test:8443", shared=shared),
        "http": key("/v1/chat/completions", chat, base="http://api.test", shared=shared),
        "other prefix": key("/proxy/v1/chat/completions", chat, shared=shared),
        "ollama host 1": key("/api/chat", json.dumps(ROUTES["/api/chat"]).encode(), base="http://10.0.0.1:11434",
                             shared=shared),
        "ollama host 2": key("/api/chat", json.dumps(ROUTES["/api/chat"]).encode(), base="http://10.0.0.2:11434",
                             shared=shared),
        "gemini flash": key(GEMINI, json.dumps(ROUTES[GEMINI]).encode(), shared=shared),
        "gemini pro": key(GEMINI.replace("flash", "pro"), json.dumps(ROUTES[GEMINI]).encode(), shared=shared),
        "gemini stream": key(GEMINI.replace(":generate", ":streamGenerate") + "?alt=sse",
                             json.dumps(ROUTES[GEMINI]).encode(), shared=shared),
    }
    assert len(set(keys.values())) == len(keys), keys
    path = "/v1/chat/completions"
    credentialed = {
        "authorization": key(path, chat, (("Authorization", "Bearer sk-1"),), shared=shared),
        "rotated": key(path, chat, (("Authorization", "Bearer sk-2"),), shared=shared),
        "api-key": key(path, chat, (("api-key", "Bearer sk-1"),), shared=shared),
        "x-api-key": key(path, chat, (("x-api-key", "Bearer sk-1"),), shared=shared),
        "x-goog-api-key": key(path, chat, (("x-goog-api-key", "Bearer sk-1"),), shared=shared),
        "?key=": key(path + "?key=Bearer%20sk-1", chat, shared=shared),
        "?key= rotated": key(path + "?key=sk-2", chat, shared=shared),
        "user info": key(path, chat, base="https://u:sk-1@api.test", shared=shared),
        "none": key(path, chat, shared=shared),
    }
    assert len(set(credentialed.values())) == (1 if shared else len(credentialed)), credentialed
    # a key in the body is the body: never one entry for two keys, shared or not
    assert key(path, with_field(path, '"sk-1"', "api_key"), shared=shared) != \
        key(path, with_field(path, '"sk-2"', "api_key"), shared=shared)


def test_two_ollama_hosts_without_auth_each_answer(installed_cached: Callable[..., object]) -> None:
    installed_cached()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"temperature": 0}}
    with FakeLLMServer() as first, FakeLLMServer() as second:
        for server in (first, second, first, second):
            assert requests.post(server.url + "/api/chat", json=body, timeout=10).status_code == 200
        assert (len(first.received), len(second.received)) == (1, 1)


# -- what is never stored: errors in a 200, cut streams; stream vs whole --------------------------------

ERRORS_IN_A_200 = {
    "openai's shape": {"error": {"message": "boom", "type": "server_error", "param": None, "code": "x"}},
    "a plain string": {"error": "boom"},
    "anthropic's shape": {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}},
}


def _deterministic(path: str) -> dict[str, Any]:
    body = dict(ROUTES[path])
    if path.startswith("/api/"):
        body["options"] = {"temperature": 0}
    elif path == GEMINI:
        body["generationConfig"] = {"temperature": 0}
    elif "embed" not in path:
        body["temperature"] = 0
    return body


@pytest.mark.parametrize("error", list(ERRORS_IN_A_200))
@pytest.mark.parametrize("path", [*ROUTES, "/embeddings", "/infill"])
def test_a_200_whose_body_is_an_error_object_is_never_stored(
        path: str, error: str, server: FakeLLMServer, installed_cached: Callable[..., object]) -> None:
    installed_cached()
    body = {"/embeddings": {"content": "hi"}, "/infill": {"input_prefix": "hi", "temperature": 0}}.get(path) \
        or _deterministic(path)
    server.inject(Fault(status=200, body=json.dumps(ERRORS_IN_A_200[error]).encode()))
    failed = requests.post(server.url + path, json=body, timeout=10)
    assert failed.status_code == 200 and failed.json() == ERRORS_IN_A_200[error]
    again = requests.post(server.url + path, json=body, timeout=10)
    assert again.headers.get("x-llmshim-cache") != "hit"
    answer = again.json()
    assert not (isinstance(answer, dict) and answer.get("error")) and len(server.received) == 2


STREAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai chat": ("/v1/chat/completions", {**_deterministic("/v1/chat/completions"), "stream": True}),
    "openai responses": ("/v1/responses", {**_deterministic("/v1/responses"), "stream": True}),
    "ollama chat": ("/api/chat", {**_deterministic("/api/chat"), "stream": True}),
    "ollama generate": ("/api/generate", {**_deterministic("/api/generate"), "stream": True}),
    "llama.cpp": ("/completion", {**_deterministic("/completion"), "stream": True}),
    "anthropic": ("/v1/messages", {**_deterministic("/v1/messages"), "stream": True}),
    "gemini": (GEMINI.replace(":generate", ":streamGenerate") + "?alt=sse", _deterministic(GEMINI)),
}


def _read(response: requests.Response) -> bytes:
    return b"".join(response.iter_content(None))


@pytest.fixture
def streaming(server: FakeLLMServer, installed_cached: Callable[..., object]) -> Iterator[FakeLLMServer]:
    installed_cached()
    yield server


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_stream_cut_off_midway_is_not_stored_and_a_whole_one_is(name: str, streaming: FakeLLMServer) -> None:
    path, body = STREAMS[name]
    streaming.inject(Fault(reset="after_chunks", after_chunks=1))
    with pytest.raises(requests.RequestException):
        _read(requests.post(streaming.url + path, json=body, timeout=10, stream=True))
    whole = requests.post(streaming.url + path, json=body, timeout=10, stream=True)
    whole_body = _read(whole)
    replayed = requests.post(streaming.url + path, json=body, timeout=10, stream=True)
    assert (whole.headers.get("x-llmshim-cache"), replayed.headers.get("x-llmshim-cache")) == (None, "hit")
    assert _read(replayed) == whole_body and len(streaming.received) == 2


@pytest.mark.parametrize("name", [name for name in STREAMS if name != "gemini"])
def test_a_stream_and_a_whole_answer_to_the_same_body_never_answer_each_other(
        name: str, streaming: FakeLLMServer) -> None:
    path, streamed = STREAMS[name]
    whole = {**streamed, "stream": False}
    for body in (streamed, whole, streamed, whole):
        response = requests.post(streaming.url + path, json=body, timeout=10)
        kind = response.headers.get("content-type", "").split(";")[0]
        assert (kind == "application/json") is (body is whole), (body, kind)
    assert len(streaming.received) == 2


def test_gemini_stream_and_whole_are_two_entries(streaming: FakeLLMServer) -> None:
    body = _deterministic(GEMINI)
    for path in (GEMINI.replace(":generate", ":streamGenerate") + "?alt=sse", GEMINI) * 2:
        assert requests.post(streaming.url + path, json=body, timeout=10).status_code == 200
    assert len(streaming.received) == 2

