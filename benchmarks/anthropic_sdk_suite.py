"""Run the anthropic SDK's own test suite twice, without and with llmshim in every process, and
compare the outcome of every test (issue 16, item 5).

The SDK's code is not part of llmshim: check it out yourself (``git clone
https://github.com/anthropics/anthropic-sdk-python``), make a virtualenv with its dev
dependencies (``pyproject.toml``'s ``dev`` group: respx, pytest-asyncio, pytest-xdist,
time-machine, dirty-equals, inline-snapshot, http-snapshot, rich, griffe, importlib-metadata,
standardwebhooks, mcp) plus llmshim's own (wrapt, opentelemetry-api/sdk), then::

    python benchmarks/anthropic_sdk_suite.py --sdk /tmp/anth-sdk --python /tmp/anth-venv/bin/python

Both runs import the SDK from its ``src`` (``PYTHONPATH``), on pytest-xdist workers. The second
run is ``python -m llmshim run -- python -m pytest ...``: llmshim's ``sitecustomize`` installs it
in the pytest process and in every xdist worker, with its defaults (cache on, in a private
directory; retries ``auto``). A probe plugin (``-p``) records, in each process, whether llmshim was
installed and how many calls it saw, so "installed everywhere" is measured, not assumed.

``tests/api_resources`` is left out by default (``--with-mock-server`` keeps it): those tests need
Stainless' mock server on 127.0.0.1:4010, which serves an OpenAPI spec downloaded from the
internet, so they cannot run offline.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import json, os
import pytest

def pytest_sessionfinish(session):
    try:
        import llmshim
        installed, calls = llmshim.is_installed(), llmshim.stats()["total_calls"]
    except Exception:
        installed, calls = False, 0
    path = os.path.join(os.environ["LLMSHIM_SUITE_PROBE_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "installed": installed,
                   "calls": calls}, out)
'''


def outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from a JUnit XML report."""
    found: dict[str, str] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = next((kind for kind in ("failure", "error", "skipped") if kind in kinds), "passed")
        found[name] = {"failure": "failed"}.get(outcome, outcome)
    return found


def run(args: argparse.Namespace, label: str, shim: bool, work: Path) -> tuple[dict[str, str], list[dict[str, object]]]:
    probes = work / f"probe-{label}"
    probes.mkdir()
    junit = work / f"{label}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=os.pathsep.join([str(args.sdk / "src"), str(work), str(ROOT)]),
               LLMSHIM_SUITE_PROBE_DIR=str(probes), XDG_CACHE_HOME=str(work / f"xdg-{label}"))
    pytest = [args.python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "llmshim_suite_probe", "-q",
              "-o", "addopts=", "-n", args.workers, f"--junitxml={junit}"]
    if not args.with_mock_server:
        pytest.append("--ignore=tests/api_resources")
    command = [args.python, "-m", "llmshim", "run", "--", *pytest] if shim else pytest
    print(f"[{label}] {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=args.sdk, env=env, capture_output=True, text=True)
    print(f"[{label}] exit {done.returncode}: {done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ''}")
    seen = [json.loads(p.read_text()) for p in sorted(probes.glob("*.json"))]
    return outcomes(junit), seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdk", type=Path, required=True, help="a checkout of anthropic-sdk-python")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of a venv with its test deps")
    parser.add_argument("--workers", default="2", help="pytest-xdist workers (default 2)")
    parser.add_argument("--with-mock-server", action="store_true", help="also tests/api_resources (needs :4010)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llmshim-anthropic-suite-") as tmp:
        work = Path(tmp)
        (work / "llmshim_suite_probe.py").write_text(PROBE)
        without, probes_without = run(args, "without", False, work)
        with_shim, probes_with = run(args, "with", True, work)
    runs = (("without llmshim", without, probes_without), ("with llmshim", with_shim, probes_with))
    for label, results, probes in runs:
        counts = collections.Counter(results.values())
        print(f"{label:16} {len(results)} tests: " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts)))
        print(f"{'':16} processes: {len(probes)}, llmshim installed in {sum(bool(p['installed']) for p in probes)}, "
              f"LLM calls it saw: {sum(int(str(p['calls'])) for p in probes)}")
    changed = {name: (without.get(name), with_shim.get(name)) for name in sorted(set(without) | set(with_shim))
               if without.get(name) != with_shim.get(name)}
    print(f"tests whose outcome differs: {len(changed)}")
    for name, (before, after) in changed.items():
        print(f"  {name}: {before} -> {after}")
    return 1 if changed or not all(p["installed"] for p in probes_with) else 0


if __name__ == "__main__":
    raise SystemExit(main())
