"""Dialects are the only code that knows the wire (issue 13, item 4).

Every registered dialect answers the contract's hooks for representative bodies; what it computes
at recognition never raises on any JSON; no module outside ``llmshim/dialects`` names a route, a
wire field or a provider's header; and a dialect added the way a contributor would (one new module,
one registry line) is cached, counted, traced and has its stream read, with no edit elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
import llmshim.dialects
from llmshim.call import WireRequest
from llmshim.dialects import DIALECTS, BodyParser, Dialect, ServerLimits, detect

ROOT = Path(__file__).resolve().parent.parent


def _wire(path: str, body: Any, url: str = "http://h:1") -> WireRequest:
    return WireRequest("POST", url + path, (), json.dumps(body).encode())


# One representative request per dialect, and what each hook answers for it. A dialect added to the
# registry without a row here fails test_every_registered_dialect_has_a_representative.
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
GEMINI_CONTENTS = [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "yo"}]}]
GEMINI_SYSTEM = {"parts": [{"text": "be brief"}]}
GEMINI_SAMPLE: dict[str, Any] = {  # sampling sits in generationConfig; top-level fields are not the wire's
    "path": "/v1beta/models/gemini-2.0-flash:generateContent",
    "body": {"contents": GEMINI_CONTENTS, "systemInstruction": GEMINI_SYSTEM, "max_tokens": 9, "temperature": 1,
             "generationConfig": {"maxOutputTokens": 7, "temperature": 0.5, "seed": 3}},
    "max_output_tokens": 7, "temperature": 0.5, "seed": 3,
    "input_chars": len(json.dumps([GEMINI_SYSTEM, GEMINI_CONTENTS])),
    "input_messages": [{"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
                       {"role": "user", "parts": [{"type": "text", "content": "hi"}]},
                       {"role": "assistant", "parts": [{"type": "text", "content": "yo"}]}],
    "framing": {"text/event-stream": "sse", "application/json; charset=UTF-8": "json", None: "json"},
    "quota": (429, json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}).encode(),
        "RESOURCE_EXHAUSTED (per day)"),
    "loading": None, "health_url": None, "limits": ServerLimits(),
}
SAMPLES: dict[str, dict[str, Any]] = {
    "openai": {
        "path": "/v1/chat/completions",
        "body": {"model": "m", "messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 7,
                 "temperature": 0.5, "seed": 3, "options": {"seed": 1, "num_predict": 2}},
        "max_output_tokens": 7, "temperature": 0.5, "seed": 3, "input_chars": len(json.dumps([MESSAGES])),
        "input_messages": [{"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
                           {"role": "user", "parts": [{"type": "text", "content": "hi"}]}],
        "framing": {"text/event-stream; charset=utf-8": "sse", "application/json": "json", None: "json"},
        "quota": (429, b'{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}',
                  "insufficient_quota"),
        "loading": (503, b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}'),
        "health_url": "http://h:1/health",
        "limits": ServerLimits(requests_limit=60.0, requests_remaining=0.0, requests_reset=1.5,
                               tokens_limit=1000.0, tokens_remaining=10.0, tokens_reset=360.0),
    },
    "ollama": {
        "path": "/api/chat",  # top-level temperature/seed/max_tokens: Ollama ignores them, so does its dialect
        "body": {"model": "m", "messages": MESSAGES, "temperature": 0, "seed": 4, "max_tokens": 9,
                 "options": {"num_predict": 5, "temperature": 0.25, "seed": 1}},
        "max_output_tokens": 5, "temperature": 0.25, "seed": 1, "input_chars": len(json.dumps([MESSAGES])),
        "input_messages": [{"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
                           {"role": "user", "parts": [{"type": "text", "content": "hi"}]}],
        # streamed by default: NDJSON whatever a proxy claims, except an explicit JSON (an error)
        "framing": {"application/x-ndjson": "ndjson", None: "ndjson", "text/plain": "ndjson",
                    "application/json": "json", "text/event-stream": "sse"},
        "quota": None, "loading": None, "health_url": None, "limits": ServerLimits(),
    },
    "llama_cpp": {
        "path": "/completion",
        "body": {"prompt": "p q", "n_predict": 4, "max_tokens": 8, "temperature": 0, "seed": 2, "stream": True},
        "max_output_tokens": 4, "temperature": 0, "seed": 2, "input_chars": len(json.dumps(["p q"])),
        "input_messages": [{"role": "user", "parts": [{"type": "text", "content": "p q"}]}],
        "framing": {"text/event-stream": "sse", "application/json": "json", None: "json"},
        "quota": None,
        "loading": (503, b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}'),
        "health_url": "http://h:1/health", "limits": ServerLimits(),
    },
    "anthropic": {  # no seed on this wire; the system prompt is counted, not a message
        "path": "/v1/messages",
        "body": {"model": "m", "system": "be brief", "messages": MESSAGES[1:], "max_tokens": 9, "temperature": 0.5,
                 "seed": 3, "options": {"num_predict": 2}},
        "max_output_tokens": 9, "temperature": 0.5, "seed": None,
        "input_chars": len(json.dumps([MESSAGES[1:], "be brief"])),
        "input_messages": [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}],
        "framing": {"text/event-stream; charset=utf-8": "sse", "application/json": "json", None: "json"},
        "quota": (429, b'{"type": "error", "error": {"type": "rate_limit_error", "message": "spend limit", '
                       b'"details": {"error_code": "enforced_spend_limit_reached"}}}', "enforced_spend_limit_reached"),
        # its own rate-limit headers (not these x-ratelimit-*): tests/test_anthropic.py
        "loading": None, "health_url": None, "limits": ServerLimits(),
    },
    "gcp.gemini": GEMINI_SAMPLE,
}
RATE_HEADERS = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1.5s", "x-ratelimit-limit-tokens": "1000",
                "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "6m0s"}
NAMES = [dialect.name for dialect in DIALECTS]


def test_every_registered_dialect_has_a_representative() -> None:
    assert sorted(NAMES) == sorted(SAMPLES) and len(set(NAMES)) == len(NAMES)
    assert all(isinstance(dialect, Dialect) for dialect in DIALECTS)


def _recognised(name: str) -> tuple[Dialect, Any, dict[str, Any]]:
    sample = SAMPLES[name]
    found = detect(_wire(sample["path"], sample["body"]))
    assert found is not None and found[0].name == name
    return found[0], found[1], sample


@pytest.mark.parametrize("name", NAMES)
def test_recognition_fills_what_the_policies_read(name: str) -> None:
    _, info, sample = _recognised(name)
    assert info.provider == name
    assert info.max_output_tokens == sample["max_output_tokens"]
    assert info.params["max_tokens"] == info.max_output_tokens  # the span reports what the limiter reserves
    assert info.temperature == sample["temperature"] and info.seed == sample["seed"]
    assert info.input_chars == sample["input_chars"]
    assert info.input_messages == sample["input_messages"]


@pytest.mark.parametrize("name", NAMES)
def test_framing_follows_the_content_type(name: str) -> None:
    dialect, info, sample = _recognised(name)
    for content_type, framing in sample["framing"].items():
        assert dialect.framing(content_type, info) == framing, content_type


@pytest.mark.parametrize("name", NAMES)
def test_quota_loading_and_health_hooks(name: str) -> None:
    dialect, _, sample = _recognised(name)
    request = _wire(sample["path"], sample["body"], url="http://user:pw@h:1")
    other = b'{"error": {"message": "Rate limit reached", "type": "requests"}}'
    assert dialect.quota_exhausted(429, other) is None and dialect.quota_exhausted(200, b"") is None
    if sample["quota"] is None:
        assert not dialect.quota_statuses
    else:
        status, body, code = sample["quota"]
        assert status in dialect.quota_statuses
        assert dialect.quota_exhausted(status, body) == code
        assert dialect.quota_exhausted(500, body) is None  # the code counts only on its status
    assert dialect.loading(503, b"server busy") is False and dialect.loading(200, b"") is False
    if sample["loading"] is None:
        assert not dialect.loading_statuses and not dialect.loading(503, b"Loading model")
    else:
        status, body = sample["loading"]
        assert status in dialect.loading_statuses and dialect.loading(status, body) is True
        assert dialect.loading(500, body) is False
    assert dialect.health_url(request) == sample["health_url"]  # never the user info or the query


@pytest.mark.parametrize("name", NAMES)
def test_server_limits_from_headers(name: str) -> None:
    dialect, _, sample = _recognised(name)
    assert dialect.server_limits(RATE_HEADERS) == sample["limits"]
    assert dialect.server_limits({}) == ServerLimits()
    hostile = {"x-ratelimit-limit-requests": "nan", "x-ratelimit-remaining-requests": "-1",
               "x-ratelimit-reset-requests": "-5", "x-ratelimit-limit-tokens": "inf",
               "x-ratelimit-remaining-tokens": "\u0661\u0662", "x-ratelimit-reset-tokens": "\u0666s"}
    assert dialect.server_limits(hostile) == ServerLimits()  # finite, non-negative ASCII numbers only


@pytest.mark.parametrize("name", NAMES)
def test_hooks_never_raise_on_garbage(name: str) -> None:
    dialect, info, _ = _recognised(name)
    for status in (0, 200, 429, 503, 599):
        for body in (b"", b"\xff\xfe\x00", b"Loading model" * 1000, b"insufficient_quota"):
            dialect.quota_exhausted(status, body)
            dialect.loading(status, body)
    for content_type in ("", ";", "TEXT/EVENT-STREAM ; x", "\x00"):
        assert dialect.framing(content_type, info) in ("sse", "ndjson", "json")
    for url in ("http://[::1]:8080", "https://h", "http://h:1?x=1#y"):
        request = WireRequest("POST", url + "/completion", (), b"{}")
        health = dialect.health_url(request)
        assert health is None or (health.endswith("/health") and "?" not in health and "@" not in health)


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["messages", "prompt", "input", "keep_alive", "prompt_cache_key"]),
                            st.sampled_from([None, "", "x", [], [{"role": "user", "content": "x"}], 0])))
def test_cache_ignored_fields_agree_with_the_key_table(body: dict[str, Any]) -> None:
    """The fields left out of cache keys, per route, are exactly those of the table the key module
    kept before the dialects answered it (so the switch changed no key): a routing hint OpenAI's
    chat never echoes, and Ollama's keep_alive on a call that generates or embeds."""
    table = {("openai", "chat/completions"): {"prompt_cache_key"}, ("ollama", "api/chat"): {"keep_alive"},
             ("ollama", "api/generate"): {"keep_alive"}, ("ollama", "api/embed"): {"keep_alive"},
             ("ollama", "api/embeddings"): {"keep_alive"}}
    work = {"api/chat": "messages", "api/generate": "prompt"}
    for path in ROUTES:
        found = detect(_wire(path, {"model": "m", **body}))
        if found is not None:
            dialect, info = found
            expected = table.get((info.provider, info.endpoint), set())
            if info.provider == "ollama" and info.endpoint in work and not info.body.get(work[info.endpoint]):
                expected = set()  # only loads or unloads the model: keep_alive is the request
            assert dialect.cache_ignored_fields(info) == expected


