"""`llmshim run` reaches an unmodified program and its children; `llmshim doctor` reports and judges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmshim.testing import FakeLLMServer


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmshim", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


APP = """
import json, multiprocessing, subprocess, sys, requests, llmshim

def worker(url):
    import llmshim, requests
    requests.post(url + "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "w"}],
                                           "stream": False}, timeout=5)
    return llmshim.is_installed(), llmshim.stats()["total_calls"]

if __name__ == "__main__":
    url = sys.argv[1]
    requests.post(url + "/api/chat", json={"model": "m", "messages": [], "stream": False}, timeout=5)
    child = subprocess.run([sys.executable, "-c", "import llmshim; print(llmshim.is_installed())"],
                           capture_output=True, text=True).stdout.strip()
    kinds = {}
    for method in ("spawn", "forkserver"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            kinds[method] = pool.apply(worker, (url,))
    print(json.dumps({"installed": llmshim.is_installed(), "calls": llmshim.stats()["total_calls"],
                      "subprocess": child, **kinds}))
"""


def test_run_reaches_the_program_and_every_kind_of_child(server: FakeLLMServer, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    env = _env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    done = _run(["run", "--cache", "off", "--", sys.executable, str(app), server.url], env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"installed": True, "calls": 1, "subprocess": "True", "spawn": [True, 1],
                      "forkserver": [True, 1]}
    assert len(server.received) == 3


def test_run_caches_and_traces_an_unmodified_program(server: FakeLLMServer, tmp_path: Path) -> None:
    app = tmp_path / "plain.py"
    app.write_text("import sys, requests\n"
                   "print(requests.post(sys.argv[1] + '/v1/chat/completions', json={'model': 'm', 'messages': []},"
                   " timeout=5).headers.get('x-llmshim-cache'))\n")
    env = _env(LLMSHIM_CACHE_PATH=str(tmp_path / "c.sqlite3"))
    first = _run(["run", "--cache", "on", "--otel-exporter", "console", "--", sys.executable, str(app), server.url],
                 env)
    second = _run(["run", "--cache", "on", "--", sys.executable, str(app), server.url], env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.splitlines()[0] == "None" and second.stdout.strip() == "hit"
    assert '"name": "chat m"' in first.stdout  # the span, exported to the console
    assert len(server.received) == 1


def test_run_chains_an_existing_sitecustomize_and_rejects_bad_settings(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    env = _env(PYTHONPATH=str(own))
    done = _run(["run", "--", sys.executable, "-c",
                 "import os, llmshim; print(os.environ.get('OWN_SITECUSTOMIZE'), llmshim.is_installed())"], env)
    assert done.returncode == 0 and done.stdout.split() == ["ran", "True"], done.stderr
    bad = _run(["run", "--", sys.executable, "-c", "print('should not run')"], _env(LLMSHIM_RPM="lots"))
    assert bad.returncode == 2 and "LLMSHIM_RPM" in bad.stderr and "should not run" not in bad.stdout


def test_doctor_reports_and_judges(tmp_path: Path) -> None:
    env = _env(LLMSHIM_CACHE_PATH=str(tmp_path / "c.sqlite3"))
    ok = _run(["doctor"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for part in ("client libraries:", "requests.adapters.HTTPAdapter.send", "settings (secrets masked):",
                 "cache:", "rate-limit store:", "OpenTelemetry:", "conflicts:"):
        assert part in ok.stdout, part
    (tmp_path / "c.sqlite3").write_bytes(b"garbage" * 200)
    corrupt = _run(["doctor"], env)
    assert corrupt.returncode == 1 and "BROKEN: cannot read the cache" in corrupt.stdout
    invalid = _run(["doctor"], _env(LLMSHIM_CACHE="sometimes"))
    assert invalid.returncode == 2 and "LLMSHIM_CACHE" in invalid.stdout
    unreachable = _run(["doctor"], _env(LLMSHIM_RATELIMIT_STORE="redis://127.0.0.1:9/0", LLMSHIM_CACHE="off"))
    assert unreachable.returncode == 1 and "BROKEN: redis unreachable" in unreachable.stdout


def test_run_reaches_uvicorn_workers(server: FakeLLMServer, tmp_path: Path) -> None:
    import socket
    import urllib.request

    pytest = __import__("pytest")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = _env(LLM_HOST=server.url, LLMSHIM_CACHE_PATH=str(tmp_path / "c.sqlite3"),
               PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "llmshim", "run", "--", sys.executable, "-m", "uvicorn",
                             "examples.fastapi_app:app", "--workers", "2", "--port", str(port), "--log-level",
                             "warning"], env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answers = []
        for _ in range(600):  # until the workers accept connections (their start-up, not a fixed sleep)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ask?q=hello", timeout=5) as response:
                    answers.append(json.loads(response.read()))
                break
            except OSError:
                import threading

                threading.Event().wait(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ask?q=hello", timeout=5) as response:
            answers.append(json.loads(response.read()))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # no worker was orphaned holding the port: SIGTERM reached uvicorn, which stopped its workers
    assert [a["answer"] for a in answers] == ["Echo: hello", "Echo: hello"]
    assert all(a["llmshim_active_in_worker"] for a in answers)
    assert answers[1]["cached"] == "hit" and len(server.received) == 1


def test_run_becomes_the_program_so_signals_reach_it() -> None:
    """A container stops `llmshim run -- app` with SIGTERM to that PID: the app must get it, and
    nothing may be left running (a child of a parent that died would be)."""
    program = ("import os, signal, sys\n"
               "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(0)))\n"
               "print(os.getpid(), flush=True)\n"
               "signal.pause()\n")
    proc = subprocess.Popen([sys.executable, "-m", "llmshim", "run", "--", sys.executable, "-c", program],
                            env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert int(proc.stdout.readline()) == proc.pid  # the same process: exec, not a child
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert "got TERM" in out and proc.returncode == 0
