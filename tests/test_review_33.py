"""Review 33: llmshim under the other tools a production LLM program already runs, in fresh
interpreters (each tool patches the process for good): sentry-sdk (its OpenAI, httpx2 and stdlib
integrations), langfuse's OpenAI drop-in, langchain-openai, OpenTelemetry's instrumentations in the
orders ``test_install.py`` does not take, and retry wrappers in user code (tenacity, backoff).

Each script runs under ``-W error`` and must leave stderr empty: a warning, a ResourceWarning from a
response never closed, or an exception swallowed in ``__del__`` fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_clean(code: str, env: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    """Run ``code`` in a fresh interpreter under ``-W error``; its last stdout line is JSON. Fails
    on a non-zero exit or anything on stderr (warnings, unraisable exceptions)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSHIM_", "OTEL_", "SENTRY_"))}
    full_env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                     "LLMSHIM_RETRY_MAX_DELAY": "0", "LANGFUSE_TRACING_ENABLED": "false"})
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=90)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert done.stderr == "", done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# A FakeLLMServer of the script's own (faults are injected from inside), llmshim's hook records, and
# the chat calls every tool is driven through: miss then hit, plain, streamed, sync and async.
COMMON = """
import asyncio, gc, json, sys, tempfile
import llmshim
from llmshim.testing import FakeLLMServer, Fault
server = FakeLLMServer().start()
seen = []
llmshim.on("call_completed", lambda r: seen.append(
    [r.cache_hit, r.saved_output_tokens if r.cache_hit else r.output_tokens]))
failed = []
llmshim.on("call_failed", lambda r: failed.append([r.status, r.error_type]))
CACHE = dict(cache="on", cache_path=tempfile.mkdtemp() + "/c.sqlite3")
def ask(word):
    return [{"role": "user", "content": word}]
def chunk(c):
    return c.choices[0].delta.content if c.choices else ["usage", c.usage.completion_tokens]
STREAM = dict(stream=True, stream_options={"include_usage": True})
"""