def test_detect_pre_check_is_derived_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cheap path check is the registered routes: a route no dialect lists is not parsed."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert detect(_wire("/v1/chat/completions", body)) is not None
    monkeypatch.setattr(llmshim.dialects, "DIALECTS", tuple(d for d in DIALECTS if d.name != "openai"))
    assert detect(_wire("/v1/chat/completions", body)) is None
    assert detect(_wire("/api/chat", body)) is not None


# -- no wire knowledge outside the dialects ----------------------------------------------------

#: Modules that still read the wire themselves, and why (none); a module listed here that no
#: longer leaks fails too.
KNOWN_LEAKS: dict[str, str] = {}
ROUTES = sorted({suffix for dialect in DIALECTS for suffix in dialect.suffixes})
ENDPOINTS = [route.lstrip("/") for route in ROUTES if "/" in route.lstrip("/")]  # "embeddings" is an operation too
WIRE_WORDS = re.compile("|".join([
    *(re.escape(f'"{route}"') for route in ROUTES), *(re.escape(f'"{endpoint}"') for endpoint in ENDPOINTS),
    r"x-ratelimit-\w", r'b?"insufficient_quota"', "Loading model", r'"(options|num_predict|n_predict|messages|prompt)"',
    r'"max_(completion|output)_tokens"', r"application/x-ndjson",
]))


