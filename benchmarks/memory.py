"""Peak memory of big bodies through llmshim, side by side with no llmshim (issue 12, item 8).

Each case runs in a fresh client process per mode (so peaks do not mix) against a server in its
own process that generates the bodies on the fly:

- ``stream``: a ~100 MB streamed chat completion (SSE, 64 KB events, ``[DONE]``), read with
  ``requests.iter_content`` and dropped piece by piece;
- ``gzip-bomb``: a ~100 KB gzip body that inflates to ~100 MB of JSON, read with httpx's
  ``iter_raw`` (the caller never inflates it; llmshim reads it alongside);
- ``big-request``: a ~50 MB request body (one long message), answered briefly.

Modes: ``none`` (llmshim not imported), ``off`` (llmshim installed, cache off: the tap and the
dialect's reader only), ``cache`` (llmshim installed, cache on, a fresh SQLite file). Each mode sets
exactly the features it names (telemetry off, retries off, no limits), whatever the environment.
The figure is the client's peak RSS during the call minus its RSS just before it
(``ru_maxrss`` after vs. current RSS before), in MB.

    python benchmarks/memory.py            # all cases, all modes
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MB = 1024 * 1024
STREAM_BYTES = 100 * MB
BOMB_BYTES = 100 * MB
REQUEST_BYTES = 50 * MB
MODES = ("none", "off", "cache")
CASES = ("stream", "gzip-bomb", "big-request")


def _bomb() -> bytes:
    """A chat completion whose content is BOMB_BYTES of one letter, gzip-compressed (~100 KB)."""
    head = b'{"id":"chatcmpl-bomb","object":"chat.completion","model":"m","choices":[{"index":0,' \
           b'"message":{"role":"assistant","content":"'
    tail = b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}'
    compressor = gzip.GzipFile(fileobj=(buffer := _Sink()), mode="wb", mtime=0)
    compressor.write(head)
    block = b"a" * MB
    for _ in range(BOMB_BYTES // MB):
        compressor.write(block)
    compressor.write(tail)
    compressor.close()
    return buffer.data()


class _Sink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def data(self) -> bytes:
        return b"".join(self.parts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bomb = b""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining:  # read and drop the request body
            remaining -= len(self.rfile.read(min(remaining, MB)))
        if self.path.endswith("/bomb/chat/completions"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(self.bomb)))
            self.end_headers()
            self.wfile.write(self.bomb)
            return
        if self.path.endswith("/stream/chat/completions"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            piece = "x" * (64 * 1024)
            event = ("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m",
                                            "choices": [{"index": 0, "delta": {"content": piece}}]}) + "\n\n").encode()
            for _ in range(STREAM_BYTES // len(event)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            last = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
            return
        body = json.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve() -> None:
    _Handler.bomb = _bomb()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    print(f"http://127.0.0.1:{httpd.server_address[1]}", flush=True)
    httpd.serve_forever()


CLIENT = r"""
import json, os, resource, sys
mode, case, base = sys.argv[1], sys.argv[2], sys.argv[3]
import requests, httpx
if mode != "none":
    import llmshim
    llmshim.install(cache="on" if mode == "cache" else "off", telemetry=False, retry_mode="off",
                    cache_path=os.environ["BENCH_CACHE"])

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if case == "stream":
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "big"}]}
    before = rss()
    with requests.post(base + "/stream/chat/completions", json=body, stream=True, timeout=120) as r:
        n = sum(len(piece) for piece in r.iter_content(65536))
elif case == "gzip-bomb":
    body = {"model": "m", "messages": [{"role": "user", "content": "bomb"}]}
    before = rss()
    with httpx.Client(timeout=120) as client, client.stream("POST", base + "/bomb/chat/completions", json=body) as r:
        n = sum(len(piece) for piece in r.iter_raw())
else:
    text = "y" * """ + str(REQUEST_BYTES) + r"""
    before = rss()
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    r = requests.post(base + "/chat/completions", data=payload, headers={"content-type": "application/json"},
                      timeout=120)
    n = len(r.content)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"delta_mb": (peak - before) / 2**20, "bytes": n}))
"""


def measure(mode: str, case: str, base: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
        env["BENCH_CACHE"] = os.path.join(folder, "cache.sqlite3")
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run([sys.executable, "-c", CLIENT, mode, case, base], capture_output=True, text=True,
                              env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{mode}/{case} failed:\n{done.stderr}")
        result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


def main() -> None:
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        base = server.stdout.readline().strip() + "/v1"
        print(f"{'case':<12} " + " ".join(f"{mode:>10}" for mode in MODES) + "   (peak RSS added by the call, MB)")
        for case in CASES:
            figures = [measure(mode, case, base) for mode in MODES]
            print(f"{case:<12} " + " ".join(f"{f['delta_mb']:>10.1f}" for f in figures))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
    else:
        threading.excepthook = lambda args: None
        main()
