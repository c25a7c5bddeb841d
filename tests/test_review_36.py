"""Review 36: a program under llmshim stops the way it stops without it.

Each test runs a small program (``CHILD``) in a fresh interpreter against the FakeLLMServer of the
test, which routes faults by a path prefix (``/retry/v1/...`` answers 503 with retry-after 8,
``/slow/v1/...`` answers after 20 s, ``/stream/v1/...`` streams one piece a second). The program
says on stdout when it has reached the point to interrupt; the test then sends the signal. Where
the program is must be exact, so a ``sys.setprofile`` watcher on its main thread spots llmshim's own
blocking primitive (the rate-limit queue's wait, the retry's sleep, the coalescing follower's wait,
the SQLite INSERT of the answer) and reports it just before the call blocks; no sleep synchronises
anything. Several scenarios share one program: each caught KeyboardInterrupt is reported and the
next scenario runs in the same (now interrupted-before) process; the last one is left uncaught, so
the exit code is Python's own for Ctrl-C, compared with the same program without llmshim.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llmshim.testing import FakeLLMServer, Fault

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

#: Slow enough that "interrupted before it elapsed" cannot be luck, short enough to leave no
#: sleeper behind for long (the server's threads are daemons).
RETRY_AFTER, SLOW, CHUNK_DELAY = 8, 20.0, 0.1

CHILD = r'''
import asyncio, json, os, signal, sys, threading, time

# Ctrl-C as a program started from a terminal gets it: the test process (a pytest-xdist worker, a
# thread some earlier test left with SIGINT blocked or ignored) hands its children its own signal
# mask and ignored signals, under which the SIGINT sent below never arrives.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)

SHIM = os.environ["SHIM"] == "1"
if SHIM:
    import llmshim
    llmshim.install()
URL = os.environ["URL"]


READY_AT = [0.0]


def say(*words):
    if words == ("READY",):
        READY_AT[0] = time.monotonic()
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def backed_by(frame, suffix):
    return frame.f_back is not None and frame.f_back.f_code.co_filename.endswith(suffix)


def sqlite_call(frame, event, arg, where):
    return (event == "c_call" and getattr(arg, "__name__", "") == "execute" and frame.f_code.co_name == where
            and frame.f_code.co_filename.endswith("cache_sqlite.py"))


# Where each point is: the primitive llmshim blocks in, seen the instant before it is entered.
POINTS = {
    "queue": lambda f, e, a: e == "call" and f.f_code.co_name == "wait" and backed_by(f, "ratelimit.py"),
    "retry": lambda f, e, a: e == "c_call" and a is time.sleep and f.f_code.co_filename.endswith("retry.py"),
    "coalesce": lambda f, e, a: e == "call" and f.f_code.co_name == "wait" and backed_by(f, "singleflight.py"),
    "write": lambda f, e, a: sqlite_call(f, e, a, "put"),  # the INSERT of the answer, in its transaction
    "plain": lambda f, e, a: e == "c_call" and getattr(a, "__name__", "") == "recv_into",
    "poll": lambda f, e, a: e == "c_call" and getattr(a, "__name__", "") == "poll",
    "asleep": lambda f, e, a: e == "call" and f.f_code.co_name == "sleep" and backed_by(f, "retry.py"),
    "aqueue": lambda f, e, a: e == "call" and f.f_code.co_name == "wait_for" and backed_by(f, "ratelimit.py"),
    "acoalesce": lambda f, e, a: e == "call" and f.f_code.co_name == "wait_for" and backed_by(f, "singleflight.py"),
}


def watch(points, then=None):
    """Report READY once every point in ``points`` was reached on this thread; ``then()`` after."""
    left = set(points)

    def profile(frame, event, arg):
        for point in list(left):
            if POINTS[point](frame, event, arg):
                left.discard(point)
        if not left:
            sys.setprofile(None)
            say("READY")
            if then is not None:
                then()
    sys.setprofile(profile)


def hold():
    """Stay here (inside the write's transaction) until the signal ends it."""
    threading.Event().wait(60)


def prefix(point):
    return {"retry": "retry", "coalesce": "slow", "plain": "slow", "stream": "stream"}.get(point, "fast")


def body(lib, point):
    words = {"write": "big " * 100_000, "stream": " ".join(f"w{i}" for i in range(200))}.get(point, point)
    return {"model": "limited-model" if point == "queue" else "gpt-fake",
            "messages": [{"role": "user", "content": f"{lib} {words}"}]}


def ask(lib, point, stream=False):
    base = f"{URL}/{prefix(point)}/v1"
    payload = dict(body(lib, point), stream=stream)
    auth = {"Authorization": "Bearer sk-test"}
    if lib == "requests":
        import requests
        reply = requests.post(base + "/chat/completions", json=payload, headers=auth, timeout=30, stream=stream)
        return reply.iter_lines() if stream else reply.json()
    if lib == "httpx":
        import httpx
        client = httpx.Client(timeout=30)
        if stream:
            def lines():
                with client.stream("POST", base + "/chat/completions", json=payload, headers=auth) as reply:
                    yield from reply.iter_lines()
            return lines()
        return client.post(base + "/chat/completions", json=payload, headers=auth).json()
    import openai
    client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=30)
    return client.chat.completions.create(messages=payload["messages"], model=payload["model"], stream=stream)


