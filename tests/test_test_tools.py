"""Users' test tools keep working with llmshim installed (issue 11, items 11 and 12).

Mocked answers never enter or come out of the persistent cache: every mocking tool of each client
library (respx, httpx.MockTransport, pytest-httpx, httpx's ASGI/WSGI transports, responses,
requests-mock, httpretty, aioresponses, unittest.mock patches of a transport or adapter) is run
in a real pytest session (pytester, a subprocess) where two tests mock *different* answers to the
*same* request, with llmshim installed and the cache on, once installed before the mocks start and
once after: each test must see its own answer. A pre-read ``httpx.Response`` completes its call at
once. And recorders see every request: a pytest-recording cassette re-recorded with a warm llmshim
cache contains the request, and replays offline.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

import llmshim
from conftest import ROOT
from llmshim.adapters import _doubles
from llmshim.testing import FakeLLMServer

pytest_plugins = ["pytester"]

URL = "http://llm.test/v1/chat/completions"

COMMON = '''
import asyncio, json, os
from unittest import mock
import pytest
import llmshim

URL = {url!r}
BODY = {{"model": "gpt-fake", "messages": [{{"role": "user", "content": "the same question"}}], "temperature": 0}}
ORDER = os.environ["ORDER"]  # llmshim installed "before" the mocks start, or "after"


def completion(answer):
    return {{"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-fake",
             "choices": [{{"index": 0, "message": {{"role": "assistant", "content": answer}},
                          "finish_reason": "stop"}}],
             "usage": {{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}}}


def content(payload):
    return payload["choices"][0]["message"]["content"]


def after():
    if ORDER == "after":
        llmshim.install()


if ORDER == "before":
    llmshim.install()
'''

TOOLS: dict[str, str] = {
    'respx': '''
import httpx, respx

def ask_respx(answer, request):
    with respx.mock:
        respx.post(URL).mock(return_value=httpx.Response(200, json=completion(answer)))
        after()
        return content(httpx.post(URL, json=BODY).json())
''',
    'respx-using-httpx': '''
import httpx, respx

def ask_respx_using_httpx(answer, request):
    with respx.mock(using="httpx") as router:
        router.post(URL).mock(return_value=httpx.Response(200, json=completion(answer)))
        after()
        with httpx.Client() as client:
            return content(client.post(URL, json=BODY).json())
''',
    'httpx-mocktransport': '''
import httpx

def ask_httpx_mocktransport(answer, request):
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=completion(answer)))
    after()
    with httpx.Client(transport=transport) as client:
        return content(client.post(URL, json=BODY).json())
''',
    'httpx-mocktransport-async': '''
import httpx

def ask_httpx_mocktransport_async(answer, request):
    async def handler(r):
        return httpx.Response(200, json=completion(answer))

    async def go():
        after()
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return content((await client.post(URL, json=BODY)).json())
    return asyncio.run(go())
''',
    'httpx-mocktransport-streamed': '''
import httpx

def ask_httpx_mocktransport_streamed(answer, request):
    def handler(r):  # an unread streamed body, as a recording stub would give
        return httpx.Response(200, headers={"content-type": "application/json"},
                              stream=httpx.ByteStream(json.dumps(completion(answer)).encode()))
    after()
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        return content(client.post(URL, json=BODY).json())
''',
    'pytest-httpx': '''
import httpx

def ask_pytest_httpx(answer, request):
    httpx_mock = request.getfixturevalue("httpx_mock")
    httpx_mock.add_response(url=URL, json=completion(answer))
    after()
    with httpx.Client() as client:
        return content(client.post(URL, json=BODY).json())
''',
    'httpx-wsgitransport': '''
import httpx

def ask_httpx_wsgitransport(answer, request):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(completion(answer)).encode()]
    after()
    with httpx.Client(transport=httpx.WSGITransport(app=app)) as client:
        return content(client.post(URL, json=BODY).json())
''',
    'httpx-asgitransport': '''
import httpx

def ask_httpx_asgitransport(answer, request):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(completion(answer)).encode()})

    async def go():
        after()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
            return content((await client.post(URL, json=BODY)).json())
    return asyncio.run(go())
''',
    'mock-patch-httpx-transport': '''
import httpx

def ask_mock_patch_httpx_transport(answer, request):
    with mock.patch.object(httpx.HTTPTransport, "handle_request",
                           return_value=httpx.Response(200, json=completion(answer))):
        after()
        with httpx.Client() as client:
            return content(client.post(URL, json=BODY).json())
''',
    'openai-sdk-respx-like-mocktransport': '''
import httpx2, openai

def ask_openai_sdk_respx_like_mocktransport(answer, request):
    transport = httpx2.MockTransport(lambda r: httpx2.Response(200, json=completion(answer)))
    after()
    client = openai.OpenAI(base_url=URL.rsplit("/chat/", 1)[0], api_key="sk-test", max_retries=0,
                           http_client=openai.DefaultHttpxClient(transport=transport))
    reply = client.chat.completions.create(model="gpt-fake", messages=BODY["messages"], temperature=0)
    return reply.choices[0].message.content
''',
    'responses': '''
import requests, responses

def ask_responses(answer, request):
    with responses.RequestsMock() as mocked:
        mocked.add(responses.POST, URL, json=completion(answer))
        after()
        return content(requests.post(URL, json=BODY, timeout=5).json())
''',
    'requests-mock': '''
import requests, requests_mock

def ask_requests_mock(answer, request):
    with requests_mock.Mocker() as mocked:
        mocked.post(URL, json=completion(answer))
        after()
        return content(requests.post(URL, json=BODY, timeout=5).json())
''',
    'httpretty': '''
import httpretty, requests

def ask_httpretty(answer, request):
    httpretty.enable(allow_net_connect=True)
    try:
        httpretty.register_uri(httpretty.POST, URL, body=json.dumps(completion(answer)),
                               content_type="application/json")
        after()
        return content(requests.post(URL, json=BODY, timeout=5).json())
    finally:
        httpretty.disable()
        httpretty.reset()
''',
    'mock-patch-requests-adapter': '''
import requests, requests.adapters, urllib3, io

def ask_mock_patch_requests_adapter(answer, request):
    def send(self, prepared, **kwargs):  # a stand-in adapter answer built as requests builds one
        body = json.dumps(completion(answer)).encode()
        raw = urllib3.HTTPResponse(body=io.BytesIO(body), headers={"content-type": "application/json"},
                                   status=200, preload_content=False)
        return self.build_response(prepared, raw)
    with mock.patch.object(requests.adapters.HTTPAdapter, "send", autospec=True, side_effect=send):
        after()
        return content(requests.post(URL, json=BODY, timeout=5).json())
''',
    'aioresponses': '''
import aiohttp
from aioresponses import aioresponses

def ask_aioresponses(answer, request):
    async def go():
        with aioresponses() as mocked:
            mocked.post(URL, payload=completion(answer))
            after()
            async with aiohttp.ClientSession() as session:
                async with session.post(URL, json=BODY) as response:
                    return content(await response.json())
    return asyncio.run(go())
''',
}

TESTS = '''

@pytest.mark.parametrize("answer", ["the first mocked answer", "the second mocked answer"])
@pytest.mark.parametrize("tool", {tools!r})
def test_each_test_sees_its_own_mocked_answer(tool, answer, request):
    assert globals()["ask_" + tool.replace("-", "_")](answer, request) == answer
'''


@pytest.fixture
def session_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A pytest session's environment: the cache on, in a directory of the test's own."""
    cache = tmp_path / "llmshim-cache.sqlite3"
    monkeypatch.setenv("LLMSHIM_CACHE", "on")
    monkeypatch.setenv("LLMSHIM_CACHE_PATH", str(cache))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return cache


