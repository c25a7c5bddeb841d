"""The ``llmshim`` command line: ``demo``, ``status``, ``serve``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmshim", description="Caching, rate limiting, retries and "
                                     "OpenTelemetry for every LLM call in a Python process.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run real client calls against the bundled LLM server and show what llmshim saw")
    sub.add_parser("status", help="install llmshim from LLMSHIM_* settings and print what it patches")
    serve = sub.add_parser("serve", help="run the bundled local LLM server (see python -m llmshim.testing)")
    serve.add_argument("--port", type=int, default=8080)
    args, rest = parser.parse_known_args(argv)

    if args.command == "demo":
        from .demo import run

        return run(sys.stdout)
    if args.command == "status":
        import importlib

        import llmshim

        from .adapters import PATCHES

        for module in sorted({p.module for p in PATCHES}):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        try:
            llmshim.install()
        except llmshim.ConfigError as exc:
            print(f"llmshim: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(llmshim.status(), indent=2))
        return 0
    from .testing.__main__ import main as serve_main

    return serve_main(["serve", "--port", str(args.port), *rest])


if __name__ == "__main__":
    raise SystemExit(main())
