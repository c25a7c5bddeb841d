"""Review 32: ``llmshim stats`` for a program of many processes.

Found: ``LLMSHIM_STATS_FILE`` held ONE process's snapshot; every process (gunicorn/uvicorn workers,
celery children, multiprocessing workers, ``llmshim run`` subprocesses) replaced it with its own
counters, so ``llmshim stats`` showed whichever wrote last (a quarter of the traffic with four
workers), and a forked child's snapshot counted its parent's calls again.

Now each process writes its own section (pid + process start) under an ``flock`` on
``<file>.lock``, sections of processes that are gone fold into one ``exited`` aggregate, the file's
top level holds the totals, and ``llmshim stats`` shows them with the number of processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmshim.cli import main, stats_view
from llmshim.policies import stats_merge
from llmshim.policies.stats import STATS, Stats
from llmshim.testing import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=str(ROOT), LLMSHIM_STATS_FILE=str(tmp_path / "stats.json"), LLMSHIM_CACHE="off", **extra)
    return env


def _cli_json(path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "llmshim", "stats", "--json", "--file", str(path)],
                          capture_output=True, text=True, env=_env(path.parent), timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _run(script: str, tmp_path: Path, **env: str) -> str:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(tmp_path, **env), timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# -- real processes: multiprocessing fork and spawn, a parent that calls before forking ---------------
PROGRAM = """
import multiprocessing, os, sys, requests, llmshim

def work(calls, model):
    if not llmshim.is_installed():
        llmshim.install()  # a spawned child is a fresh interpreter
    for i in range(calls):
        answer = requests.post(os.environ["LLM_URL"] + "/v1/chat/completions", timeout=30,
                               json={"model": model, "messages": [{"role": "user", "content": f"{model} {i}"}]})
        assert answer.status_code == 200
    if model.startswith("fork"):  # a forked child's own stats are its own calls only
        assert llmshim.stats()["total_calls"] == calls, llmshim.stats()

if __name__ == "__main__":
    llmshim.install()
    work(3, "parent")  # before the children fork: counted once, in the parent's section
    children = [multiprocessing.get_context(method).Process(target=work, args=(3, f"{method}-{n}"))
                for n, method in enumerate(["fork", "fork", "spawn"])]
    for child in children:
        child.start()
    for child in children:
        child.join()
        assert child.exitcode == 0
"""


def test_every_process_of_a_program_is_counted_once(server: FakeLLMServer, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A parent (3 calls, then forks), two fork children and a spawn child of multiprocessing (3
    calls each; the fork children end with ``os._exit``, their last calls are flushed by
    multiprocessing's finalizer): ``llmshim stats`` shows all 12 calls from 4 processes, per model."""
    _run(PROGRAM, tmp_path, LLM_URL=server.url)
    shown = _cli_json(tmp_path / "stats.json")
    assert (shown["total_calls"], shown["completed"], shown["process_count"]) == (12, 12, 4)
    calls = {name.split("/", 1)[1]: counts["calls"] for name, counts in shown["by_model"].items()}
    assert calls == {"parent": 3, "fork-0": 3, "fork-1": 3, "spawn-2": 3}
    assert shown["input_tokens"] == sum(c["input_tokens"] for c in shown["by_model"].values()) > 0
    assert len(server.received) == 12
    assert main(["stats", "--processes", "--file", str(tmp_path / "stats.json")]) == 0
    text = capsys.readouterr().out
    assert "(4 processes, written" in text and "total_calls        12" in text
    listed = text.split("  processes:\n", 1)[1].splitlines()
    assert listed and all(" exited " in line for line in listed)  # the program ended: every process is gone
    assert sum(int(line.split("calls=")[1].split()[0]) for line in listed) == 12


def test_a_forked_child_does_not_count_its_parents_calls(server: FakeLLMServer, tmp_path: Path) -> None:
    """A real ``os.fork``: the parent made 2 calls (written), the child makes 1 and exits, the
    parent one more: 4 calls, the child's section holds 1."""
    _run(f"""
    import os, sys, requests, llmshim
    llmshim.install()
    def ask():
        requests.post({server.url!r} + "/v1/chat/completions", json={{"model": "m", "messages": []}}, timeout=30)
    ask(); ask()
    pid = os.fork()
    if pid == 0:
        ask()
        sys.exit(0 if llmshim.stats()["total_calls"] == 1 else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ask()
    print(pid)
    """, tmp_path)
    document = json.loads((tmp_path / "stats.json").read_text())
    assert (document["total_calls"], document["process_count"]) == (4, 2)
    assert document["exited"]["total_calls"] + sum(s["total_calls"] for s in document["processes"].values()) == 4
    assert len(server.received) == 4