SENTRY = COMMON + """
import openai, sentry_sdk
from sentry_sdk.transport import Transport
from sentry_sdk.integrations.httpx import HttpxIntegration
from sentry_sdk.integrations.httpx2 import Httpx2Integration
from sentry_sdk.integrations.openai import OpenAIIntegration
envelopes = []
class Recording(Transport):  # sentry's envelopes, kept in memory instead of sent
    def capture_envelope(self, envelope):
        envelopes.append(envelope)
def sentry_on():
    # What auto-enabling would turn on for this program, named (auto-enabling imports every framework
    # installed, seconds here, and with langchain installed prefers its LangChain integration); the
    # default ones (stdlib's http.client, logging, threading...) stay on.
    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=Recording, traces_sample_rate=1.0,
                    auto_enabling_integrations=False,
                    integrations=[OpenAIIntegration(), Httpx2Integration(), HttpxIntegration()])
def sentry_saw():
    sentry_sdk.flush()
    spans, errors = [], []
    for envelope in envelopes:
        for item in envelope.items:
            kind, payload = item.headers.get("type"), item.payload.json
            if kind == "span":  # sentry's streamed spans: its OpenAI integration's
                for s in payload["items"]:
                    a = {k: v["value"] for k, v in s["attributes"].items()}
                    spans.append([s["name"], s["status"], a.get("gen_ai.response.streaming"),
                                  a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens")])
            elif kind == "event":
                errors.extend(v["type"] for v in payload["exception"]["values"])
    envelopes.clear()
    return spans, errors
def calls():
    out = {}
    with sentry_sdk.start_transaction(name="t"):
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as c:
            out["sync"] = [c.chat.completions.create(model="m", messages=ask("a b c")).choices[0].message.content
                           for _ in range(2)]
            out["stream"] = [[chunk(x) for x in c.chat.completions.create(model="m", messages=ask("s"), **STREAM)]
                             for _ in range(2)]
            server.inject(Fault(status=429))  # retried by llmshim: sentry sees one good call
            out["retried"] = c.chat.completions.create(model="m", messages=ask("r")).choices[0].message.content
            server.inject(Fault(status=500), times=3)  # every attempt fails: the caller's error
            try:
                c.chat.completions.create(model="m", messages=ask("f"))
            except openai.InternalServerError as e:
                out["error"] = type(e).__name__
        async def go():
            async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as c:
                plain = [(await c.chat.completions.create(model="m", messages=ask("x"))).choices[0].message.content
                         for _ in range(2)]
                streams = []
                for _ in range(2):
                    s = await c.chat.completions.create(model="m", messages=ask("as"), **STREAM)
                    streams.append([chunk(x) async for x in s])
                return plain, streams
        out["async"], out["astream"] = asyncio.run(go())
    out["spans"], out["errors"] = sentry_saw()
    out.update(seen=seen[:], failed=failed[:], attempts=len(server.received))
    seen.clear(); failed.clear(); server.reset()
    return out
phases = {}
llmshim.install(**CACHE); sentry_on()  # llmshim first
phases["llmshim-first"] = calls()
llmshim.uninstall()  # sentry stays working without llmshim, and llmshim goes on top of it again
with sentry_sdk.start_transaction(name="t"), \\
        openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as c:
    bare = c.chat.completions.create(model="m", messages=ask("bare")).choices[0].message.content
phases["uninstalled"] = [bare, sentry_saw(), seen[:]]
server.reset()
llmshim.install(**dict(CACHE, cache_path=tempfile.mkdtemp() + "/c.sqlite3"))  # sentry first
phases["sentry-first"] = calls()
llmshim.uninstall()
def wire():  # what the SDK got and what the server got, plain and streamed, under sentry
    def headers(h):  # the date header is the clock's
        return sorted(kv for kv in h.items() if kv[0] != "date")
    with sentry_sdk.start_transaction(name="t"), \\
            openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as c:
        r = c.chat.completions.with_raw_response.create(model="m", messages=ask("q"))
        got = [r.http_response.content.decode(), headers(r.headers), r.http_response.http_version]
        with c.chat.completions.with_streaming_response.create(model="m", messages=ask("q"), stream=True) as s:
            got += [[b.decode() for b in s.iter_bytes()], headers(s.headers)]
    sent = [[[h for h in r.headers if h[0].lower() not in ("sentry-trace", "baggage")], r.body.decode()]
            for r in server.received]  # sentry's trace headers carry new ids every call
    server.reset()
    return got, sent
without = wire()
llmshim.install(cache="off", retry_mode="off")  # every feature off
phases["features-off"] = [wire() == without, without == wire()]
llmshim.uninstall()
server.stop()
print(json.dumps(phases))
"""


def test_sentry_openai_integration_sees_hits_as_the_calls_they_replay() -> None:
    """Both orders in one interpreter (sentry cannot be taken out): llmshim then sentry; llmshim
    uninstalled under sentry; llmshim installed again on top of sentry."""
    pytest.importorskip("sentry_sdk")
    phases = run_clean(SENTRY, env={"LLMSHIM_RETRY_MODE": "llmshim"})
    assert phases["uninstalled"] == ["Echo: bare", [[["chat m", "ok", False, 1, 2]], []], []]
    for order in ("llmshim-first", "sentry-first"):
        out = phases[order]
        stream = ["", "Echo:", " s", None, ["usage", 2]]
        assert out["sync"] == ["Echo: a b c"] * 2, order
        assert out["stream"] == [stream] * 2  # no chunk lost or doubled, live or replayed
        assert out["async"] == ["Echo: x"] * 2
        assert out["astream"] == [[c.replace(" s", " as") if isinstance(c, str) else c for c in stream]] * 2
        assert out["retried"] == "Echo: r"
        assert out["error"] == "InternalServerError"  # the SDK's own exception type
        # miss then hit for each pair, the retried call, the failure a call_failed
        assert out["seen"] == [[False, 4], [True, 4], [False, 2], [True, 2], [False, 2],
                               [False, 2], [True, 2], [False, 2], [True, 2]]
        assert out["failed"] == [[500, "500"]]
        assert out["attempts"] == 2 + 2 + 3 + 2  # misses, the 429 and its retry, 3 failing, async misses
        # One sentry gen_ai span per call; a hit's usage is its miss's (sentry reads the replayed body)
        ok = [s for s in out["spans"] if s[1] == "ok"]
        plain, streamed = ["chat m", "ok", False, 1, 2], ["chat m", "ok", True, 1, 2]
        assert ok == [["chat m", "ok", False, 3, 4]] * 2 + [streamed] * 2 + [plain] * 3 + [streamed] * 2
        assert [s[0] for s in out["spans"] if s[1] != "ok"] == ["chat m"]  # the final failure, only it
        assert out["errors"] == ["InternalServerError"]  # the 429 llmshim retried is not an error
    assert phases["features-off"] == [True, True]  # byte for byte what the SDK and the server saw


