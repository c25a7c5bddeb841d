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
    stats = sub.add_parser("stats", help="print the stats snapshot a process wrote to LLMSHIM_STATS_FILE")
    stats.add_argument("--file", default=None, help="snapshot path (default: $LLMSHIM_STATS_FILE, else the demo's)")
    stats.add_argument("--json", action="store_true", help="print the raw JSON")
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
    if args.command == "stats":
        return _print_stats(args.file, args.json)
    from .testing.__main__ import main as serve_main

    return serve_main(["serve", "--port", str(args.port), *rest])


def _print_stats(path: str | None, raw: bool) -> int:
    import os

    from .demo import DEMO_STATS_FILE

    path = path or os.environ.get("LLMSHIM_STATS_FILE") or DEMO_STATS_FILE
    try:
        with open(path) as handle:
            snapshot = json.load(handle)
    except (OSError, ValueError) as exc:
        print(f"llmshim: no stats snapshot at {path} ({exc}); set LLMSHIM_STATS_FILE in the process "
              "to watch, or run `llmshim demo`", file=sys.stderr)
        return 1
    if raw:
        print(json.dumps(snapshot, indent=2))
        return 0
    print(format_stats(snapshot, source=f"{path} (pid {snapshot.get('pid')})"))
    return 0


def format_stats(snapshot: dict[str, object], source: str = "this process") -> str:
    """The stats snapshot as a short human-readable table."""
    def show(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"llmshim stats from {source}"]
    for key in ("total_calls", "completed", "failed", "aborted", "throttled_calls", "retries", "cache_hits",
                "cache_misses", "cache_hit_rate", "average_latency_s", "input_tokens", "output_tokens",
                "tokens_saved"):
        lines.append(f"  {key:<18} {show(snapshot.get(key))}")
    by_model = snapshot.get("by_model") or {}
    if isinstance(by_model, dict) and by_model:
        lines.append("  by provider/model:")
        for name, counts in by_model.items():
            lines.append(f"    {name:<36} calls={counts['calls']} in={counts['input_tokens']} "
                         f"out={counts['output_tokens']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
