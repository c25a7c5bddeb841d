"""The cache-hit path made cheaper (issue 15 rows 3-5) without changing what it answers.

- Cache keys: the same keys as before the speed-up (golden values computed by the code at the
  branch point, each case computed twice so the per-process memos are warm the second time), and
  the memos keep no credential.
- The store lookup: entries written in the current on-disk format read back equal (headers, the
  description, the outcome); only the description's trailing fields are decoded for a hit, and
  that shortcut is sound whatever the request holds (Hypothesis); a row that does not decode is a
  miss with a warning and a metric, through a real client, a real server and a real SQLite file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.call import Call, WireRequest
from llmshim.dialects import detect
from llmshim.store import cache_keys
from llmshim.store.base import Entry
from llmshim.store.cache_keys import cache_key, normalise_url, parse_ignored_headers, split_headers
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.entry_text import decode, headers_of, outcome_of
from llmshim.testing import FakeLLMServer

PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- cache keys: unchanged ------------------------------------------------------------------------------

SDK = (("host", "api.openai.com"), ("accept-encoding", "gzip, deflate"), ("connection", "keep-alive"),
       ("authorization", "Bearer sk-one"), ("accept", "application/json"), ("content-type", "application/json"),
       ("user-agent", "OpenAI/Python 3.57.0"), ("x-stainless-lang", "python"), ("x-stainless-retry-count", "0"),
       ("content-length", "84"))
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}).encode()
OPENAI = "https://api.openai.com/v1/chat/completions"
TEST = "http://api.test/v1/chat/completions"

# (name, url, headers, body, shared, ignored headers, key with salt b"k" * 32 computed at the branch
# point dd79aa6, before this speed-up)
GOLDEN: list[tuple[str, str, tuple[tuple[str, str], ...], bytes, bool, tuple[str, ...], str]] = [
    ("sdk headers", OPENAI, SDK, CHAT, False, (),
     "5ee95ab0953990d6033d2d55062841a43925d79dbf17ad03c95a9b51dcca6977"),
    ("another key", OPENAI, tuple((n, "Bearer sk-two" if n == "authorization" else v) for n, v in SDK), CHAT, False, (),
     "8b0a528c3984b99b4771a1035f9843db6924be3b23afebe564cde4c486246496"),
    ("shared", OPENAI, SDK, CHAT, True, (),
     "9ddd5d7dc372334dc8a817db64ba88f19c3081847fc6fda3d52025a5e27a912e"),
    ("mixed-case names, repeated, selecting", "http://API.Test:80/v1/chat/completions",
     (("X-Tenant", "b"), ("x-tenant", "a"), ("Host", "api.test"), ("OpenAI-Organization", "org"), ("X-Api-Key", "k"),
      ("Cookie", "s=1"), ("X-Trace-Id", "t1"), ("Traceparent", "00-1")), CHAT, False, (),
     "e867ae44919138d3bb49fe9e9f4a59b22ff027101793deede207bc21e9f07ad2"),
    ("host naming another", TEST, (("host", "other.test"),), CHAT, False, (),
     "e950bdd63b0349c7f13f66b0aff4fcacdc4956dfe9a286cc69c4bc230bad81bf"),
    ("ignored names and prefixes", TEST,
     (("x-trace-id", "1"), ("x-run", "2"), ("x-runner", "3"), ("x-keep", "4"), ("host", "elsewhere")),
     CHAT, False, ("x-trace-id", "x-run*", "host"),
     "6ec51c13673129327256c5040fb98d878db0b5d620fe02092c9fcccdb0c8cc98"),
    ("gemini query key",
     "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=AIza&alt=sse",
     (("content-type", "application/json"),), json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode(),
     False, (), "cfcd1ae8b7ad36ec3da603997452cf61c08f228b68a00d1b3c5d30f320b0a69a"),
    ("user info", "https://user:secret@api.test:8443/v1/chat/completions?x=1", (), CHAT, False, (),
     "8c8021e6ac06755ecd1ef0d6d56ec4f35507cbebd058fcd9bc520962f8c64c88"),
    ("numbers, duplicates, escapes, whitespace", TEST, (),
     b' {"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \xc3\xa9 \\ud800"}], "temperature": 0.0,'
     b' "seed": 10e-1, "n": 100000000000000000000000000000000000000000000, "model": "m2", "x": [1.5, -0, 1E400]} ',
     False, (), "505764e2f298cb43e23998df949c23982d2a8cfce5caa6d126365067f0ea5789"),
    ("ollama", "http://127.0.0.1:11434/api/chat", (("content-type", "application/json"),),
     json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode(),
     False, (), "03dcdf03166571c27be545274ec25a04413b55a268936dd73e4810a7eada7bb3"),
    ("huge body", TEST, (),
     json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}).encode(),
     False, (), "0dbc511da0d6b48f29c7d1589dc4fa6a16702306a3375d2f7346583633ef82a0"),
]


def _call(url: str, headers: tuple[tuple[str, str], ...], body: bytes) -> Call:
    wire = WireRequest("POST", url, headers, body)
    found = detect(wire)
    assert found is not None
    return Call(request=wire, info=found[1], library="t", dialect=found[0])


@pytest.mark.parametrize(("url", "headers", "body", "shared", "ignored", "key"),
                         [case[1:] for case in GOLDEN], ids=[case[0] for case in GOLDEN])
def test_the_faster_key_is_the_key_of_before(url: str, headers: tuple[tuple[str, str], ...], body: bytes,
                                             shared: bool, ignored: tuple[str, ...], key: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    names = parse_ignored_headers(list(ignored)) if ignored else frozenset()
    monkeypatch.setattr(cache_keys, "_KEYS", {})
    for _ in range(3):  # cold, with the header names and the URL remembered, then from the key memo
        assert cache_key(_call(url, headers, body), b"k" * 32, shared, names) == key


@given(st.binary(max_size=200), st.binary(max_size=3000))
@PROPERTIES
def test_the_primed_hmac_is_hmac_sha256_for_any_salt_and_message(salt: bytes, message: bytes) -> None:
    import hmac

    expected = hmac.digest(salt, message, "sha256").hex()
    assert cache_keys.hmac_sha256_hex(salt, message) == expected
    assert cache_keys.hmac_sha256_hex(salt, message) == expected  # again, from the primed states


def test_the_primed_hmac_agrees_from_many_threads_at_once() -> None:
    import hmac
    from concurrent.futures import ThreadPoolExecutor

    salt, messages = b"s" * 32, [bytes([i]) * (i * 97 % 5000) for i in range(256)]  # big ones release the GIL
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda m: cache_keys.hmac_sha256_hex(salt, m), messages * 4))
    assert got == [hmac.digest(salt, m, "sha256").hex() for m in messages] * 4


def test_the_memos_keep_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_keys, "_PLAIN_URLS", {})
    monkeypatch.setattr(cache_keys, "_KINDS", {})
    monkeypatch.setattr(cache_keys, "_KEYS", {})  # empty: the keys are worked out, not remembered
    for _, url, headers, body, shared, ignored, _key in GOLDEN:
        names = parse_ignored_headers(list(ignored)) if ignored else frozenset()
        cache_key(_call(url, headers, body), b"k" * 32, shared, names)
    assert sum(len(memo) for memo in cache_keys._KEYS.values()) == len(GOLDEN) - 1  # the huge body is not
    remembered = repr(cache_keys._PLAIN_URLS) + repr(cache_keys._KINDS) + repr(cache_keys._KEYS)
    assert OPENAI in remembered and "authorization" in remembered  # a name is remembered, not its value
    for secret in ("sk-one", "sk-two", "secret", "AIza", "user:"):
        assert secret not in remembered


@given(st.lists(st.tuples(st.sampled_from(["Host", "host", "X-Run", "x-runner", "Authorization", "X-Keep", "Accept",
                                           "x-stainless-os", "X-Api-Key", "x-trace-id"]),
                          st.sampled_from(["api.test", "a", "B", "other.test"])), max_size=8),
       st.sampled_from([frozenset(), frozenset({"x-run*"}), frozenset({"host", "x-keep"})]))
@PROPERTIES
def test_split_headers_answers_as_the_classification_without_memo(headers: list[tuple[str, str]],
                                                                  ignored: frozenset[str]) -> None:
    """The memo is the answer the classification gives, in any order of first sight."""
    kept: list[tuple[str, str]] = []
    credentials: list[tuple[str, str]] = []
    for name, value in headers:
        lowered = name.lower()
        if cache_keys.is_credential_header(lowered):
            credentials.append((lowered, value))
        elif lowered == "host" and value.lower() == "api.test":
            continue
        elif not cache_keys._noise(lowered, ignored):
            kept.append((lowered, value))
    expected = (sorted(kept, key=lambda item: item[0]), sorted(credentials, key=lambda item: item[0]))
    assert split_headers(headers, "api.test", ignored) == expected


def test_a_full_memo_begins_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_keys, "_PLAIN_URLS", {})
    for port in range(cache_keys._PLAIN_URLS_MAX + 10):
        normalise_url(f"http://127.0.0.1:{port}/v1/chat/completions")
    assert len(cache_keys._PLAIN_URLS) <= cache_keys._PLAIN_URLS_MAX
    assert f"http://127.0.0.1:{cache_keys._PLAIN_URLS_MAX + 9}/v1/chat/completions" in cache_keys._PLAIN_URLS


def test_a_url_with_user_info_or_a_query_is_normalised_each_time() -> None:
    for url in ("https://u:p@api.test/v1/chat/completions", "https://api.test/v1/x?key=AIza-never-kept"):
        assert normalise_url(url)[0].startswith("https://api.test")
        assert url not in cache_keys._PLAIN_URLS


# -- the entry's texts ------------------------------------------------------------------------------------

def _described(body: Any, usage: dict[str, Any], estimator: str | None) -> dict[str, Any]:
    """A description as ``CachePolicy.save`` writes it: the request's summary, then the outcome."""
    meta = {"provider": "openai", "endpoint": "chat/completions", "model": "m", "stream": False, "url": TEST,
            "body_bytes": 10, "body": body, "status": 200, "usage": usage}
    if estimator is not None:
        meta["estimator"] = estimator
    return meta


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["status", "usage", "estimator", "x", "\"status\": "]) | st.text(),
                        inner, max_size=4), max_leaves=12)
