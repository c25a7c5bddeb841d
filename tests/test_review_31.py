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
