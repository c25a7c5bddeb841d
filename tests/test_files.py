"""The files llmshim writes are private even when they already existed; a read-only cache still answers.

- A cache file (and its -wal/-shm/-journal) found with group or other bits loses them before
  SQLite opens it (SQLite gives new -wal/-shm the database file's own mode, whatever the umask).
- llmshim's own folder (the default ``.../llmshim``) is kept 0700; a folder the user chose is never
  changed, only warned about when other users can write into it.
- The rate-limit store and the stats file are private too.
- A cache on a read-only filesystem (a real read-only bind mount, in a mount namespace of its own)
  serves hits in ``readonly`` mode.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import llmshim
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore, default_path
from llmshim.store.limits_sqlite import SQLiteLimitStore
from llmshim.store.sqlite_files import FileState, Tighten, plan_private, prepare_private
from llmshim.testing import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
COMPANIONS = ("-wal", "-shm", "-journal")
BODY = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "baked answer"}]}


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _loose_cache(path: Path) -> None:
    """A cache file as an older llmshim or a copy with the default umask leaves it: 0644, companions too."""
    store = SQLiteStore(str(path))
    store.put(Entry("k", 200, [], b"body", 1.0, None, {}), 1.0)
    store.close()
    for name in (path, *(Path(f"{path}{suffix}") for suffix in COMPANIONS)):
        name.touch()
        os.chmod(name, 0o644)


# -- the decision, for every mode ------------------------------------------------------------------
modes = st.integers(min_value=0, max_value=0o7777)


@given(db=modes, companions=st.lists(st.one_of(st.none(), modes), min_size=3, max_size=3), folder=modes,
       own=st.booleans())
def test_plan_private_removes_every_group_and_other_bit_and_nothing_else(
        db: int, companions: list[int | None], folder: int, own: bool) -> None:
    files = [FileState("/d/c", db), *(FileState(f"/d/c{s}", m) for s, m in zip(COMPANIONS, companions, strict=True))]
    changes, warnings = plan_private(files[0], files[1:], FileState("/d", folder), own)
    planned = {change.path: change.mode for change in changes}
    for file in files:
        if file.mode is None:
            assert file.path not in planned
            continue
        after = planned.get(file.path, stat.S_IMODE(file.mode))
        assert after & 0o077 == 0  # no group/other bit survives
        assert after & 0o7700 == stat.S_IMODE(file.mode) & 0o7700  # the owner's bits are the owner's
    if own:
        assert planned.get("/d", folder & 0o7777) & 0o077 == 0 and not warnings
    else:
        assert "/d" not in planned  # a folder the user chose is never changed
        assert bool(warnings) == bool(folder & 0o022)  # only a folder others can write into is a risk


def test_plan_private_changes_nothing_that_is_already_private() -> None:
    private = [FileState("/d/c", 0o100600), FileState("/d/c-wal", 0o100600), FileState("/d/c-shm", None)]
    assert plan_private(private[0], private[1:], FileState("/d", 0o40700), True) == ([], [])
    assert plan_private(private[0], private[1:], FileState("/d", 0o40755), False) == ([], [])
    assert plan_private(FileState("/d/c", 0o100664), [], FileState("/d", 0o40755), True) == (
        [Tighten("/d/c", 0o600), Tighten("/d", 0o700)], [])


# -- the files, for real ---------------------------------------------------------------------------
def test_an_existing_loose_cache_in_the_default_folder_is_made_private(server: FakeLLMServer) -> None:
    path = Path(default_path())
    path.parent.mkdir(parents=True)
    os.chmod(path.parent, 0o755)
    _loose_cache(path)
    llmshim.install(cache="on")
    try:
        answer = httpx.post(server.url + "/v1/chat/completions", json=BODY)
        assert answer.json()["choices"][0]["message"]["content"] == "Echo: baked answer"
        for name in [path, *(f"{path}{suffix}" for suffix in COMPANIONS)]:
            if os.path.exists(name):
                assert mode(name) == 0o600, name
        assert mode(path.parent) == 0o700
    finally:
        llmshim.uninstall()


def test_a_cache_in_a_shared_folder_is_private_and_the_folder_is_left_alone_with_a_warning(
        server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    path = shared / "answers.sqlite3"
    _loose_cache(path)
    with caplog.at_level(logging.WARNING, logger="llmshim"):
        llmshim.install(cache="on", cache_path=str(path))
        try:
            for prompt in ("one", "two"):
                httpx.post(server.url + "/v1/chat/completions",
                           json={**BODY, "messages": [{"role": "user", "content": prompt}]})
        finally:
            llmshim.uninstall()
    assert mode(path) == 0o600 and all(mode(f"{path}{s}") == 0o600 for s in COMPANIONS if Path(f"{path}{s}").exists())
    assert mode(shared) == 0o1777  # not ours to change
    warned = [r.getMessage() for r in caplog.records if str(shared) in r.getMessage()]
    assert len(warned) == 1 and "writable by other users" in warned[0]


def test_new_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """SQLite creates -wal and -shm with the database file's mode: checked with umask 0."""
    out = subprocess.run([sys.executable, "-c", f"""
import os, stat, json
os.umask(0)
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.store.base import Entry
from llmshim.store.limits_sqlite import SQLiteLimitStore
from llmshim.policies.stats import STATS
base = {str(tmp_path)!r}
cache = SQLiteStore(base + "/new/cache.sqlite3")
cache.put(Entry("k", 200, [], b"b", 1.0, None, {{}}), 1.0)
limits = SQLiteLimitStore(base + "/limits/limits.sqlite3")
limits.try_take("k", 1.0, [("r", 1.0, 10.0, 1.0)], "normal")
STATS.write_to(base + "/stats.json"); STATS.write()
names = [base + "/new", base + "/limits"] + [base + p + s for p in ("/new/cache.sqlite3", "/limits/limits.sqlite3")
                                            for s in ("", "-wal", "-shm")] + [base + "/stats.json"]
print(json.dumps({{n: oct(stat.S_IMODE(os.stat(n).st_mode)) for n in names}}))
"""], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0, out.stderr
    modes = json.loads(out.stdout)
    assert modes == {name: ("0o700" if name.endswith(("/new", "/limits")) else "0o600") for name in modes}


def test_the_rate_limit_store_and_the_stats_file_are_made_private(tmp_path: Path) -> None:
    limits = tmp_path / "limits.sqlite3"
    first = SQLiteLimitStore(str(limits))
    first.try_take("k", 1.0, [("r", 1.0, 10.0, 1.0)], "normal")
    first.close()
    os.chmod(limits, 0o666)
    store = SQLiteLimitStore(str(limits))
    assert store.try_take("k", 1.0, [("r", 1.0, 10.0, 1.0)], "normal") == 0
    assert mode(limits) == 0o600 and mode(f"{limits}-wal") == 0o600
    store.close()
    stats = tmp_path / "stats.json"
    stats.write_text("{}")
    os.chmod(stats, 0o644)
    llmshim.install(stats_file=str(stats))
    llmshim.uninstall()
    try:
        llmshim.policies.stats.STATS.write()
        assert mode(stats) == 0o600 and json.loads(stats.read_text())["pid"] == os.getpid()
    finally:
        llmshim.policies.stats.STATS.write_to(None)


def test_a_file_that_cannot_be_tightened_is_used_with_one_clear_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another user's file: chmod answers EPERM (root here can chmod anything, so the OS call is
    made to fail as it does for an ordinary user)."""
    path = tmp_path / "theirs.sqlite3"
    _loose_cache(path)

    def not_the_owner(name: str, new_mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", name)

    monkeypatch.setattr(os, "chmod", not_the_owner)
    with caplog.at_level(logging.WARNING, logger="llmshim"):
        store = SQLiteStore(str(path))
        assert store.get("k", 2.0) is not None
        store.close()
        prepare_private(str(path), own_directory=False)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"llmshim: cannot make {path} ")]
    assert len(warned) == 1 and "other users may read it" in warned[0]


# -- a cache on a read-only filesystem -------------------------------------------------------------
def _read_only_runner() -> list[str] | None:
    """A command prefix that runs a shell in a mount namespace of its own (root here and in CI)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "-m"], [unshare, "-rm"]):
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