COUNT = st.none() | st.integers(min_value=0, max_value=10**9)


@given(JSON, COUNT, COUNT, st.none() | st.text())
@PROPERTIES
def test_the_outcome_is_the_descriptions_last_fields_whatever_the_request_holds(
        body: Any, input_tokens: int | None, output_tokens: int | None, estimator: str | None) -> None:
    meta = _described(body, {"input_tokens": input_tokens, "output_tokens": output_tokens}, estimator)
    text = json.dumps(meta, default=str)
    outcome = outcome_of(text)
    expected = {name: meta[name] for name in ("status", "usage", "estimator") if name in meta}
    if len(text) - text.rfind('"status": ') > 512:  # a very long estimator name: the caller decodes it all
        assert outcome is None
    else:
        assert outcome == expected


@given(JSON)
@PROPERTIES
def test_an_outcome_is_found_only_at_the_top_level(description: Any) -> None:
    """Descriptions not written by ``put`` (no trailing status): None, or exactly the top-level
    fields from the last ``status`` on; never a nested object's."""
    text = json.dumps(description)
    outcome = outcome_of(text)
    if outcome is not None:
        assert isinstance(description, dict) and "status" in description
        keys = list(description)
        assert outcome == {k: description[k] for k in keys[keys.index("status"):]}