def _leaks(path: Path) -> list[str]:
    """Lines of code naming the wire; comments (whole-line or inline) and docstring lines aside."""
    code = (line.split("  #", 1)[0] for line in path.read_text().splitlines())
    return [f"{n}: {line.strip()}" for n, line in enumerate(code, 1)
            if WIRE_WORDS.search(line) and not line.lstrip().startswith("#") and '"""' not in line
            and "``" not in line]


def test_no_module_outside_the_dialects_reads_the_wire() -> None:
    """Code (not docs) outside llmshim/dialects names no route, wire field or provider header.
    The bundled test server, the demo (which speaks to it) and the redaction module (which must
    recognise every header to mask it) are about the wire by purpose."""
    exempt = {"llmshim/demo.py", "llmshim/redact.py"}
    found = {}
    for path in sorted((ROOT / "llmshim").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(("llmshim/dialects/", "llmshim/testing/")) or relative in exempt:
            continue
        leaks = _leaks(path)
        if leaks:
            found[relative] = leaks
    assert sorted(found) == sorted(KNOWN_LEAKS), found


# -- what recognition computes never raises ---------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["model", "messages", "prompt", "input", "content", "temperature", "seed", "max_tokens",
                          "max_completion_tokens", "max_output_tokens", "n_predict", "stream", "input_prefix",
                          "num_predict", "system", "instructions"])
