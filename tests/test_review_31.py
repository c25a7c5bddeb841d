"""Review 31: llmshim inside production process models (gunicorn's sync, gthread, gevent and uvicorn
workers, with and without ``--preload``, worker recycling, reload and graceful stop; celery's prefork
and threads pools), against the bundled FakeLLMServer over real sockets, with the real servers'
own worker processes. Each app's endpoint or task makes one LLM call (requests, or httpx async).

Found: the master of a pre-fork server (gunicorn, celery, ``uvicorn --workers``) installs llmshim
(``llmshim run`` or ``install()`` in the app), makes no call, and exits after its workers: its
at-exit stats snapshot (all zeros) replaced the one a worker wrote, so ``llmshim stats`` showed
nothing after every run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from llmshim.testing import FakeLLMServer, Fault

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("gunicorn")

WSGI_APP = '''
import json, os
import requests
if os.environ.get("APP_INSTALL"):
    import llmshim
    llmshim.install()
LLM = os.environ["LLM_URL"]

def ask(question):
    return requests.post(LLM + "/v1/chat/completions", timeout=30,
                         json={"model": "m", "messages": [{"role": "user", "content": question}]})

ask("boot")  # at import: in the master itself under --preload, before it forks

def app(environ, start_response):
    answer = ask(environ["QUERY_STRING"].split("=", 1)[1])
    import llmshim
    body = json.dumps({"pid": os.getpid(), "status": answer.status_code, "cache": answer.headers.get("x-llmshim-cache"),
                       "text": answer.json()["choices"][0]["message"]["content"] if answer.status_code == 200 else None,
                       "installed": llmshim.is_installed()}).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    return [body]
'''

ASGI_APP = '''
import json, os
import httpx
if os.environ.get("APP_INSTALL"):
    import llmshim
    llmshim.install()
LLM = os.environ["LLM_URL"]
httpx.post(LLM + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "boot"}]},
           timeout=30)  # at import: in the master itself under --preload, before it forks

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(LLM + "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": scope["query_string"].decode().split("=", 1)[1]}]})
    import llmshim
    body = json.dumps({"pid": os.getpid(), "status": answer.status_code, "cache": answer.headers.get("x-llmshim-cache"),
                       "text": answer.json()["choices"][0]["message"]["content"], "installed": llmshim.is_installed()})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})
'''

CELERY_APP = '''
import os
import requests
from celery import Celery
if os.environ.get("APP_INSTALL"):
    import llmshim
    llmshim.install()
app = Celery("tasks", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True

@app.task(bind=True, max_retries=2, default_retry_delay=0)
def ask(self, question):
    import llmshim
    answer = requests.post(os.environ["LLM_URL"] + "/v1/chat/completions", timeout=30,
                           json={"model": "m", "messages": [{"role": "user", "content": question}]})
    if answer.status_code >= 500:
        raise self.retry(exc=RuntimeError(f"upstream {answer.status_code}"))
    return {"pid": os.getpid(), "cache": answer.headers.get("x-llmshim-cache"), "installed": llmshim.is_installed(),
            "text": answer.json()["choices"][0]["message"]["content"]}
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(server: FakeLLMServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), LLM_URL=server.url,
               LLMSHIM_CACHE_PATH=str(tmp_path / "cache.sqlite3"), LLMSHIM_STATS_FILE=str(tmp_path / "stats.json"),
               **extra)
    return env


def _ask(port: int, question: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/?q={question}", timeout=60) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _asked(server: FakeLLMServer) -> list[str]:
    return [r.json()["messages"][0]["content"] for r in server.received]


class Gunicorn:
    """A gunicorn of the test's own, under ``llmshim run`` (``how="run"``) or with ``install()``
    in the app module (``how="install"``); ``stop()`` sends SIGTERM and returns its exit code."""

    def __init__(self, env: dict[str, str], tmp_path: Path, args: list[str], how: str) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}", "--no-control-socket",
                   "--graceful-timeout", "30", *args]
        if how == "run":
            command = [sys.executable, "-m", "llmshim", "run", "--", *command]
        else:
            env = {**env, "APP_INSTALL": "1"}
        self.log = tmp_path / f"gunicorn-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(1200):  # until a worker accepts (its start-up, not a fixed sleep)
            assert self.proc.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                return
            except OSError:
                threading.Event().wait(0.05)
        raise AssertionError("gunicorn never listened:\n" + self.log.read_text())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("gunicorn did not stop within 60 s of SIGTERM:\n" + self.log.read_text()) from None


@contextmanager
def gunicorn(env: dict[str, str], tmp_path: Path, args: list[str], how: str = "run") -> Iterator[Gunicorn]:
    served = Gunicorn(env, tmp_path, args, how)
    try:
        yield served
    finally:
        code = served.stop()
    log = served.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log and "database is locked" not in log and "llmshim" not in log.lower(), log
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", served.port), timeout=5):
        pass  # no worker was orphaned holding the port


def _app(tmp_path: Path, worker: str) -> list[str]:
    """The app module for ``worker`` written to tmp_path, and gunicorn's arguments for it."""
    if worker == "uvicorn":
        pytest.importorskip("uvicorn")
        (tmp_path / "asgiapp.py").write_text(ASGI_APP)
        return ["-k", "uvicorn.workers.UvicornWorker", "asgiapp:app"]
    (tmp_path / "wsgiapp.py").write_text(WSGI_APP)
    return {"sync": [], "gthread": ["--threads", "4"], "gevent": ["-k", "gevent"]}[worker] + ["wsgiapp:app"]


