"""The command line without surprises (issue 14 item 6): ``--version``, unknown flags refused,
``run`` passing the program's arguments untouched, ``serve --help`` listing every server option,
``stats`` never passing off the demo's numbers as the caller's, and ``doctor`` showing the
effective cache path, judging an unwritable one, and naming what llmshim cannot see.

Every command runs in a subprocess on real files; the pure deciders are tested on plain values.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from llmshim import doctor_checks
from llmshim._version import __version__
from llmshim.cli import StatsSource, program_of, split_program, stats_source
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.testing import FakeLLMServer, Fault
from llmshim.testing.__main__ import parse_fault

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment without LLMSHIM_*, its own cache and temp folders (the demo's stats
    file lives in the temp folder), and the worktree's llmshim first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp / "xdg"), TMPDIR=str(tmp), **extra)
    return env


def _llmshim(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmshim", *args], env=env, capture_output=True, text=True,
                          timeout=60, **kwargs)


def _cache_file(path: Path) -> None:
    """A real, empty llmshim cache file at ``path``."""
    store = SQLiteStore(str(path))
    store.stats()
    store.close()
    assert path.is_file()


# -- --version and unknown flags -------------------------------------------------------------------
def test_version_prints_the_package_version(tmp_path: Path) -> None:
    done = _llmshim(["--version"], _env(tmp_path))
    assert done.returncode == 0 and done.stdout == f"llmshim {__version__}\n", done.stderr
    assert re.fullmatch(r"llmshim \d+\.\d+\.\d+\S*\n", done.stdout)


@pytest.mark.parametrize("args", [
    ["cache", "stats", "--path", "F"],  # --path belongs before the subcommand: it used to be ignored
    ["doctor", "--verbose"],
    ["stats", "--since", "1h"],
    ["status", "-x"],
    ["settings", "--json"],
    ["demo", "--fast"],
    ["serve", "--no-such-option"],
    ["run", "--no-such-option", "--", sys.executable, "-c", "print('ran')"],
    ["doctor", "--", "extra"],
])
def test_an_unknown_flag_is_an_error_not_ignored(args: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite3"
    _cache_file(cache)
    done = _llmshim(args, _env(tmp_path, LLMSHIM_CACHE_PATH=str(cache)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unrecognized arguments" in done.stderr and done.stdout == ""  # nothing ran


def test_the_documented_cache_path_form_still_works(tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite3"
    _cache_file(cache)
    done = _llmshim(["cache", "--path", str(cache), "stats"], _env(tmp_path))
    assert done.returncode == 0 and f"cache {cache}" in done.stdout, done.stderr


_ECHO_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "--cache", "off", "--", sys.executable, "-c", _ECHO_ARGV, "--verbose", "--cache", "on", "--", "-x",
      "--version", "--help"], ["--verbose", "--cache", "on", "--", "-x", "--version", "--help"]),
    (["run", sys.executable, "-c", _ECHO_ARGV, "--version", "--", "a", "--help"], ["--version", "--", "a", "--help"]),
    (["run", "--", sys.executable, "-c", _ECHO_ARGV], []),
])
def test_run_passes_the_programs_arguments_through_untouched(args: list[str], expected: list[str],
                                                             tmp_path: Path) -> None:
    done = _llmshim(args, _env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected


def test_the_cut_at_the_first_double_dash_is_pure() -> None:
    assert split_program(["run", "--cache", "on", "--", "p", "--", "-x"]) == (["run", "--cache", "on"],
                                                                             ["p", "--", "-x"])
    assert split_program(["doctor"]) == (["doctor"], None)
    assert program_of([], ["p", "-x"]) == ["p", "-x"]
    assert program_of(["p", "a"], ["b"]) == ["p", "a", "--", "b"]  # the program began before: its own --
    assert program_of(["p"], None) == ["p"]


# -- serve ---------------------------------------------------------------------------------------
#: FakeLLMServer's constructor parameters and the serve flag for each; ``responder`` is a Python
#: callable, not something a command line can carry.
SERVER_FLAGS = {"host": "--host", "port": "--port", "chunk_delay": "--chunk-delay", "rpm_limit": "--rpm",
                "rpm_window": "--rpm-window", "rpm_style": "--rpm-style", "compress": "--gzip"}
FAULT_KEYS = {"status": "status=", "headers": "header=", "body": "body=", "reset": "reset=",
              "after_chunks": "after_chunks=", "delay": "delay=", "chunk_delay": "chunk_delay=", "path": "path=",
              "cut": "cut="}


@pytest.mark.parametrize("command", [["-m", "llmshim", "serve", "--help"],
                                     ["-m", "llmshim.testing", "serve", "--help"]])
def test_serve_help_lists_every_server_option(command: list[str], tmp_path: Path) -> None:
    parameters = set(inspect.signature(FakeLLMServer.__init__).parameters) - {"self", "responder"}
    assert parameters == set(SERVER_FLAGS), "a server option without a serve flag (or a stale one here)"
    import dataclasses

    assert {f.name for f in dataclasses.fields(Fault)} == set(FAULT_KEYS), "a Fault field the --fault SPEC lacks"
    done = subprocess.run([sys.executable, *command], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in [*SERVER_FLAGS.values(), "--fault"]:
        assert re.search(rf"^\s+{re.escape(flag)}\b", done.stdout, re.M), flag
    for key in FAULT_KEYS.values():
        assert key in done.stdout, key
    for endpoint in ("/v1/chat/completions", "/api/chat", "/completion", "include_usage"):
        assert endpoint in done.stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``llmshim serve`` on a free port with a rate limit and two queued faults; its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "llmshim", "serve", "--port", "0", "--rpm", "4", "--rpm-style", "window",
         "--fault", "status=503,times=2,path=/chat,header=retry-after-ms:7,body=warming up", "--fault", "418"],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", first)
        assert match, first + (process.stderr.read() if process.stderr else "")
        yield process, match.group(1)
    finally:
        process.terminate()  # the server we started, by its own handle
        process.communicate(timeout=30)


def test_serve_applies_its_options(served: tuple[subprocess.Popen[str], str]) -> None:
    _, url = served
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    answers = [requests.post(f"{url}/v1/chat/completions", json=body, timeout=10) for _ in range(5)]
    assert [a.status_code for a in answers] == [503, 503, 418, 200, 429]  # two faults, the next, then rpm 4
    assert answers[0].headers["retry-after-ms"] == "7" and "warming up" in answers[0].text
    assert answers[4].headers["x-ratelimit-limit-requests"] == "4"


@pytest.mark.parametrize(("spec", "fault", "times"), [
    ("503", Fault(status=503), 1),
    ("status=429,times=always,header=retry-after:2", Fault(status=429, headers=(("retry-after", "2"),)), None),
    ("reset=after_chunks,after_chunks=2,path=/chat", Fault(reset="after_chunks", after_chunks=2, path="/chat"), 1),
    ("delay=0.5,times=3", Fault(delay=0.5), 3),
])
def test_a_fault_spec_reads_as_written(spec: str, fault: Fault, times: int | None) -> None:
    assert parse_fault(spec) == (fault, times)


@pytest.mark.parametrize("spec", ["", "times=2", "status=abc", "reset=later", "colour=red", "header=x",
                                  "status=500,times=0", "status"])
def test_a_bad_fault_spec_is_refused(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_fault(spec)
    done = _llmshim(["serve", "--port", "0", "--fault", spec], _env(tmp_path))
    assert done.returncode == 2 and "--fault" in done.stderr and done.stdout == ""


# -- stats ---------------------------------------------------------------------------------------
def _snapshot(path: Path, calls: int, pid: int) -> None:
    path.write_text(json.dumps({"total_calls": calls, "completed": calls, "failed": 0, "pid": pid, "by_model": {}}))


def test_stats_without_a_file_or_a_demo_snapshot_says_where_it_looked(tmp_path: Path) -> None:
    done = _llmshim(["stats"], _env(tmp_path))
    assert done.returncode == 1 and done.stdout == ""
    assert str(tmp_path / "llmshim-demo-stats.json") in done.stderr and "LLMSHIM_STATS_FILE is unset" in done.stderr


def test_stats_announces_the_demos_snapshot_in_its_first_line(tmp_path: Path) -> None:
    _snapshot(tmp_path / "llmshim-demo-stats.json", 41, 4242)
    done = _llmshim(["stats"], _env(tmp_path))
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("llmshim: showing the snapshot `llmshim demo` wrote") and "not your program's" in first
    assert "pid 4242" in first and "total_calls        41" in done.stdout
    raw = _llmshim(["stats", "--json"], _env(tmp_path))
    assert raw.returncode == 0 and json.loads(raw.stdout)["total_calls"] == 41  # stdout stays pure JSON
    assert raw.stderr.splitlines()[0].startswith("llmshim: showing the snapshot `llmshim demo` wrote")


def test_stats_named_by_the_variable_never_falls_back_to_the_demo(tmp_path: Path) -> None:
    _snapshot(tmp_path / "llmshim-demo-stats.json", 41, 4242)
    missing = _llmshim(["stats"], _env(tmp_path, LLMSHIM_STATS_FILE=str(tmp_path / "mine.json")))
    assert missing.returncode == 1 and "41" not in missing.stdout and "mine.json" in missing.stderr
    _snapshot(tmp_path / "mine.json", 7, 77)
    mine = _llmshim(["stats"], _env(tmp_path, LLMSHIM_STATS_FILE=str(tmp_path / "mine.json")))
    assert mine.returncode == 0 and "total_calls        7" in mine.stdout and "demo" not in mine.stdout


def test_the_stats_source_is_decided_purely() -> None:
    assert stats_source("f.json", "v.json", "d.json", True) == StatsSource("f.json", "--file")
    assert stats_source(None, "v.json", "d.json", True).origin == "LLMSHIM_STATS_FILE"
    assert stats_source(None, None, "d.json", True).origin == "demo"
    assert stats_source(None, None, "d.json", False).origin is None


# -- doctor: the cache path ------------------------------------------------------------------------
def test_doctor_shows_the_effective_default_cache_path(tmp_path: Path) -> None:
    done = _llmshim(["doctor"], _env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    default = str(tmp_path / "xdg" / "llmshim" / "cache.sqlite3")
    setting = next(line for line in done.stdout.splitlines() if line.strip().startswith("cache_path"))
    assert default in setting and "None" not in setting
    assert f"file {default}  (the default)" in done.stdout
    assert "LLMSHIM_CACHE_NONDETERMINISTIC=skip" in done.stdout and "LLMSHIM_CACHE=off" in done.stdout


def _where_modes_hold() -> list[str]:
    """A command prefix under which permission bits hold: root ignores them, so as root without the
    capabilities that override them (util-linux's setpriv)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to hold")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def _doctor_as_user(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_where_modes_hold(), sys.executable, "-m", "llmshim", "doctor"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_doctor_reports_a_read_only_cache_file_as_broken(tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite3"  # in a folder the user can write: only the file is read-only
    _cache_file(cache)
    cache.chmod(0o444)
    env = _env(tmp_path, LLMSHIM_CACHE_PATH=str(cache), LLMSHIM_CACHE="on")
    done = _doctor_as_user(env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"BROKEN: {cache} is read-only for this user" in done.stdout
    readonly = _doctor_as_user({**env, "LLMSHIM_CACHE": "readonly"})
    assert readonly.returncode == 0 and "BROKEN" not in readonly.stdout, readonly.stdout  # reading is all it needs


def test_doctor_reports_an_unwritable_cache_folder_as_broken(tmp_path: Path) -> None:
    folder = tmp_path / "closed"
    folder.mkdir()
    _cache_file(folder / "cache.sqlite3")
    folder.chmod(0o555)
    try:
        env = _env(tmp_path, LLMSHIM_CACHE_PATH=str(folder / "cache.sqlite3"))
        done = _doctor_as_user(env)
        assert done.returncode == 1 and f"BROKEN: the folder {folder} is not writable" in done.stdout, (
            done.stdout + done.stderr)
        missing = _doctor_as_user({**env, "LLMSHIM_CACHE_PATH": str(folder / "sub" / "cache.sqlite3")})
        assert missing.returncode == 1 and f"BROKEN: {folder} is not a folder this user can create" in (
            missing.stdout), missing.stdout
        off = _doctor_as_user({**env, "LLMSHIM_CACHE": "off"})
        assert off.returncode == 0, off.stdout  # no cache, nothing to write
    finally:
        folder.chmod(0o700)


def test_doctor_reports_a_cache_path_under_a_file_as_broken(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    done = _llmshim(["doctor"], _env(tmp_path, LLMSHIM_CACHE_PATH=str(tmp_path / "plain" / "cache.sqlite3")))
    assert done.returncode == 1 and "BROKEN:" in done.stdout and "not a folder" in done.stdout


def _state(**changes: Any) -> doctor_checks.PathState:
    ok = doctor_checks.PathState(path="/c/cache.sqlite3", exists=True, is_file=True, file_writable=True,
                                 nearest_directory="/c", directory_exists=True, directory_usable=True)
    return doctor_checks.PathState(**{**ok.__dict__, **changes})


@pytest.mark.parametrize(("state", "needs_write", "problem"), [
    (_state(), True, None),
    (_state(exists=False, is_file=False, file_writable=False), True, None),  # created on the first call
    (_state(file_writable=False), True, "is read-only"),
    (_state(file_writable=False), False, None),  # readonly / replay only read
    (_state(directory_usable=False), True, "SQLite cannot write its journal"),
    (_state(exists=False, is_file=False, directory_exists=False, directory_usable=False, nearest_directory="/"),
     True, "not a folder this user can create"),
    (_state(is_file=False), False, "is not a file"),
])
def test_the_cache_path_judgement_is_pure(state: doctor_checks.PathState, needs_write: bool,
                                          problem: str | None) -> None:
    found = doctor_checks.judge_cache_path(state, needs_write)
    assert found == problem if problem is None else problem in str(found)


# -- doctor: what llmshim cannot see, and other instrumentations -----------------------------------
def test_doctor_inside_a_program_names_the_libraries_it_imported(tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    (stubs / "curl_cffi").mkdir(parents=True)
    (stubs / "curl_cffi" / "__init__.py").write_text("")
    (stubs / "logfire").mkdir()
    (stubs / "logfire" / "__init__.py").write_text("")
    program = """
import sys, types
import curl_cffi, logfire  # stand-ins: imported by the program, not installed
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
module = types.ModuleType("opentelemetry.instrumentation.openai_v2")
class OpenAIInstrumentor(BaseInstrumentor):
    def instrumentation_dependencies(self): return []
    def _instrument(self, **kwargs): pass
    def _uninstrument(self, **kwargs): pass
OpenAIInstrumentor.__module__ = module.__name__
module.OpenAIInstrumentor = OpenAIInstrumentor
sys.modules[module.__name__] = module
OpenAIInstrumentor().instrument()
from llmshim.doctor import main
sys.exit(main(sys.stdout))
"""
    env = _env(tmp_path, LLMSHIM_CACHE="off")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(stubs)])
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(re.match(r"\s+curl_cffi\s+imported: ", line) for line in lines), done.stdout
    assert not any(re.match(r"\s+urllib3\s+imported", line) for line in lines)  # doctor's own imports don't count
    assert any("Logfire (logfire) imported" in line and "two GenAI spans" in line for line in lines)
    assert any("official OpenAI instrumentation (opentelemetry-instrumentation-openai-v2) ACTIVE" in line
               for line in lines), done.stdout
    cli = _llmshim(["doctor"], env)  # its own process: only what is installed
    assert cli.returncode == 0 and "curl_cffi" not in cli.stdout and "ACTIVE" not in cli.stdout


def test_blind_spots_and_instrumentations_are_found_purely() -> None:
    table = doctor_checks.BLIND_SPOTS
    present = doctor_checks.found(table, {"grpc": object()}, {"botocore": "1.2.3", "grpcio": "1.0"})
    assert [(library.module, how) for library, how in present] == [("botocore", "installed 1.2.3"),
                                                                   ("grpc", "imported")]
    assert not {"httpx", "httpx2", "requests", "aiohttp"} & {library.module for library in table}
    assert all(library.why and library.what for library in (*table, *doctor_checks.INSTRUMENTATIONS))


def test_the_demo_without_any_client_library_skips_each_with_its_pip_name(tmp_path: Path) -> None:
    """A bare ``pip install llmshim`` has none of the clients the demo drives. It must skip each
    with the distribution to install, and end normally: ``find_spec("google.genai")`` raises when
    no ``google`` package exists at all (it did, ending the demo with a traceback)."""
    from tests.conftest import run_python

    hidden = ("openai", "requests", "aiohttp", "httpx", "httpx2", "ollama", "anthropic", "google")
    out = run_python(
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        f"    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {hidden!r}: raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from llmshim.demo import run\n"
        "sys.exit(run(sys.stdout))\n",
        env={"XDG_CACHE_HOME": str(tmp_path), "LLMSHIM_STATS_FILE": str(tmp_path / "stats.json")}, timeout=120)
    assert "skipped google-genai SDK, streamed (Gemini): `pip install google-genai` to include it" in out
    assert "`pip install openai` to include it" in out and "Traceback" not in out
