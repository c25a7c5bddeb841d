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
    full_env.update({"PYTHONPATH": str(ROOT), "LLMSHIM_RETRY_MAX_DELAY": "0", "LANGFUSE_TRACING_ENABLED": "false"})
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
