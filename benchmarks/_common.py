"""Helpers shared by the benchmarks: percentiles, timing loops, the bundled server in its own process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def pin(pid: int, core_index: int) -> None:
    """Pin a process to one core (when there are at least two): client and server must not share."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 2:
        os.sched_setaffinity(pid, {cores[core_index]})


def start_server() -> tuple[subprocess.Popen[str], str]:
    """The bundled LLM server in its own process on the last core; this process on the first."""
    proc = subprocess.Popen([sys.executable, "-m", "llmshim.testing", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().split(" on ", 1)[1].split()[0]
    pin(proc.pid, -1)
    pin(0, 0)
    return proc, url


def callgrind_count(script: str, *extra: str) -> int:
    """Instructions valgrind's callgrind counts running ``script`` (Python source) in a fresh
    interpreter, hashing seeded and the cache off; ``extra``: more callgrind options (say
    ``--toggle-collect=functools_reduce``, to count inside that function only)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(script)
    try:
        done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *extra,
                               os.path.realpath(sys.executable), file.name],
                              capture_output=True, text=True,
                              env={**os.environ, "LLMSHIM_CACHE": "off", "PYTHONHASHSEED": "0"})
    finally:
        os.unlink(file.name)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:  # a script that failed counted nothing, or only part
        raise SystemExit(f"callgrind printed no count:\n{done.stderr[-2000:]}")
    return int(found.group(1))
