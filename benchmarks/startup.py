"""What llmshim adds to the start-up of every Python process it is installed in, side by side.

    python benchmarks/startup.py [--runs 200] [--against /path/to/earlier/tree] [--no-callgrind]

``python -c pass`` is started over and over in three ways, in turns (one run of each mode, then
the next round), so that all modes see the same moment-to-moment machine:

- plain: no llmshim;
- run: with the ``sitecustomize`` of ``llmshim run`` (``llmshim/_boot`` first on ``PYTHONPATH``);
- pth: with a ``.pth`` file in a site directory saying ``import llmshim; llmshim.install()`` (the
  user site directory, ``PYTHONUSERBASE``: this benchmark writes nothing into the interpreter's).

Every mode has the same ``PYTHONPATH`` (the tree measured, so that its llmshim is the one imported)
and the same kind of user site directory (``PYTHONUSERBASE``; only the pth mode's holds a file).
Reported: the median wall time of a start with p10-p90, and the difference to plain. On a loaded
machine wall time is noisy, so when valgrind is installed each mode is also counted in machine
instructions by callgrind (repeatable: the same count run after run), also against plain.
``--against TREE`` adds the same two llmshim modes for another source tree (an earlier commit's
worktree, say), measured in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import re
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


def modes(tree: Path, users: Path, label: str) -> dict[str, dict[str, str]]:
    """The environments of one tree's modes: plain, run (the boot sitecustomize), pth."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    base["PYTHONPATH"] = str(tree)
    base.pop("PYTHONHOME", None)
    # Installed packages start from compiled bytecode: kept here under the temporary directory.
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


def start(env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True)
    elapsed = time.perf_counter() - began
    if done.returncode or done.stderr:
        raise SystemExit(f"python -c pass failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed


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
    parser.add_argument("--no-callgrind", action="store_true", help="wall time only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        envs = modes(TREE, Path(tmp), "")
        if args.against is not None:
            envs |= modes(args.against.resolve(), Path(tmp), " (against)")
        for env in envs.values():
            start(env)  # write every .pyc before measuring
        times: dict[str, list[float]] = {name: [] for name in envs}
        for _ in range(args.runs):
            for name, env in envs.items():
                times[name].append(start(env))
        counts = {name: None if args.no_callgrind else instructions(env) for name, env in envs.items()}
    print(f"python -c pass, {args.runs} starts per mode, in turns; Python {sys.version.split()[0]}; tree {TREE}"
          + (f"; against {args.against}" if args.against else ""))
    plain_ms = statistics.median(times["plain"]) * 1000
    plain_ir = counts["plain"]
    print(f"{'mode':<16} {'median':>9} {'p10-p90':>15} {'added':>9}   {'instructions':>14} {'added':>12}")
    for name, values in times.items():
        median = statistics.median(values) * 1000
        spread = f"{pct(values, 0.1) * 1000:.1f}-{pct(values, 0.9) * 1000:.1f}"
        added = "" if name == "plain" else f"{median - plain_ms:+.1f} ms"
        count = counts[name]
        ir = f"{count / 1e6:,.1f} M" if count is not None else "n/a"
        ir_added = "" if name == "plain" or count is None or plain_ir is None else f"{(count - plain_ir) / 1e6:+,.1f} M"
        print(f"{name:<16} {median:>6.1f} ms {spread:>12} ms {added:>9}   {ir:>14} {ir_added:>12}")


if __name__ == "__main__":
    main()