LANGFUSE = COMMON + """
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exports = []
class Collector(BaseHTTPRequestHandler):  # langfuse's OTLP endpoint: records what it was sent
    def do_POST(self):
        size = len(self.rfile.read(int(self.headers["Content-Length"])))
        exports.append([self.path, self.headers["Content-Type"], size])
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
threading.Thread(target=collector.serve_forever, daemon=True).start()
import os
os.environ["LANGFUSE_HOST"] = "http://127.0.0.1:%d" % collector.server_address[1]
exporter = InMemorySpanExporter()  # the program's own tracing: langfuse adds its processor to it
provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
llmshim.install(**CACHE)
from langfuse import get_client
from langfuse.openai import AsyncOpenAI, OpenAI
out = {}
c = OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)
out["sync"] = [c.chat.completions.create(model="m", messages=ask("a b c")).choices[0].message.content
               for _ in range(2)]
out["stream"] = [[chunk(x) for x in c.chat.completions.create(model="m", messages=ask("s"), **STREAM)]
                 for _ in range(2)]
async def go():
    a = AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)
    s = await a.chat.completions.create(model="m", messages=ask("as"), **STREAM)
    streamed = [chunk(x) async for x in s]
    await a.close()
    return streamed
out["astream"] = asyncio.run(go())
c.close()
get_client().flush()
by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
out["spans"] = [[s.name, by_id[s.parent.span_id].name if s.parent and s.parent.span_id in by_id else None,
                 json.loads(s.attributes.get("langfuse.observation.usage_details", "{}")).get("completion_tokens")]
                for s in by_id.values()]
get_client().shutdown()
llmshim.uninstall()
out.update(seen=seen, exports=sorted(set((p, t) for p, t, n in exports if n > 0)), attempts=len(server.received))
server.stop(); collector.shutdown(); collector.server_close()
print(json.dumps(out))
"""


def test_langfuse_openai_drop_in_records_hits_like_misses() -> None:
    """langfuse's ``from langfuse.openai import OpenAI`` (it wraps the SDK's methods and exports by
    OTLP over requests) with llmshim's cache on: same answers, langfuse's generation spans with the
    same usage for a hit, llmshim's span for each call, and langfuse's own export
    (protobuf over requests, through llmshim's patched adapter) delivered untouched."""
    pytest.importorskip("langfuse")
    out = run_clean(LANGFUSE, env={"LANGFUSE_PUBLIC_KEY": "pk-lf-test", "LANGFUSE_SECRET_KEY": "sk-lf-test",
                                   "LANGFUSE_TRACING_ENABLED": "true"})
    stream = ["", "Echo:", " s", None, ["usage", 2]]
    assert out["sync"] == ["Echo: a b c"] * 2
    assert out["stream"] == [stream] * 2
    assert out["astream"] == ["", "Echo:", " as", None, ["usage", 2]]
    assert out["seen"] == [[False, 4], [True, 4], [False, 2], [True, 2], [False, 2]]
    assert out["attempts"] == 3
    generations = [s for s in out["spans"] if s[0] == "OpenAI-generation"]
    assert [g[2] for g in generations] == [4, 4, 2, 2, 2]  # a hit's usage is the miss's
    # llmshim's own span per call too; beside langfuse's, not under it: langfuse starts its generation
    # without making it the current span, so nothing below the SDK can nest under it
    assert [s[:2] for s in out["spans"] if s[0] == "chat m"] == [["chat m", None]] * 5
    assert out["exports"] == [["/api/public/otel/v1/traces", "application/x-protobuf"]]


