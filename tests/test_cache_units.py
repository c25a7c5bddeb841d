"""The cache's pure parts, without sockets: ``plan`` (what to do with a request), ``storable``
(may an ended call be kept), and what a key is made of (``key_material``, ``cache_key``,
``split_headers``, ``credential_of``, ``normalise_url``). Tables of cases, then properties.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmshim.call import Call, ResponseInfo, WireRequest
from llmshim.dialects import detect
from llmshim.knobs import current_cache_control
from llmshim.policies.cache import Plan, cache_control, plan
from llmshim.policies.cache_recorder import storable
from llmshim.store.cache_keys import (
    EXACT_BODY_BYTES,
    NOISE_HEADERS,
    cache_key,
    credential_of,
    is_credential_header,
    key_material,
    normalise_url,
    split_headers,
)

with warnings.catch_warnings():  # Hypothesis imports libcst to report a failure; libcst warns on import
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

SALT = b"0123456789abcdef"
PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHAT = "http://api.test/v1/chat/completions"
DETERMINISTIC = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def make_call(body: dict[str, Any] | bytes, url: str = CHAT, headers: tuple[tuple[str, str], ...] = (),
              controls: dict[str, str] | None = None, bypass: str | None = None) -> Call:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    wire = WireRequest("POST", url, headers, raw)
    found = detect(wire)
    assert found is not None, (url, raw[:80])
    return Call(request=wire, info=found[1], library="test", dialect=found[0], controls=controls or {},
                cache_bypass=bypass)


def decided(p: Plan) -> tuple[bool, bool, bool, float | None, str]:
    return p.lookup, p.store, p.only_cached, p.ttl, p.reason


# -- plan ---------------------------------------------------------------------------------------
SKIP = "non-deterministic (temperature > 0, no seed)"
PLANS = [
    # (setting mode, body, url, x-llmshim-cache header, nondeterministic setting) -> decision
    ("off", DETERMINISTIC, CHAT, None, "cache", (False, False, False, None, "cache off")),
    ("on", DETERMINISTIC, CHAT, None, "cache", (True, True, False, None, "on")),
    ("readonly", DETERMINISTIC, CHAT, None, "cache", (True, False, False, None, "readonly")),
    ("refresh", DETERMINISTIC, CHAT, None, "cache", (False, True, False, None, "refresh")),
    ("replay", DETERMINISTIC, CHAT, None, "cache", (True, False, True, None, "replay")),
    # non-deterministic requests: skipped only when asked, never in replay mode
    ("on", {"model": "m", "messages": []}, CHAT, None, "skip", (False, False, False, None, SKIP)),
    ("on", {"model": "m", "messages": []}, CHAT, None, "cache", (True, True, False, None, "on")),
    ("on", {"model": "m", "messages": [], "temperature": 0.7}, CHAT, None, "skip",
     (False, False, False, None, SKIP)),
    ("on", {"model": "m", "messages": [], "temperature": 0.7, "seed": 1}, CHAT, None, "skip",
     (True, True, False, None, "on")),
    ("replay", {"model": "m", "messages": []}, CHAT, None, "skip", (True, False, True, None, "replay")),
    ("on", {"model": "m", "messages": [], "options": {"temperature": 0}}, "http://h/api/chat", None, "skip",
     (True, True, False, None, "on")),
    ("on", {"model": "m", "messages": [], "options": {"temperature": 0.5}}, "http://h/api/chat", None, "skip",
     (False, False, False, None, SKIP)),
    ("on", {"model": "m", "input": "x"}, "http://api.test/v1/embeddings", None, "skip",
     (True, True, False, None, "on")),
    # stateful requests are never cached
    ("on", {"model": "m", "input": "x", "background": True, "temperature": 0}, "http://api.test/v1/responses",
     None, "cache", (False, False, False, None, "stateful request")),
    ("on", {"model": "m", "input": "x", "previous_response_id": "r", "temperature": 0},
     "http://api.test/v1/responses", None, "cache", (False, False, False, None, "stateful request")),
    ("on", {"model": "m", "input": "x", "conversation": "c", "temperature": 0}, "http://api.test/v1/responses",
     None, "cache", (False, False, False, None, "stateful request")),
    # the request header wins over the setting
    ("on", DETERMINISTIC, CHAT, "no-store", "cache", (True, False, False, None, "readonly")),
    ("on", DETERMINISTIC, CHAT, "refresh", "cache", (False, True, False, None, "refresh")),
    ("on", DETERMINISTIC, CHAT, "only-if-cached", "cache", (True, False, True, None, "replay")),
    ("on", DETERMINISTIC, CHAT, "ttl=5", "cache", (True, True, False, 5.0, "on")),
    ("on", DETERMINISTIC, CHAT, " Refresh , TTL=2.5 ", "cache", (False, True, False, 2.5, "refresh")),
    ("on", DETERMINISTIC, CHAT, "ttl=-1", "cache", (True, True, False, None, "on")),
    ("on", DETERMINISTIC, CHAT, "ttl=soon", "cache", (True, True, False, None, "on")),
    ("on", DETERMINISTIC, CHAT, "whatever", "cache", (True, True, False, None, "on")),
]


@pytest.mark.parametrize(("mode", "body", "url", "header", "nondeterministic", "expected"), PLANS)
def test_plan_table(mode: str, body: dict[str, Any], url: str, header: str | None, nondeterministic: str,
                    expected: tuple[bool, bool, bool, float | None, str]) -> None:
    call = make_call(body, url, controls={"x-llmshim-cache": header} if header else None)
    assert decided(plan(call, mode, None, nondeterministic)) == expected


def test_plan_a_call_answered_by_a_test_double_is_never_looked_up_or_stored() -> None:
    call = make_call(DETERMINISTIC, bypass="respx answers this call")
    assert decided(plan(call, "on", 60.0, "cache")) == (False, False, False, 60.0, "respx answers this call")


def test_plan_cache_control_sits_between_the_header_and_the_setting() -> None:
    call = make_call(DETERMINISTIC)
    with cache_control(mode="refresh", ttl=9):
        block = current_cache_control()
        assert decided(plan(call, "on", 60.0, "cache", block)) == (False, True, False, 9.0, "refresh")
        with_header = make_call(DETERMINISTIC, controls={"x-llmshim-cache": "only-if-cached, ttl=3"})
        assert decided(plan(with_header, "on", 60.0, "cache", block)) == (True, False, True, 3.0, "replay")
    assert current_cache_control() is None  # the block ended
    assert decided(plan(call, "on", 60.0, "cache", None)) == (True, True, False, 60.0, "on")


MODES = st.sampled_from(["off", "on", "readonly", "refresh", "replay"])
HEADERS = st.one_of(st.none(), st.sampled_from(["no-store", "refresh", "only-if-cached", "ttl=7", "junk"]))
BODIES = st.fixed_dictionaries({"model": st.just("m"), "messages": st.just([])}, optional={
    "temperature": st.one_of(st.none(), st.integers(0, 2), st.floats(0, 2, allow_nan=False)),
    "seed": st.one_of(st.none(), st.integers(0, 9)),
    "background": st.booleans(), "previous_response_id": st.sampled_from(["", "r1"]),
})


@PROPERTIES
@given(MODES, BODIES, HEADERS, st.sampled_from(["cache", "skip"]), st.one_of(st.none(), st.floats(1, 100)))
def test_plan_properties(mode: str, body: dict[str, Any], header: str | None, nondeterministic: str,
                         ttl: float | None) -> None:
    call = make_call(body, controls={"x-llmshim-cache": header} if header else None)
    before = dict(call.info.body)
    first = plan(call, mode, ttl, nondeterministic)
    assert plan(call, mode, ttl, nondeterministic) == first and dict(call.info.body) == before  # pure
    effective = mode if mode == "replay" else {  # the replay setting holds over a per-call mode
        "no-store": "readonly", "refresh": "refresh", "only-if-cached": "replay"}.get(header or "", mode)
    if first.only_cached:  # replay: answers only from the cache, never stores; what it never serves, never sent
        assert (first.lookup or first.reason in ("stateful request", "not a generation")) and not first.store
        assert effective == "replay"
    if first.store:
        assert effective in ("on", "refresh")
    if first.lookup:
        assert effective in ("on", "readonly", "replay")
    if body.get("background") or body.get("previous_response_id"):
        assert not first.lookup and not first.store
    if header == "ttl=7":
        assert first.ttl == 7.0


# -- storable -----------------------------------------------------------------------------------
def ended(outcome: str | None = "ok", status: int | None = 200, done: bool = True, error: str | None = None,
          response: bool = True) -> Call:
    call = make_call(DETERMINISTIC)
    call.outcome, call.status = outcome, status
    call.response = ResponseInfo(done=done, error=error) if response else None
    return call


@pytest.mark.parametrize(("call", "opaque", "expected"), [
    (ended(), False, True),
    (ended(status=204), False, True),
    (ended(status=299), False, True),
    (ended(), True, False),  # bytes read where the tap could not see them
    (ended(outcome="error"), False, False),
    (ended(outcome="aborted"), False, False),
    (ended(outcome=None), False, False),
    (ended(status=300), False, False),
    (ended(status=404), False, False),
    (ended(status=500), False, False),
    (ended(status=199), False, False),
    (ended(status=None), False, False),
    (ended(done=False), False, False),  # no done marker: an unfinished stream
    (ended(error="overloaded"), False, False),  # an error event inside a 2xx body
    (ended(response=False), False, False),
])
def test_storable_table(call: Call, opaque: bool, expected: bool) -> None:
    assert storable(call, opaque) is expected


def test_storable_only_complete_successful_readable_answers_exhaustively() -> None:
    """Every combination of the inputs (small domains with the status boundaries)."""
    for outcome, status, done, error, response, opaque in itertools.product(
            ["ok", "error", "aborted", None], [None, 100, 199, 200, 204, 299, 300, 404, 500], [True, False],
            [None, "boom"], [True, False], [True, False]):
        call = ended(outcome, status, done, error, response)
        expected = (outcome == "ok" and status is not None and 200 <= status < 300 and response and done
                    and error is None and not opaque)
        assert storable(call, opaque) is expected, (outcome, status, done, error, response, opaque)


# -- normalise_url ------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "expected"), [
    ("HTTP://API.Example.COM:80/v1/x?b=1&a=2#frag", ("http://api.example.com/v1/x?b=1&a=2", "api.example.com", "")),
    ("https://h.test:443/p", ("https://h.test/p", "h.test", "")),
    ("https://h.test:8443/p", ("https://h.test:8443/p", "h.test:8443", "")),
    ("http://h.test:443/p", ("http://h.test:443/p", "h.test:443", "")),
    ("http://[::1]:8080/v1", ("http://[::1]:8080/v1", "[::1]:8080", "")),
    ("https://user:pw@H.test/p", ("https://h.test/p", "h.test", "user:pw")),
    ("https://h.test", ("https://h.test/", "h.test", "")),
    ("https://h.test/A/%7e?Q=%20", ("https://h.test/A/%7e?Q=%20", "h.test", "")),  # path and query as sent
])
def test_normalise_url_table(url: str, expected: tuple[str, str, str]) -> None:
    assert normalise_url(url) == expected


HOSTS = st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,10}(\.[a-zA-Z]{2,5}){0,2}", fullmatch=True)
PATHS = st.from_regex(r"(/[A-Za-z0-9._~%-]{0,8}){0,3}", fullmatch=True)


@given(st.sampled_from(["http", "https", "HTTP"]), HOSTS, st.one_of(st.none(), st.integers(1, 65535)), PATHS,
       st.from_regex(r"[a-z0-9=&]{0,10}", fullmatch=True))
def test_normalise_url_is_idempotent_and_ignores_host_case(scheme: str, host: str, port: int | None, path: str,
                                                           query: str) -> None:
    url = f"{scheme}://{host}{f':{port}' if port else ''}{path}{'?' + query if query else ''}"
    once = normalise_url(url)
    assert normalise_url(once[0]) == once
    assert normalise_url(url.replace(host, host.swapcase(), 1)) == once
    assert once[0] == once[0].split("#")[0] and once[2] == ""


# -- split_headers and credential_of ------------------------------------------------------------
def test_split_headers_table() -> None:
    headers = [("X-Api-Key", "k1"), ("User-Agent", "sdk"), ("X-Beta", "2"), ("accept", "*/*"), ("x-beta", "1"),
               ("Host", "api.test"), ("traceparent", "00-x"), ("X-Stainless-Os", "Linux"), ("Cookie", "s=1"),
               ("x-trace-id", "t"), ("OpenAI-Organization", "org")]
    kept, credentials = split_headers(headers, "api.test", frozenset({"x-trace-*"}))
    assert kept == [("openai-organization", "org"), ("x-beta", "2"), ("x-beta", "1")]  # repeats keep their order
    assert credentials == [("cookie", "s=1"), ("x-api-key", "k1")]
    kept, _ = split_headers([("Host", "other.test")], "api.test")
    assert kept == [("host", "other.test")]  # a Host that names another host selects the answer


@pytest.mark.parametrize(("headers", "expected"), [
    ((("Authorization", "Bearer a"),), "Bearer a"),
    ((("api-key", "b"),), "b"),
    ((("X-API-KEY", "c"),), "c"),
    ((("x-goog-api-key", "d"),), "d"),
    ((("cookie", "session=1"),), None),  # a session must not split one key's budget
    ((("authorization", ""), ("x-api-key", "e")), "e"),  # an empty value is no key
    ((("x-api-key", "first"), ("authorization", "second")), "first"),
    ((), None),
])
def test_credential_of_table(headers: tuple[tuple[str, str], ...], expected: str | None) -> None:
    assert credential_of(headers) == expected


NAMES = st.one_of(st.sampled_from([*sorted(NOISE_HEADERS), "authorization", "x-api-key", "cookie", "host",
                                   "x-session-id", "openai-beta", "x-stainless-lang"]),
                  st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True))
HEADER_LISTS = st.lists(st.tuples(NAMES.map(lambda n: n.upper() if len(n) % 2 else n),
                                  st.text("abcxyz019 ", max_size=6)), max_size=8)


@PROPERTIES
@given(HEADER_LISTS)
def test_split_headers_never_keeps_a_credential_and_drops_only_noise(headers: list[tuple[str, str]]) -> None:
    kept, credentials = split_headers(headers, "api.test")
    assert all(not is_credential_header(name) for name, _ in kept)
    assert sorted(credentials) == sorted((n.lower(), v) for n, v in headers if is_credential_header(n))
    assert [n for n, _ in kept] == sorted(n for n, _ in kept) and [n for n, _ in credentials] == sorted(
        n for n, _ in credentials)
    dropped = [(n.lower(), v) for n, v in headers if (n.lower(), v) not in kept and (n.lower(), v) not in credentials]
    assert all(n in NOISE_HEADERS or n.startswith("x-stainless-") or (n == "host" and v == "api.test")
               for n, v in dropped)


# -- key material and the key -------------------------------------------------------------------
def key(headers: tuple[tuple[str, str], ...] = (), url: str = CHAT, body: dict[str, Any] | bytes = DETERMINISTIC,
        shared: bool = False, salt: bytes = SALT, ignored: frozenset[str] = frozenset()) -> str:
    return cache_key(make_call(body, url, headers), salt, shared, ignored)


def test_key_material_names_the_scope_and_never_holds_a_credential() -> None:
    anonymous, _ = key_material(make_call(DETERMINISTIC), SALT, False)
    assert json.loads(anonymous)[-1] == "anonymous"
    shared, _ = key_material(make_call(DETERMINISTIC, headers=(("authorization", "Bearer sk-secret"),)), SALT, True)
    assert json.loads(shared)[-1] == "shared"
    scoped, body = key_material(make_call(DETERMINISTIC, headers=(("authorization", "Bearer sk-secret"),)), SALT,
                                False)
    assert re.fullmatch(r"[0-9a-f]{64}", json.loads(scoped)[-1])
    assert "sk-secret" not in scoped + body
    user, _ = key_material(make_call(DETERMINISTIC, "https://me:pw@api.test/v1/chat/completions"), SALT, False)
    assert "pw" not in user and re.fullmatch(r"[0-9a-f]{64}", json.loads(user)[-1])


@pytest.mark.parametrize(("first", "second", "same"), [
    ({}, {"headers": (("user-agent", "x"), ("traceparent", "00-1"), ("x-stainless-retry-count", "1"))}, True),
    ({"url": "http://api.test/v1/chat/completions"}, {"url": "HTTP://API.TEST:80/v1/chat/completions"}, True),
    ({"body": b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}'},
     {"body": b'{ "model" : "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0 }'}, True),
    ({"body": b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}'},  # typed servers
     {"body": b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.0}'}, False),
    ({"headers": (("authorization", "Bearer a"),)}, {"headers": (("authorization", "Bearer b"),)}, False),
    ({"headers": (("authorization", "Bearer a"),), "shared": True},
     {"headers": (("authorization", "Bearer b"),), "shared": True}, True),
    ({}, {"headers": (("authorization", "Bearer a"),)}, False),
    ({}, {"headers": (("openai-beta", "assistants=v2"),)}, False),  # deny by default: a header selects
    ({"headers": (("x-trace-id", "1"),), "ignored": frozenset({"x-trace-*"})},
     {"headers": (("x-trace-id", "2"),), "ignored": frozenset({"x-trace-*"})}, True),
    ({"headers": (("x-api-key", "1"),), "ignored": frozenset({"x-api-*"})},
     {"headers": (("x-api-key", "2"),), "ignored": frozenset({"x-api-*"})}, False),  # never ignore a credential
    ({"url": "http://api.test/v1/chat/completions?a=1"}, {"url": "http://api.test/v1/chat/completions?a=2"}, False),
    ({"body": {**DETERMINISTIC, "temperature": 0}}, {"body": {**DETERMINISTIC, "temperature": 1}}, False),
    ({}, {"salt": b"another salt...."}, False),
])
def test_cache_key_table(first: dict[str, Any], second: dict[str, Any], same: bool) -> None:
    assert (key(**first) == key(**second)) is same


def test_a_huge_body_is_keyed_by_its_exact_bytes() -> None:
    content = "x" * (EXACT_BODY_BYTES + 1)
    _, body = key_material(make_call({**DETERMINISTIC, "messages": [{"role": "user", "content": content}]}), SALT,
                           False)
    assert body.startswith("exact:") and len(body) == len("exact:") + 64


SECRETS = st.from_regex(r"sk-[A-Za-z0-9]{12,24}", fullmatch=True)


@PROPERTIES
@given(SECRETS, st.sampled_from(["authorization", "x-api-key", "api-key", "x-custom-token"]), st.booleans())
def test_no_credential_reaches_the_material_or_the_key(secret: str, header: str, shared: bool) -> None:
    call = make_call(DETERMINISTIC, headers=((header, secret), ("x-beta", "1")))
    head, body = key_material(call, SALT, shared)
    assert secret not in head + body and secret.lower() not in (head + body).lower()
    digest = cache_key(call, SALT, shared)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == cache_key(call, SALT, shared)


@PROPERTIES
@given(st.lists(st.tuples(st.sampled_from(["openai-beta", "x-region", "authorization", "user-agent", "x-org"]),
                          st.text("abc", min_size=1, max_size=3)), max_size=5, unique_by=lambda h: h[0]),
       st.randoms(use_true_random=False))
def test_the_key_does_not_depend_on_header_order_or_name_case(headers: list[tuple[str, str]],
                                                              rnd: Any) -> None:
    shuffled = list(headers)
    rnd.shuffle(shuffled)
    respelled = tuple((name.upper(), value) for name, value in shuffled)
    assert key(tuple(headers)) == key(respelled)
