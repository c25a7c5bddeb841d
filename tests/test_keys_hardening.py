"""Cache keys never merge requests that can answer differently (issue 11, items 1, 2 and 5).

The property tests write the key's specification as an independent oracle (``_oracle``): two
requests share a key exactly when their bodies are the same JSON value — code point for code point,
object keys in order, duplicates kept, numbers as exact decimals — minus the top-level fields the
spec lists for that endpoint, and their headers agree on everything but transport noise. Bodies are
serialised the ways clients do (escaped or raw Unicode, any whitespace, number spellings) and go
through ``detect`` and ``cache_key`` like a real call. The regression tests then replay each example
of the issue (and others of the same class) through real clients against the bundled server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.call import Call, WireRequest
from llmshim.config import ConfigError
from llmshim.dialects import detect
from llmshim.store import cache_keys as keys
from llmshim.testing import FakeLLMServer

with warnings.catch_warnings():  # Hypothesis imports libcst to report a failure; libcst warns on import
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

SALT = b"0123456789abcdef"
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- a JSON model the tests serialise themselves (duplicate keys, spellings, escapes) -------------

@dataclasses.dataclass(frozen=True)
class Num:
    """A JSON number: its exact value is mantissa * 10**exponent; ``text`` is one spelling of it."""

    mantissa: int
    exponent: int
    text: str


@dataclasses.dataclass(frozen=True)
class Obj:
    pairs: tuple[tuple[str, Any], ...]


Value = Any  # Obj | list | str | Num | bool | None


def _spell(draw: st.DrawFn, mantissa: int, exponent: int, styles: tuple[str, ...] = ("plain", "fraction", "exponent"),
           ) -> str:
    """One of the spellings of mantissa * 10**exponent that clients produce: 15, 15.0, 1.50e1, 150E-1..."""
    sign = "-" if mantissa < 0 else ""
    pad = draw(st.integers(0, 3))
    digits, power = str(abs(mantissa)) + "0" * pad, exponent - pad  # the value is int(digits) * 10**power
    style = draw(st.sampled_from(styles))
    if style == "exponent":
        plus = draw(st.sampled_from(["", "+"])) if power >= 0 else ""
        return f"{sign}{digits.lstrip('0') or '0'}{draw(st.sampled_from(['e', 'E']))}{plus}{power}"
    if power >= 0:
        whole = (digits + "0" * power).lstrip("0") or "0"
        return sign + whole + (".0" if style == "fraction" else "")
    padded = digits.rjust(1 - power, "0")
    return f"{sign}{padded[:power].lstrip('0') or '0'}.{padded[power:]}"


@st.composite
def numbers(draw: st.DrawFn) -> Num:
    mantissa = draw(st.one_of(st.integers(-10, 10), st.integers(-10**20, 10**20)))
    exponent = draw(st.integers(-25, 25))
    return Num(mantissa, exponent, _spell(draw, mantissa, exponent))


_INTERESTING = ["中", "国", "人", "日", "本", "語", "é", "e\u0301", "\udcc3", "\udca9", "\ud83d", "😀", "\U0002a6d6",
                "\x00", "\x1f", '"', "\\", "/", "\u2028", "\ufeff", "ä", "ß", "Ω", "ѐ", "ت"]
strings = st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(_INTERESTING)),
                   max_size=8).map("".join)
KEYS = st.sampled_from(["a", "b", "type", "properties", "ключ", "キー", "\udcc3", "é"])

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers(), strings),
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(list),
                            st.lists(st.tuples(KEYS, inner), max_size=4).map(lambda p: Obj(tuple(p)))),
    max_leaves=12,
)


@dataclasses.dataclass(frozen=True)
class Style:
    """How a client serialises: ASCII escapes or raw UTF-8, whitespace, every character escaped."""

    ascii: bool
    space: str
    escape_all: bool


styles = st.builds(Style, st.booleans(), st.sampled_from(["", " ", "\n  ", "\t"]), st.booleans())


def _string(text: str, style: Style) -> str:
    if style.escape_all:
        units = text.encode("utf-16-le", "surrogatepass")
        codes = (int.from_bytes(units[i:i + 2], "little") for i in range(0, len(units), 2))
        return '"' + "".join(f"\\u{code:04x}" for code in codes) + '"'
    return json.dumps(text, ensure_ascii=style.ascii)


def dump(value: Value, style: Style) -> str:
    sep = "," + style.space
    if isinstance(value, Obj):
        return "{" + style.space + sep.join(f"{_string(k, style)}:{style.space}{dump(v, style)}"
                                            for k, v in value.pairs) + style.space + "}"
    if isinstance(value, list):
        return "[" + sep.join(dump(v, style) for v in value) + "]"
    if isinstance(value, Num):
        return value.text
    if isinstance(value, str):
        return _string(value, style)
    return json.dumps(value)


def wire_bytes(value: Value, style: Style) -> bytes:
    """The bytes a client sends; raw lone surrogates cannot be UTF-8, so such a client escapes them."""
    try:
        return dump(value, style).encode("utf-8")
    except UnicodeEncodeError:
        return dump(value, dataclasses.replace(style, ascii=True)).encode("utf-8")


def _oracle(value: Value, ignored: frozenset[str] = frozenset()) -> Any:
    """The specification of body equality, written independently of llmshim's code."""
    if isinstance(value, Obj):
        return ("object", tuple((k, _oracle(v)) for k, v in value.pairs if k not in ignored))
    if isinstance(value, list):
        return ("array", tuple(_oracle(v) for v in value))
    if isinstance(value, Num):  # an integer literal is never a fraction's or an exponent's (Go, Rust, C++ servers)
        exact = Fraction(value.mantissa) * Fraction(10) ** value.exponent
        if not any(mark in value.text for mark in ".eE"):
            return ("integer", exact)
        return ("number", exact, exact == 0 and value.text.startswith("-"))
    if isinstance(value, str):
        return ("string", value)
    return ("literal", value)


