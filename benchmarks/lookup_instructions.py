"""Instructions of one SQLite cache lookup against a bare ``sqlite3`` read of the same row.

    python benchmarks/lookup_instructions.py [--against TREE]      # needs valgrind

A store holds one realistic entry (four response headers, a 700-byte answer, a description with
the request); each row is counted by callgrind inside ``functools.reduce`` only (200 lookups after
100 warm-up), in a fresh interpreter:

- bare: ``conn.execute(SELECT every column WHERE key = ?).fetchone()``, nothing decoded (the floor);
- kept key: ``SQLiteStore.get`` of a key looked up before (its decoded entry kept, when the tree
  keeps them);
- cold key: ``SQLiteStore.get`` with nothing kept (the first lookup of a key): the row read whole
  and decoded.
"""

from __future__ import annotations

import argparse
import os

from _common import callgrind_count

SCRIPT = """
import sys
sys.path.insert(0, {tree!r})
import functools, gc, json, os, sqlite3, tempfile, time
from llmshim.store.base import Entry
from llmshim.store.cache_sqlite import SQLiteStore
path = os.path.join(tempfile.mkdtemp(), "c.sqlite3")
store = SQLiteStore(path)
now = time.time()
headers = [("content-type", "application/json"), ("x-request-id", "req_123456789"),
           ("openai-processing-ms", "321"), ("date", "Mon, 30 Nov 2026 00:00:00 GMT")]
answer = json.dumps({{"id": "c1", "object": "chat.completion", "choices": [{{"index": 0, "message": {{
    "role": "assistant", "content": "x" * 600}}, "finish_reason": "stop"}}],
    "usage": {{"prompt_tokens": 20, "completion_tokens": 150}}}}).encode()
meta = {{"method": "POST", "url": "https://api.openai.com/v1/chat/completions", "model": "gpt-4o-mini",
        "request": {{"messages": [{{"role": "user", "content": "y" * 300}}]}}, "status": 200,
        "usage": {{"input_tokens": 20, "output_tokens": 150}}}}
KEY = "a" * 64
store.put(Entry(KEY, 200, headers, answer, now, None, meta), now)
bare = sqlite3.connect(path, isolation_level=None)
SELECT = "SELECT status, headers, body, created_at, expires_at, meta, last_access FROM entries WHERE key = ?"
mode = {mode!r}
if mode == "bare":
    fn = lambda: bare.execute(SELECT, (KEY,)).fetchone()
elif mode == "kept key":
    fn = lambda: store.get(KEY, now)
else:
    decoded = getattr(store, "_decoded", None)
    fn = (lambda: store.get(KEY, now)) if decoded is None else (lambda: (decoded.clear(), store.get(KEY, now)))
for _ in range(100):
    fn()
def one(acc, _):
    fn()
    return acc
gc.collect()
gc.disable()
functools.reduce(one, range(200), 0)
"""


def count(tree: str, mode: str) -> int:
    return callgrind_count(SCRIPT.format(tree=tree, mode=mode), "--toggle-collect=functools_reduce") // 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="an earlier checkout of llmshim, counted the same way")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, **({"--against": os.path.abspath(args.against)} if args.against else {})}
    floor = count(here, "bare")
    print("instructions per lookup (callgrind, 200 lookups after 100 warm-up)")
    print("| tree | lookup | instructions | x bare read |")
    print("|---|---|---|---|")
    print(f"| - | bare sqlite3 read of the row | {floor:,} | 1.00x |")
    for name, tree in trees.items():
        for mode in ("kept key", "cold key"):
            n = count(tree, mode)
            print(f"| {name} | SQLiteStore.get, {mode} | {n:,} | {n / floor:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
