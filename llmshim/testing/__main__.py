"""``python -m llmshim.testing serve``: run the local LLM server in the foreground."""

from __future__ import annotations

import argparse
import threading

from .server import FakeLLMServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmshim.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve OpenAI, Ollama and llama.cpp dialects on 127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--rpm", type=int, default=None, help="answer 429 beyond this many requests/min")
    serve.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed pieces")
    serve.add_argument("--gzip", action="store_true", help="gzip whole bodies when the client accepts it")
    args = parser.parse_args(argv)
    server = FakeLLMServer(port=args.port, rpm_limit=args.rpm, chunk_delay=args.chunk_delay, compress=args.gzip)
    server.start()
    print(f"llmshim fake LLM server on {server.url}  (OpenAI base URL {server.openai_base_url})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