@given(st.lists(st.tuples(st.text(), st.text()), max_size=6))
@PROPERTIES
def test_headers_and_texts_read_back_as_json_loads_reads_them(headers: list[tuple[str, str]]) -> None:
    text = json.dumps(headers)
    assert headers_of(text) == [tuple(pair) for pair in json.loads(text)] == headers
    for spelled in (text, f"  {text}\n", json.dumps(headers, indent=1)):
        assert decode(spelled) == json.loads(spelled)
    for broken in ("", "[", text + "]", "nope", '{"a": 1} {"b": 2}'):
        with pytest.raises(ValueError):
            decode(broken)


# -- the store: entries written as before read back equal ---------------------------------------------------

def _write_as_before(path: Path, key: str, headers: list[tuple[str, str]], meta: dict[str, Any], now: float) -> None:
    """A row exactly as the store wrote it before this change (its ``put``: JSON text columns)."""
    store = SQLiteStore(str(path))
    assert store.salt  # creates the schema
    store.close()
    conn = sqlite3.connect(path)
    body = b'{"answer": 42}'
    conn.execute("INSERT INTO entries (key, created_at, expires_at, last_access, status, headers, body, meta, size) "
                 "VALUES (?, ?, NULL, ?, 200, ?, ?, ?, ?)",
                 (key, now, now, json.dumps(headers), body, json.dumps(meta, default=str), 100))
    conn.commit()
    conn.close()


