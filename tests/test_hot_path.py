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
