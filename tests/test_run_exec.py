"""``llmshim run -- COMMAND`` becomes the program (``exec``, as ``opentelemetry-instrument`` does): a
container's SIGTERM to that PID reaches the program, nothing is left running when it stops, and the
program's exit code is the command's. llmshim is still installed in it from the start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(os.name != "posix", reason="exec and SIGTERM: POSIX (elsewhere a child process)")

PROGRAM = """
import os, signal, sys, llmshim
marker = sys.argv[1]
def stop(signum, frame):
    with open(marker, "w") as handle:
        handle.write(f"TERM {os.getpid()} installed={llmshim.is_installed()}")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print(os.getpid(), flush=True)  # the handler is in place from here
while True:
    signal.pause()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=str(ROOT), LLMSHIM_CACHE="off", **extra)
    return env


def _llmshim_run(*command: str) -> list[str]:
    return [sys.executable, "-m", "llmshim", "run", "--", *command]


def test_sigterm_to_llmshim_run_reaches_the_program_and_leaves_nothing_running(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    proc = subprocess.Popen(_llmshim_run(sys.executable, "-c", PROGRAM, str(marker)), env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    program_pid = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert marker.read_text() == f"TERM {program_pid} installed=True"  # the program got it, llmshim in it
        assert program_pid == proc.pid  # the same process: nothing was between the signal and the program
        with pytest.raises(ProcessLookupError):
            os.kill(program_pid, 0)  # and it is gone, not orphaned
    finally:
        proc.stdout.close()
        if program_pid != proc.pid:  # a failed run must not leave its orphan behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(program_pid, signal.SIGKILL)


@pytest.mark.parametrize(("code", "expected"), [("raise SystemExit(7)", 7), ("pass", 0),
                                                ("import os; os.kill(os.getpid(), 9)", -9)])
def test_the_exit_status_is_the_programs(code: str, expected: int) -> None:
    done = subprocess.run(_llmshim_run(sys.executable, "-c", code), env=_env(), timeout=60)
    assert done.returncode == expected


def test_a_missing_command_exits_127_and_no_command_exits_2() -> None:
    missing = subprocess.run(_llmshim_run("no-such-command-llmshim"), env=_env(), capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 127 and "command not found: no-such-command-llmshim" in missing.stderr
    empty = subprocess.run([sys.executable, "-m", "llmshim", "run"], env=_env(), capture_output=True, text=True,
                           timeout=60)
    assert empty.returncode == 2 and "nothing to run" in empty.stderr


def test_the_program_sees_the_environment_llmshim_run_prepared() -> None:
    program = ("import os, llmshim; print(os.environ['PYTHONPATH'].split(os.pathsep)[0]); "
               "print(llmshim.is_installed())")
    done = subprocess.run(_llmshim_run(sys.executable, "-c", program), env=_env(), capture_output=True, text=True,
                          timeout=60)
    boot, installed = done.stdout.split()
    assert Path(boot) == ROOT / "llmshim" / "_boot" and installed == "True", done.stderr
