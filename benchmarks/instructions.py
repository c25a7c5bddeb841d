"""Instructions llmshim adds to one OpenAI SDK call, counted by valgrind (callgrind), not timed.

Wall-clock medians on a shared 2-core VM move by ±100 µs between runs; instruction counts do not
depend on what else the machine is doing, so a change to the hot path can be judged on a loaded
machine (the garbage collector is off and hashing seeded: a collection's millions of instructions
would otherwise land in one count and not another). Each figure is the difference of four
whole-process counts - the SDK making 20 warm-up calls then N more, or none more, without and with
llmshim (features off, one hook) - so start-up and warm-up cancel out:

    added per call = ((with, N) - (with, 0) - (without, N) + (without, 0)) / N

The SDK talks to an in-memory transport (httpx2's ``MockTransport``, the body streamed as a socket's
is): a real socket makes the count depend on how the answer happened to arrive (one read or
several), which moved it by hundreds of thousands of instructions between runs. ``--against TREE``
counts another checkout (say, the commit before a change) the same way in the same run.

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

CLIENT = """
import sys
sys.path.insert(0, {tree!r})
import gc, json, httpx2, openai, llmshim
gc.disable()  # a collection now or later is millions of instructions: counts would be noise
ANSWER = json.dumps({{"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                      "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "Red, green, blue."}},
                                   "finish_reason": "stop"}}],
                      "usage": {{"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19}}}}).encode()

class Body(httpx2.SyncByteStream):  # streamed to the caller as a socket's body is, not preloaded
    def __iter__(self):
        yield ANSWER

def answer(request):
    return httpx2.Response(200, headers={{"content-type": "application/json"}}, stream=Body())

client = openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="sk-bench", max_retries=0,
                       http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))
MSG = [{{"role": "user", "content": "Name three colours of the rainbow"}}]
if {installed}:
    llmshim.on("call_completed", lambda record: None)
    llmshim.install(telemetry=False, cache="off", retry_mode="off")
for _ in range(20 + {calls}):
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
"""


def instructions(tree: str, installed: bool, calls: int) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(CLIENT.format(tree=tree, installed=installed, calls=calls))
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


def added_per_call(tree: str, calls: int) -> tuple[int, int]:
    """(instructions of one SDK call without llmshim, instructions llmshim adds to it)."""
    without = instructions(tree, False, calls) - instructions(tree, False, 0)
    with_shim = instructions(tree, True, calls) - instructions(tree, True, 0)
    return without // calls, (with_shim - without) // calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--against", metavar="TREE", help="another llmshim checkout, counted the same way")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this tree", here)] + ([("--against", args.against)] if args.against else [])
    print(f"instructions per OpenAI SDK call (sync, chat, in-memory transport), {args.calls} calls after 20 "
          "warm-up, callgrind")
    print("| tree | SDK call without llmshim | added by llmshim (features off, 1 hook) | share |")
    print("|---|---|---|---|")
    for name, tree in trees:
        base, added = added_per_call(tree, args.calls)
        print(f"| {name} ({tree}) | {base:,} | +{added:,} | {added / base:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
