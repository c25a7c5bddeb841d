"""Secrets are masked everywhere llmshim prints or records.

A secret here is two random marker words (any alphabet) around a middle that may hold every
character URLs treat specially; a test asserts that neither marker appears, so a partial leak (the
scrub stopping at a special character) fails too. The secret goes into the settings, request URLs
and exception texts; the places checked are ``status()``, ``repr(Settings)``, ``ConfigError``, the
``llmshim status`` / ``doctor`` / ``run`` output, span attributes/events/status (real OTel SDK),
CallRecords, log records, the stats file and pytest-plugin cassettes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llmshim
from conftest import ROOT
from llmshim import config, redact
from llmshim.testing import Answer, FakeLLMServer

with warnings.catch_warnings():  # see test_config_hardening: Hypothesis' failure report imports libcst
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

pytest_plugins = ["pytester"]

SPECIAL = ":/?#[]@!$&'()*+,;=% \"<>\\`{}|^~\t"
MARKER = st.text(st.characters(categories=["L", "Nd"]), min_size=8, max_size=14)
MIDDLE = st.text(st.sampled_from(SPECIAL) | st.characters(categories=["L", "N", "P", "S"]), max_size=8)
HOST = st.from_regex(r"[a-z][a-z0-9-]{0,12}(\.[a-z]{2,6}){0,2}", fullmatch=True)
PORT = st.integers(min_value=1, max_value=65535)


@st.composite
def secrets(draw: st.DrawFn) -> tuple[str, str, str]:
    """(secret, first marker, last marker); the prefixes keep a marker from being an ordinary word."""
    first, last = "Zq" + draw(MARKER), "Xj" + draw(MARKER)
    assume(first != last and first not in last and last not in first)
    return first + draw(MIDDLE) + last, first, last


def leaked(text: str, secret: tuple[str, str, str]) -> bool:
    full, first, last = secret
    return any(part in text for part in (full, quote(full, safe=""), first, last))


# -- the pure functions ------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(secret=secrets(), user=st.sampled_from(["", "default", "user"]), host=HOST, port=PORT,
       scheme=st.sampled_from(["redis://", "rediss://", "unix://", "reddis://", "redis:/", "redis:", "REDIS://",
                               "http://", "redis+sentinel://", ""]),
       encode=st.booleans(), tail=st.sampled_from(["/0", "", "/1?ssl_cert_reqs=none", "?db=2"]))
def test_a_setting_url_never_shows_its_password(secret: tuple[str, str, str], user: str, host: str, port: int,
                                                scheme: str, encode: bool, tail: str) -> None:
    password = quote(secret[0], safe="") if encode else secret[0]
    value = f"{scheme}{user}:{password}@{host}:{port}{tail}"
    shown = redact.scrub_setting_url(value)
    assert not leaked(shown, secret), shown
    assert f"{host}:{port}" in shown  # what helps debugging stays


@settings(max_examples=300, deadline=None)
@given(secret=secrets(), host=HOST, port=PORT, name=st.text(st.characters(categories=["L", "Nd"]), min_size=1,
                                                             max_size=10),
       path=st.sampled_from(["/v1/chat/completions", "/api/chat", "/v1beta/models/gemini:generateContent",
                             "/v1/projects/p/models/claude@2024:rawPredict", "/"]))
def test_a_request_url_keeps_host_and_path_and_masks_the_rest(secret: tuple[str, str, str], host: str, port: int,
                                                               name: str, path: str) -> None:
    assume(not leaked(name, secret))
    url = f"https://u:{quote(secret[0], safe='')}@{host}:{port}{path}?{quote(name)}={quote(secret[0], safe='')}"
    for shown in (redact.scrub_url(url), redact.public_url(url), redact.scrub_text(f"error at {url}: refused")):
        assert not leaked(shown, secret), shown
        assert f"{host}:{port}{path}" in shown


TEMPLATES = [
    "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /v1/chat?{name}={s} (Caused by X)",
    "url='http://127.0.0.1:9/v1/chat?a=1&{name}={s}'",
    "{{'api_key': '{s}', 'model': 'm'}}",
    '{{"Authorization": "Bearer {s}"}}',
    "Authorization: Bearer {s}",
    "('x-api-key', '{s}')",
    "x-goog-api-key: {s}",
    "password={s} user=x",
    "access_token={s}&expires=5",
    "Incorrect API key provided: sk-{s}",
    "redis://:{s}@cache-host:6379/0 failed",
    "rediss://default:{s}@cache-host:6380 timed out",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret=secrets().filter(lambda s: not any(c in s[0] for c in " \t\"'<>`&;,)]}")),
       template=st.sampled_from(TEMPLATES), name=st.sampled_from(["key", "api_key", "sig", "token", "q", "x"]),
       before=st.text(max_size=20), after=st.text(max_size=20))
def test_free_text_never_shows_a_credential(secret: tuple[str, str, str], template: str, name: str, before: str,
                                            after: str) -> None:
    value = (quote(secret[0], safe="") if "://" in template  # URLs are percent-encoded
             else secret[1] + secret[2] if "sk-" in template else secret[0])  # key shapes are word characters
    body = template.format(s=value, name=name)
    assume(not leaked(before + " " + after, secret))
    shown = redact.scrub_text(f"{before} {body} {after}")
    assert not leaked(shown, secret), shown
    assert redact.scrub_text(shown) == shown  # idempotent


@pytest.mark.parametrize("name", ["Authorization", "proxy-authorization", "x-api-key", "api-key", "X-Goog-Api-Key",
                                  "cookie", "set-cookie", "x-amz-security-token", "x-auth-token", "anthropic-api-key"])
def test_credential_headers_are_recognised(name: str) -> None:
    assert redact.is_secret_header(name)


@pytest.mark.parametrize("name", ["content-type", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
                                  "openai-organization", "x-request-id", "anthropic-ratelimit-input-tokens-limit"])
def test_ordinary_headers_are_kept(name: str) -> None:
    assert not redact.is_secret_header(name)


# -- settings: status(), repr, ConfigError -------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(secret=secrets(), host=HOST, port=PORT, encode=st.booleans(),
       env=st.sampled_from(["LLMSHIM_CACHE_URL", "LLMSHIM_RATELIMIT_STORE"]),
       scheme=st.sampled_from(["redis://", "rediss://", "reddis://", "redis:/", "http://", "sqlite://", ""]))
def test_settings_display_and_errors_never_show_the_password(secret: tuple[str, str, str], host: str, port: int,
                                                             encode: bool, env: str, scheme: str) -> None:
    password = quote(secret[0], safe="") if encode else secret[0]
    value = f"{scheme}user:{password}@{host}:{port}/0"
    try:
        loaded = config.load({env: value})
    except config.ConfigError as exc:
        assert env in str(exc) and not leaked(str(exc), secret), str(exc)
        return
    shown = json.dumps(loaded.masked(), ensure_ascii=False) + repr(loaded)
    assert not leaked(shown, secret), shown
    assert host in shown


def test_status_masks_the_password_of_both_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_CACHE_URL", "redis://default:Pa55w%40rd-Zebra@cache-host:6379/0")
    monkeypatch.setenv("LLMSHIM_RATELIMIT_STORE", "rediss://:Other-Secret-Quokka@limits-host:6380/1")
    llmshim.install()
    try:
        shown = json.dumps(llmshim.status())
    finally:
        llmshim.uninstall()
    assert "Zebra" not in shown and "Quokka" not in shown and "Pa55w" not in shown
    assert "redis://***@cache-host:6379/0" in shown and "rediss://***@limits-host:6380/1" in shown


# -- the command line ------------------------------------------------------------------------------------

CLI_SECRETS = ["Sw0rdfish-Marlin", "p@ss:w/rd?#Marlin", "пароль-Марлин", "Marlin%2F%40x"]


def _cli(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(extra, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llmshim", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _assert_hidden(done: subprocess.CompletedProcess[str], secret: str) -> None:
    text = done.stdout + done.stderr
    for part in {secret, quote(secret, safe=""), "Marlin", "Марлин", "Sw0rdfish"}:
        assert part not in text, text


@pytest.mark.parametrize("secret", CLI_SECRETS)
def test_status_and_doctor_output_never_show_the_password(secret: str, tmp_path: Path) -> None:
    password = quote(secret, safe="")
    env = {"LLMSHIM_CACHE_URL": f"redis://default:{password}@127.0.0.1:9/0", "LLMSHIM_CACHE": "on",
           "LLMSHIM_RATELIMIT_STORE": f"redis://:{password}@127.0.0.1:9/1", "LLMSHIM_RPM": "60",
           "LLMSHIM_CACHE_PATH": str(tmp_path / "c.sqlite3")}
    status = _cli(["status"], **env)
    assert status.returncode == 0, status.stderr
    assert "redis://***@127.0.0.1:9/0" in status.stdout
    _assert_hidden(status, secret)
    doctor = _cli(["doctor"], **env)
    assert doctor.returncode == 1 and "BROKEN: redis unreachable" in doctor.stdout, doctor.stdout
    _assert_hidden(doctor, secret)


@pytest.mark.parametrize("secret", CLI_SECRETS[:2])
@pytest.mark.parametrize("command", ["status", "doctor", "run"])
def test_a_mistyped_url_exits_2_without_echoing_the_password(command: str, secret: str) -> None:
    args = ["run", "--", sys.executable, "-c", "print('should not run')"] if command == "run" else [command]
    for env, value in (("LLMSHIM_CACHE_URL", f"reddis://user:{secret}@cache-host:6379/0"),
                       ("LLMSHIM_RATELIMIT_STORE", f"redis:/:{secret}@limits-host/0")):
        done = _cli(args, **{env: value})
        assert done.returncode == 2 and env in done.stdout + done.stderr, (done.stdout, done.stderr)
        _assert_hidden(done, secret)


# -- a call: spans, records, logs, stats ---------------------------------------------------------------

@pytest.fixture
def spans(installed: Callable[..., object]) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    installed(tracer_provider=provider)
    return exporter


def _span_text(exporter: InMemorySpanExporter) -> str:
    out = []
    for span in exporter.get_finished_spans():
        out.append(json.dumps({"name": span.name, "attributes": dict(span.attributes or {}),
                               "status": span.status.description,
                               "events": [[e.name, dict(e.attributes or {})] for e in span.events]},
                              default=str, ensure_ascii=False))
    return "\n".join(out)


SECRET_KEY = "Qz9-Kestrel-\u043a\u043b\u044e\u0447-7Vb"  # Latin and Cyrillic: "ключ"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_a_connection_error_carries_no_key_into_span_records_logs_or_stats(
        library: str, spans: InMemorySpanExporter, records: list[llmshim.CallRecord],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    llmshim.stats(reset=True)
    from llmshim.policies.stats import STATS

    STATS.write_to(str(stats_file))
    url = (f"http://user:Kestrel-pass@127.0.0.1:{_closed_port()}/v1/chat/completions"
           f"?key={quote(SECRET_KEY, safe='')}&api-version=2024")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level(logging.DEBUG, logger="llmshim"):
        if library == "requests":
            with pytest.raises(requests.ConnectionError) as caught:
                requests.post(url, json=body, timeout=5)
        else:
            with pytest.raises(httpx.ConnectError) as caught:
                httpx.post(url, json=body, timeout=5)
    STATS.write()
    STATS.write_to(None)
    assert quote(SECRET_KEY, safe="") in str(caught.value) or library == "httpx"  # the raw text does carry it
    text = _span_text(spans)
    assert "Error" in text and "error.type" in text  # the span is there and marked
    everything = [text, repr(records), stats_file.read_text()]
    everything += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    for part in everything:
        assert "Kestrel" not in part and "\u043a\u043b\u044e\u0447" not in part, part
    assert [r.event for r in records] == ["call_started", "call_failed"]


def test_a_span_records_the_scrubbed_exception(spans: InMemorySpanExporter) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1/chat/completions?key={quote(SECRET_KEY, safe='')}"
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json={"model": "m", "messages": []}, timeout=5)
    (span,) = spans.get_finished_spans()
    assert span.status.description is not None and "ConnectionError" in span.status.description
    assert "key=***" in span.status.description  # scrubbed, not dropped: the shape of the error stays
    (event,) = [e for e in span.events if e.name == "exception"]
    attributes = dict(event.attributes or {})
    assert attributes["exception.type"].endswith("ConnectionError")
    assert "key=***" in str(attributes["exception.message"]) and "Kestrel" not in json.dumps(attributes)


def test_log_records_are_scrubbed_message_arguments_and_traceback(
        server: FakeLLMServer, shim: None, caplog: pytest.LogCaptureFixture) -> None:
    def leaky(record: llmshim.CallRecord) -> None:
        raise RuntimeError(f"cannot reach redis://:{SECRET_KEY}@cache-host:6379/0 (token={SECRET_KEY})")

    llmshim.on("call_completed", leaky)
    stream = __import__("io").StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("llmshim").addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="llmshim"):
            requests.post(server.url + "/api/chat", json={"model": "m", "messages": [], "stream": False}, timeout=5)
    finally:
        llmshim.off("call_completed", leaky)
        logging.getLogger("llmshim").removeHandler(handler)
    assert any("RuntimeError" in (r.exc_text or "") for r in caplog.records)
    for text in [stream.getvalue(), *(r.getMessage() + (r.exc_text or "") for r in caplog.records)]:
        assert "Kestrel" not in text and "\u043a\u043b\u044e\u0447" not in text
    assert "redis://***@cache-host:6379/0" in stream.getvalue()


def test_the_redacting_filter_scrubs_arguments_and_never_raises() -> None:
    record = logging.LogRecord("llmshim", logging.WARNING, __file__, 1, "failed (%s: %s)",
                               ("ConnectionError", f"http://h/x?key={SECRET_KEY}"), None)
    assert redact.LOG_FILTER.filter(record) is True
    assert "Kestrel" not in record.getMessage() and "key=***" in record.getMessage()

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    broken = logging.LogRecord("llmshim", logging.WARNING, __file__, 1, "%s %d", (Unprintable(),), None)
    assert redact.LOG_FILTER.filter(broken) is True
    assert "withheld" in broken.getMessage()


# -- cassettes -------------------------------------------------------------------------------------------

CASSETTE_TEST = """
import requests
URL = {url!r}
KEY = {key!r}

