"""pytest plugin: record every LLM call of a test into a cassette, replay it offline.

    pytest --llmshim-record     # calls go out; each test's calls are written to cassettes/<module>/<test>.json
    pytest --llmshim-replay     # no network: answers come from the cassettes; an unknown request fails the test

Active only when asked (an option, a fixture or the ``llmshim`` marker). Requests are matched by
llmshim's cache key (section 6 of the design: method, URL, dialect, the canonical body minus
noise), with a fixed salt and shared scope, so header noise, whitespace and the API key never break
a replay, and no key is ever written. Cassettes are readable JSON: the redacted request and the
response status, headers (minus credentials and cookies) and body pieces (text, chunk by chunk as
they arrived). The file, its name and the recording/replaying policy are ``cassettes.py``; a
test in a class is ``<Class>.<test>.json``, a parametrized one keeps its id (``test_x[a%2Fb].json``).
An ``llmshim.install()`` made before the test (a conftest's) is put back after it; one made by
the code under test keeps the cassette.

Fixtures: ``llmshim_calls`` (the CallRecords of the test's calls), ``llmshim_spans`` (their spans,
from an in-memory exporter). Marker: ``@pytest.mark.llmshim(priority="high", cache="off", rpm="60")``
passes settings to ``llmshim.install()`` for one test.

PYTEST_DONT_REWRITE (see ``llmshim/__init__.py``): this module may be imported before pytest
starts, too, and ``-p llmshim.pytest_plugin`` would then mark it for rewriting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim

from .cassettes import Cassette, CassetteError, CassettePolicy, cassette_name


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
    path: Path = root / module / f"{cassette_name(request.node.nodeid)}.json"
    return path


def _users_install() -> Callable[[], None] | None:
    """How to put back an ``llmshim.install()`` the user made before the test (in a conftest, or
    at import), or None when llmshim was not installed: the test's own install replaces it, and
    the test's end must not leave the rest of the session without it. The same settings and
    OpenTelemetry providers; a pipeline built anew (the test's install retired the old one)."""
    from .runtime import STATE

    if not STATE.active:
        return None
    settings, (tracer_provider, meter_provider) = STATE.settings, STATE.providers
    return functools.partial(llmshim._apply, settings, tracer_provider, meter_provider)


@pytest.fixture
def _llmshim_session(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    record = request.config.getoption("--llmshim-record")
    replay = request.config.getoption("--llmshim-replay")
    marker = request.node.get_closest_marker("llmshim")
    cassette = None
    if record or replay:
        cassette = Cassette(_cassette_path(request), "replay" if replay else "record")
        if replay:
            try:
                cassette.load()  # before install: an unreadable cassette fails the test with nothing to undo
            except CassetteError as exc:
                pytest.fail(str(exc), pytrace=False)
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
    from .runtime import PINNED

    restore = _users_install()
    if cassette is not None:  # in every pipeline built during the test: an install() the code under
        PINNED.append(CassettePolicy(cassette))  # test makes itself keeps it (or a replay would go out)
    try:
        llmshim.install(tracer_provider=provider, **settings)
    except BaseException:
        PINNED.clear()
        raise
    llmshim.on("call_completed", calls.append)
    llmshim.on("call_failed", calls.append)
    try:
        yield {"calls": calls, "exporter": exporter}
    finally:
        PINNED.clear()
        llmshim.off("call_completed", calls.append)
        llmshim.off("call_failed", calls.append)
        if restore is not None:
            restore()
        else:
            llmshim.uninstall()
    if cassette is not None and cassette.mode == "record" and cassette.interactions:
        try:
            cassette.save()
        except CassetteError as exc:
            pytest.fail(str(exc), pytrace=False)
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


__all__ = ["Cassette", "CassettePolicy", "cassette_name", "llmshim_calls", "llmshim_spans"]