def test_an_entry_written_before_reads_back_equal(tmp_path: Path) -> None:
    now = time.time()
    headers = [("content-type", "application/json"), ("x-request-id", "req_1"), ("x-odd", 'say "hi" \\ é')]
    meta = _described({"messages": [{"role": "user", "content": "hi", "status": "nested"}]},
                      {"input_tokens": 14, "output_tokens": 5}, "tiktoken")
    _write_as_before(tmp_path / "c.sqlite3", "a" * 64, headers, meta, now)
    store = SQLiteStore(str(tmp_path / "c.sqlite3"))
    entry = store.get("a" * 64, now)
    assert entry is not None
    assert (entry.status, entry.headers, entry.body) == (200, headers, b'{"answer": 42}')
    assert dict(entry.outcome) == {"status": 200, "usage": {"input_tokens": 14, "output_tokens": 5},
                                   "estimator": "tiktoken"}
    assert entry.meta == meta  # the whole description, decoded when asked for
    assert entry == Entry("a" * 64, 200, headers, b'{"answer": 42}', now, None, meta)
    found = store.find("a" * 8)
    assert found is not None and found.meta == meta and "tiktoken" in repr(found)
    store.close()


def test_a_description_not_written_by_put_is_decoded_whole(tmp_path: Path) -> None:
    now = time.time()
    _write_as_before(tmp_path / "c.sqlite3", "k" * 64, [], {"provider": "openai", "model": "m"}, now)
    store = SQLiteStore(str(tmp_path / "c.sqlite3"))
    entry = store.get("k" * 64, now)
    assert entry is not None and dict(entry.outcome) == entry.meta == {"provider": "openai", "model": "m"}
    store.close()