def test_chat(llmshim_calls):
    reply = requests.post(URL + "/v1/chat/completions?key=" + KEY, json={{"model": "m", "messages": []}},
                          headers={{"x-api-key": KEY}}, timeout=5)
    assert reply.status_code == 200
"""


def test_cassettes_carry_no_key_from_url_or_headers(pytester: pytest.Pytester,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # this tree's plugin
    from llmshim.testing.responses import answer_for

    def with_echoed_key(received: Any) -> Answer:
        path = received.path.split("?", 1)[0]
        answer = answer_for(received.method, path, json.loads(received.body))
        answer.headers = [*answer.headers, ("x-api-key", "Kestrel-header-echo"), ("set-cookie", "s=Kestrel"),
                          ("x-ratelimit-remaining-tokens", "999")]
        return answer

    with FakeLLMServer(responder=with_echoed_key) as server:
        pytester.makepyfile(test_app=CASSETTE_TEST.format(url=server.url, key=quote(SECRET_KEY, safe="")))
        pytester.runpytest_subprocess("--llmshim-record", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    text = (pytester.path / "cassettes" / "test_app" / "test_chat.json").read_text()
    assert "Kestrel" not in text and quote(SECRET_KEY, safe="") not in text, text
    assert "x-ratelimit-remaining-tokens" in text  # ordinary headers are kept for the replay


def test_a_failing_redis_cache_warns_without_its_password(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LLMSHIM_CACHE", "on")
    monkeypatch.setenv("LLMSHIM_CACHE_URL", f"redis://default:{quote(SECRET_KEY, safe='')}@127.0.0.1:"
                                            f"{_closed_port()}/0")
    with caplog.at_level(logging.WARNING, logger="llmshim"):
        llmshim.install()
        try:
            reply = requests.post(server.url + "/api/chat", json={"model": "m", "messages": [], "stream": False},
                                  timeout=5)
        finally:
            llmshim.uninstall()
    assert reply.json()["done"] is True  # fail open: the call went on without the cache
    warnings_seen = [r.getMessage() for r in caplog.records if r.name == "llmshim"]
    assert any("cache" in m and "failed" in m for m in warnings_seen), warnings_seen
    assert not any("Kestrel" in m or "\u043a\u043b\u044e\u0447" in m for m in warnings_seen)


def test_a_credential_echoed_in_a_response_header_is_never_written_to_the_cache(tmp_path: Path) -> None:
    import requests

    from llmshim.store.cache_sqlite import SQLiteStore
    from llmshim.testing import FakeLLMServer, responses

    def echoing(received: Any) -> responses.Answer:
        answer = responses.answer_for(received.method, received.path, received.json())
        answer.headers = [*answer.headers, ("x-gateway-api-key", "sk-echoedSECRET"), ("x-session-token", "tok1")]
        return answer

    with FakeLLMServer(responder=echoing) as server:
        llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
            requests.post(server.openai_base_url + "/chat/completions", json=body, timeout=5)
        finally:
            llmshim.uninstall()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("c.sqlite3"))
    assert b"echoedSECRET" not in raw and b"tok1" not in raw
    assert SQLiteStore(str(tmp_path / "c.sqlite3")).stats()["entries"] == 1


_BODY_SECRETS = {"api_key": "sk-proj-BodyKey0123456789abcdef", "access_token": "ya29.BodyToken-0123456789",
                 "password": "hunter2-Body-Password", "client_secret": "BodyClientSecret-0123456789"}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_credential_in_the_request_body_never_reaches_the_cache(backend: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """OpenAI-compatible proxies (LiteLLM and others) take ``api_key`` in the body, some SDKs pass
    tokens in ``metadata``: the entry's description of the request masks every credential-named
    field, at any depth; the answer is still cached, and still keyed by the body as sent (two
    keys, two entries)."""
    import requests

    from llmshim.testing import FakeLLMServer

    settings: dict[str, str] = {"cache": "on", "cache_path": str(tmp_path / "cache.sqlite3")}
    raw: Any = None
    if backend == "redis":
        redis_server = request.getfixturevalue("redis_server")
        settings.update(cache_url=redis_server.url, redis_timeout="10s")
        import redis

        raw = redis.Redis.from_url(redis_server.url)
    with FakeLLMServer() as server:
        llmshim.install(**settings)
        try:
            for n in range(2):
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "api_key": _BODY_SECRETS["api_key"] + str(n),
                        "metadata": {"auth": {"access_token": _BODY_SECRETS["access_token"]}},
                        "extra": [{"password": _BODY_SECRETS["password"],
                                   "client_secret": _BODY_SECRETS["client_secret"]}]}
                for _ in range(2):
                    answer = requests.post(server.openai_base_url + "/chat/completions", json=body, timeout=10)
                    assert answer.status_code == 200
        finally:
            llmshim.uninstall()
        assert len(server.received) == 2  # each body's repeat was a hit
    kept = b"".join(path.read_bytes() for path in tmp_path.glob("cache.sqlite3*"))
    if raw is not None:
        kept += b"".join(b"".join(raw.hgetall(k).values()) for k in raw.keys("llmshim:cache:*")
                         if raw.type(k) == b"hash")  # the fields as stored (DUMP may compress them)
        raw.close()
    assert kept  # something was stored to look at
    for secret in _BODY_SECRETS.values():
        assert secret.encode() not in kept, secret
