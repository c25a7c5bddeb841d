"""Instructions llmshim adds to one OpenAI SDK call, counted by valgrind (callgrind), not timed.

Wall-clock medians on a shared 2-core VM move by ±100 µs between runs; instruction counts do not
depend on what else the machine is doing, so a change to the hot path can be judged on a loaded
machine (the garbage collector is off and hashing seeded: a collection's millions of instructions
would otherwise land in one count and not another). Each figure is the difference of four
whole-process counts - the SDK making 20 warm-up calls then N more, or none more, without and with
llmshim (features off, one hook) - so start-up and warm-up cancel out:

    added per call = ((with, N) - (with, 0) - (without, N) + (without, 0)) / N

The bundled LLM server runs in its own process (not counted). ``--against TREE`` counts another
checkout (say, the commit before a change) the same way in the same run.

    python benchmarks/instructions.py --calls 100 --against /tmp/tree-before

Needs valgrind (Debian's ``valgrind`` package). A few minutes per tree.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

CLIENT = """
import sys
sys.path.insert(0, {tree!r})
import gc, openai, llmshim
gc.disable()  # a collection now or later is millions of instructions: counts would be noise
client = openai.OpenAI(base_url={url!r}, api_key="sk-bench", max_retries=0)
MSG = [{{"role": "user", "content": "Name three colours of the rainbow"}}]
if {installed}:
    llmshim.on("call_completed", lambda record: None)
    llmshim.install(telemetry=False, cache="off", retry_mode="off")
for _ in range(20 + {calls}):
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
"""


def instructions(tree: str, url: str, installed: bool, calls: int) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(CLIENT.format(tree=tree, url=url, installed=installed, calls=calls))
    try:
        done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                               os.path.realpath(sys.executable), script.name],
                              capture_output=True, text=True,
                              env={**os.environ, "LLMSHIM_CACHE": "off", "PYTHONHASHSEED": "0"})
    finally:
        os.unlink(script.name)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"callgrind printed no count:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def added_per_call(tree: str, url: str, calls: int) -> tuple[int, int]:
    """(instructions of one SDK call without llmshim, instructions llmshim adds to it)."""
    without = instructions(tree, url, False, calls) - instructions(tree, url, False, 0)
    with_shim = instructions(tree, url, True, calls) - instructions(tree, url, True, 0)
    return without // calls, (with_shim - without) // calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--against", metavar="TREE", help="another llmshim checkout, counted the same way")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "llmshim.testing", "serve", "--port", str(port)],
                              cwd=here, env={**os.environ, "PYTHONPATH": here},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # the server binds; the first counted run would fail loudly otherwise
        url = f"http://127.0.0.1:{port}/v1"
        trees = [("this tree", here)] + ([("--against", args.against)] if args.against else [])
        print(f"instructions per OpenAI SDK call (sync, chat), {args.calls} calls after 20 warm-up, callgrind")
        print("| tree | SDK call without llmshim | added by llmshim (features off, 1 hook) | share |")
        print("|---|---|---|---|")
        for name, tree in trees:
            base, added = added_per_call(tree, url, args.calls)
            print(f"| {name} ({tree}) | {base:,} | +{added:,} | {added / base:.1%} |", flush=True)
    finally:
        server.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