# -- the routes, and what their specification leaves out of the key -------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
    path: str
    required: tuple[tuple[str, Any], ...]
    ignored: frozenset[str]  # the documented top-level fields that never change this endpoint's answer


ROUTES = [
    Route("/v1/chat/completions", (("model", "m"), ("messages", [Obj((("role", "user"), ("content", "hi")),)])),
          frozenset({"prompt_cache_key"})),
    Route("/v1/responses", (("model", "m"), ("input", "hi")), frozenset()),
    Route("/api/chat", (("model", "m"), ("messages", [Obj((("role", "user"), ("content", "hi")),)])),
          frozenset({"keep_alive"})),
    Route("/api/generate", (("model", "m"), ("prompt", "hi")), frozenset({"keep_alive"})),
    Route("/completion", (("prompt", "hi"),), frozenset()),
]
EXTRA_FIELDS = st.sampled_from(["temperature", "response_format", "tools", "metadata", "store", "user",
                                "service_tier", "prompt_cache_key", "keep_alive", "safety_identifier", "x", "é"])


def _ignored(route: Route, body: Obj) -> frozenset[str]:
    """The spec: Ollama's keep_alive is inert only in a call that generates (a chat with messages,
    a generate with a prompt); without them Ollama loads or unloads the model instead."""
    if route.path in ("/api/chat", "/api/generate"):
        work = [v for k, v in body.pairs if k == ("messages" if route.path == "/api/chat" else "prompt")]
        if not work or not work[-1]:
            return frozenset()
    return route.ignored


@st.composite
def bodies(draw: st.DrawFn, route: Route) -> Obj:
    required = [(k, draw(strings) if isinstance(v, str) and k != "model" else v) for k, v in route.required]
    if route.path.endswith(("/chat/completions", "/api/chat")):
        required[1] = ("messages", [Obj((("role", "user"), ("content", draw(strings))))])
    extra = draw(st.lists(st.tuples(EXTRA_FIELDS, json_values), max_size=4))
    pairs = required + extra
    return Obj(tuple(draw(st.permutations(pairs))))