# ---- in this process: tools that patch nothing themselves -------------------------------------------

import asyncio  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import llmshim  # noqa: E402
from llmshim.testing import FakeLLMServer, Fault  # noqa: E402


def test_langchain_openai_invoke_stream_async_and_batch_replay_the_same_messages(
        server: FakeLLMServer, installed_cached: Callable[..., object], records: list[llmshim.CallRecord]) -> None:
    """langchain-openai's ChatOpenAI (the OpenAI SDK underneath) through every entry point, each
    twice: the second is a cache hit whose message is the first's, content, usage and metadata."""
    langchain_openai = pytest.importorskip("langchain_openai")
    import httpx

    installed_cached(retry_mode="auto")
    # The test's own async client, closed on the loop that used it: by default langchain-openai
    # shares one process-wide AsyncClient (an lru_cache per base URL), whose pooled keep-alive
    # connection would outlive asyncio.run's closed loop until interpreter exit (an unclosed transport).
    async_client = httpx.AsyncClient()
    llm = langchain_openai.ChatOpenAI(base_url=server.openai_base_url, api_key="k", model="m", max_retries=0,
                                      stream_usage=True, http_async_client=async_client)

    def whole(message: Any) -> list[Any]:
        return [message.content, message.usage_metadata, message.response_metadata.get("finish_reason")]

    def joined(chunks: list[Any]) -> list[Any]:
        return [[c.content for c in chunks], whole(sum(chunks[1:], chunks[0]))]

    async def asynchronous() -> list[Any]:
        async with async_client:
            plain = [whole(await llm.ainvoke("async one")) for _ in range(2)]
            streams = []
            for _ in range(2):
                streams.append(joined([c async for c in llm.astream("astream one")]))
        return plain + streams

    invoked = [llm.invoke("hello there") for _ in range(2)]
    assert invoked[0].response_metadata == invoked[1].response_metadata  # id, model, usage: all replayed
    assert whole(invoked[0]) == whole(invoked[1]) == \
        ["Echo: hello there", {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5,
                               "input_token_details": {}, "output_token_details": {}}, "stop"]
    streamed = [joined(list(llm.stream("streamed one"))) for _ in range(2)]
    assert streamed[0] == streamed[1]
    assert streamed[0][0] == ["", "Echo:", " streamed", " one", "", "", ""]  # no chunk lost or doubled
    assert streamed[0][1][1]["output_tokens"] == 3
    a_plain, a_plain_hit, a_stream, a_stream_hit = asyncio.run(asynchronous())
    assert a_plain == a_plain_hit and a_plain[0] == "Echo: async one"
    assert a_stream == a_stream_hit and a_stream[0] == ["", "Echo:", " astream", " one", "", "", ""]
    batch = llm.batch(["b1", "b2", "b3", "b1", "b2"], config={"max_concurrency": 5})  # threads
    assert [m.content for m in batch] == ["Echo: b1", "Echo: b2", "Echo: b3", "Echo: b1", "Echo: b2"]
    done = [r for r in records if r.event != "call_started"]
    assert [r.cache_hit for r in done][:8] == [False, True] * 4
    assert len(server.received) == 4 + 3  # one per distinct request: the batch's twins coalesced or hit
    assert len(done) == 8 + 5 and {r.event for r in done} == {"call_completed"}


