"""Big bodies do not multiply memory (issue 12, item 8).

A body bigger than ``LLMSHIM_CACHE_MAX_ENTRY_BYTES`` is not buffered beyond it and not cached; a
whole JSON body above the parser's limit is read from its edges (usage and identity salvaged); a
compressed body is inflated alongside in bounded pieces (a gzip bomb never exists whole); a big
request is described, not copied, in the entry's metadata, and keyed by its exact bytes. The
figures with a 100 MB stream and a 100 MB gzip bomb are in ``benchmarks/memory.py``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.adapters._decoding import PIECE, decoder_for
from llmshim.dialects._framing import JsonBody
from llmshim.store.cache_sqlite import SQLiteStore
from llmshim.testing import FakeLLMServer
from llmshim.testing.responses import Answer

MB = 1024 * 1024


def _parse(body: bytes, limit: int, step: int) -> list[object]:
    reader = JsonBody(limit=limit)
    out: list[object] = []
    for start in range(0, len(body), step):
        out += list(reader.feed(body[start:start + step]))
    return out + list(reader.feed(b"", final=True))


@settings(deadline=None, max_examples=40)
@given(st.text(max_size=50), st.integers(0, 10**6), st.integers(0, 10**6),
       st.sampled_from(["stop", "length", "tool_calls"]), st.integers(700, 70_000))
def test_a_big_json_body_is_read_from_its_edges(content: str, prompt: int, completion: int, reason: str,
                                                 step: int) -> None:
    answer = {"id": "chatcmpl-x", "object": "chat.completion", "model": "m-1",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": content + "z" * 300_000},
                           "finish_reason": reason}],
              "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    body = json.dumps(answer).encode()
    whole, = _parse(body, limit=len(body) + 1, step=step)
    edges, = _parse(body, limit=100_000, step=step)
    assert edges == {"id": "chatcmpl-x", "object": "chat.completion", "model": "m-1",
                     "usage": answer["usage"], "choices": [{"index": 0, "finish_reason": reason}]}
    assert whole == answer


def test_an_ollama_body_is_read_from_its_edges() -> None:
    body = json.dumps({"model": "llama3", "response": "y" * 300_000, "done": True, "done_reason": "stop",
                       "prompt_eval_count": 26, "eval_count": 290}).encode()
    assert _parse(body, limit=1000, step=4096) == [
        {"model": "llama3", "done": True, "done_reason": "stop", "prompt_eval_count": 26, "eval_count": 290}]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compression_bomb_is_inflated_in_bounded_pieces(encoding: str) -> None:
    plain = b"a" * (64 * MB)
    bomb = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    decoder = decoder_for(encoding)
    assert decoder is not None
    total = biggest = 0
    for start in range(0, len(bomb), 65536):
        for piece in decoder.decode(bomb[start:start + 65536]):
            total += len(piece)
            biggest = max(biggest, len(piece))
    total += len(decoder.flush())
    assert total == len(plain) and biggest <= PIECE


def _stream(size: int) -> Answer:
    event = b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"' \
        + b"x" * 60_000 + b'"}}]}\n\n'
    finish = b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{},' \
        b'"finish_reason":"stop"}]}\n\n'
    chunks = [event] * (size // len(event)) + [finish, b"data: [DONE]\n\n"]
    return Answer(200, [("Content-Type", "text/event-stream")], chunks=chunks)


@pytest.mark.parametrize(("size", "cached"), [(600_000, True), (3 * MB, False)])
def test_an_answer_above_the_entry_limit_is_passed_through_and_not_cached(tmp_path: Path, size: int,
                                                                        cached: bool) -> None:
    with FakeLLMServer(responder=lambda received: _stream(size)) as server:
        llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"), cache_max_entry_bytes="1M")
        try:
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "big"}]}
            url = server.openai_base_url + "/chat/completions"
            first = requests.post(url, json=body, timeout=30).content
            second = requests.post(url, json=body, timeout=30)
        finally:
            llmshim.uninstall()
    assert second.content == first and first.endswith(b"data: [DONE]\n\n") and len(first) >= size * 0.9
    assert (second.headers.get("x-llmshim-cache") == "hit") is cached
    assert len(server.received) == (1 if cached else 2)


def test_a_big_request_is_described_not_copied_and_keyed_by_its_bytes(server: FakeLLMServer,
                                                                      tmp_path: Path) -> None:
    text = "q" * (2 * MB)
    url = server.openai_base_url + "/chat/completions"
    llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        requests.post(url, json=body, timeout=30)
        again = requests.post(url, json=body, timeout=30)
        respelled = requests.post(url, data=json.dumps(body, indent=1), headers={"content-type": "application/json"},
                                  timeout=30)
    finally:
        llmshim.uninstall()
    assert again.headers.get("x-llmshim-cache") == "hit"
    assert respelled.headers.get("x-llmshim-cache") is None  # exact bytes above 1 MiB: stricter, never looser
    row, *_ = SQLiteStore(str(tmp_path / "c.sqlite3")).list()
    assert "body" not in row and row["body_bytes"] > 2 * MB and len(row["body_preview"]) <= 4096


TRACED = r"""
import gzip, json, os, threading, tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import httpx, llmshim

plain = b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"content":"' \
    + b"a" * (64 << 20) + b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
bomb = gzip.compress(plain)
del plain

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(bomb)))
        self.end_headers()
        self.wfile.write(bomb)

httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
llmshim.install(cache=sys.argv[1], telemetry=False, retry_mode="off", cache_path=os.environ["CACHE"])
records = []
llmshim.on("call_completed", records.append)
body = {"model": "m", "messages": [{"role": "user", "content": "bomb"}]}
tracemalloc.start()
url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"
with httpx.Client() as client, client.stream("POST", url, json=body) as r:
    raw = sum(len(piece) for piece in r.iter_raw())
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": peak, "raw": raw, "tokens": [records[0].input_tokens, records[0].output_tokens]}))
"""


@pytest.mark.parametrize("cache", ["off", "on"])
def test_a_gzip_bomb_read_raw_costs_llmshim_a_bounded_amount(tmp_path: Path, cache: str) -> None:
    from conftest import run_python

    script = TRACED.replace("sys.argv[1]", repr(cache))
    out = json.loads(run_python(script, env={"CACHE": str(tmp_path / "c.sqlite3")}, timeout=120).splitlines()[-1])
    assert out["raw"] < MB  # the caller read ~100 KB of gzip, never inflating it
    assert out["tokens"] == [1, 2]  # llmshim still read the usage, from the body's tail
    assert out["peak"] < 48 * MB  # 64 MiB inflated alongside; without the bounds: several times that