@st.composite
def variants(draw: st.DrawFn, value: Value) -> Value:
    """The same value respelled, or nudged: a string or number changed, pairs reordered or doubled."""
    if isinstance(value, Num):
        if draw(st.booleans()):
            return Num(value.mantissa, value.exponent, _spell(draw, value.mantissa, value.exponent))
        if draw(st.booleans()):  # the same value with a zero more in the mantissa
            return Num(value.mantissa * 10, value.exponent - 1, _spell(draw, value.mantissa * 10, value.exponent - 1))
        nudged = value.mantissa + draw(st.sampled_from([-1, 1]))
        return Num(nudged, value.exponent, _spell(draw, nudged, value.exponent))
    if isinstance(value, str) and draw(st.integers(0, 3)) == 0:
        return value + draw(st.sampled_from(_INTERESTING))
    if isinstance(value, list):
        return [draw(variants(v)) for v in value]
    if isinstance(value, Obj):
        pairs = [(k, draw(variants(v))) for k, v in value.pairs]
        change = draw(st.integers(0, 5))
        if change == 0 and len(pairs) > 1:
            pairs = draw(st.permutations(pairs))
        elif change == 1 and pairs:
            pairs.append(draw(st.sampled_from(pairs)))  # a duplicate key
        return Obj(tuple(pairs))
    return value


def call_for(raw: bytes, path: str, headers: tuple[tuple[str, str], ...] = (),
             base: str = "http://api.test:8080") -> Call:
    wire = WireRequest("POST", base + path, headers, raw)
    found = detect(wire)
    assert found is not None, raw
    return Call(request=wire, info=found[1], library="test", dialect=found[0])


def key(raw: bytes, path: str = "/v1/chat/completions", headers: tuple[tuple[str, str], ...] = (),
        shared: bool = False, ignored: frozenset[str] = frozenset(), base: str = "http://api.test:8080") -> str:
    return keys.cache_key(call_for(raw, path, headers, base), SALT, shared, ignored)


@HYPOTHESIS
@given(st.data())
def test_two_bodies_share_a_key_exactly_when_they_are_the_same_request(data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ROUTES))
    first = data.draw(bodies(route))
    second = data.draw(st.one_of(variants(first), bodies(route)))
    raw_first, raw_second = wire_bytes(first, data.draw(styles)), wire_bytes(second, data.draw(styles))
    same = _oracle(first, _ignored(route, first)) == _oracle(second, _ignored(route, second))
    event(f"same request: {same}, same bytes: {raw_first == raw_second}")
    assert (key(raw_first, route.path) == key(raw_second, route.path)) == same, (raw_first, raw_second)


@st.composite
def respelled(draw: st.DrawFn, value: Value) -> Value:
    """The same JSON value, every number spelled anew (an integer has one spelling; the others
    keep a fraction or an exponent)."""
    if isinstance(value, Num):
        if not any(mark in value.text for mark in ".eE"):
            return value
        spelling = _spell(draw, value.mantissa, value.exponent, ("fraction", "exponent"))
        return Num(value.mantissa, value.exponent, spelling)
    if isinstance(value, list):
        return [draw(respelled(v)) for v in value]
    if isinstance(value, Obj):
        return Obj(tuple((k, draw(respelled(v))) for k, v in value.pairs))
    return value


@HYPOTHESIS
@given(st.data())
def test_every_spelling_of_one_body_has_one_key(data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ROUTES))
    body = data.draw(bodies(route))
    again = data.draw(respelled(body))
    assert _oracle(body) == _oracle(again)
    assert key(wire_bytes(body, data.draw(styles)), route.path) == key(wire_bytes(again, data.draw(styles)),
                                                                       route.path)


@pytest.mark.parametrize(("first", "second"), [
    ('"中国人"', '"日本語"'),  # raw UTF-8 (ensure_ascii=False): the latin-1 path made both "???"
    ('"caf\\udcc3\\udca9"', '"café"'),  # lone surrogates: surrogateescape made both the bytes of "café"
    ('"caf\\udcc3\\udca9"', '"caf\\u00c3\\u00a9"'),
    ('"e\\u0301"', '"\\u00e9"'),  # NFD and NFC: different code points, different tokens
    ("1.0000000000000001", "1"),  # equal as floats, not as decimals
    ("1e400", "1e401"),  # both inf as floats
    ("true", "1"),
    ("[1, 2]", "[2, 1]"),
])
def test_issue_examples_of_bodies_that_must_not_collide(first: str, second: str) -> None:
    def body(content: str) -> bytes:
        return ('{"model":"m","messages":[{"role":"user","content":"x"}],"extra":' + content + "}").encode()

    assert key(body(first)) != key(body(second))


