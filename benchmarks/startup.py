"""What llmshim adds to the start-up of every Python process it is installed in, side by side.

    python benchmarks/startup.py [--runs 200] [--against /path/to/earlier/tree] [--source] [--no-callgrind]

``python -c pass`` is started over and over in three ways, in turns (one run of each mode, then
the next round), so that all modes see the same moment-to-moment machine:

- plain: no llmshim;
- run: with the ``sitecustomize`` of ``llmshim run`` (``llmshim/_boot`` first on ``PYTHONPATH``);
- pth: with a ``.pth`` file in a site directory saying ``import llmshim; llmshim.install()`` (the
  user site directory, ``PYTHONUSERBASE``: this benchmark writes nothing into the interpreter's).

Every mode has the same ``PYTHONPATH`` (the tree measured, so that its llmshim is the one imported)
and the same kind of user site directory (``PYTHONUSERBASE``; only the pth mode's holds a file).
Reported: the median wall time of a start with p10-p90, the median CPU time (user + system, from
the child's resource usage: less sensitive than wall time to other processes, not immune), each
with the difference to plain. On a loaded machine both are noisy, so when valgrind is installed
each mode is also counted in machine instructions by callgrind (repeatable: the same count run
after run), also against plain.
``--against TREE`` adds the same two llmshim modes for another source tree (an earlier commit's
``git archive``, say), measured in the same rounds. llmshim starts from bytecode, as an installed
package does (written on a first start, under a temporary ``PYTHONPYCACHEPREFIX``); ``--source``
measures it compiled at every start instead, as in an editable install with
``PYTHONDONTWRITEBYTECODE=1``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from _common import pct

TREE = Path(__file__).resolve().parent.parent


def modes(tree: Path, users: Path, label: str, source: bool) -> dict[str, dict[str, str]]:
    """The environments of one tree's modes: plain, run (the boot sitecustomize), pth."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    base["PYTHONPATH"] = str(tree)
    base.pop("PYTHONHOME", None)
    if source:  # every start compiles llmshim's modules (the standard library keeps its bytecode)
        base["PYTHONDONTWRITEBYTECODE"] = "1"
        if any(tree.rglob("__pycache__")):
            sys.exit(f"--source: {tree} has __pycache__ directories; remove them first")
    else:  # installed packages start from compiled bytecode: kept under the temporary directory
        base.pop("PYTHONDONTWRITEBYTECODE", None)
        base["PYTHONPYCACHEPREFIX"] = str(users / "pycache")
    empty, with_pth = users / "empty", users / f"pth-{label}"
    site = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    for home in (empty, with_pth):
        (home / site).mkdir(parents=True, exist_ok=True)
        # The user site's .pth files run before the interpreter's site-packages (where llmshim's
        # dependencies are) is on sys.path: a path line puts it there first, in every mode alike.
        dependencies = "\n".join(sysconfig.get_path(kind) for kind in ("purelib", "platlib"))
        (home / site / "00-dependencies.pth").write_text(dependencies)
    (with_pth / site / "llmshim-startup.pth").write_text("import llmshim; llmshim.install()\n")
    run = dict(base, PYTHONUSERBASE=str(empty), PYTHONPATH=os.pathsep.join([str(tree / "llmshim" / "_boot"),
                                                                            str(tree)]))
    plain = {} if label else {"plain": dict(base, PYTHONUSERBASE=str(empty))}
    return plain | {f"run{label}": run, f"pth{label}": dict(base, PYTHONUSERBASE=str(with_pth))}


def start(env: dict[str, str]) -> tuple[float, float]:
    """One ``python -c pass``: (wall time, CPU time of the process, user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True)
    elapsed = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode or done.stderr:
        raise SystemExit(f"python -c pass failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def instructions(env: dict[str, str]) -> int | None:
    """Machine instructions of one ``python -c pass``, counted by callgrind (None without valgrind)."""
    if shutil.which("valgrind") is None:
        return None
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           sys.executable, "-c", "pass"], env=env, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    return int(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="starts per mode (default 200)")
    parser.add_argument("--against", type=Path, help="another source tree, measured in the same rounds")
    parser.add_argument("--no-callgrind", action="store_true", help="wall and CPU time only")
    parser.add_argument("--source", action="store_true",
                        help="no bytecode for llmshim: compiled at every start (PYTHONDONTWRITEBYTECODE=1, as in an "
                             "editable install where that is set)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        envs = modes(TREE, Path(tmp), "", args.source)
        if args.against is not None:
            envs |= modes(args.against.resolve(), Path(tmp), " (against)", args.source)
        for env in envs.values():
            start(env)  # write every .pyc before measuring
        walls: dict[str, list[float]] = {name: [] for name in envs}
        cpus: dict[str, list[float]] = {name: [] for name in envs}
        for _ in range(args.runs):
            for name, env in envs.items():
                wall, cpu = start(env)
                walls[name].append(wall)
                cpus[name].append(cpu)
        counts = {name: None if args.no_callgrind else instructions(env) for name, env in envs.items()}
    print(f"python -c pass, {args.runs} starts per mode, in turns; Python {sys.version.split()[0]}; "
          f"{'from source' if args.source else 'from bytecode'}; tree {TREE}"
          + (f"; against {args.against}" if args.against else ""))
    print(f"{'mode':<15} {'wall median':>11} {'p10-p90':>13} {'added':>9}   {'CPU median':>10} {'added':>9}   "
          f"{'instructions':>12} {'added':>10}")
    for name in envs:
        wall, cpu, count = statistics.median(walls[name]), statistics.median(cpus[name]), counts[name]
        spread = f"{pct(walls[name], 0.1) * 1000:.1f}-{pct(walls[name], 0.9) * 1000:.1f}"
        print(f"{name:<15} {wall * 1000:>8.1f} ms {spread:>10} ms {_added(wall, walls):>9}   "
              f"{cpu * 1000:>7.1f} ms {_added(cpu, cpus):>9}   "
              f"{'n/a' if count is None else f'{count / 1e6:,.1f} M':>12} {_added_count(count, counts['plain']):>10}")


def _added(value: float, by_mode: dict[str, list[float]]) -> str:
    plain = statistics.median(by_mode["plain"])
    return "" if value == plain else f"{(value - plain) * 1000:+.1f} ms"


def _added_count(count: int | None, plain: int | None) -> str:
    return "" if count is None or plain is None or count == plain else f"{(count - plain) / 1e6:+,.1f} M"


if __name__ == "__main__":
    main()
