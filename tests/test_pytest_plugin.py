"""The pytest plugin, run with pytester in subprocesses: record, replay offline, a useful failure."""

from __future__ import annotations

import json

import pytest

from llmshim.testing import FakeLLMServer

pytest_plugins = ["pytester"]

TEST_FILE = """
import openai, requests
URL = {url!r}

def test_chat(llmshim_calls, llmshim_spans):
    with openai.OpenAI(base_url=URL + "/v1", api_key="sk-secret-123456") as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": "{prompt}"}}])
    assert reply.choices[0].message.content == "Echo: {prompt}"
    with requests.post(URL + "/api/chat", json={{"model": "m", "messages": [{{"role": "user", "content": "yo"}}]}},
                       stream=True, timeout=5) as response:
        lines = list(response.iter_lines())
    assert len(lines) == 3
    assert [call.provider for call in llmshim_calls] == ["openai", "ollama"]
    assert sorted(span.name for span in llmshim_spans.get_finished_spans()) == ["chat gpt-4o", "chat m"]
"""


def test_record_then_replay_offline(pytester: pytest.Pytester, server: FakeLLMServer) -> None:
    pytester.makepyfile(test_app=TEST_FILE.format(url=server.url, prompt="hi"))
    recorded = pytester.runpytest_subprocess("--llmshim-record", "-p", "no:cacheprovider")
    recorded.assert_outcomes(passed=1)
    cassette = pytester.path / "cassettes" / "test_app" / "test_chat.json"
    text = cassette.read_text()
    assert "sk-secret" not in text and "Bearer" not in text
    interactions = json.loads(text)["interactions"]
    assert [i["request"]["provider"] for i in interactions] == ["openai", "ollama"]
    assert len(interactions[1]["response"]["body"]) >= 2  # the NDJSON stream, piece by piece
    server.stop()  # offline from here on
    replayed = pytester.runpytest_subprocess("--llmshim-replay", "-p", "no:cacheprovider")
    replayed.assert_outcomes(passed=1)

    pytester.makepyfile(test_app=TEST_FILE.format(url=server.url, prompt="something else"))
    unmatched = pytester.runpytest_subprocess("--llmshim-replay", "-p", "no:cacheprovider")
    unmatched.assert_outcomes(failed=1)  # one failure, carrying the explanation in the SDK's own error
    unmatched.stdout.fnmatch_lines(["*request not in cassette*", "*something else*", "*closest recorded*",
                                    "*hi*"])


def test_inactive_unless_asked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="""
import llmshim
def test_untouched():
    assert not llmshim.is_installed()
""")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_marker_sets_settings_for_one_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_marked="""
import pytest, llmshim

@pytest.mark.llmshim(priority="high", cache="off", rpm="60")
def test_marked():
    settings = llmshim.status()["settings"]
    assert llmshim.is_installed()
    assert (settings["priority"], settings["cache"], settings["rpm"]) == ("high", "off", 60)

def test_unmarked():
    assert not llmshim.is_installed()
""")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


MOCKED = """
import httpx, respx

def test_mocked():
    with respx.mock:
        respx.post("http://llm.invalid/v1/chat/completions").respond(200, json={
            "id": "c", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "MOCKED"}, "finish_reason": "stop"}]})
        r = httpx.post("http://llm.invalid/v1/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"]["content"] == "MOCKED"
"""


@pytest.mark.parametrize("mode", ["--llmshim-record", "--llmshim-replay"])
def test_a_mocked_call_is_neither_recorded_nor_replayed(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makepyfile(test_mocked=MOCKED)
    result = pytester.runpytest_subprocess(mode, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    cassettes = list(pytester.path.glob("cassettes/**/*.json"))
    assert all(not json.loads(p.read_text()).get("interactions") for p in cassettes)