@pytest.mark.parametrize(("first", "second"), [
    ('"\\u00e9"', '"é"'), ("1.0", "10e-1"), ("0", "-0"), ("0.0", "0e7"), ("1.5", "1.50"), ("100.0", "1E2"),
    ('"\\ud83d\\ude00"', '"😀"'), ('{"a": 1}', '{ "a" :1 }'),
])
def test_the_same_json_value_spelled_differently_has_one_key(first: str, second: str) -> None:
    def body(content: str) -> bytes:
        return ('{"model":"m","messages":[{"role":"user","content":"x"}],"extra":' + content + "}").encode()

    assert key(body(first)) == key(body(second))


SCHEMA_AB = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
SCHEMA_BA = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "string"}}}


def test_property_order_and_duplicate_keys_are_kept_at_every_depth() -> None:
    def chat(**extra: Any) -> bytes:
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}).encode()

    assert key(chat(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA_AB}})) != \
        key(chat(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA_BA}}))
    base = b'{"model":"m","messages":[{"role":"user","content":"x"}]'
    assert key(base + b',"seed":1,"seed":2}') != key(base + b',"seed":2}')
    assert key(base + b',"seed":1,"seed":2}') != key(base + b',"seed":2,"seed":1}')
    assert key(base + b',"temperature":0,"seed":1}') != key(base + b',"seed":1,"temperature":0}')


# -- fields: only what provably cannot change the answer stays out --------------------------------

@pytest.mark.parametrize(("path", "field", "values"), [
    ("/v1/responses", "store", (True, False)),
    ("/v1/responses", "metadata", ({"t": "a"}, {"t": "b"})),
    ("/v1/responses", "user", ("a", "b")),
    ("/v1/responses", "service_tier", ("auto", "flex")),
    ("/v1/responses", "safety_identifier", ("a", "b")),
    ("/v1/responses", "prompt_cache_key", ("a", "b")),
    ("/v1/responses", "truncation", ("auto", "disabled")),
    ("/v1/chat/completions", "store", (True, False)),
    ("/v1/chat/completions", "metadata", ({"t": "a"}, {"t": "b"})),
    ("/v1/chat/completions", "service_tier", ("auto", "flex")),
    ("/v1/chat/completions", "user", ("a", "b")),
    ("/api/chat", "user", ("a", "b")),
    ("/api/generate", "keep_alive", (0, "5m")),  # an empty prompt: load or unload the model
])
def test_fields_that_change_what_the_server_returns_or_keeps_are_in_the_key(
        path: str, field: str, values: tuple[Any, Any]) -> None:
    required: dict[str, Any] = {
        "/v1/responses": {"model": "m", "input": "x"},
        "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        "/api/generate": {"model": "m", "prompt": ""},
    }[path]
    first, second = ({**required, field: value} for value in values)
    assert key(json.dumps(first).encode(), path) != key(json.dumps(second).encode(), path)
    assert key(json.dumps(first).encode(), path) != key(json.dumps(required).encode(), path)


@pytest.mark.parametrize(("path", "body", "field", "values"), [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "prompt_cache_key",
     ("a", "b")),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "keep_alive", ("5m", 0)),
    ("/api/embed", {"model": "m", "input": "x"}, "keep_alive", ("5m", -1)),
])
def test_fields_the_spec_proves_inert_stay_out_of_the_key(path: str, body: dict[str, Any], field: str,
                                                            values: tuple[Any, Any]) -> None:
    first, second = ({**body, field: value} for value in values)
    assert key(json.dumps(first).encode(), path) == key(json.dumps(second).encode(), path)


# -- headers: deny by default ---------------------------------------------------------------------

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
header_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)


def _is_noise(name: str) -> bool:
    return not keys.is_credential_header(name) and (
        name in keys.NOISE_HEADERS or name.startswith(keys.NOISE_PREFIXES))


@HYPOTHESIS
@given(header_names, st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12),
       st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12))
def test_every_header_that_is_not_noise_separates_requests(name: str, first: str, second: str) -> None:
    if name == "host":
        return  # Host: its own test
    differ = key(CHAT, headers=((name, first),)) != key(CHAT, headers=((name, second),))
    assert differ == (first != second and not _is_noise(name))
    alone = key(CHAT, headers=((name, first),)) != key(CHAT)
    assert alone == (not _is_noise(name))


