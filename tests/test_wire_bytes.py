"""Cache keys come from exactly the bytes the library sends (issue 11, item 1).

Every client is driven over a real socket to the bundled server with the cache on. Two prompts in
non-Latin alphabets of the same length must never get each other's answer (the server echoes the
prompt), and the body llmshim read must be byte for byte what reached the server. A body the
library cannot encode (a lone surrogate in a ``str`` body) must fail exactly as it does without
llmshim: never answered from the cache.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.adapters import requests as requests_adapter
from llmshim.testing import FakeLLMServer

#: Pairs of prompts of equal length in one script: a lossy encoding maps both to the same bytes.
ALPHABETS = {
    "cyrillic": ("Привет, как дела?", "Победа, всё ясно?"),
    "cjk": ("你好，今天天气怎么样", "再见，明天天气很好吗"),  # noqa: RUF001
    "arabic": ("مرحبا كيف حالك", "وداعا الى لقاء"),
    "emoji": ("🙂🙃🎉 party", "🚀🌍🔥 party"),
    "greek-mixed": ("Γειά σου ß", "Ξένε μου ß"),  # noqa: RUF001
}


def _body(prompt: str) -> dict[str, Any]:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": prompt}], "temperature": 0}


def _answer(response_json: dict[str, Any]) -> str:
    return str(response_json["choices"][0]["message"]["content"])


Send = Callable[[FakeLLMServer, dict[str, Any]], dict[str, Any]]


def _requests_str(ensure_ascii: bool) -> Send:
    def send(server: FakeLLMServer, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body, ensure_ascii=ensure_ascii)
        r = requests.post(server.openai_base_url + "/chat/completions", data=data,
                          headers={"content-type": "application/json"}, timeout=10)
        return r.json()  # type: ignore[no-any-return]
    return send


def _requests_bytes(server: FakeLLMServer, body: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(body, ensure_ascii=False).encode()
    return requests.post(server.openai_base_url + "/chat/completions", data=data, timeout=10).json()  # type: ignore[no-any-return]


def _requests_json(server: FakeLLMServer, body: dict[str, Any]) -> dict[str, Any]:
    return requests.post(server.openai_base_url + "/chat/completions", json=body, timeout=10).json()  # type: ignore[no-any-return]


def _httpx_str(server: FakeLLMServer, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client() as client:
        r = client.post(server.openai_base_url + "/chat/completions", content=json.dumps(body, ensure_ascii=False),
                        headers={"content-type": "application/json"})
        return r.json()  # type: ignore[no-any-return]


def _httpx_json(server: FakeLLMServer, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client() as client:
        return client.post(server.openai_base_url + "/chat/completions", json=body).json()  # type: ignore[no-any-return]


def _aiohttp(kind: str) -> Send:
    def send(server: FakeLLMServer, body: dict[str, Any]) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                kwargs: dict[str, Any] = {"json": body} if kind == "json" else {
                    "data": json.dumps(body, ensure_ascii=False) if kind == "str"
                    else json.dumps(body, ensure_ascii=False).encode(),
                    "headers": {"content-type": "application/json"}}
                async with session.post(server.openai_base_url + "/chat/completions", **kwargs) as r:
                    return await r.json()  # type: ignore[no-any-return]
        return asyncio.run(go())
    return send


CLIENTS: dict[str, Send] = {
    "requests-str-utf8": _requests_str(ensure_ascii=False),
    "requests-str-ascii": _requests_str(ensure_ascii=True),
    "requests-bytes": _requests_bytes,
    "requests-json": _requests_json,
    "httpx-str": _httpx_str,
    "httpx-json": _httpx_json,
    "aiohttp-str": _aiohttp("str"),
    "aiohttp-bytes": _aiohttp("bytes"),
    "aiohttp-json": _aiohttp("json"),
}




@pytest.mark.parametrize("alphabet", sorted(ALPHABETS))
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_two_prompts_never_get_each_others_answer(client: str, alphabet: str, server: FakeLLMServer,
                                                 cached: Path, records: list[llmshim.CallRecord]) -> None:
    send = CLIENTS[client]
    first, second = ALPHABETS[alphabet]
    assert _answer(send(server, _body(first))) == f"Echo: {first}"
    assert _answer(send(server, _body(second))) == f"Echo: {second}", "answered with the other prompt's entry"
    assert len(server.received) == 2
    for received, prompt in zip(server.received, (first, second), strict=True):
        assert received.json()["messages"][0]["content"] == prompt
    # The same prompt again is a hit with its own answer, not the other's.
    assert _answer(send(server, _body(first))) == f"Echo: {first}"
    assert len(server.received) == 2
    done = [r for r in records if r.event == "call_completed"]
    assert [r.cache_hit for r in done] == [False, False, True]


def _send_prepared_str(server: FakeLLMServer, text: str) -> dict[str, Any]:
    """A str body set on a PreparedRequest (requests itself refuses to measure an unencodable str)."""
    prepared = requests.Request("POST", server.openai_base_url + "/chat/completions",
                                headers={"content-type": "application/json"}, data="{}").prepare()
    prepared.body = json.dumps(_body(text), ensure_ascii=False)
    prepared.headers["Content-Length"] = str(len(prepared.body.encode("utf-8", "surrogatepass")))
    with requests.Session() as session:
        return session.send(prepared, timeout=10).json()  # type: ignore[no-any-return]


def test_a_lone_surrogate_fails_as_without_llmshim_and_is_never_a_hit(server: FakeLLMServer, cached: Path) -> None:
    """urllib3 2.x encodes a str body as strict UTF-8: a lone surrogate raises. With the cache warm
    for the prompt a lossy encoding would turn it into ("?"), llmshim must not answer it."""
    assert _answer(_send_prepared_str(server, "?")) == "Echo: ?"
    llmshim.uninstall()
    with pytest.raises(UnicodeEncodeError):
        _send_prepared_str(server, "\ud800")
    llmshim.install(cache="on", cache_path=str(cached))
    with pytest.raises(UnicodeEncodeError):
        _send_prepared_str(server, "\ud800")
    assert len(server.received) == 1


def test_a_lone_surrogate_escaped_by_json_is_its_own_request(server: FakeLLMServer, cached: Path) -> None:
    """With ensure_ascii (the default) the surrogate travels as \\ud800: a valid request of its own."""
    send = _requests_str(ensure_ascii=True)
    assert _answer(send(server, _body("?"))) == "Echo: ?"
    assert send(server, _body("\udc80x"))["choices"][0]["message"]["content"] != "Echo: ?"
    assert len(server.received) == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(), charset=st.sampled_from([None, "utf-8", "latin-1"]))
def test_requests_to_wire_is_exactly_what_urllib3_sends(text: str, charset: str | None) -> None:
    """Pure: the body llmshim reads from a PreparedRequest equals the bytes urllib3 puts on the wire,
    or is None when urllib3 could not encode it (then the request passes through untouched)."""
    from urllib3.util.request import body_to_chunks

    body: str | bytes = text
    if charset is not None:
        try:
            body = text.encode(charset)
        except UnicodeEncodeError:
            return
    prepared = requests.Request("POST", "http://127.0.0.1:1/v1/chat/completions", data=body).prepare()
    wire = requests_adapter.to_wire(prepared)
    try:
        chunks = body_to_chunks(prepared.body, method="POST", blocksize=8192).chunks
        sent = b"".join(bytes(c) for c in chunks or ())
    except UnicodeEncodeError:
        assert wire is None
        return
    assert wire is not None and wire.body == sent