CASES = [("sync", True, "run"), ("sync", False, "install"), ("gthread", True, "install"), ("gthread", False, "run"),
         ("gevent", True, "run"), ("gevent", False, "install"), ("uvicorn", True, "install"), ("uvicorn", False, "run")]


@pytest.mark.parametrize(("worker", "preload", "how"), CASES)
def test_every_recycled_worker_shares_the_cache(server: FakeLLMServer, tmp_path: Path, worker: str, preload: bool,
                                                how: str) -> None:
    """``--max-requests 1``: each request is served by a fresh worker process, forked from a master
    that (under ``--preload``) made an LLM call itself at import. The question is asked upstream
    once, the rest are hits from the SQLite file the processes share; the boot call too (each
    worker imports the app without ``--preload``); a worker's pending writes (the async worker's
    background writer) land before it exits."""
    args = ["-w", "1", "--max-requests", "1", *(["--preload"] if preload else []), *_app(tmp_path, worker)]
    answers = []
    for _ in range(2):  # then a new gunicorn: its workers are other processes for certain
        with gunicorn(_env(server, tmp_path, LLMSHIM_CACHE="on"), tmp_path, args, how) as served:
            answers += [_ask(served.port, "same") for _ in range(2 - len(answers))] or [_ask(served.port, "same")]
    assert [a["text"] for a in answers] == ["Echo: same"] * 3 and all(a["installed"] for a in answers)
    assert len({a["pid"] for a in answers}) >= 2
    assert [a["cache"] for a in answers] == [None, "hit", "hit"]
    assert _asked(server) == ["boot", "same"]


def test_the_masters_exit_does_not_replace_a_workers_stats_snapshot(server: FakeLLMServer, tmp_path: Path) -> None:
    """The master makes no call and exits last: before, its all-zero snapshot was what the file held."""
    args = ["-w", "2", *_app(tmp_path, "sync")]
    with gunicorn(_env(server, tmp_path, LLMSHIM_CACHE="on"), tmp_path, args) as served:
        answers = [_ask(served.port, "q") for _ in range(3)]
        master = served.proc.pid
    snapshot = json.loads((tmp_path / "stats.json").read_text())
    assert [a["text"] for a in answers] == ["Echo: q"] * 3
    assert snapshot["pid"] != master and snapshot["total_calls"] >= 1  # a worker's own (its boot call at least)