@pytest.mark.parametrize("mode, sdk_retries, per_call", [("auto", 2, 3), ("llmshim", 0, 3), ("off", 1, 2)])
def test_langchain_with_retry_over_the_sdk_and_llmshim_bounds_attempts_and_keeps_the_exception(
        server: FakeLLMServer, installed: Callable[..., object], mode: str, sdk_retries: int, per_call: int) -> None:
    """langchain's ``with_retry`` (tenacity) around ChatOpenAI around the SDK's retries, with
    llmshim's: an upstream that always answers 429 sees (langchain's tries) x (the SDK's or
    llmshim's attempts, never both), and langchain's retry predicate still gets the SDK's
    RateLimitError."""
    langchain_openai = pytest.importorskip("langchain_openai")
    import openai

    installed(retry_mode=mode, retry_max_delay="0")
    # the delay each retrier waits for: the SDK takes 1 ms as asked (0 would be its own backoff, seconds);
    # llmshim, with no wait allowed (LLMSHIM_RETRY_MAX_DELAY=0), retries at once when asked for none
    server.inject(Fault(status=429, headers={"retry-after-ms": "0" if mode == "llmshim" else "1"}), times=None)
    llm = langchain_openai.ChatOpenAI(base_url=server.openai_base_url, api_key="k", model="m",
                                      max_retries=sdk_retries)
    retried = llm.with_retry(retry_if_exception_type=(openai.RateLimitError,), stop_after_attempt=2,
                             wait_exponential_jitter=False)
    with pytest.raises(openai.RateLimitError):
        retried.invoke("always limited")
    assert len(server.received) == 2 * per_call


def _always_limited(server: FakeLLMServer) -> None:
    server.inject(Fault(status=429, headers={"retry-after-ms": "0"}), times=None)


BODY = {"model": "m", "messages": [{"role": "user", "content": "limited"}], "stream": False}


def _tenacity_httpx(server: FakeLLMServer) -> type[BaseException]:
    import httpx
    tenacity = pytest.importorskip("tenacity")

    @tenacity.retry(stop=tenacity.stop_after_attempt(2), reraise=True,
                    retry=tenacity.retry_if_exception_type(httpx.HTTPStatusError))
    def call() -> None:
        httpx.post(server.openai_base_url + "/chat/completions", json=BODY).raise_for_status()

    with pytest.raises(httpx.HTTPStatusError) as caught:
        call()
    assert caught.value.response.status_code == 429
    return httpx.HTTPStatusError


def _backoff_requests(server: FakeLLMServer) -> type[BaseException]:
    backoff = pytest.importorskip("backoff")
    import requests

    @backoff.on_exception(backoff.constant, requests.HTTPError, max_tries=2, interval=0, jitter=None)
    def call() -> None:
        requests.post(server.url + "/api/chat", json=BODY, timeout=5).raise_for_status()

    with pytest.raises(requests.HTTPError) as caught:
        call()
    assert caught.value.response is not None and caught.value.response.status_code == 429
    return requests.HTTPError


def _tenacity_openai(server: FakeLLMServer) -> type[BaseException]:
    import openai
    tenacity = pytest.importorskip("tenacity")

    @tenacity.retry(stop=tenacity.stop_after_attempt(2), reraise=True,
                    retry=tenacity.retry_if_exception_type(openai.RateLimitError))
    def call() -> None:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as client:
            client.chat.completions.create(model="m", messages=BODY["messages"])  # type: ignore[arg-type]

    with pytest.raises(openai.RateLimitError):
        call()
    return openai.RateLimitError


@pytest.mark.parametrize("wrapper, per_try", [
    (_tenacity_httpx, 3),  # raw httpx: llmshim's 3 attempts under each of the user's 2 tries
    (_backoff_requests, 3),
    (_tenacity_openai, 1),  # the SDK marks its attempts: llmshim defers to it, even at max_retries=0
])
def test_user_retry_wrappers_multiply_by_a_bounded_factor_and_see_the_library_exception(
        server: FakeLLMServer, installed: Callable[..., object], records: list[llmshim.CallRecord],
        wrapper: Callable[[FakeLLMServer], type[BaseException]], per_try: int) -> None:
    installed(retry_mode="auto", retry_max_delay="0")
    _always_limited(server)
    wrapper(server)
    assert len(server.received) == 2 * per_try
    failed = [r for r in records if r.event == "call_failed"]
    assert [(r.status, r.outcome) for r in failed] == [(429, "error")] * 2  # one failed call per user try


