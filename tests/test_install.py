"""install()/uninstall() in fresh interpreters: import order, repetition, exact restoration, and
stacking with OpenTelemetry's httpx/requests instrumentations and with vcrpy, in both orders."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import OPENAI_LIBRARY, run_python
from llmshim.testing import FakeLLMServer

PRELUDE = """
import json, sys
import llmshim
seen = []
llmshim.on("call_completed", lambda r: seen.append(  # tokens the answer holds: spent, or saved by a cache hit
    (r.library, r.provider, r.model, r.saved_output_tokens if r.cache_hit else r.output_tokens)))
def call_all(url):
    import asyncio, requests, httpx, httpx2, aiohttp, openai
    body = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "stream": False}
    requests.post(url + "/api/chat", json=body, timeout=5).json()
    httpx.post(url + "/api/chat", json=body).json()
    httpx2.post(url + "/api/chat", json=body).json()
    async def go():
        async with aiohttp.ClientSession() as s, s.post(url + "/api/chat", json=body) as r:
            await r.json()
    asyncio.run(go())
    with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="m", messages=body["messages"])
"""

ALL_SEEN = [["requests", "ollama", "m", 3], ["httpx", "ollama", "m", 3], ["httpx2", "ollama", "m", 3],
            ["aiohttp", "ollama", "m", 3], [OPENAI_LIBRARY, "openai", "m", 3]]


def _script(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)


@pytest.mark.parametrize("order", ["install-first", "import-first"])
def test_import_order_does_not_matter(server: FakeLLMServer, order: str) -> None:
    imports = "import requests, httpx, httpx2, aiohttp, openai\n"
    body = ("llmshim.install()\n" + imports) if order == "install-first" else (imports + "llmshim.install()\n")
    out = run_python(_script(body + f"call_all({server.url!r})\nprint(json.dumps(seen))"))
    assert json.loads(out) == ALL_SEEN


def test_sessions_and_clients_made_before_install_are_covered(server: FakeLLMServer) -> None:
    out = run_python(_script(f"""
        import requests, httpx, openai
        session = requests.Session()
        client = httpx.Client()
        sdk = openai.OpenAI(base_url={server.url!r} + "/v1", api_key="k")
        llmshim.install()
        body = {{"model": "m", "messages": [{{"role": "user", "content": "a"}}], "stream": False}}
        session.post({server.url!r} + "/api/chat", json=body)
        client.post({server.url!r} + "/api/chat", json=body)
        sdk.chat.completions.create(model="m", messages=body["messages"])
        client.close(); sdk.close(); session.close()
        print(json.dumps([s[0] for s in seen]))
    """))
    assert json.loads(out) == ["requests", "httpx", OPENAI_LIBRARY]


def test_install_twice_uninstall_twice_restores_exact_originals(server: FakeLLMServer) -> None:
    out = run_python(_script(f"""
        import requests, httpx, httpx2, aiohttp, aiohttp.client, requests.adapters
        owners = [(httpx.Client, "_send_single_request"), (httpx.AsyncClient, "_send_single_request"),
                  (httpx2.Client, "_send_single_request"), (httpx2.AsyncClient, "_send_single_request"),
                  (requests.adapters.HTTPAdapter, "send"), (aiohttp.client.ClientSession, "_middlewares")]
        before = [vars(o).get(a) for o, a in owners]
        llmshim.install(); llmshim.install()
        patched = [vars(o).get(a) for o, a in owners]
        assert all(p is not b for p, b in zip(patched, before)), "not all patched"
        assert len(llmshim.status()["libraries"]["httpx"]["patched"]) == 2
        llmshim.uninstall(); llmshim.uninstall()
        after = [vars(o).get(a) for o, a in owners]
        assert all(x is y for x, y in zip(after, before)), "not restored"
        call_all({server.url!r})
        assert seen == [], seen
        llmshim.install()
        call_all({server.url!r})
        print(json.dumps(seen))
    """))
    assert json.loads(out) == ALL_SEEN


def test_disabled_library_is_not_patched(server: FakeLLMServer) -> None:
    out = run_python(_script(f"""
        llmshim.install()
        call_all({server.url!r})
        print(json.dumps(seen))
    """), env={"LLMSHIM_LIBRARIES": "requests,aiohttp"})
    assert [s[0] for s in json.loads(out)] == ["requests", "aiohttp"]


OTEL = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
exporter = InMemorySpanExporter()
provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
def otel_on():
    HTTPXClientInstrumentor().instrument(); RequestsInstrumentor().instrument()
def otel_off():
    HTTPXClientInstrumentor().uninstrument(); RequestsInstrumentor().uninstrument()
"""