@pytest.mark.parametrize("name", [
    "Ocp-Apim-Subscription-Key", "x-portkey-api-key", "x-litellm-api-key", "Cookie", "Proxy-Authorization",
    "Authorization", "api-key", "x-goog-api-key", "X-Tenant", "x-gateway-route", "OpenAI-Organization",
    "OpenAI-Project", "OpenAI-Beta", "anthropic-version", "anthropic-beta", "x-stainless-api-key",
    "x-datadog-api-key", "Content-Type",
])
def test_gateway_credentials_and_unknown_headers_scope_the_entry(name: str) -> None:
    assert key(CHAT, headers=((name, "tenant-a"),)) != key(CHAT, headers=((name, "tenant-b"),))


@pytest.mark.parametrize("name", ["User-Agent", "traceparent", "tracestate", "baggage", "x-stainless-os",
                                  "x-stainless-retry-count", "Accept", "Accept-Encoding", "Connection",
                                  "Content-Length", "x-request-id", "Idempotency-Key", "x-b3-traceid",
                                  "x-datadog-trace-id", "sentry-trace", "x-amzn-trace-id"])
def test_transport_and_tracing_noise_never_changes_the_key(name: str) -> None:
    assert key(CHAT, headers=((name, "one"),)) == key(CHAT, headers=((name, "two"),)) == key(CHAT)


def test_host_header_counts_only_when_it_names_another_host() -> None:
    assert key(CHAT, headers=(("Host", "API.test:8080"),)) == key(CHAT)
    assert key(CHAT, headers=(("Host", "tenant-b.test"),)) != key(CHAT)


def test_url_user_info_scopes_the_entry() -> None:
    assert key(CHAT, base="http://a:one@api.test:8080") != key(CHAT, base="http://a:two@api.test:8080")
    assert key(CHAT, base="http://a:one@api.test:8080") != key(CHAT)


def test_shared_scope_drops_credentials_but_keeps_headers_that_select_the_answer() -> None:
    assert key(CHAT, headers=(("x-api-key", "a"),), shared=True) == key(CHAT, headers=(("x-api-key", "b"),),
                                                                          shared=True)
    assert key(CHAT, headers=(("OpenAI-Beta", "a"),), shared=True) != key(CHAT, headers=(("OpenAI-Beta", "b"),),
                                                                            shared=True)


def test_ignored_headers_never_drop_a_credential() -> None:
    for ignored in (frozenset({"x-*"}), frozenset({"x-api-key", "cookie", "authorization"})):
        assert key(CHAT, headers=(("x-api-key", "a"),), ignored=ignored) != \
            key(CHAT, headers=(("x-api-key", "b"),), ignored=ignored)
        assert key(CHAT, headers=(("Cookie", "s=a"),), ignored=ignored) != \
            key(CHAT, headers=(("Cookie", "s=b"),), ignored=ignored)
    assert key(CHAT, headers=(("x-my-trace", "a"),), ignored=frozenset({"x-my-trace"})) == key(CHAT)
    assert key(CHAT, headers=(("x-trace-a", "1"),), ignored=frozenset({"x-trace-*"})) == key(CHAT)


@pytest.mark.parametrize("value", [
    "authorization", "Api-Key", "x-api-key", "x-goog-api-key", "cookie", "proxy-authorization",
    "x-portkey-api-key", "ocp-apim-subscription-key", "x-session-id", "x-my-token", "x-client-secret",
    "x-auth-user", "x-*-key", "x-api-key*", "user-agent, x-api-key",
])
def test_the_ignore_setting_refuses_credentials(value: str) -> None:
    with pytest.raises(ConfigError, match="LLMSHIM_CACHE_IGNORE_HEADERS"):
        llmshim.config.load({"LLMSHIM_CACHE_IGNORE_HEADERS": value})
    with pytest.raises(ConfigError):
        llmshim.install(cache_ignore_headers=value)
    assert not llmshim.is_installed()