def flights():
    from llmshim.policies.cache import CachePolicy
    from llmshim.runtime import STATE
    return next(p for p in STATE.pipeline.policies if isinstance(p, CachePolicy)).flights


def scenario(lib, point):
    if point == "stream":
        pieces = iter(ask(lib, point, stream=True))
        next(pieces)
        say("READY")
        for _ in pieces:
            pass
        return
    if point == "coalesce":  # a leader in flight on another thread first, then the same call here
        before = flights().in_flight()
        threading.Thread(target=ask, args=(lib, point), daemon=True).start()
        while flights().in_flight() == before:
            threading.Event().wait(0.005)
    watch([point], hold if point == "write" else None)
    try:
        ask(lib, point)
    finally:
        sys.setprofile(None)


def run_sync(scenarios):
    if SHIM and any(point == "queue" for _, point in scenarios):
        ask("warm", "queue")  # takes the one permit a minute: the next limited-model call queues
    *caught, last = scenarios
    for lib, point in caught:
        try:
            scenario(lib, point)
        except KeyboardInterrupt:
            say("INTERRUPTED", lib, point, round(time.monotonic() - READY_AT[0], 3))
        else:
            say("FINISHED", lib, point)
    scenario(*last)


async def run_async():
    import httpx
    client = httpx.AsyncClient(timeout=30)
    auth = {"Authorization": "Bearer sk-test"}

    async def call(point, lib="async"):
        reply = await client.post(f"{URL}/{prefix(point)}/v1/chat/completions", json=body(lib, point), headers=auth)
        return reply.json()

    if not SHIM:  # nothing of llmshim's to wait in: the loop waiting for the calls' answers
        calls = [asyncio.create_task(call("plain")), asyncio.create_task(call("plain", "again"))]
        watch(["poll"])
        await asyncio.gather(*calls)
        return
    await call("queue", "warm")
    leader = asyncio.create_task(call("coalesce"))
    while flights().in_flight() == 0:
        await asyncio.sleep(0)
    watch(["asleep", "aqueue", "acoalesce"])
    await asyncio.gather(leader, call("coalesce"), call("queue"), call("retry"))


def run_threads():
    done = []

    def worker(point, lib):
        try:
            ask(lib, point)
            done.append(lib)
        except Exception as exc:
            say("FAILED", lib, type(exc).__name__, exc)

    # daemons: four queued behind one rate-limited call, four following one slow leader
    workers = [threading.Thread(target=worker, args=("queue", f"daemon{n}"), daemon=True) for n in range(4)]
    workers += [threading.Thread(target=worker, args=("coalesce", "daemon"), daemon=True) for n in range(4)]
    workers += [threading.Thread(target=worker, args=("fast", f"worker{n}")) for n in range(8)]
    for thread in workers:
        thread.start()
    say("READY")
    sys.stdin.readline()  # the test says when every call is in flight or queued
    import atexit
    atexit.register(lambda: say("DONE", sum(lib.startswith("worker") for lib in done)))
    sys.exit(0)


mode = os.environ["MODE"]
if mode == "sync":
    run_sync([tuple(s.split(":")) for s in os.environ["SCENARIOS"].split(",")])
elif mode == "async":
    asyncio.run(run_async())
else:
    run_threads()
