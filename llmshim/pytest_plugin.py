"""pytest plugin: record every LLM call of a test into a cassette, replay it offline.

    pytest --llmshim-record     # calls go out; each test's calls are written to cassettes/<module>/<test>.json
    pytest --llmshim-replay     # no network: answers come from the cassettes; an unknown request fails the test

Active only when asked (an option, a fixture or the ``llmshim`` marker). Requests are matched by
llmshim's cache key (section 6 of the design: method, URL, dialect, the canonical body minus
noise), with a fixed salt and shared scope, so header noise, whitespace and the API key never break
a replay, and no key is ever written. Cassettes are readable JSON: the redacted request and the
response status, headers (minus credentials and cookies) and body pieces (text, chunk by chunk as
they arrived).

Fixtures: ``llmshim_calls`` (the CallRecords of the test's calls), ``llmshim_spans`` (their spans,
from an in-memory exporter). Marker: ``@pytest.mark.llmshim(priority="high", cache="off", rpm="60")``
passes settings to ``llmshim.install()`` for one test.

PYTEST_DONT_REWRITE (see ``llmshim/__init__.py``): this module may be imported before pytest
starts, too, and ``-p llmshim.pytest_plugin`` would then mark it for rewriting.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim

from . import redact
from .call import Call, Reply
from .pipeline import AsyncHandler, Handler, Pipeline, track
from .store import cache_keys
from .tap import OnEnd

SALT = b"llmshim-cassette-v1"


@dataclasses.dataclass
class Cassette:
    path: Path
    mode: str  # record | replay
    interactions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unmatched: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def load(self) -> None:
        """The recorded interactions; none when there is no file. A file that is not a cassette of
        this version fails the test with its path and the reason (never a traceback from json)."""
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            version = data.get("version") if isinstance(data, dict) else None
            if version != 1 or not isinstance(data.get("interactions"), list):
                raise ValueError(f"not a version 1 cassette (version {version!r})")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            pytest.fail(f"llmshim replay: cannot read cassette {self.path}: {exc}; record it again with "
                        "--llmshim-record", pytrace=False)
        self.interactions = data["interactions"]

    def explain(self) -> str:
        """The first unmatched request and the closest recorded one."""
        wanted = json.dumps(self.unmatched[0]["request"], sort_keys=True)
        recorded = [json.dumps(i["request"], sort_keys=True) for i in self.interactions]
        closest = difflib.get_close_matches(wanted, recorded, n=1, cutoff=0.0)
        return (f"llmshim replay: request not in cassette {self.path}:\n  {wanted}\n"
                f"closest recorded:\n  {closest[0] if closest else '(the cassette is empty)'}")

    def save(self) -> None:
        """Written whole to a temporary file beside it, then renamed over it: an interrupted
        write never leaves a truncated cassette. A folder that cannot be written fails the test
        with the path and the reason."""
        text = json.dumps({"version": 1, "interactions": self.interactions}, indent=2, ensure_ascii=False) + "\n"
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            pytest.fail(f"llmshim record: cannot write cassette {self.path}: {exc}", pytrace=False)


def _piece(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}


def _bytes(piece: dict[str, str]) -> bytes:
    return piece["text"].encode() if "text" in piece else base64.b64decode(piece["base64"])


def _masked(value: Any) -> Any:
    """A body as a cassette shows it: the string value of every field named like a credential
    (``api_key``, ``access_token``, ``password``...) masked, at any depth. Matching is by the
    cache key of the request as sent, so the mask never changes which answer a request gets."""
    if isinstance(value, dict):
        return {k: redact.MASK if isinstance(v, str) and redact.is_secret_header(str(k)) else _masked(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _request(call: Call) -> dict[str, Any]:
    """The redacted request a cassette shows: no headers, the URL without userinfo or query, no
    credential in the body."""
    request = dict(cache_keys.summary(call))
    request["url"] = redact.public_url(call.request.url)
    if "body" in request:
        request["body"] = _masked(request["body"])
    if "body_preview" in request:
        request["body_preview"] = redact.scrub_text(request["body_preview"])
    return request


class CassettePolicy:
    """Records or replays at the cache's place in the pipeline. A call a test double or another
    recorder answers is neither replayed nor recorded."""

    serves_answers = True

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette
        self._used: set[int] = set()

    def _key(self, call: Call) -> str:
        return cache_keys.cache_key(call, SALT, shared=True)

    def _answer(self, call: Call) -> Reply | None:
        key = self._key(call)
        for index, item in enumerate(self.cassette.interactions):
            if item["key"] == key and index not in self._used:
                self._used.add(index)
                response = item["response"]
                body = b"".join(_bytes(p) for p in response["body"])
                headers = [(k, v) for k, v in response["headers"]] + [("content-length", str(len(body)))]
                assert call.replay is not None
                return track(call, call.replay(response["status"], headers, body))
        self.cassette.unmatched.append({"key": key, "request": _request(call)})
        body = json.dumps({"error": {"message": self.cassette.explain(), "type": "llmshim_cassette_miss"}}).encode()
        assert call.replay is not None
        return track(call, call.replay(504, [("content-type", "application/json"), ("x-should-retry", "false"),
                                             ("content-length", str(len(body)))], body))

    def _record(self, call: Call, reply: Reply) -> Reply:
        pieces: list[bytes] = []

        class Tee:
            def on_chunk(self, data: bytes) -> None:
                pieces.append(data)

            def on_complete(self) -> None:
                pass

            def on_abort(self, error: BaseException | None) -> None:
                pass

        reply.tap.subscribe(Tee())
        headers = [(str(k), str(v)) for k, v in (reply.headers.multi_items() if hasattr(reply.headers, "multi_items")
                                                 else reply.headers.items())
                   if str(k).lower() not in ("content-encoding", "content-length", "transfer-encoding", "set-cookie",
                                             "date", "connection") and not redact.is_secret_header(str(k))]

        def store() -> None:
            self.cassette.interactions.append({
                "key": self._key(call), "request": _request(call),
                "response": {"status": reply.status, "headers": headers, "body": [_piece(p) for p in pieces]}})

        reply.tap.subscribe(OnEnd(store))
        return reply

    def handle(self, call: Call, next: Handler) -> Reply:
        if call.cache_bypass:  # a mock or another recorder answers: never hidden, never recorded
            return next(call)
        if self.cassette.mode == "replay" and call.replay is not None:
            answer = self._answer(call)
            assert answer is not None
            return answer
        return self._record(call, next(call))

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        if call.cache_bypass:
            return await anext(call)
        if self.cassette.mode == "replay" and call.replay is not None:
            answer = self._answer(call)
            assert answer is not None
            return answer
        return self._record(call, await anext(call))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmshim")
    group.addoption("--llmshim-record", action="store_true", help="record each test's LLM calls into cassettes")
    group.addoption("--llmshim-replay", action="store_true", help="replay LLM calls from cassettes, offline")
    group.addoption("--llmshim-cassettes", default="cassettes", help="cassette folder (default: ./cassettes)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[Any]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call":
        item._llmshim_call_report = report  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "llmshim(**settings): llmshim.install() settings for this test")


#: Characters a cassette's file name keeps as they are; any other is written ``%XX`` (each UTF-8
#: byte), ``%`` included, so two test ids never share a file.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]]")
_LONGEST_NAME = 150  # bytes; file systems allow 255


def cassette_name(nodeid: str) -> str:
    """The file name (without ``.json``) of a test's cassette, from its node id: the classes and
    the test's name, ``Class.test_name[params]``. One-to-one, and short enough for any file
    system: a long name is cut and ends with a digest of the whole id instead."""
    rest = nodeid.partition("::")[2] or nodeid
    test, bracket, params = rest.partition("[")  # a parameter id may hold "::" itself
    name = test.replace("::", ".") + bracket + params
    safe = _UNSAFE.sub(lambda m: "".join(f"%{byte:02X}" for byte in m.group().encode("utf-8")), name)
    if len(safe) > _LONGEST_NAME:
        safe = safe[:_LONGEST_NAME - 17] + "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return safe


def _cassette_path(request: pytest.FixtureRequest) -> Path:
    root = Path(request.config.rootpath) / request.config.getoption("--llmshim-cassettes")
    module = Path(str(request.node.path)).stem
    path: Path = root / module / f"{cassette_name(request.node.nodeid)}.json"
    return path


def _users_install() -> Callable[[], None] | None:
    """How to put back an ``llmshim.install()`` the user made before the test (in a conftest, or
    at import), or None when llmshim was not installed: the test's own install replaces it, and
    the test's end must not leave the rest of the session without it. The same settings and
    OpenTelemetry providers; a pipeline built anew (the test's install retired the old one)."""
    from . import _build, _lock, adapters
    from .runtime import STATE

    if not STATE.active:
        return None
    settings = STATE.settings
    staged = STATE._build  # install() staged the build and no call has needed it yet
    if staged is not None:
        build = staged
    else:
        from .policies.observer import ObserverPolicy

        observer = STATE.pipeline.find(ObserverPolicy)
        telemetry = observer.telemetry if observer is not None else None
        tracer = telemetry._fixed_tracer_provider if telemetry is not None else None
        meter = telemetry._fixed_meter_provider if telemetry is not None else None

        def build() -> Pipeline:
            return _build(settings, tracer, meter)

    def restore() -> None:
        with _lock:  # as install() does, with the user's Settings as they were
            if STATE.active and settings.libraries != STATE.settings.libraries:
                llmshim._uninstall_locked()
            STATE.swap(build)
            STATE.settings = settings
            STATE.active = True
            adapters.apply_all()

    return restore


def _keep_in_pipeline(policy: CassettePolicy) -> None:
    """The cassette's policy just inside the observer of the pipeline in place, unless it is there."""
    from .policies.observer import ObserverPolicy
    from .runtime import STATE

    pipeline = STATE.pipeline
    if STATE.active and pipeline.find(CassettePolicy) is None:
        pipeline.insert(policy, after=ObserverPolicy)


def _keeping(policy: CassettePolicy, install: Callable[..., Any]) -> Callable[..., Any]:
    """``llmshim.install`` for the length of a recording or replaying test: the code under test
    may call it itself (an app that sets llmshim up as it starts), and the new pipeline must still
    hold the cassette, or a replay would go to the live API and a recording would miss calls."""
    @functools.wraps(install)
    def install_keeping_the_cassette(*args: Any, **kwargs: Any) -> Any:
        settings = install(*args, **kwargs)
        _keep_in_pipeline(policy)
        return settings

    return install_keeping_the_cassette


@pytest.fixture
def _llmshim_session(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    record = request.config.getoption("--llmshim-record")
    replay = request.config.getoption("--llmshim-replay")
    marker = request.node.get_closest_marker("llmshim")
    cassette = None
    if record or replay:
        cassette = Cassette(_cassette_path(request), "replay" if replay else "record")
        if replay:
            cassette.load()  # before install: an unreadable cassette fails the test with nothing to undo
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    calls: list[llmshim.CallRecord] = []
    settings = dict(marker.kwargs) if marker else {}
    if record or replay:
        settings.setdefault("cache", "off")
        settings.setdefault("retry_mode", "off")
    restore = _users_install()
    install = llmshim.install
    install(tracer_provider=provider, **settings)
    llmshim.on("call_completed", calls.append)
    llmshim.on("call_failed", calls.append)
    if cassette is not None:
        policy = CassettePolicy(cassette)
        _keep_in_pipeline(policy)
        llmshim.install = _keeping(policy, install)
    try:
        yield {"calls": calls, "exporter": exporter}
    finally:
        llmshim.install = install
        llmshim.off("call_completed", calls.append)
        llmshim.off("call_failed", calls.append)
        if restore is not None:
            restore()
        else:
            llmshim.uninstall()
    if cassette is not None and cassette.mode == "record" and cassette.interactions:
        cassette.save()
    report = getattr(request.node, "_llmshim_call_report", None)
    if cassette is not None and cassette.unmatched and not (report is not None and report.failed):
        pytest.fail(cassette.explain(), pytrace=False)  # the code under test swallowed the 504


@pytest.fixture
def llmshim_calls(_llmshim_session: dict[str, Any]) -> list[llmshim.CallRecord]:
    """The CallRecords of this test's LLM calls, as they ended."""
    calls: list[llmshim.CallRecord] = _llmshim_session["calls"]
    return calls


@pytest.fixture
def llmshim_spans(_llmshim_session: dict[str, Any]) -> Any:
    """This test's llmshim spans (an InMemorySpanExporter: ``.get_finished_spans()``)."""
    return _llmshim_session["exporter"]


@pytest.fixture(autouse=True)
def _llmshim_auto(request: pytest.FixtureRequest) -> Iterator[None]:
    """Only when asked: an option given or the marker set brings the session in for every test."""
    wanted = (request.config.getoption("--llmshim-record") or request.config.getoption("--llmshim-replay")
              or request.node.get_closest_marker("llmshim") is not None)
    if wanted and "_llmshim_session" not in request.fixturenames:
        request.getfixturevalue("_llmshim_session")
    yield


__all__ = ["Cassette", "CassettePolicy", "llmshim_calls", "llmshim_spans"]