OTEL_UNINSTALL = COMMON + """
import httpx, requests, requests.adapters, aiohttp, aiohttp.client
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
exporter = InMemorySpanExporter()
provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
OWNERS = [httpx.Client, httpx.AsyncClient, httpx.HTTPTransport, httpx.AsyncHTTPTransport,
          requests.Session, requests.adapters.HTTPAdapter, aiohttp.client.ClientSession]
def snapshot():  # every attribute of every class either tool patches, by identity
    return {f"{o.__name__}.{k}": id(v) for o in OWNERS for k, v in vars(o).items()}
def otel_on():
    HTTPXClientInstrumentor().instrument(); RequestsInstrumentor().instrument()
def otel_off():
    HTTPXClientInstrumentor().uninstrument(); RequestsInstrumentor().uninstrument()
BODY = {"model": "m", "messages": [{"role": "user", "content": "a"}], "stream": False}
def step(name):  # one call per library; which spans and llmshim records it made
    exporter.clear(); seen.clear()
    answers = [requests.post(server.url + "/api/chat", json=BODY, timeout=5).json()["message"]["content"],
               httpx.post(server.url + "/api/chat", json=BODY).json()["message"]["content"]]
    async def go():
        async with httpx.AsyncClient() as c:
            return (await c.post(server.url + "/api/chat", json=BODY)).json()["message"]["content"]
    answers.append(asyncio.run(go()))
    assert answers == ["Echo: a"] * 3, answers
    spans = sorted(s.instrumentation_scope.name.rsplit(".", 1)[-1] for s in exporter.get_finished_spans())
    return [name, spans, len(seen)]
genuine = snapshot()
steps = []
otel_on(); llmshim.install()
steps.append(step("both, otel first"))
llmshim.uninstall()  # while OTel is instrumented: OTel goes on alone
steps.append(step("otel alone"))
otel_off()
steps.append(step("neither"))
steps.append(["restored", snapshot() == genuine])
llmshim.install(); otel_on()  # each again, the other order
steps.append(step("both, llmshim first"))
otel_off()  # OTel out from under llmshim: llmshim goes on alone
steps.append(step("llmshim alone"))
llmshim.uninstall()
steps.append(["restored", snapshot() == genuine])
server.stop()
print(json.dumps(steps))
"""


def test_opentelemetry_uninstrument_and_uninstall_in_either_order_restore_every_attribute() -> None:
    """OpenTelemetry's httpx and requests instrumentations and llmshim, each taken out while the other
    stays (test_install.py takes both out together): the one left keeps working alone, plain calls
    work after both, every attribute of the patched classes is the genuine one again, and both go
    back in, in the other order."""
    steps = run_clean(OTEL_UNINSTALL, env={"LLMSHIM_CACHE": "off"})
    both = ["httpx", "httpx", "llmshim", "llmshim", "llmshim", "requests"]  # 3 HTTP spans, 3 GenAI spans
    assert steps == [
        ["both, otel first", both, 3],
        ["otel alone", ["httpx", "httpx", "requests"], 0],
        ["neither", [], 0],
        ["restored", True],
        ["both, llmshim first", both, 3],
        ["llmshim alone", ["llmshim", "llmshim", "llmshim"], 3],
        ["restored", True],
    ]


OTEL_AIOHTTP = COMMON + """
import aiohttp, aiohttp.client
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
exporter = InMemorySpanExporter()
provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
def snapshot():
    return {k: id(v) for k, v in vars(aiohttp.client.ClientSession).items()}
BODY = {"model": "m", "messages": [{"role": "user", "content": "a b"}]}  # Ollama streams by default
def step(name):
    exporter.clear(); seen.clear()
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/api/chat", json=dict(BODY, stream=False)) as r:
                plain = (await r.json())["message"]["content"]
            async with s.post(server.url + "/api/chat", json=BODY) as r:
                lines = [json.loads(line)["message"]["content"] async for line in r.content if line.strip()]
        return plain, lines
    answers = asyncio.run(go())
    spans = sorted(s.instrumentation_scope.name.rsplit(".", 1)[-1] for s in exporter.get_finished_spans())
    return [name, answers, spans, len(seen)]
genuine = snapshot()
steps = []
AioHttpClientInstrumentor().instrument(); llmshim.install()
steps.append(step("both, otel first"))
llmshim.uninstall()
steps.append(step("otel alone"))
AioHttpClientInstrumentor().uninstrument()
steps.append(["restored", snapshot() == genuine])
llmshim.install(); AioHttpClientInstrumentor().instrument()
steps.append(step("both, llmshim first"))
AioHttpClientInstrumentor().uninstrument()
steps.append(step("llmshim alone"))
llmshim.uninstall()
steps.append(["restored", snapshot() == genuine])
server.stop()
print(json.dumps(steps))
"""