# -- concurrency and recycling ---------------------------------------------------------------------
WRITER = """
import sys
from llmshim.policies.stats import STATS
STATS.write_to(sys.argv[1])
for _ in range(30):
    STATS.add(store_errors=1)
    STATS.write(lock_wait_s=30)  # every write waits its turn: a lost section would show in the total
"""


def test_many_processes_writing_at_once_lose_no_section(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=_env(tmp_path),
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    assert [w.wait(timeout=90) for w in writers] == [0] * 4, [w.stderr.read() for w in writers if w.stderr]
    for writer in writers:
        assert writer.stderr is not None and writer.stderr.read() == ""
        writer.stderr.close()
    document = json.loads(path.read_text())
    assert (document["store_errors"], document["process_count"]) == (4 * 30, 4)
    assert stat_mode(path) == stat_mode(f"{path}.lock") == 0o600


def stat_mode(path: Path | str) -> int:
    return os.stat(path).st_mode & 0o777


def test_recycled_workers_keep_the_totals_and_the_file_stays_small(server: FakeLLMServer, tmp_path: Path) -> None:
    """A master that called once (a ``--preload`` boot call), then two rounds of two forked
    workers that call twice and exit (a pre-fork server recycling its workers): 5 processes
    counted, the master's call once, the gone workers folded into ``exited``."""
    _run(f"""
    import os, sys, requests, llmshim
    llmshim.install()
    requests.post({server.url!r} + "/v1/chat/completions", json={{"model": "m", "messages": []}})  # the master's
    for round in range(2):
        pids = []
        for worker in range(2):
            pid = os.fork()
            if pid == 0:
                for _ in range(2):
                    requests.post({server.url!r} + "/v1/chat/completions", json={{"model": "m", "messages": []}})
                sys.exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
    """, tmp_path)
    document = json.loads((tmp_path / "stats.json").read_text())
    assert (document["total_calls"], document["process_count"]) == (9, 5)
    assert len(document["processes"]) <= 3 and document["exited"]["processes"] >= 2  # the master, the last two
    assert _cli_json(tmp_path / "stats.json")["total_calls"] == 9 == len(server.received)


# -- fail open: what the file may hold --------------------------------------------------------------
BROKEN = {
    "garbage": b"\x00\xffnot json",
    "truncated": b'{"format": "llmshim-stats/2", "processes": {"1:2.0": {"total_calls": 3',
    "foreign": b'["a", "list"]',
    "someone else's object": b'{"name": "not ours"}',
    "damaged section": b'{"format": "llmshim-stats/2", "processes": {"1:2.0": {"total_calls": "many"}}}',
    "deep": b"[" * 100_000,
}


@pytest.mark.parametrize("content", list(BROKEN.values()), ids=list(BROKEN))
def test_a_broken_file_is_reported_by_the_cli_and_replaced_by_the_next_write(
        server: FakeLLMServer, tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    import requests

    import llmshim

    path = tmp_path / "stats.json"
    path.write_bytes(content)
    assert main(["stats", "--file", str(path)]) == 1  # the CLI's own code, in this process (a subprocess each: slow)
    printed = capsys.readouterr()
    assert printed.out == "" and "is not a readable llmshim stats file" in printed.err and str(path) in printed.err
    llmshim.stats(reset=True)
    llmshim.install(stats_file=str(path))
    try:
        answer = requests.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=30)
        assert answer.status_code == 200
        STATS.write()
    finally:
        llmshim.uninstall()
        STATS.write_to(None)
    document = json.loads(path.read_text())
    assert (document["total_calls"], document["process_count"]) == (1, 1)


def test_a_write_that_cannot_get_the_lock_in_time_skips(tmp_path: Path) -> None:
    import fcntl

    path = tmp_path / "stats.json"
    stats = Stats()
    stats.write_to(str(path))
    stats.add(store_errors=1)
    with open(f"{path}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process writing (a separate open file: flock conflicts)
        stats.write(lock_wait_s=0.01)
        assert not path.exists()
    stats.write()
    assert json.loads(path.read_text())["store_errors"] == 1


def test_a_write_inside_a_call_never_sleeps_for_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write at a call's end runs in the caller's thread (an event loop's, in an asyncio
    program): with another process holding the lock it skips at once, it never sleeps."""
    import fcntl

    from llmshim.policies import stats as stats_module

    slept: list[float] = []  # recorded, not raised: the writer fails open, it would swallow an exception
    monkeypatch.setattr(stats_module.time, "sleep", slept.append)
    path = tmp_path / "stats.json"
    stats = Stats()
    stats.write_to(str(path))
    stats.add(store_errors=1)
    with open(f"{path}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stats.write()  # what call_ended calls
        assert not path.exists()
    assert slept == []


def test_an_old_single_process_snapshot_is_read_and_kept_by_the_next_writer(tmp_path: Path) -> None:
    legacy = {"total_calls": 7, "completed": 6, "failed": 1, "average_latency_s": 0.5, "pid": 1, "since": 10.0,
              "by_model": {"openai/gpt-4o": {"calls": 7, "input_tokens": 3, "output_tokens": 4}}}
    shown, listed = stats_view(legacy)
    assert shown == legacy and len(listed) == 1
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(legacy))
    stats = Stats()
    stats.write_to(str(path))
    stats.add(store_errors=2)
    stats.write()
    document = json.loads(path.read_text())
    assert (document["total_calls"], document["store_errors"], document["process_count"]) == (7, 2, 2)
    assert document["average_latency_s"] == 0.5 and document["by_model"]["openai/gpt-4o"]["calls"] == 7


# -- pure: the merge --------------------------------------------------------------------------------
_dyadic = st.integers(0, 10**6).map(lambda n: n / 1024)  # sums of these are exact: equality, not approx
_money = st.none() | _dyadic
_model = st.fixed_dictionaries({**{f: st.integers(0, 1000) for f in stats_merge.MODEL_FIELDS},
                                 "cost_usd": _money, "saved_cost_usd": _money})
_sections = st.fixed_dictionaries({
    **{f: st.integers(0, 10**6) for f in stats_merge.FIELDS}, **{f: _money for f in stats_merge.MONEY},
    "latency_count": st.integers(0, 1000), "latency_total_s": _dyadic,
    "by_model": st.dictionaries(st.sampled_from(["openai/a", "ollama/b", "openai/c"]), _model, max_size=3),
    "since": st.none() | _dyadic, "processes": st.integers(0, 5)})


@settings(max_examples=30, deadline=None)
@given(st.lists(_sections, max_size=5), st.randoms(use_true_random=False))
def test_the_merge_is_a_sum_in_any_order_and_grouping(sections: list[dict[str, Any]], rng: Any) -> None:
    shuffled = list(sections)
    rng.shuffle(shuffled)
    cut = rng.randint(0, len(sections))
    assert stats_merge.merge(sections) == stats_merge.merge(shuffled)
    assert stats_merge.merge([stats_merge.merge(sections[:cut]), stats_merge.merge(sections[cut:])]) == \
        stats_merge.merge(sections)
    assert stats_merge.merge([*sections, stats_merge.empty()]) == stats_merge.merge(sections)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.integers(1, 10**6).map(lambda p: f"{p}:1.0"), _sections, max_size=5), _sections,
       st.sets(st.integers(1, 10**6)))
def test_folding_the_exited_keeps_the_totals_and_the_file_round_trips(
        sections: dict[str, dict[str, Any]], exited: dict[str, Any], alive: set[int]) -> None:
    kept, folded = stats_merge.fold_exited(sections, exited, lambda pid: pid in alive)
    assert stats_merge.totals(kept, folded) == stats_merge.totals(sections, exited)
    assert all(int(key.split(":")[0]) in alive for key in kept)
    document = json.loads(json.dumps(stats_merge.document(kept, folded, 1)))
    assert stats_merge.parse(document)[:2] == (kept, folded)


_calls = st.lists(st.fixed_dictionaries({
    "outcome": st.sampled_from(["ok", "aborted", "error"]), "cache_hit": st.none() | st.booleans(),
    "model": st.sampled_from(["a", "b"]), "tokens": st.tuples(st.integers(0, 50), st.integers(0, 50)),
    "duration": st.none() | _dyadic, "retries": st.integers(0, 2), "cost": _money}), max_size=12)


def _call(spec: dict[str, Any]) -> Any:
    """A call as ``Stats.call_ended`` reads one (outcome, facts, response tokens, provider/model, duration)."""
    hit = spec["cache_hit"]
    tokens_in, tokens_out = spec["tokens"]
    facts = SimpleNamespace(cache_hit=hit, estimator=None, retries=spec["retries"], ratelimit_wait_s=None,
                            throttled=False, saved_input_tokens=tokens_in if hit else None,
                            saved_output_tokens=tokens_out if hit else None,
                            tokens_saved=tokens_in + tokens_out if hit else 0,
                            cost_usd=None if hit else spec["cost"], saved_cost_usd=spec["cost"] if hit else None)
    response = SimpleNamespace(tokens=SimpleNamespace(input_tokens=tokens_in, output_tokens=tokens_out))
    return SimpleNamespace(outcome=spec["outcome"], facts=facts, response=response, duration=spec["duration"],
                           info=SimpleNamespace(provider="openai", model=spec["model"]))


@settings(max_examples=60, deadline=None)
@given(_calls, st.lists(st.integers(0, 2), min_size=12, max_size=12))
def test_sections_of_processes_merge_to_the_stats_of_one_process_counting_every_call(
        calls: list[dict[str, Any]], owners: list[int]) -> None:
    one, processes = Stats(), [Stats() for _ in range(3)]
    for spec, owner in zip(calls, owners, strict=False):
        for stats in (one, processes[owner]):
            stats.call_started()
            stats.call_ended(_call(spec))
    total = stats_merge.merge(p.section() for p in processes)
    merged, alone = stats_merge.derive(total), one.snapshot()
    assert merged.pop("since") is not None and alone.pop("since") is not None and alone.pop("pid") == os.getpid()
    assert merged == alone  # the average too: the latency sums are exact (dyadic durations)
    timed = [Fraction(c["duration"]) for c in calls if c["duration"] is not None]
    assert total["latency_count"] == len(timed) and Fraction(total["latency_total_s"]) == sum(timed)
    assert total["processes"] == 3


def test_llmshim_stats_shows_every_gunicorn_worker(server: FakeLLMServer, tmp_path: Path) -> None:
    """``llmshim run -- gunicorn -w 2``: each worker imports the app (one boot call) and answers
    requests; the master makes none. Before, the file held one worker's share."""
    pytest.importorskip("gunicorn")
    from test_review_31 import _app, _ask, gunicorn
    from test_review_31 import _env as gunicorn_env

    with gunicorn(gunicorn_env(server, tmp_path, LLMSHIM_CACHE="off"), tmp_path, ["-w", "2", *_app(tmp_path, "sync")]) \
            as served:
        answers = [_ask(served.port, f"q{n}") for n in range(4)]
    assert all(a["status"] == 200 for a in answers)
    shown = _cli_json(tmp_path / "stats.json")
    assert shown["total_calls"] == 6 == len(server.received) and shown["process_count"] == 2


def test_a_fork_while_another_thread_writes_leaves_the_child_no_held_lock(tmp_path: Path) -> None:
    """The flock belongs to the open file, which a forked child shares: the child lets go of its
    copy at once, or every writer would skip for as long as the child lives."""
    from conftest import run_python

    out = run_python(f"""
import fcntl, os
from llmshim.policies.stats import Stats
stats = Stats()
lock = os.open({str(tmp_path / "s.json.lock")!r}, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX)
stats._lock_fd = lock  # the moment a thread of this process is inside write()
ready_r, ready_w = os.pipe()  # child -> parent: it ran its after-fork handling
done_r, done_w = os.pipe()  # parent -> child: the lock was tried, the child may end
pid = os.fork()
if pid == 0:
    stats.after_fork_in_child()
    os.write(ready_w, b"x")
    os.read(done_r, 1)  # alive until the parent has tried the lock
    os._exit(0)
os.read(ready_r, 1)
os.close(lock)  # the parent's write ends
other = os.open({str(tmp_path / "s.json.lock")!r}, os.O_RDWR)
try:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held by the child")
os.write(done_w, b"x")
os.waitpid(pid, 0)
""")
    assert out.strip() == "free"
