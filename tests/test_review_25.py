"""Review 25: the pytest plugin's cassettes and cache replay mode, tried adversarially.

Each case runs real pytest sessions in subprocesses (pytester) or real clients over real sockets to
the bundled server, and checks what reached the server and what was written to disk:

- one cassette per test id: two classes' ``test_x``, parameter ids that differ only in characters a
  file name cannot hold (``[a/b]`` and ``[a_b]``), and a very long id each keep their own answers;
- nothing secret in a cassette file, wherever the request carried it (URL user info, ``?key=``,
  Azure's ``api-key``, ``x-api-key``, cookies, a key inside the JSON body, a gateway's echo), and a
  replay with other keys still matches;
- a user's own ``llmshim.install()`` survives a test the plugin ran;
- an unreadable cassette or an unwritable folder fails the one test with the path, never upstream;
- cache replay mode never sends what the cache never serves (stateful requests, count_tokens).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import llmshim
from llmshim.pytest_plugin import cassette_name
from llmshim.testing import Answer, FakeLLMServer, Received

pytest_plugins = ["pytester"]

RUN = ("-p", "no:cacheprovider")


def _outcome(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *args)


# -- cassette names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodeids", [
    ["t.py::TestA::test_x", "t.py::TestB::test_x", "t.py::test_x"],
    ["t.py::test_p[a/b]", "t.py::test_p[a_b]", "t.py::test_p[a%2Fb]", "t.py::test_p[a b]", "t.py::test_p[a:b]"],
    ["t.py::test_p[a::b]", "t.py::test_p[a.b]", "t.py::Test::test_p[a.b]"],
    ["t.py::test_p[" + "x" * 400 + "]", "t.py::test_p[" + "x" * 401 + "]", "t.py::test_p[é]", "t.py::test_p[ü]"],
])
def test_cassette_names_are_one_to_one_and_fit_a_file_system(nodeids: list[str]) -> None:
    names = [cassette_name(nodeid) for nodeid in nodeids]
    assert len(set(names)) == len(names)
    for name in names:
        assert len(name.encode()) <= 150 and "/" not in name and "\\" not in name and ":" not in name
    assert cassette_name("t.py::test_chat") == "test_chat"  # the plain name, as documented


NAMES_FILE = """
import openai, pytest
URL = {url!r}

def ask(text):
    with openai.OpenAI(base_url=URL + "/v1", api_key="sk-test") as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": text}}])
    return reply.choices[0].message.content

class TestA:
    def test_x(self):
        assert ask("from A") == "Echo: from A"

class TestB:
    def test_x(self):
        assert ask("from B") == "Echo: from B"

@pytest.mark.parametrize("p", ["a/b", "a_b", "x" * 300])
def test_p(p):
    assert ask(p) == "Echo: " + p
"""


def test_every_test_id_records_and_replays_its_own_cassette(pytester: pytest.Pytester, server: FakeLLMServer) -> None:
    pytester.makepyfile(test_names=NAMES_FILE.format(url=server.url))
    _outcome(pytester, "--llmshim-record").assert_outcomes(passed=5)  # the long id broke the save
    assert len(list((pytester.path / "cassettes" / "test_names").glob("*.json"))) == 5
    server.stop()  # offline: a shared cassette answered TestA with TestB's answer, [a/b] with [a_b]'s
    _outcome(pytester, "--llmshim-replay").assert_outcomes(passed=5)


# -- secrets -----------------------------------------------------------------------------------------------

SECRETS_FILE = """
import os, openai

def test_chat():
    key = os.environ["REVIEW25_KEY"]
    url = {url!r}.replace("http://", f"http://user:pw-{{key}}@") + "/v1"
    headers = {{"api-key": "azure-" + key, "x-api-key": "sk-ant-" + key, "Cookie": "session=cookie-" + key}}
    with openai.OpenAI(base_url=url, api_key="sk-" + key, default_headers=headers,
                       default_query={{"key": "AIza" + key}}) as client:
        reply = client.chat.completions.create(
            model="gpt-4o", messages=[{{"role": "user", "content": "hi"}}],
            extra_body={{"api_key": "BODYSECRET", "metadata": {{"access_token": "NESTEDSECRET"}}}})
    assert reply.choices[0].message.content == "Echo: hi"
"""


def _gateway_echo(received: Received) -> Answer | None:
    """A gateway that sets a cookie and echoes the caller's key in response headers (and in the
    account's organization and project, which a committed cassette must not name either)."""
    if not received.path.startswith("/v1/chat/completions"):
        return None
    body = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: hi"}, "finish_reason": "stop"}]}
    key = received.header("api-key") or ""
    headers = [("Content-Type", "application/json"), ("Set-Cookie", f"sid={key}"), ("x-api-key", key),
               ("x-gateway-auth-token", key), ("openai-organization", f"org-{key}"), ("openai-project", f"proj_{key}"),
               ("anthropic-organization-id", key)]
    return Answer(200, headers, json.dumps(body).encode())