def test_the_ignore_setting_parses_names_and_prefixes() -> None:
    settings = llmshim.config.load({"LLMSHIM_CACHE_IGNORE_HEADERS": " X-Trace-* , x-my-hop "})
    assert settings.cache_ignore_headers == frozenset({"x-trace-*", "x-my-hop"})
    assert llmshim.config.load({}).cache_ignore_headers == frozenset()
    with pytest.raises(ConfigError):
        llmshim.config.load({"LLMSHIM_CACHE_IGNORE_HEADERS": "bad name"})


# -- end to end: real clients, the real cache file, the bundled server ----------------------------

@pytest.fixture
def cached(installed: Callable[..., object], tmp_path: Path) -> Path:
    path = tmp_path / "cache.sqlite3"
    installed(cache="on", cache_path=str(path), cache_ignore_headers="x-my-trace")
    return path


@pytest.mark.parametrize(("first", "second"), [("中国人", "日本語"), ("Привет", "Пока"), ("مرحبا", "وداعا"),
                                               ("😀", "😁"), ("caf\udcc3\udca9", "café")])
def test_different_prompts_in_any_alphabet_never_share_an_answer(
        server: FakeLLMServer, cached: Path, first: str, second: str) -> None:
    answers = []
    for prompt in (first, second, first):
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": False}
        ascii_needed = any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
        raw = json.dumps(body, ensure_ascii=ascii_needed).encode("utf-8")
        answers.append(requests.post(server.url + "/v1/chat/completions", data=raw, timeout=10).json())
    assert len(server.received) == 2  # the third is a hit
    assert answers[0] == answers[2] != answers[1]
    assert [json.loads(r.body)["messages"][0]["content"] for r in server.received] == [first, second]


def test_json_schema_property_order_is_never_merged(server: FakeLLMServer, cached: Path) -> None:
    with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0) as client:
        for schema in (SCHEMA_AB, SCHEMA_BA, SCHEMA_AB):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}],
                response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
        for params in ({"b": {"type": "integer"}, "a": {"type": "string"}},
                       {"a": {"type": "string"}, "b": {"type": "integer"}}):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[{
                "type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": params}}}])
    assert len(server.received) == 4


def test_ollama_format_schema_order_is_never_merged(server: FakeLLMServer, cached: Path) -> None:
    for schema in (SCHEMA_AB, SCHEMA_BA):
        requests.post(server.url + "/api/chat", timeout=10, json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "format": schema, "stream": False})
    assert len(server.received) == 2


@pytest.mark.parametrize(("field", "values"), [("store", (False, True)), ("metadata", ({"a": "1"}, {"a": "2"})),
                                               ("user", ("u1", "u2")), ("service_tier", ("auto", "flex"))])
def test_responses_flags_are_in_the_key(server: FakeLLMServer, cached: Path, field: str,
                                        values: tuple[Any, Any]) -> None:
    with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0) as client:
        ids = [client.responses.create(model="m", input="x", **{field: value}).id for value in (*values, values[0])]
    assert len(server.received) == 2
    assert [json.loads(r.body)[field] for r in server.received] == list(values)
    assert ids[0] == ids[2]


@pytest.mark.parametrize("name", ["Ocp-Apim-Subscription-Key", "x-portkey-api-key", "x-litellm-api-key",
                                  "Cookie", "X-Tenant-Id", "x-anything-else"])
def test_gateway_tenants_never_share_an_answer(server: FakeLLMServer, cached: Path, name: str) -> None:
    for tenant in ("tenant-a", "tenant-b", "tenant-a"):
        requests.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "private?"}]}, headers={name: tenant}, timeout=10)
    assert [r.header(name) for r in server.received] == ["tenant-a", "tenant-b"]


def test_session_cookies_scope_the_entry(server: FakeLLMServer, cached: Path) -> None:
    for session_id in ("alice", "bob"):
        with requests.Session() as session:
            session.cookies.set("session", session_id)
            session.post(server.url + "/api/chat", json={"model": "m", "messages": [
                {"role": "user", "content": "my orders"}], "stream": False}, timeout=10)
    assert len(server.received) == 2


def test_ignored_noise_header_from_the_setting_still_hits(server: FakeLLMServer, cached: Path) -> None:
    for trace in ("1", "2"):
        requests.post(server.url + "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                      "stream": False}, headers={"x-my-trace": trace}, timeout=10)
    assert len(server.received) == 1