def test_opentelemetry_aiohttp_client_instrumentation_in_both_orders() -> None:
    """The same for OpenTelemetry's aiohttp-client instrumentation (trace hooks on every session),
    plain and streamed NDJSON reads. Skipped in CI: its latest release (0.66b1) pins
    opentelemetry-instrumentation 0.66b1 against the 0.66b2 the other instrumentations need."""
    import importlib.util

    if importlib.util.find_spec("opentelemetry.instrumentation.aiohttp_client") is None:
        pytest.skip("opentelemetry-instrumentation-aiohttp-client is not installed (its pins conflict)")
    steps = run_clean(OTEL_AIOHTTP, env={"LLMSHIM_CACHE": "off"})
    answers = ["Echo: a b", ["Echo:", " a", " b", ""]]
    assert steps == [
        ["both, otel first", answers, ["aiohttp_client", "aiohttp_client", "llmshim", "llmshim"], 2],
        ["otel alone", answers, ["aiohttp_client", "aiohttp_client"], 0],
        ["restored", True],
        ["both, llmshim first", answers, ["aiohttp_client", "aiohttp_client", "llmshim", "llmshim"], 2],
        ["llmshim alone", answers, ["llmshim", "llmshim"], 2],
        ["restored", True],
    ]


class _Responses:
    """``responses``: mock.patch of ``requests.adapters.HTTPAdapter.send``; calls through requests."""

    def __init__(self, server: FakeLLMServer) -> None:
        import requests

        responses = pytest.importorskip("responses")
        self.owner, self.attribute, self.url = requests.adapters.HTTPAdapter, "send", server.url + "/api/chat"
        self.mock = responses.RequestsMock(assert_all_requests_are_fired=False)
        self.mock.add(responses.POST, self.url, json={"message": {"content": "mocked"}})
        self.post = lambda body: requests.post(self.url, json=body, timeout=5).json()

    def start(self) -> None:
        self.mock.start()

    def stop(self) -> None:
        self.mock.stop()


class _MockHttpx(_Responses):
    """``unittest.mock.patch.object`` of ``httpx.Client._send_single_request``; calls through httpx."""

    def __init__(self, server: FakeLLMServer) -> None:
        from unittest import mock

        import httpx

        self.owner, self.attribute, self.url = httpx.Client, "_send_single_request", server.url + "/api/chat"
        self.mock = mock.patch.object(httpx.Client, "_send_single_request", new=lambda client, request: httpx.Response(
            200, json={"message": {"content": "mocked"}}, request=request))
        self.post = lambda body: httpx.post(self.url, json=body).json()