OPTIONS = st.dictionaries(st.sampled_from(["num_predict", "temperature", "seed", "stop"]),
                          st.integers(-2, 50) | JSON, max_size=3)
#: Bodies each route would recognise, under random other fields: so the fields are read, not just the shape.
SHAPES = st.sampled_from([{"model": "m", "messages": []}, {"model": "m", "prompt": "x"}, {"prompt": "x"},
                          {"model": "m", "input": "x"}, {"input_prefix": "a"}, {"content": "x"}, {}])
BODIES = st.builds(lambda extra, options, shape: {**extra, **({"options": options} if options is not None else {}),
                                                  **shape},
                   st.dictionaries(FIELDS, st.integers(-2, 50) | st.booleans() | JSON, max_size=8),
                   st.none() | OPTIONS | JSON, SHAPES)


@settings(max_examples=300, deadline=None)
@given(body=BODIES, path=st.sampled_from(ROUTES))
def test_recognised_fields_never_raise_and_are_well_typed(body: dict[str, Any], path: str) -> None:
    for dialect in DIALECTS:
        try:
            info = dialect.recognise(path, body)
        except Exception as error:  # pragma: no cover - the assertion below names it
            raise AssertionError(f"{dialect.name} raised on {body!r}") from error
        if info is None:
            continue
        assert info.max_output_tokens is None or (type(info.max_output_tokens) is int and info.max_output_tokens > 0)
        assert info.temperature is None or type(info.temperature) in (int, float)
        assert isinstance(info.input_chars, int) and isinstance(info.input_messages, list)
        assert isinstance(info.params, dict)