def _corrupt(path: Path, column: str, value: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE entries SET {column} = ?", (value,))
    conn.commit()
    conn.close()


BODY = {"model": "m", "messages": [{"role": "user", "content": "say something short"}], "stream": False}


@pytest.mark.parametrize(("column", "value"), [
    ("headers", "[[\"content-type\", \"application/json\"]"),  # cut short
    ("headers", "not json"),
    ("meta", '{"provider": "openai", "status": 200, "usage": {"input_tokens": 1'),  # cut short
    ("meta", "[1, 2]"),
])
def test_a_row_that_does_not_decode_is_a_miss_a_warning_and_a_metric(
        server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str, value: str) -> None:
    path = tmp_path / "c.sqlite3"
    llmshim.install(cache="on", cache_path=str(path), telemetry=False)
    try:
        first = requests.post(server.url + "/api/chat", json=BODY, timeout=10)
        assert first.headers.get("x-llmshim-cache") is None
    finally:
        llmshim.uninstall()
    _corrupt(path, column, value)
    llmshim.install(cache="on", cache_path=str(path), telemetry=False)
    try:
        with caplog.at_level(logging.WARNING, logger="llmshim"):
            again = requests.post(server.url + "/api/chat", json=BODY, timeout=10)
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers.get("x-llmshim-cache") != "hit"  # the server answered
        assert llmshim.stats()["cache_errors"] >= 1
        assert any("cache read failed" in record.getMessage() for record in caplog.records)
    finally:
        llmshim.uninstall()


def test_a_hit_reports_what_it_saved_from_the_outcome_alone(server: FakeLLMServer, tmp_path: Path) -> None:
    """The hit decodes only the trailing fields: a request part it cannot decode does not stop it,
    and its usage is still what the hit saved."""
    path = tmp_path / "c.sqlite3"
    llmshim.install(cache="on", cache_path=str(path), telemetry=False)
    try:
        requests.post(server.url + "/api/chat", json=BODY, timeout=10).content  # noqa: B018
    finally:
        llmshim.uninstall()
    conn = sqlite3.connect(path)
    (meta,) = conn.execute("SELECT meta FROM entries").fetchone()
    usage = json.loads(meta)["usage"]
    assert usage["input_tokens"] and usage["output_tokens"]
    conn.execute("UPDATE entries SET meta = ?", ('{"provider": "ollama", "body": {"messages": [}, '
                                                  + meta[meta.rindex('"status": '):],))
    conn.commit()
    conn.close()
    llmshim.install(cache="on", cache_path=str(path), telemetry=False)
    try:
        before = llmshim.stats()["tokens_saved"]
        hit = requests.post(server.url + "/api/chat", json=BODY, timeout=10)
        assert hit.headers.get("x-llmshim-cache") == "hit"
        assert llmshim.stats()["tokens_saved"] - before == usage["input_tokens"] + usage["output_tokens"]
    finally:
        llmshim.uninstall()


def test_on_event_loop_is_true_only_on_a_thread_running_one() -> None:
    import asyncio

    from llmshim.store.background import on_event_loop

    async def inside() -> tuple[bool, bool]:
        return on_event_loop(), await asyncio.to_thread(on_event_loop)  # the loop's thread; a worker's

    assert on_event_loop() is False
    assert asyncio.run(inside()) == (True, False)
    assert on_event_loop() is False  # after the loop ends


# -- the key memo: a request sent again gets the key it got the first time, and only that request --------

_HEADER = st.tuples(st.sampled_from(["authorization", "x-api-key", "x-tenant", "host", "accept", "x-trace-id",
                                     "openai-organization", "cookie"]), st.text(max_size=6))
_REQUEST = st.tuples(st.sampled_from([OPENAI, TEST, "http://api.test:8080/v1/chat/completions",
                                      "https://u:p@api.test/v1/chat/completions?key=k"]),
                     st.lists(_HEADER, max_size=4).map(tuple),
                     st.sampled_from(["gpt-4o-mini", "m", "caf\u00e9", "\u6a21\u578b"]),
                     st.text(max_size=8),
                     st.sampled_from([b"", b" ", b"\n"]),
                     st.booleans(),
                     st.sampled_from([frozenset(), frozenset({"x-tenant"}), frozenset({"x-trace-*"})]),
                     st.sampled_from([b"k" * 32, b"j" * 32, b"k" * 31]))


@given(st.lists(_REQUEST, min_size=1, max_size=6))
@PROPERTIES
def test_a_memoised_key_is_the_key_worked_out_afresh(requests_: list[Any]) -> None:
    """Whatever mix of requests comes (sent again, differing in one header value, a byte of
    whitespace, the scope setting, the ignored headers or the salt), the key from the memo is the
    key computed without it."""
    for url, headers, model, content, padding, shared, ignored, salt in requests_ * 2:  # each sent twice
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode() + padding
        call = _call(url, headers, body)
        assert cache_key(call, salt, shared, ignored) == cache_keys._cache_key(call, salt, shared, ignored)


def test_the_key_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_keys, "_KEYS", {})
    monkeypatch.setattr(cache_keys, "MEMO_KEYS", 8)
    for i in range(20):
        cache_key(_call(TEST, (), json.dumps({"model": "m", "messages": [], "n": i}).encode()), b"k" * 32)
    assert 1 <= sum(len(memo) for memo in cache_keys._KEYS.values()) <= 8
    for salt in range(40):  # settings that come and go
        cache_key(_call(TEST, (), CHAT), bytes([salt]) * 32)
    assert len(cache_keys._KEYS) <= 16


def test_requests_whose_parts_joined_with_nul_would_be_one_text_keep_their_own_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_keys, "_KEYS", {})
    one = _call(TEST, (("x-a", "1\0x-b\0" + "2"),), CHAT)  # a NUL inside a value: "x-a\01\0x-b\02" either way
    two = _call(TEST, (("x-a", "1"), ("x-b", "2")), CHAT)
    keys = [cache_key(call, b"k" * 32) for call in (one, two, one, two)]
    assert keys[0] != keys[1] and keys == keys[:2] * 2
    assert keys[:2] == [cache_keys._cache_key(call, b"k" * 32, False, frozenset()) for call in (one, two)]
