"""What llmshim costs a process that it is installed in as the interpreter starts (``llmshim run``'s
sitecustomize, or a ``.pth`` calling ``install()``), most of which never make an LLM call: the
settings are parsed and checked, import hooks set, and nothing heavy is imported or opened until a
patched library is imported or the first call is made. Each check runs in a fresh interpreter
started the way a user's would be; none measures time (``benchmarks/startup.py`` does).
"""

from __future__ import annotations

import itertools
import json
import os
import site
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import llmshim
from conftest import ROOT
from llmshim import runtime
from llmshim.pipeline import Pipeline
from llmshim.run import BOOT_DIR
from llmshim.settings import Settings
from llmshim.testing import FakeLLMServer

#: Every llmshim module a start-up imports: a new one here is a cost every Python process pays.
START_UP_MODULES = ["llmshim", "llmshim.adapters", "llmshim.config", "llmshim.redact", "llmshim.setting_parsers",
                    "llmshim.settings", "llmshim.state", "llmshim.values"]
#: What the first patched library's import or the first call brings, never the start.
HEAVY = ["asyncio", "email", "hashlib", "importlib.metadata", "json", "opentelemetry", "sqlite3", "wrapt"]

STARTS = ["llmshim run", pytest.param(".pth", marks=pytest.mark.skipif(
    not site.ENABLE_USER_SITE, reason="the .pth goes in the user site directory, disabled here"))]


def _environment(how: str, tmp_path: Path, **settings: str) -> dict[str, str]:
    """A child's environment: this tree's llmshim, installed at start-up by ``how`` (or not: "none"),
    a cache directory of its own, and ``settings`` as ``LLMSHIM_*`` variables (none: the defaults,
    cache and telemetry on)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env.update({f"LLMSHIM_{name.upper()}": value for name, value in settings.items()})
    env["PYTHONPATH"] = str(ROOT)
    if how == "none":
        return env
    if how == "llmshim run":
        env["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, str(ROOT)])
        return env
    site = tmp_path / "user" / f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    site.mkdir(parents=True)
    # A user site's .pth runs before the interpreter's site-packages (llmshim's dependencies) is on
    # sys.path; a path line first puts it there, as it is for a .pth in site-packages itself.
    (site / "00-dependencies.pth").write_text("\n".join(sysconfig.get_path(k) for k in ("purelib", "platlib")))
    (site / "llmshim.pth").write_text("import llmshim; llmshim.install()\n")
    env["PYTHONUSERBASE"] = str(tmp_path / "user")
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", STARTS)
def test_a_start_under_llmshim_imports_nothing_heavy_and_opens_no_cache(how: str, tmp_path: Path) -> None:
    code = (f"import sys, llmshim; print(llmshim.is_installed(), sorted(m for m in sys.modules if m.startswith"
            f"('llmshim')), [m for m in {HEAVY!r} if m in sys.modules])")
    done = _python(code, _environment(how, tmp_path))
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert done.stdout.strip() == f"True {START_UP_MODULES} []"
    assert not (tmp_path / "xdg-cache" / "llmshim").exists()  # no call, no cache file


@pytest.mark.parametrize("how", STARTS)
def test_a_malformed_setting_still_fails_at_start_up_naming_it(how: str, tmp_path: Path) -> None:
    done = _python("import llmshim; print(llmshim.is_installed())", _environment(how, tmp_path, cache_ttl="soon"))
    assert done.returncode == 0 and done.stdout == "False\n"  # the program runs, without llmshim
    assert "invalid value 'soon' for LLMSHIM_CACHE_TTL" in done.stderr
    assert ("llmshim run: llmshim is not active in this process" if how == "llmshim run" else "ConfigError") \
        in done.stderr


LATER_CALLS = """
import json, sys
wrapt_at_start = "wrapt" in sys.modules
import httpx, requests
body = {{"model": "m", "temperature": 0, "messages": [{{"role": "user", "content": "late"}}]}}
answers = [httpx.post({url!r} + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"],
           requests.post({url!r} + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]]
import llmshim
stats = llmshim.stats()
print(json.dumps([wrapt_at_start, answers, stats["total_calls"], stats["cache_hits"]]))
"""


@pytest.mark.parametrize("how", STARTS)
def test_libraries_imported_after_start_up_are_patched_and_their_calls_seen(
        how: str, server: FakeLLMServer, tmp_path: Path) -> None:
    done = _python(LATER_CALLS.format(url=server.url), _environment(how, tmp_path))
    assert done.returncode == 0 and not done.stderr, done.stderr
    # both calls seen, the second one answered by the cache the first call's pipeline opened
    assert json.loads(done.stdout) == [False, ["Echo: late", "Echo: late"], 2, 1]
    assert len(server.received) == 1
    assert (tmp_path / "xdg-cache" / "llmshim" / "cache.sqlite3").exists()


def test_a_library_imported_before_install_is_patched_at_once(tmp_path: Path) -> None:
    code = ("import sys, requests, llmshim; from requests.adapters import HTTPAdapter; llmshim.install(); "
            "print(HTTPAdapter.send.__module__, 'wrapt' in sys.modules)")
    done = _python(code, _environment("none", tmp_path))
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert done.stdout.split() == ["llmshim.adapters.requests", "False"]


# -- the pipeline built on first use -----------------------------------------------------------------

@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``build_pipeline`` counted; the first build waits for ``release`` once it has begun, and
    ``second`` tells when a second build begins."""
    seen: dict[str, Any] = {"builds": [], "building": threading.Event(), "release": threading.Event(),
                            "second": threading.Event()}
    real = runtime.build_pipeline
    begun = itertools.count(1)

    def build(settings: Settings, tracer_provider: Any = None, meter_provider: Any = None) -> Pipeline:
        if next(begun) == 2:
            seen["second"].set()
        seen["building"].set()
        assert seen["release"].wait(30)
        pipeline = real(settings, tracer_provider, meter_provider)
        seen["builds"].append(pipeline)
        return pipeline

    monkeypatch.setattr(runtime, "build_pipeline", build)
    yield seen
    seen["release"].set()


class _Arrivals:
    """A lock that sets ``second`` when a second thread comes for it (the first holds it)."""

    def __init__(self, lock: Any, second: threading.Event) -> None:
        self._lock, self._second, self._arrivals = lock, second, itertools.count(1)

    def __enter__(self) -> Any:
        if next(self._arrivals) == 2:
            self._second.set()
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self._lock.__exit__(*exc)


def test_two_threads_first_calls_at_once_are_served_by_one_pipeline(
        server: FakeLLMServer, counted_builds: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "first"}]}
    answers: dict[str, str] = {}

    def call(name: str) -> None:
        reply = httpx.post(server.url + "/v1/chat/completions", json=body)
        answers[name] = reply.json()["choices"][0]["message"]["content"]

    llmshim.install(cache="off")
    try:
        assert counted_builds["builds"] == []  # nothing built by install()
        monkeypatch.setattr(runtime.STATE, "_lock", _Arrivals(runtime.STATE._lock, counted_builds["second"]))
        first = threading.Thread(target=call, args=("first",))
        first.start()
        assert counted_builds["building"].wait(30)  # the first call is building the pipeline...
        second = threading.Thread(target=call, args=("second",))
        second.start()
        assert counted_builds["second"].wait(30)  # ...when the second comes for it (or builds its own)
        counted_builds["release"].set()
        first.join(30)
        second.join(30)
        assert answers == {"first": "Echo: first", "second": "Echo: first"}
        [built] = counted_builds["builds"]  # one build for both
        assert runtime.STATE.pipeline is built and built.in_flight == 0
        assert llmshim.stats()["total_calls"] == 2
    finally:
        llmshim.uninstall()
    assert built.closed