@settings(max_examples=200, deadline=None)
@given(body=BODIES)
def test_every_max_tokens_field_is_read_as_the_limiter_read_it(body: dict[str, Any]) -> None:
    """Each dialect reads only its own wire's fields; where a field is read, a positive int wins."""
    for path in ROUTES:
        found = detect(_wire(path, body))
        if found is None:
            continue
        info = found[1]
        names = [f for f, attribute in found[0].param_names.items() if attribute == "max_tokens"]
        expected = next((v for v in (info.param_source.get(f) for f in names)
                         if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)
        assert info.max_output_tokens == expected


# -- adding a dialect: one new module, one registry line ---------------------------------------

ACME = '''
"""Acme's wire: POST .../acme/generate {"engine", "text", "limits": {"max_new"}, "sampling": {"temp"}};
streams SSE "token" events ({"t": ...}) and one "end" event with the engine and the token counts."""

from typing import Any

from llmshim.call import CallInfo, ResponseInfo
from llmshim.dialects._base import Dialect

_ROUTES = {"/acme/generate": "text_completion"}


class AcmeDialect(Dialect):
    name = "acme"
    suffixes = tuple(_ROUTES)
    param_names = {"temp": "temperature", "max_new": "max_tokens", "seed": "seed"}
    prompt_fields = ("text",)
    prompt_text_fields = ("text",)
    quota_statuses = frozenset({429})

    def quota_exhausted(self, status: int, body: bytes) -> str | None:
        return "credits_exhausted" if status == 429 and b"no credits" in body else None

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        operation = next((op for route, op in _ROUTES.items() if path.endswith(route)), None)
        if operation is None or not isinstance(body.get("engine"), str) or not isinstance(body.get("text"), str):
            return None
        sampling = {**(body.get("sampling") or {}), **(body.get("limits") or {})}
        return self.call_info(operation=operation, endpoint="acme/generate", model=body["engine"],
                              stream=body.get("stream") is True, body=body, params=sampling)

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if event == "token" or (not info.stream and "text" in message):
            into.add_text(message.get("t", message.get("text")))
        if event == "end" or not info.stream:
            into.model = message.get("engine")
            into.usage.input_tokens, into.usage.output_tokens = message.get("tokens_in"), message.get("tokens_out")
            into.finish_reasons, into.done = ["stop"], True


ACME = AcmeDialect()
'''


class _AcmeServer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.received.append(body)
        words = body["text"].split()
        if body["text"] in ("no credits", "slow down"):  # a 429: out of credits, or just busy
            payload, content_type = json.dumps({"error": body["text"]}).encode(), "application/json"
            self.send_response(429)
            self.send_header("retry-after", "0")
        elif body.get("stream"):
            events = [f'event: token\ndata: {json.dumps({"t": w + " "})}\n\n' for w in words]
            events.append("event: end\ndata: " + json.dumps(
                {"engine": body["engine"], "tokens_in": len(words), "tokens_out": len(words)}) + "\n\n")
            payload, content_type = "".join(events).encode(), "text/event-stream"
        else:
            payload = json.dumps({"engine": body["engine"], "text": body["text"], "tokens_in": len(words),
                                  "tokens_out": len(words)}).encode()
            content_type = "application/json"
        if body["text"] not in ("no credits", "slow down"):
            self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def acme_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Handler", (_AcmeServer,), {"received": received})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", received
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_a_new_dialect_is_one_module_and_one_registry_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, acme_server: tuple[str, list[dict[str, Any]]]) -> None:
    (tmp_path / "acme.py").write_text(ACME)
    spec = importlib.util.spec_from_file_location("acme_dialect", tmp_path / "acme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(llmshim.dialects, "DIALECTS", (*DIALECTS, module.ACME))  # the registry line

    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    url, received = acme_server
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    llmshim.install(cache="on", cache_path=str(tmp_path / "cache.sqlite3"), tracer_provider=tracer_provider,
                    meter_provider=MeterProvider(metric_readers=[reader]))
    body = {"engine": "a1", "text": "one two three", "stream": True, "limits": {"max_new": 5}, "sampling": {"temp": 0}}
    try:
        answers = []
        for _ in range(2):
            with requests.post(url + "/v2/acme/generate", json=body, stream=True, timeout=10) as response:
                answers.append(b"".join(response.iter_content(7)))
                headers = response.headers
    finally:
        llmshim.uninstall()

    assert len(received) == 1 and answers[0] == answers[1]  # the second call came from the cache
    assert headers.get("x-llmshim-cache") is not None
    stats = llmshim.stats()
    assert (stats["total_calls"], stats["completed"], stats["cache_hits"], stats["cache_misses"]) == (2, 2, 1, 1)
    assert (stats["input_tokens"], stats["output_tokens"], stats["tokens_saved"]) == (3, 3, 6)  # a hit spends nothing
    live, hit = (dict(s.attributes or {}) for s in exporter.get_finished_spans()
                 if s.instrumentation_scope.name == "llmshim")
    assert live["gen_ai.provider.name"] == "acme" and live["gen_ai.request.model"] == "a1"
    assert live["gen_ai.request.max_tokens"] == 5 and live["gen_ai.request.temperature"] == 0
    assert (live["gen_ai.usage.input_tokens"], live["gen_ai.usage.output_tokens"]) == (3, 3)
    assert live["gen_ai.response.model"] == "a1" and live["gen_ai.response.finish_reasons"] == ("stop",)
    assert json.loads(live["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "one two three"}]}]
    assert json.loads(live["gen_ai.output.messages"])[0]["parts"][0]["content"] == "one two three "  # the stream, read
    assert hit["llmshim.cache.hit"] is True and hit["llmshim.cache.saved.output_tokens"] == 3
    assert "gen_ai.usage.output_tokens" not in hit


def _acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    (tmp_path / "acme.py").write_text(ACME)
    spec = importlib.util.spec_from_file_location(name, tmp_path / "acme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(llmshim.dialects, "DIALECTS", (*DIALECTS, module.ACME))
    return module


def test_retry_asks_the_new_dialect_whether_a_quota_is_exhausted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, acme_server: tuple[str, list[dict[str, Any]]]) -> None:
    """A 429 is retried, unless the dialect reads it as an exhausted quota: no code in retry names it."""
    _acme(tmp_path, monkeypatch, "acme_dialect_quota")
    url, received = acme_server
    llmshim.install(retry_mode="auto", retry_max_attempts="3", retry_max_delay="0.01")
    try:
        statuses = [requests.post(url + "/acme/generate", json={"engine": "a1", "text": text}, timeout=10).status_code
                    for text in ("no credits", "slow down")]
    finally:
        llmshim.uninstall()
    assert statuses == [429, 429]
    assert [r["text"] for r in received] == ["no credits"] + ["slow down"] * 3


def test_the_cache_reads_sampling_where_the_dialect_puts_it(server: Any, tmp_path: Path) -> None:
    """Ollama's temperature and seed sit in ``options``; top-level ones are ignored by the server,
    so they do not make a call deterministic (cache_nondeterministic=skip)."""
    llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"), cache_nondeterministic="skip")
    try:
        for body in ({"options": {"temperature": 0}}, {"options": {"temperature": 0.8, "seed": 3}},
                     {"temperature": 0}, {"seed": 3}):
            for _ in range(2):
                requests.post(server.url + "/api/generate", timeout=5,
                              json={"model": "m", "prompt": json.dumps(body), "stream": False, **body})
    finally:
        llmshim.uninstall()
    assert len(server.received) == 1 + 1 + 2 + 2


def test_body_parser_reads_a_new_dialect_through_its_framing(tmp_path: Path) -> None:
    (tmp_path / "acme.py").write_text(ACME)
    spec = importlib.util.spec_from_file_location("acme_dialect_2", tmp_path / "acme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    info = module.ACME.recognise("/acme/generate", {"engine": "e", "text": "x", "stream": True})
    parser = BodyParser(module.ACME, info, "text/event-stream", capture=True)
    for piece in (b'event: tok', b'en\ndata: {"t": "x"}\n\nevent: end\ndata: {"engine": "e", "tokens_in": 1,',
                  b' "tokens_out": 1}\n\n'):
        parser.feed(piece)
    result = parser.finish()
    assert (result.done, result.model, result.output, result.usage.output_tokens) == (True, "e", ["x"], 1)