'''


def _environment(server: FakeLLMServer, cache: Path, shim: bool, mode: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=str(ROOT), URL=server.url, SHIM="1" if shim else "0", MODE=mode,
               LLMSHIM_CACHE="on", LLMSHIM_CACHE_PATH=str(cache), LLMSHIM_RETRY_MODE="llmshim",
               LLMSHIM_LIMITS="limited-model=1rpm", LLMSHIM_QUEUE_TIMEOUT="60", PYTHONUNBUFFERED="1", **more)
    return env


def _serve_faults(server: FakeLLMServer) -> None:
    server.inject(Fault(path="/retry/", status=503, headers={"retry-after": str(RETRY_AFTER)}), times=None)
    server.inject(Fault(path="/slow/", delay=SLOW), times=None)
    server.inject(Fault(path="/stream/", chunk_delay=CHUNK_DELAY), times=None)


def _run(env: dict[str, str], on_ready: Callable[[subprocess.Popen[str]], None],
         timeout: float = 40) -> tuple[int, list[str], str]:
    """Run CHILD; at each READY line call ``on_ready(proc)``. A hang is a failure, not a stuck test."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    errors: list[str] = []
    hung: list[bool] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else ""), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, lambda: (hung.append(True), proc.kill()))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("READY"):
                on_ready(proc)
        code = proc.wait()
    finally:
        timer.cancel()
    reader.join()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    if hung:
        raise AssertionError(f"the program hung (killed after {timeout} s):\n" + "\n".join(lines) + "\n" + errors[0])
    return code, lines, errors[0]


def _blocked(pid: int) -> bool:
    """Whether the main thread of ``pid`` sleeps in a system call (Linux's /proc; True where none)."""
    try:
        state = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in "SD" and Path(f"/proc/{pid}/task/{pid}/syscall").read_text().split()[0] != "running"
    except (OSError, IndexError):
        return True


def _interrupt(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C once the program's main thread blocks in the wait it announced. Sent earlier, between
    the READY line and the wait's system call, CPython notes the signal but the sleep or lock wait
    it then enters is not interrupted by it: the KeyboardInterrupt comes when that wait ends, with
    or without llmshim (seen once in CI on a loaded machine: 8.0 s, the whole retry-after)."""
    while proc.poll() is None and not _blocked(proc.pid):
        threading.Event().wait(0.0005)
    proc.send_signal(signal.SIGINT)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()


def _quiet(stderr: str, tracebacks: int) -> None:
    """Nothing on stderr but the program's own tracebacks (as many as without llmshim): no warning,
    no thread's traceback, no 'Exception ignored', nothing from a callback after the loop closed."""
    for noise in ("Warning", "Exception ignored", "Exception in thread", "Task was destroyed",
                  "Event loop is closed", "was never retrieved", "llmshim:"):
        assert noise not in stderr, stderr
    assert stderr.count("Traceback") == tracebacks, stderr


def _sound(cache: Path) -> list[str]:
    """The cache file after the interrupted program: intact, and the prompts of what it holds."""
    with sqlite3.connect(cache) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT body FROM entries").fetchall()
    conn.close()
    return [json.loads(bytes(body))["choices"][0]["message"]["content"] for body, in rows]


LIBRARIES = ("requests", "httpx", "openai")
POINTS = ("queue", "retry", "coalesce", "stream", "write")


def test_ctrl_c_interrupts_a_call_at_once_wherever_llmshim_holds_it(server: FakeLLMServer, tmp_path: Path) -> None:
    """SIGINT while queued for a rate-limit permit, sleeping before a retry, following an identical
    call in flight, reading a slow stream, or inside the SQLite write of a big answer: for requests,
    httpx and the OpenAI SDK, KeyboardInterrupt reaches the program long before the wait would have
    ended, the program goes on (the next scenario runs in the same process), and it finally dies of
    Ctrl-C exactly as the same program without llmshim; the cache is sound and never holds an
    interrupted answer."""
    _serve_faults(server)
    cache = tmp_path / "cache.sqlite3"
    scenarios = ",".join(f"{lib}:{point}" for lib in LIBRARIES for point in POINTS) + ",requests:plain"
    code, lines, stderr = _run(_environment(server, cache, True, "sync", SCENARIOS=scenarios), _interrupt)
    without = _run(_environment(server, tmp_path / "plain.sqlite3", False, "sync", SCENARIOS="requests:plain"),
                   _interrupt)
    assert (code, without[0]) == (-signal.SIGINT, -signal.SIGINT), stderr
    interrupted = {(w[1], w[2]): float(w[3]) for w in map(str.split, lines) if w[0] == "INTERRUPTED"}
    assert set(interrupted) == {(lib, point) for lib in LIBRARIES for point in POINTS}, lines
    assert max(interrupted.values()) < RETRY_AFTER, interrupted  # not at the wait's end: at once
    assert stderr.strip().endswith("KeyboardInterrupt") and without[2].strip().endswith("KeyboardInterrupt")
    _quiet(stderr, without[2].count("Traceback"))
    stored = _sound(cache)
    assert not [text for text in stored if "big" in text], "an interrupted write was stored"
    assert all(text.startswith("Echo: ") for text in stored), stored


def test_an_interrupted_write_is_never_a_hit_for_the_next_process(server: FakeLLMServer, tmp_path: Path) -> None:
    """SIGINT, then SIGKILL (no clean-up at all), inside the write's transaction of a 400 kB answer:
    the next process finds the file intact (WAL recovery), misses, and stores the answer whole."""
    cache = tmp_path / "cache.sqlite3"
    for stop in (_interrupt, _kill):
        code, _, stderr = _run(_environment(server, cache, True, "sync", SCENARIOS="httpx:write"), stop)
        assert code == (-signal.SIGINT if stop is _interrupt else -signal.SIGKILL), stderr
        assert not [text for text in _sound(cache) if "big" in text]
    import llmshim

    llmshim.install(cache="on", cache_path=str(cache))
    try:
        prompt = "httpx " + "big " * 100_000
        for expected in (None, "hit"):  # a miss carries no header
            reply = httpx.post(f"{server.url}/fast/v1/chat/completions", timeout=30,
                               json={"model": "gpt-fake", "messages": [{"role": "user", "content": prompt}]},
                               headers={"Authorization": "Bearer sk-test"})
            assert reply.headers.get("x-llmshim-cache") == expected
            assert reply.json()["choices"][0]["message"]["content"] == "Echo: " + prompt
    finally:
        llmshim.uninstall()
    assert [text for text in _sound(cache) if "big" in text] == ["Echo: " + prompt]


def test_ctrl_c_under_asyncio_run_with_tasks_queued_retrying_and_coalesced(server: FakeLLMServer,
                                                                          tmp_path: Path) -> None:
    """``asyncio.run(main())`` with one task queued for a permit, one sleeping before a retry, one
    following a slow leader: Ctrl-C ends the program with KeyboardInterrupt as without llmshim, and
    nothing complains after the loop has closed (no destroyed pending task, no closed-loop error
    from a callback of llmshim's)."""
    _serve_faults(server)
    code, lines, stderr = _run(_environment(server, tmp_path / "c.sqlite3", True, "async"), _interrupt)
    without = _run(_environment(server, tmp_path / "p.sqlite3", False, "async"), _interrupt)
    assert lines == ["READY"] and (code, without[0]) == (-signal.SIGINT, -signal.SIGINT), stderr
    assert stderr.strip().endswith("KeyboardInterrupt") and without[2].strip().endswith("KeyboardInterrupt")
    _quiet(stderr, without[2].count("Traceback"))
    _sound(tmp_path / "c.sqlite3")


def test_sys_exit_with_calls_in_flight_and_queued_on_other_threads(server: FakeLLMServer, tmp_path: Path) -> None:
    """``sys.exit()`` in the main thread while 8 daemon threads are queued for a permit or follow a
    slow leader and 8 others are mid-call: the others finish their calls, the process exits 0 as
    without llmshim, llmshim's exit hooks do not wait for the daemons, nothing is printed."""
    server.inject(Fault(path="/slow/", delay=SLOW), times=None)
    server.inject(Fault(path="/fast/", delay=1.0), times=None)
    stats = tmp_path / "stats.json"

    def when_all_are_in(proc: subprocess.Popen[str]) -> None:
        # 8 workers, the rate-limited daemons' one permitted call and the coalescing leader(s)
        # are at the server; then every call is in flight or queued
        while sum("/fast/" in r.path and "limited" not in r.json()["model"] for r in list(server.received)) < 8:
            threading.Event().wait(0.01)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()

    for shim in (True, False):
        server.received.clear()
        code, lines, stderr = _run(_environment(server, tmp_path / "c.sqlite3", shim, "threads",
                                                LLMSHIM_STATS_FILE=str(stats)), when_all_are_in)
        assert (code, lines) == (0, ["READY", "DONE 8"]), stderr
        _quiet(stderr, 0)
    assert len(_sound(tmp_path / "c.sqlite3")) >= 8


# -- an interrupt inside one end-of-body observer, deterministically -------------------------------
def _interrupt_at(where: Callable[[object, str, object], bool]) -> Callable[[], None]:
    """Raise KeyboardInterrupt on this thread the first time ``where(frame, event, arg)`` holds:
    what a Ctrl-C does there (a signal during a C call, SQLite's included, is raised just after it).
    Returns how to stop watching."""
    def profile(frame: object, event: str, arg: object) -> None:
        if where(frame, event, arg):
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(profile)
    return lambda: sys.setprofile(None)


def _in(name: str, filename: str, caller: str | None = None) -> Callable[[object, str, object], bool]:
    """Entering function ``name`` of ``filename`` (called from a function named ``caller``)."""
    def where(frame: object, event: str, arg: object) -> bool:
        code, back = frame.f_code, frame.f_back  # type: ignore[attr-defined]
        return (event == "call" and code.co_name == name and code.co_filename.endswith(filename)
                and (caller is None or (back is not None and back.f_code.co_name == caller)))
    return where


@pytest.mark.parametrize(("point", "library", "stored"), [
    (_in("put", "cache_sqlite.py"), "requests", False),  # the answer's write: the call's report came after it
    (_in("put", "cache_sqlite.py"), "httpx", False),
    (_in("pump", "limiter.py", "release"), "httpx", True),  # came before the write, which still stores it
], ids=["write-requests", "write-httpx", "slot-httpx"])
def test_ctrl_c_in_one_end_of_body_observer_still_ends_the_others(
        server: FakeLLMServer, installed_cached: Callable[..., object], records: list[object],
        point: Callable[[object, str, object], bool], library: str, stored: bool) -> None:
    """The end of a body runs several observers in turn (the limiter's slot, the cache's write and
    landing, the call's report, the pipeline's leave). A Ctrl-C inside one of them reaches the
    caller, and the others still run: the call is reported once, the identical call in flight
    lands (an identical call is stored or served, not kept 30 s waiting on a flight that never
    lands, and never stored again), the slot is free, and a retired pipeline closes."""
    import requests

    import llmshim
    from llmshim.policies.cache import CachePolicy
    from llmshim.policies.ratelimit import RateLimitPolicy
    from llmshim.runtime import STATE

    installed_cached(max_concurrency="2")
    policies = STATE.pipeline.policies
    flights = next(p for p in policies if isinstance(p, CachePolicy)).flights
    limiter = next(p for p in policies if isinstance(p, RateLimitPolicy)).limiter
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": f"interrupted {library}"}]}

    def ask() -> tuple[str | None, str]:
        url, auth = f"{server.url}/v1/chat/completions", {"Authorization": "Bearer sk-test"}
        reply = requests.post(url, json=body, headers=auth, timeout=30) if library == "requests" else \
            httpx.post(url, json=body, headers=auth, timeout=30)
        return reply.headers.get("x-llmshim-cache"), reply.json()["choices"][0]["message"]["content"]

    stop = _interrupt_at(point)
    try:
        with pytest.raises(KeyboardInterrupt):
            ask()
    finally:
        stop()
    ended = [r for r in records if getattr(r, "event", "") != "call_started"]
    assert (len(ended), flights.in_flight(), limiter.held()) == (1, 0, (0, 0))
    pipeline = STATE.pipeline
    answer = "Echo: interrupted " + library
    assert [ask() for _ in range(2)] == [("hit" if stored else None, answer), ("hit", answer)]
    llmshim.uninstall()
    assert pipeline._closed


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("point", [_in("_patience", "ratelimit.py"), _in("_learn", "ratelimit.py")],
                         ids=["granted-before-the-wait", "reply-before-the-release"])
def test_ctrl_c_next_to_the_rate_limit_wait_leaves_no_slot_taken(
        server: FakeLLMServer, installed: Callable[..., object],
        point: Callable[[object, str, object], bool], asynchronous: bool) -> None:
    """A Ctrl-C just after the enqueue granted a permit at once (before the wait), or just after
    the reply came back (before its end was made to release the slot), leaves no slot taken: with
    one slot, a leaked one would queue every later call until its queue timeout, for good."""
    import asyncio

    from llmshim.policies.ratelimit import RateLimitPolicy
    from llmshim.runtime import STATE

    installed(max_concurrency="1")
    limiter = next(p for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy)).limiter
    request = {"url": f"{server.url}/v1/chat/completions", "headers": {"Authorization": "Bearer sk-test"},
               "json": {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}}

    async def ask() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(**request)

    stop = _interrupt_at(point)
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(ask()) if asynchronous else httpx.post(timeout=30, **request)
    finally:
        stop()
    assert limiter.held() == (0, 0)