RUNNER = _read_only_runner()


@pytest.mark.skipif(RUNNER is None, reason="needs `unshare -m` (root) or `unshare -rm` for a read-only bind mount")
@pytest.mark.parametrize("companions", ["none", "present"])
def test_a_cache_on_a_read_only_filesystem_serves_hits_in_readonly_mode(
        server: FakeLLMServer, tmp_path: Path, companions: str) -> None:
    baked = tmp_path / "image"
    baked.mkdir()
    path = baked / "cache.sqlite3"
    llmshim.install(cache="on", cache_path=str(path))
    try:
        first = httpx.post(server.url + "/v1/chat/completions", json=BODY)
    finally:
        llmshim.uninstall()
    assert len(server.received) == 1
    assert not Path(f"{path}-shm").exists()  # the last connection closed: SQLite removed -wal and -shm
    if companions == "present":  # baked while another process had it open
        Path(f"{path}-shm").touch()
        Path(f"{path}-wal").touch()
    code = f"""
import json, httpx, llmshim
llmshim.install(cache="readonly", cache_path={str(path)!r})
answer = httpx.post({server.url!r} + "/v1/chat/completions", json={BODY!r})
llmshim.uninstall()
print(json.dumps({{"hit": answer.headers.get("x-llmshim-cache"), "body": answer.text}}))
"""
    script = f"mount --bind {baked} {baked} && mount -o remount,bind,ro {baked} && exec {sys.executable} -c \"$0\""
    assert RUNNER is not None
    done = subprocess.run([*RUNNER, "sh", "-c", script, code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"hit": "hit", "body": first.text}
    assert "llmshim: cache" not in done.stderr, done.stderr  # no failed read, no failed write
    assert len(server.received) == 1  # answered from the read-only file