@pytest.mark.parametrize("order", ["otel-first", "llmshim-first"])
def test_stacks_with_opentelemetry_http_instrumentations(server: FakeLLMServer, order: str) -> None:
    first, second = ("otel_on()", "llmshim.install()") if order == "otel-first" else ("llmshim.install()", "otel_on()")
    out = run_python(_script(OTEL + f"""
import requests, httpx, requests.adapters
orig = (vars(httpx.Client)["_send_single_request"], vars(requests.adapters.HTTPAdapter)["send"])
{first}
{second}
body = {{"model": "m", "messages": [{{"role": "user", "content": "a"}}], "stream": False}}
requests.post({server.url!r} + "/api/chat", json=body).json()
httpx.post({server.url!r} + "/api/chat", json=body).json()
finished = exporter.get_finished_spans()
by_id = {{s.context.span_id: s for s in finished}}
spans = sorted((by_id[s.parent.span_id].name if s.parent else "-") + " > " + s.name
               + " [" + s.instrumentation_scope.name + "]" for s in finished)
llmshim.uninstall(); otel_off()
restored = (vars(httpx.Client)["_send_single_request"], vars(requests.adapters.HTTPAdapter)["send"]) == orig
print(json.dumps({{"seen": [s[0] for s in seen], "spans": spans, "restored": restored}}))
"""), env={"LLMSHIM_CACHE": "off"})  # two identical requests: with the cache on, the second is a hit
    result = json.loads(out)
    assert result["seen"] == ["requests", "httpx"]
    # One GenAI span and one HTTP span per call, no duplicates. httpx: OTel's HTTP span (on the
    # transport) nests under llmshim's. requests: OTel wraps Session.send, above HTTPAdapter.send,
    # so there the HTTP span is the parent (see README, Limitations).
    assert result["spans"] == [
        "- > POST [opentelemetry.instrumentation.requests]",
        "- > chat m [llmshim]",
        "POST > chat m [llmshim]",
        "chat m > POST [opentelemetry.instrumentation.httpx]",
    ]
    assert result["restored"] is True


@pytest.mark.parametrize("order", ["llmshim-first", "vcr-first"])
def test_coexists_with_vcrpy_record_then_replay(server: FakeLLMServer, order: str, tmp_path: object) -> None:
    cassette = f"{tmp_path}/c.yaml"
    out = run_python(_script(f"""
import vcr, requests, httpx2, openai
{"llmshim.install()" if order == "llmshim-first" else ""}
body = {{"model": "m", "messages": [{{"role": "user", "content": "a b c"}}], "stream": False}}
def calls():
    with openai.OpenAI(base_url={server.url!r} + "/v1", api_key="k", max_retries=0) as c:
        a = c.chat.completions.create(model="m", messages=body["messages"]).model_dump()
    b = requests.post({server.url!r} + "/api/chat", json=body).json()
    return a, b
with vcr.use_cassette({cassette!r}, record_mode="once"):
    {"llmshim.install()" if order == "vcr-first" else "pass"}
    recorded = calls()
assert llmshim.is_installed()  # vcrpy's exit did not drop llmshim's patches
recorded_seen = list(seen); seen.clear()
with vcr.use_cassette({cassette!r}, record_mode="none"):
    replayed = calls()
print(json.dumps({{"same": recorded == replayed, "recorded": recorded_seen, "replayed": seen}}))
"""), env={"LLMSHIM_CACHE": "off"})  # the second round must reach vcrpy, not llmshim's cache
    result = json.loads(out)
    assert result["same"] is True
    expected = [[OPENAI_LIBRARY, "openai", "m", 4], ["requests", "ollama", "m", 4]]
    assert result["recorded"] == expected
    assert result["replayed"] == expected  # llmshim sits above vcrpy's stubs, so replays are seen too


def test_install_again_repatches_after_a_mock_restored_the_original(server: FakeLLMServer) -> None:
    """A mock started before install() and stopped after it restores the genuine method, dropping
    llmshim silently; the next install() must notice and patch again."""
    from unittest import mock

    import requests
    from requests.adapters import HTTPAdapter

    import llmshim

    genuine = HTTPAdapter.send
    seen: list[llmshim.CallRecord] = []
    llmshim.on("call_completed", seen.append)
    try:
        with mock.patch.object(HTTPAdapter, "send", new=lambda self, *a, **k: genuine(self, *a, **k)):
            llmshim.install()
        assert HTTPAdapter.send is genuine  # the mock put the genuine method back: llmshim is gone
        llmshim.install()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        requests.post(server.openai_base_url + "/chat/completions", json=body, timeout=5)
        assert len(seen) == 1  # seen again
        llmshim.uninstall()
        assert HTTPAdapter.send is genuine
    finally:
        llmshim.off("call_completed", seen.append)
        llmshim.uninstall()
