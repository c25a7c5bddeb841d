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
import dataclasses
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim

from . import redact
from .call import Call, Reply
from .pipeline import AsyncHandler, Handler, track
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
        if self.path.exists():
            self.interactions = json.loads(self.path.read_text())["interactions"]

    def explain(self) -> str:
        """The first unmatched request and the closest recorded one."""
        wanted = json.dumps(self.unmatched[0]["request"], sort_keys=True)
        recorded = [json.dumps(i["request"], sort_keys=True) for i in self.interactions]
        closest = difflib.get_close_matches(wanted, recorded, n=1, cutoff=0.0)
        return (f"llmshim replay: request not in cassette {self.path}:\n  {wanted}\n"
                f"closest recorded:\n  {closest[0] if closest else '(the cassette is empty)'}")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"version": 1, "interactions": self.interactions}, indent=2,
                                        ensure_ascii=False) + "\n")


def _piece(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}


def _bytes(piece: dict[str, str]) -> bytes:
    return piece["text"].encode() if "text" in piece else base64.b64decode(piece["base64"])


def _request(call: Call) -> dict[str, Any]:
    """The redacted request a cassette shows: no headers, the URL without userinfo or query."""
    request = dict(cache_keys.summary(call))
    request["url"] = redact.public_url(call.request.url)
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


def _cassette_path(request: pytest.FixtureRequest) -> Path:
    root = Path(request.config.rootpath) / request.config.getoption("--llmshim-cassettes")
    module = Path(str(request.node.path)).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path: Path = root / module / f"{name}.json"
    return path


@pytest.fixture
def _llmshim_session(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    record = request.config.getoption("--llmshim-record")
    replay = request.config.getoption("--llmshim-replay")
    marker = request.node.get_closest_marker("llmshim")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    calls: list[llmshim.CallRecord] = []
    llmshim.on("call_completed", calls.append)
    llmshim.on("call_failed", calls.append)
    settings = dict(marker.kwargs) if marker else {}
    if record or replay:
        settings.setdefault("cache", "off")
        settings.setdefault("retry_mode", "off")
    llmshim.install(tracer_provider=provider, **settings)
    cassette = None
    if record or replay:
        cassette = Cassette(_cassette_path(request), "replay" if replay else "record")
        if replay:
            cassette.load()
        from .policies.observer import ObserverPolicy

        llmshim.runtime.STATE.pipeline.insert(CassettePolicy(cassette), after=ObserverPolicy)
    try:
        yield {"calls": calls, "exporter": exporter}
    finally:
        llmshim.uninstall()
        llmshim.off("call_completed", calls.append)
        llmshim.off("call_failed", calls.append)
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
