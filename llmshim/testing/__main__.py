"""``python -m llmshim.testing serve`` (and ``llmshim serve``): run the local LLM server in the foreground.

The options are declared once here (``add_serve_options``) and shared by both commands, so
``--help`` lists every knob the server has: address, rate limit, streaming pace, compression and
faults. A fault is written ``--fault SPEC``; ``parse_fault`` reads it (pure, tested on its own).
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

from .server import FakeLLMServer, Fault

__all__ = ["SERVE_PARSER", "add_serve_options", "main", "parse_fault", "serve"]

ENDPOINTS = """\
endpoints (every dialect at once, on the one port; answers are "Echo: <last prompt>",
token counts are whitespace words, so the same request always gets the same bytes):
  OpenAI     POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses
             (SSE with [DONE]; usage chunk when stream_options.include_usage); GET /v1/models
  Ollama     POST /api/chat, /api/generate, /api/embed, /api/embeddings (NDJSON); GET /api/tags,
             /api/version
  llama.cpp  POST /completion, /infill, /embedding (SSE); GET /health
  Anthropic  POST /v1/messages (SSE events when "stream": true; tool_use with a forced tool_choice),
             /v1/messages/count_tokens
  Gemini     POST /v1beta/models/M:generateContent, :streamGenerateContent (SSE with ?alt=sse),
             :embedContent, :batchEmbedContents, :countTokens (Vertex AI paths too)
OpenAI routes carry x-ratelimit-* headers and x-request-id; Anthropic routes anthropic-ratelimit-*
(resets as RFC 3339 times) and request-id, and errors in Anthropic's shape (--fault 529: overloaded_error).

fault SPEC: comma-separated key=value pairs, or just a status (--fault 503):
  status=N        answer N (default body: the dialect's error shape)
  times=N|always  how many matching requests take it (default 1)
  path=TEXT       only requests whose path contains TEXT
  body=TEXT       the error message in the dialect's error shape
  header=NAME:VALUE  add a response header (repeatable), e.g. header=retry-after-ms:1500
  reset=before_headers|after_chunks  close with a TCP reset (after_chunks=N streamed pieces first)
  cut=close|truncated_chunk|stall  end a stream cleanly after after_chunks=N pieces: a close without the
                  last chunk, half a chunk then a close, or silence until the client hangs up
  delay=SECONDS   wait before answering;  chunk_delay=SECONDS  between streamed pieces
Faults apply in the order given: --fault status=429,times=2 --fault 500"""

#: The parser's description and epilog, for ``llmshim serve`` and ``python -m llmshim.testing serve``.
SERVE_PARSER: dict[str, Any] = {
    "description": "A protocol-faithful local LLM server on real HTTP/1.1, with rate limits and fault injection.",
    "epilog": ENDPOINTS, "formatter_class": argparse.RawDescriptionHelpFormatter}

_NUMBERS = {"delay": float, "chunk_delay": float, "after_chunks": int, "status": int}
_RESETS = ("before_headers", "after_chunks")
_CUTS = ("close", "truncated_chunk", "stall")


def parse_fault(spec: str) -> tuple[Fault, int | None]:
    """``"status=429,times=2,header=retry-after:1"`` -> (the Fault, how many requests take it; None:
    all). Raises ``ValueError`` naming the bad part."""
    if spec.strip().isdigit():
        spec = f"status={spec.strip()}"
    fields: dict[str, Any] = {}
    headers: list[tuple[str, str]] = []
    times: int | None = 1
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value:
            raise ValueError(f"{part!r} is not key=value")
        if key == "times":
            times = None if value in ("always", "forever") else int(value)
            if times is not None and times < 1:
                raise ValueError(f"times={value}: at least 1, or always")
        elif key == "header":
            name, colon, text = value.partition(":")
            if not colon or not name.strip():
                raise ValueError(f"header={value!r} is not NAME:VALUE")
            headers.append((name.strip(), text.strip()))
        elif key in ("path", "body"):
            fields[key] = value
        elif key == "reset":
            if value not in _RESETS:
                raise ValueError(f"reset={value}: one of {', '.join(_RESETS)}")
            fields["reset"] = value
        elif key == "cut":
            if value not in _CUTS:
                raise ValueError(f"cut={value}: one of {', '.join(_CUTS)}")
            fields["cut"] = value
        elif key in _NUMBERS:
            fields[key] = _NUMBERS[key](value)
        else:
            raise ValueError(f"unknown fault key {key!r}")
    if not fields.keys() & {"status", "reset", "cut", "delay", "chunk_delay"}:
        raise ValueError(f"{spec!r} does nothing: give status, reset, cut, delay or chunk_delay")
    return Fault(headers=tuple(headers), **fields), times


def _fault(spec: str) -> tuple[Fault, int | None]:
    try:
        return parse_fault(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_serve_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of the server, on ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--rpm", type=int, default=None, help="answer 429 (with retry-after) beyond this many "
                        "requests per window")
    parser.add_argument("--rpm-window", type=float, default=60.0, help="seconds the --rpm window spans (default 60)")
    parser.add_argument("--rpm-style", choices=("window", "bucket"), default="window",
                        help="window: a sliding log of --rpm-window seconds; bucket: OpenAI's shape, --rpm requests "
                        "refilled continuously per minute (default window)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed pieces (default 0)")
    parser.add_argument("--gzip", action="store_true", help="gzip whole bodies when the client accepts it")
    parser.add_argument("--fault", type=_fault, action="append", default=[], metavar="SPEC",
                        help="inject a fault (repeatable; SPEC below)")
    return parser


def serve(args: argparse.Namespace) -> int:
    """Run the server with ``args`` (from a parser ``add_serve_options`` filled) until interrupted."""
    server = FakeLLMServer(args.host, args.port, rpm_limit=args.rpm, rpm_window=args.rpm_window,
                           rpm_style=args.rpm_style, chunk_delay=args.chunk_delay, compress=args.gzip)
    for fault, times in args.fault:
        server.inject(fault, times)
    server.start()
    where = "" if args.host == "127.0.0.1" else f"  (listening on {args.host})"
    print(f"llmshim fake LLM server on {server.url}  (OpenAI base URL {server.openai_base_url}){where}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmshim.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_options(sub.add_parser("serve", help="serve the OpenAI, Ollama, llama.cpp and Anthropic dialects "
                                     "on 127.0.0.1", **SERVE_PARSER))
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