def _entries(cache: Path) -> int:
    if not cache.exists():
        return 0
    with contextlib.closing(sqlite3.connect(cache)) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


@pytest.mark.parametrize("order", ["before", "after"])
def test_mocked_answers_never_enter_or_leave_the_cache(order: str, pytester: pytest.Pytester,
                                                       session_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One session, every tool: for each, two tests mock different answers to the same request."""
    monkeypatch.setenv("ORDER", order)
    pytester.makepyfile(test_mocked=COMMON.format(url=URL) + "".join(TOOLS.values())
                        + TESTS.format(tools=sorted(TOOLS)))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", "-q",
                                           "-o", "timeout=60")
    failed = [line for line in result.outlines if line.startswith(("FAILED", "ERROR"))]
    assert result.ret == 0, "\n".join(failed or result.outlines[-40:])
    result.assert_outcomes(passed=2 * len(TOOLS))
    assert _entries(session_env) == 0, "a mocked answer was stored in the persistent cache"


# -- in process: what llmshim reports about a mocked call ----------------------------------------



BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "q"}], "temperature": 0}


def _completion(answer: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


@pytest.mark.parametrize("cache", ["on", "off"])
def test_a_pre_read_mocked_response_completes_its_call_at_once(cache: str, tmp_path: Path,
                                                               records: list[llmshim.CallRecord]) -> None:
    """httpx reads a ``Response(json=...)`` at construction: its body never flows through the
    stream llmshim watches. The call must still complete, as it is returned (not "aborted" at
    garbage collection, not pending with an identical request waiting on it)."""
    llmshim.install(cache=cache, cache_path=str(tmp_path / "c.sqlite3"))
    try:
        answers = iter(["one", "two"])
        transport = httpx.MockTransport(lambda r: httpx.Response(200, json=_completion(next(answers))))
        with httpx.Client(transport=transport) as client:
            first = client.post(URL, json=BODY)
            assert [r.event for r in records] == ["call_started", "call_completed"]
            second = client.post(URL, json=BODY)
        assert (first.json()["choices"][0]["message"]["content"], second.json()["choices"][0]["message"]["content"]) \
            == ("one", "two")
    finally:
        llmshim.uninstall()
    done = [r for r in records if r.event == "call_completed"]
    assert [(r.outcome, bool(r.cache_hit), r.output_tokens) for r in done] == [("ok", False, 2), ("ok", False, 2)]


def test_a_real_transport_is_still_cached(server: FakeLLMServer, cached: Path) -> None:
    """The detection must not switch the cache off for the real network (a local server is one)."""
    with httpx.Client() as client:
        first = client.post(server.openai_base_url + "/chat/completions", json=BODY).json()
        second = client.post(server.openai_base_url + "/chat/completions", json=BODY).json()
    assert first == second and len(server.received) == 1


# -- the verdicts themselves, per tool (pure: no request is sent) -------------------------------------

def _httpx_verdict(client: httpx.Client | httpx.AsyncClient) -> str | None:
    return _doubles.httpx_double(httpx, client, httpx.Request("POST", URL))


def test_the_real_httpx_transport_is_the_network() -> None:
    with httpx.Client() as client:
        assert _httpx_verdict(client) is None
    with httpx.Client(transport=httpx.HTTPTransport(retries=2)) as client:
        assert _httpx_verdict(client) is None


@pytest.mark.parametrize("transport, reason", [
    (httpx.MockTransport(lambda r: httpx.Response(200)), "test double (MockTransport)"),
    (httpx.WSGITransport(app=lambda environ, start: []), "test double (WSGITransport)"),
])
def test_httpx_test_transports_are_doubles(transport: Any, reason: str) -> None:
    with httpx.Client(transport=transport) as client:
        assert _httpx_verdict(client) == reason


def test_httpx_patched_layers_are_named() -> None:
    import respx

    with respx.mock, httpx.Client() as client:
        assert _httpx_verdict(client) == "mocked (respx)"
    with mock.patch.object(httpx.HTTPTransport, "handle_request", autospec=True), httpx.Client() as client:
        assert _httpx_verdict(client) == "mocked (unittest.mock)"
    with mock.patch("httpcore.ConnectionPool.handle_request"), httpx.Client() as client:
        assert _httpx_verdict(client) == "mocked (unittest.mock)"
    with httpx.Client() as client:
        assert _httpx_verdict(client) is None  # and once the mocks are gone, the network again


def test_requests_and_socket_level_mocks_are_named() -> None:
    import httpretty
    import requests.adapters
    import urllib3.connectionpool

    adapter = requests.adapters.HTTPAdapter()
    genuine_send = requests.adapters.HTTPAdapter.send
    assert _doubles.requests_double(adapter, genuine_send) is None
    assert _doubles.requests_double(adapter, mock.MagicMock()) == "mocked (unittest.mock)"
    with mock.patch.object(urllib3.connectionpool.HTTPConnectionPool, "urlopen"):
        assert _doubles.requests_double(adapter, genuine_send) == "mocked (unittest.mock)"
    httpretty.enable(allow_net_connect=False)
    try:
        assert _doubles.requests_double(adapter, genuine_send) == "mocked (httpretty: socket replaced)"
    finally:
        httpretty.disable()
    assert _doubles.requests_double(adapter, genuine_send) is None


def test_an_open_vcrpy_cassette_is_a_recorder(tmp_path: Path) -> None:
    import requests.adapters
    import vcr

    adapter = requests.adapters.HTTPAdapter()
    with vcr.use_cassette(str(tmp_path / "c.yaml"), record_mode="none"):
        assert _doubles.requests_double(adapter, requests.adapters.HTTPAdapter.send) == "recording (vcrpy cassette)"
        with httpx.Client() as client:
            assert _httpx_verdict(client) == "recording (vcrpy cassette)"
    assert _doubles.requests_double(adapter, requests.adapters.HTTPAdapter.send) is None


def test_a_check_that_breaks_fails_closed() -> None:
    def broken() -> str | None:
        raise RuntimeError("boom")

    assert _doubles.bypass_reason(broken) == "unverified transport"


# -- recorders (item 12) -------------------------------------------------------------------------

RECORDED = '''
import asyncio, os
import pytest
import llmshim

URL = os.environ["LLM_URL"] + "/v1/chat/completions"

llmshim.install()


def body(client):
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": "recorded " + client}], "temperature": 0}


def ask_requests():
    import requests
    return requests.post(URL, json=body("requests"), timeout=5).json()["choices"][0]["message"]["content"]


def ask_httpx():
    import httpx
    with httpx.Client() as client:
        return client.post(URL, json=body("httpx")).json()["choices"][0]["message"]["content"]


def ask_aiohttp():
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.post(URL, json=body("aiohttp")) as response:
                return (await response.json())["choices"][0]["message"]["content"]
    return asyncio.run(go())


@pytest.mark.vcr
@pytest.mark.parametrize("client", ["requests", "httpx", "aiohttp"])
def test_recorded(client):
    assert globals()["ask_" + client]() == "Echo: recorded " + client
'''

CLIENTS = 3


def test_a_recorder_sees_every_request_with_a_warm_cache(pytester: pytest.Pytester, session_env: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-recording re-records (``--record-mode=rewrite``) with llmshim's cache already warm for
    every request: each must still reach the server and the cassette, which then replays offline."""
    run = ("-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", "-o", "timeout=60")
    pytester.makepyfile(test_recorded=RECORDED)
    with FakeLLMServer() as server:
        monkeypatch.setenv("LLM_URL", server.url)
        warm = pytester.runpytest_subprocess(*run, "-p", "no:recording")  # no recorder: llmshim caches
        assert warm.ret == 0, "\n".join(warm.outlines[-30:])
        assert len(server.received) == CLIENTS and _entries(session_env) == CLIENTS
        recorded = pytester.runpytest_subprocess(*run, "--record-mode=rewrite")
        assert recorded.ret == 0, "\n".join(recorded.outlines[-30:])
        assert len(server.received) == 2 * CLIENTS, "llmshim answered from its cache: the recorder never saw it"
    cassettes = sorted(pytester.path.rglob("*.yaml"))
    assert len(cassettes) == CLIENTS
    for cassette, client in zip(cassettes, ["aiohttp", "httpx", "requests"], strict=True):
        assert f"recorded {client}" in cassette.read_text()
    # Offline: the server is gone; the cassettes alone answer (llmshim's cache does not either).
    replayed = pytester.runpytest_subprocess(*run, "--record-mode=none")
    assert replayed.ret == 0, "\n".join(replayed.outlines[-30:])


@pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")  # betamax's own, Python >= 3.12
def test_a_betamax_recording_sees_every_request_with_a_warm_cache(server: FakeLLMServer, cached: Path) -> None:
    import betamax
    import requests

    url = server.openai_base_url + "/chat/completions"
    assert requests.post(url, json=BODY, timeout=5).ok  # warm: stored
    assert requests.post(url, json=BODY, timeout=5).headers.get("x-llmshim-cache") == "hit"
    with requests.Session() as session:
        recorder = betamax.Betamax(session, cassette_library_dir=str(cached.parent))
        with recorder.use_cassette("llm", record="all"):
            answer = session.post(url, json=BODY, timeout=5)
    assert answer.json()["choices"][0]["message"]["content"] == "Echo: q"
    assert "x-llmshim-cache" not in answer.headers
    assert len(server.received) == 2, "llmshim answered from its cache: betamax never saw the request"