def test_no_secret_reaches_a_cassette_and_other_keys_still_replay(pytester: pytest.Pytester,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLMServer(responder=_gateway_echo) as gateway:
        pytester.makepyfile(test_app=SECRETS_FILE.format(url=gateway.url))
        monkeypatch.setenv("REVIEW25_KEY", "RECORDSECRET")
        _outcome(pytester, "--llmshim-record").assert_outcomes(passed=1)
        assert len(gateway.received) == 1 and gateway.received[0].json()["api_key"] == "BODYSECRET"
        text = (pytester.path / "cassettes" / "test_app" / "test_chat.json").read_text()
        for secret in ("RECORDSECRET", "BODYSECRET", "NESTEDSECRET"):  # the body's were written as sent
            assert secret not in text
        assert json.loads(text)["interactions"][0]["request"]["body"]["api_key"] == "***"
        monkeypatch.setenv("REVIEW25_KEY", "OTHERKEY")  # header, query and URL keys are not the request
        _outcome(pytester, "--llmshim-replay").assert_outcomes(passed=1)
        assert len(gateway.received) == 1


# -- the user's own install ----------------------------------------------------------------------------

def test_a_users_own_install_survives_a_plugin_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
import llmshim
from opentelemetry.sdk.trace import TracerProvider
PROVIDER = TracerProvider()

def pytest_configure(config):
    llmshim.install(priority="low", rpm="30", tracer_provider=PROVIDER)
""")
    pytester.makepyfile(test_user="""
import pytest, llmshim
from llmshim.policies.observer import ObserverPolicy
from llmshim.runtime import STATE
import conftest

def test_before():
    assert llmshim.status()["settings"]["priority"] == "low"
    assert STATE.pipeline.find(ObserverPolicy).telemetry._fixed_tracer_provider is conftest.PROVIDER

@pytest.mark.llmshim(priority="high")
def test_marked():
    assert llmshim.status()["settings"]["priority"] == "high"

def test_after():
    assert llmshim.is_installed()
    settings = llmshim.status()["settings"]
    assert (settings["priority"], settings["rpm"]) == ("low", 30)
    assert STATE.pipeline.find(ObserverPolicy).telemetry._fixed_tracer_provider is conftest.PROVIDER
""")
    _outcome(pytester, "-p", "no:randomly").assert_outcomes(passed=3)


APP_INSTALLS_FILE = """
import llmshim, requests

def test_app_installs():
    llmshim.install()  # the app under test sets llmshim up as it starts
    reply = requests.post({url!r} + "/v1/chat/completions", timeout=5,
                          json={{"model": "m", "messages": [{{"role": "user", "content": "v"}}]}})
    assert reply.json()["choices"][0]["message"]["content"] == "Echo: v"
"""


def test_an_install_inside_the_test_keeps_the_cassette(pytester: pytest.Pytester, server: FakeLLMServer) -> None:
    pytester.makepyfile(test_app=APP_INSTALLS_FILE.format(url=server.url))
    _outcome(pytester, "--llmshim-record").assert_outcomes(passed=1)  # it wrote no cassette
    cassette = pytester.path / "cassettes" / "test_app" / "test_app_installs.json"
    assert len(json.loads(cassette.read_text())["interactions"]) == 1
    server.reset()
    _outcome(pytester, "--llmshim-replay").assert_outcomes(passed=1)
    assert server.received == []


# -- cassettes that cannot be read or written ----------------------------------------------------------

PLAIN_FILE = """
import openai
def test_chat():
    with openai.OpenAI(base_url={url!r} + "/v1", api_key="sk-test", max_retries=0) as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": "hi"}}])
    assert reply.choices[0].message.content == "Echo: hi"
"""


@pytest.mark.parametrize("content", ['{"version": 1, "interactions": [', '{"version": 7, "interactions": []}',
                                     "[]", "\udcff"])
def test_an_unreadable_cassette_fails_the_test_with_its_path(pytester: pytest.Pytester, server: FakeLLMServer,
                                                             content: str) -> None:
    pytester.makepyfile(test_app=PLAIN_FILE.format(url=server.url))
    cassette = pytester.path / "cassettes" / "test_app" / "test_chat.json"
    cassette.parent.mkdir(parents=True)
    cassette.write_bytes(content.encode("utf-8", "surrogateescape"))
    result = _outcome(pytester, "--llmshim-replay")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*cannot read cassette {cassette}*"])
    assert "Traceback" not in result.stdout.str() and server.received == []


def test_an_unwritable_cassette_folder_fails_the_test_with_its_path(pytester: pytest.Pytester,
                                                                    server: FakeLLMServer) -> None:
    pytester.makepyfile(test_app=PLAIN_FILE.format(url=server.url))
    (pytester.path / "cassettes").write_text("a file where the folder should be")  # root ignores chmod
    result = _outcome(pytester, "--llmshim-record")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*cannot write cassette*test_chat.json*"])
    assert not list(pytester.path.glob("**/*.tmp"))


# -- cache replay mode ---------------------------------------------------------------------------------------

NEVER_CACHED = [
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "previous_response_id": "resp_1"}),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "background": True}),
    ("/v1/messages/count_tokens", {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize(("path", "body"), NEVER_CACHED)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_cache_replay_never_sends_what_the_cache_never_serves(
        server: FakeLLMServer, installed: Callable[..., object], tmp_path: Path, path: str, body: dict[str, object],
        flavour: str) -> None:
    installed(cache="replay", cache_path=str(tmp_path / "c.sqlite3"))
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    if flavour == "sync":
        response = httpx.post(server.url + path, json=body, headers=headers)
    else:
        import asyncio

        async def send() -> httpx.Response:
            async with httpx.AsyncClient() as client:
                return await client.post(server.url + path, json=body, headers=headers)

        response = asyncio.run(send())
    assert server.received == []
    assert (response.status_code, response.headers["x-should-retry"]) == (504, "false")
    assert "never answered from the cache" in response.json()["error"]["message"]


def test_outside_replay_the_cache_still_sends_what_it_never_serves(
        server: FakeLLMServer, installed: Callable[..., object], tmp_path: Path) -> None:
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    for path, body in NEVER_CACHED:
        assert httpx.post(server.url + path, json=body, headers={"x-api-key": "k"}).status_code == 200
    assert len(server.received) == len(NEVER_CACHED)
    assert llmshim.is_installed()