def test_a_fork_child_that_calls_is_the_snapshot_its_idle_parent_leaves(tmp_path: Path) -> None:
    """The same, in pure fork terms: the parent installed (stats file set), forked, waited for its
    child (which made a call and exited normally, at-exit handlers run), then exited itself."""
    from conftest import run_python

    stats = tmp_path / "stats.json"
    with FakeLLMServer() as fake:
        run_python(f"""
import os, sys, requests, llmshim
llmshim.install(stats_file={str(stats)!r})
pid = os.fork()
if pid == 0:
    requests.post({fake.url!r} + "/v1/chat/completions", json={{"model": "m", "messages": []}})
    sys.exit(0)
os.waitpid(pid, 0)
print(pid)
""")
    snapshot = json.loads(stats.read_text())
    assert snapshot["total_calls"] == 1 and snapshot["completed"] == 1


@pytest.mark.parametrize("worker", ["sync", "uvicorn"])
def test_sigterm_with_a_call_in_flight_finishes_it_and_its_answer_is_cached(server: FakeLLMServer, tmp_path: Path,
                                                                             worker: str) -> None:
    """A graceful stop while the upstream is still answering: the caller gets its answer, the
    worker exits in time, and the answer (written by the async worker's background writer) is a
    hit for the next gunicorn."""
    args = ["-w", "1", *_app(tmp_path, worker)]
    env = _env(server, tmp_path, LLMSHIM_CACHE="on")
    with gunicorn(env, tmp_path, args) as served:
        server.inject(Fault(delay=1.5, path="/chat/completions"))
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_ask, served.port, "slow")
            for _ in range(1200):  # until the upstream holds the request
                if "slow" in _asked(server):
                    break
                threading.Event().wait(0.01)
            served.proc.send_signal(signal.SIGTERM)
            answer = pending.result(timeout=60)
    assert answer["text"] == "Echo: slow" and answer["cache"] is None
    with gunicorn(env, tmp_path, args) as served:
        again = _ask(served.port, "slow")
    assert again["cache"] == "hit" and _asked(server).count("slow") == 1


def test_a_reload_keeps_the_cache_and_the_new_workers_are_installed(server: FakeLLMServer, tmp_path: Path) -> None:
    """``kill -HUP``: the master starts new workers (re-importing the app), stops the old ones."""
    args = ["-w", "1", *_app(tmp_path, "sync")]
    with gunicorn(_env(server, tmp_path, LLMSHIM_CACHE="on"), tmp_path, args) as served:
        first = _ask(served.port, "r")
        served.proc.send_signal(signal.SIGHUP)
        for _ in range(1200):  # until a new worker answers
            later = _ask(served.port, "r")
            if later["pid"] != first["pid"]:
                break
            threading.Event().wait(0.01)
    assert later["pid"] != first["pid"] and later["installed"] and later["cache"] == "hit"
    assert _asked(server).count("r") == 1


def _limited_run(tmp_path: Path, queue_timeout: str) -> tuple[list[dict[str, Any]], int]:
    """4 sync workers, 8 concurrent distinct questions, ``LLMSHIM_RPM=6`` with a burst of 20 s
    (2 requests at once, refilled at 1 per 10 s) shared through a SQLite ``LLMSHIM_RATELIMIT_STORE``;
    a call over budget gets llmshim's 429 after ``queue_timeout``. The answers, and how many
    requests reached the upstream."""
    with FakeLLMServer() as server:
        server.inject(Fault(delay=0.5, path="/chat/completions"), times=None)  # a passed call holds its worker
        env = _env(server, tmp_path, LLMSHIM_CACHE="off", LLMSHIM_RPM="6", LLMSHIM_RATELIMIT_BURST="20",
                   LLMSHIM_QUEUE_TIMEOUT=queue_timeout,
                   LLMSHIM_RATELIMIT_STORE=f"sqlite:///{tmp_path / 'limits.sqlite3'}")
        (tmp_path / "wsgiapp.py").write_text(WSGI_APP.replace('ask("boot")', 'pass'))
        with gunicorn(env, tmp_path, ["-w", "4", "wsgiapp:app"]) as served, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _ask(served.port, f"q{i}"), range(8)))
        return answers, len(server.received)