def test_a_pipeline_that_cannot_be_built_lets_the_call_through_with_a_warning(
        server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> Pipeline:
        raise OSError("no room for the cache")

    monkeypatch.setattr(runtime, "build_pipeline", broken)
    llmshim.install(cache="off")
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": []})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].startswith("Echo")
        assert runtime.STATE.pipeline.policies == ()
    finally:
        llmshim.uninstall()
    assert "could not set up the cache, limits or telemetry" in caplog.text
    assert "no room for the cache" in caplog.text


def test_install_over_a_built_pipeline_builds_its_successor_at_once(counted_builds: dict[str, Any]) -> None:
    counted_builds["release"].set()
    llmshim.install(cache="off")
    try:
        first = runtime.STATE.pipeline  # built here, on first use
        llmshim.install(cache="off", retry_mode="llmshim")
        assert len(counted_builds["builds"]) == 2 and first.closed  # retired with its successor in place
        assert runtime.STATE.pipeline is counted_builds["builds"][1]
    finally:
        llmshim.uninstall()


def test_submodules_and_lazy_names_are_there_after_import_llmshim_alone(tmp_path: Path) -> None:
    code = ("import llmshim; print(llmshim.runtime.STATE is llmshim.state.STATE, llmshim.__version__ != '', "
            "callable(llmshim.priority), hasattr(llmshim, 'no_such_thing'))")
    done = _python(code, _environment("none", tmp_path))
    assert done.returncode == 0 and done.stdout.split() == ["True", "True", "True", "False"], done.stderr