@pytest.mark.parametrize("then", ["uninstall-again", "install-and-uninstall"])
@pytest.mark.parametrize("tool", [_Responses, _MockHttpx])
def test_a_wrapper_left_under_another_tool_is_removed_once_that_tool_is_gone(
        server: FakeLLMServer, tool: type[_Responses], then: str) -> None:
    """Another tool patching llmshim's own attribute after install() (``responses``, a mock):
    uninstall() leaves llmshim's replacement under it, as promised, and the tool's stop() puts
    that replacement back. Found: it then stayed for good; no later uninstall() ever restored the
    genuine method. Now the next uninstall(), or install() then uninstall(), peels it off."""
    other = tool(server)
    genuine = vars(other.owner)[other.attribute]
    body = {"model": "m", "messages": [{"role": "user", "content": "a"}], "stream": False}

    def call() -> str:
        return str(other.post(body)["message"]["content"])

    llmshim.install()
    other.start()
    try:
        llmshim.uninstall()  # under the other tool: llmshim's replacement stays beneath it
        assert vars(other.owner)[other.attribute] is not genuine
        assert call() == "mocked"
        llmshim.install()  # another round under the other tool
        llmshim.uninstall()
        assert call() == "mocked"
    finally:
        other.stop()
    assert vars(other.owner)[other.attribute] is not genuine  # llmshim's, put back by the tool
    assert call() == "Echo: a"  # a pass-through
    if then == "install-and-uninstall":
        llmshim.install()
        assert call() == "Echo: a"
    llmshim.uninstall()
    assert vars(other.owner)[other.attribute] is genuine
    assert call() == "Echo: a" and len(server.received) == 2 + (then == "install-and-uninstall")


STREAMED = {"model": "m", "messages": [{"role": "user", "content": "one two three four"}], "stream": True}


def _cut_stream_errors(server: FakeLLMServer) -> dict[str, str]:
    """The exception each library raises for a stream cut after two pieces (a TCP reset)."""
    import aiohttp
    import httpx
    import openai
    import requests

    def sdk() -> None:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as c:
            list(c.chat.completions.create(model="m", messages=STREAMED["messages"], stream=True))

    def raw_httpx() -> None:
        with httpx.stream("POST", server.openai_base_url + "/chat/completions", json=STREAMED) as r:
            list(r.iter_lines())

    def raw_requests() -> None:
        with requests.post(server.openai_base_url + "/chat/completions", json=STREAMED, stream=True, timeout=5) as r:
            list(r.iter_lines())

    def raw_aiohttp() -> None:
        async def go() -> None:
            async with aiohttp.ClientSession() as s, s.post(server.openai_base_url + "/chat/completions",
                                                            json=STREAMED) as r:
                async for _ in r.content:
                    pass
        asyncio.run(go())

    errors = {}
    for name, read in [("openai", sdk), ("httpx", raw_httpx), ("requests", raw_requests), ("aiohttp", raw_aiohttp)]:
        server.inject(Fault(reset="after_chunks", after_chunks=2))
        try:
            read()
            errors[name] = "no error"
        except Exception as e:  # the type is what is compared
            errors[name] = f"{type(e).__module__}.{type(e).__qualname__}"
    return errors


def test_a_stream_cut_midway_raises_what_the_library_raises_and_a_user_retry_gets_it_whole(
        server: FakeLLMServer, installed_cached: Callable[..., object], records: list[llmshim.CallRecord]) -> None:
    """What a user's ``retry_if_exception_type`` is written against: the same exception type with
    and without llmshim for a stream cut mid-way (llmshim never replays it), and tenacity retrying
    the whole read gets the whole answer once, no chunk doubled; the cut answer was not stored."""
    import openai
    tenacity = pytest.importorskip("tenacity")

    without = _cut_stream_errors(server)
    installed_cached(retry_mode="auto", retry_max_delay="0")
    assert _cut_stream_errors(server) == without
    assert without["openai"] == "openai.APIConnectionError"
    server.reset()
    server.inject(Fault(reset="after_chunks", after_chunks=2))

    @tenacity.retry(stop=tenacity.stop_after_attempt(3), reraise=True,
                    retry=tenacity.retry_if_exception_type(openai.APIConnectionError))
    def read_whole() -> list[str | None]:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0) as c:
            return [x.choices[0].delta.content for x in
                    c.chat.completions.create(model="m", messages=STREAMED["messages"], stream=True) if x.choices]

    whole = ["", "Echo:", " one", " two", " three", " four", None]
    assert read_whole() == whole
    assert read_whole() == whole  # a hit: the whole answer of the second try, not the cut one
    assert len(server.received) == 2
    done = [(r.event, r.cache_hit) for r in records[-3:] if r.event != "call_started"]
    assert done == [("call_completed", False), ("call_completed", True)]