def test_a_sqlite_rate_limit_holds_across_workers(tmp_path: Path) -> None:
    """Each worker on a budget of its own would let up to 8 through (2 each); shared, the upstream
    sees the burst at most (and one refill, generously)."""
    answers, upstream = _limited_run(tmp_path, "2")
    passed = [a for a in answers if a["status"] == 200]
    assert upstream == len(passed) and 1 <= len(passed) <= 3, answers
    assert all(a["status"] == 429 for a in answers if a["status"] != 200)
    assert len({a["pid"] for a in answers}) >= 2  # the answers came from several workers


def test_no_waiting_with_a_shared_budget_still_lets_the_burst_through(tmp_path: Path) -> None:
    # LLMSHIM_QUEUE_TIMEOUT=0 with a shared store refused every call: the store is asked on its own
    # thread and the caller waited 0 s for that answer (not for a permit).
    answers, upstream = _limited_run(tmp_path, "0")
    assert 1 <= upstream <= 3, answers


@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.timeout(240)
def test_celery_tasks_share_the_cache_and_task_retries_stay_bounded(server: FakeLLMServer, redis_server: Any,
                                                                     tmp_path: Path, pool: str) -> None:
    """A celery worker under ``llmshim run`` (prefork: children forked after the tasks were
    imported). Repeated questions go upstream once. Against an upstream that always answers 500,
    each task is tried 3 times by celery (``self.retry``) and each try up to 3 times by llmshim,
    within llmshim's retry budget of each worker process (10 a minute at least): llmshim cannot tell
    a task's retry from a new request, so the attempts multiply up to that budget
    (9 + 11 measured with the threads pool: one process)."""
    celery = pytest.importorskip("celery")
    (tmp_path / "tasks.py").write_text(CELERY_APP)
    env = _env(server, tmp_path, BROKER=redis_server.url, LLMSHIM_CACHE="on", LLMSHIM_RETRY_MODE="auto",
               LLMSHIM_RETRY_MAX_DELAY="0")
    command = [sys.executable, "-m", "llmshim", "run", "--", sys.executable, "-m", "celery", "-A", "tasks", "worker",
               "--pool", pool, "-c", "2", "--loglevel", "warning", "--without-heartbeat", "--without-gossip",
               "--without-mingle"]
    log = tmp_path / "celery.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    client = celery.Celery("tasks", broker=redis_server.url, backend=redis_server.url)
    try:
        answers = [client.send_task("tasks.ask", [q]).get(timeout=60) for q in ["a", "b", "a", "b", "a"]]
        server.inject(Fault(status=500), times=None)
        failures = []
        for q in ["x", "y", "z"]:
            with pytest.raises(Exception) as failed:
                client.send_task("tasks.ask", [q]).get(timeout=60)
            failures.append(str(failed.value))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        client.close()
    assert code == 0, log.read_text()
    assert [a["text"] for a in answers] == ["Echo: a", "Echo: b"] * 2 + ["Echo: a"]
    assert all(a["installed"] for a in answers) and [a["cache"] for a in answers][2:] == ["hit"] * 3
    assert _asked(server)[:2] in (["a", "b"], ["b", "a"])
    assert failures == ["upstream 500"] * 3
    failed_attempts = len(server.received) - 2
    processes = 2 if pool == "prefork" else 1
    # 3 tasks x 3 celery tries, + llmshim's retries within each process's budget: 10 a minute, + 0.1
    # per request made (at most 14 requests here: 1.4)
    assert 9 <= failed_attempts <= 9 + 12 * processes
