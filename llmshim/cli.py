"""The ``llmshim`` command line: ``demo``, ``status``, ``stats``, ``cache``, ``run``, ``doctor``,
``settings`` and ``serve``.

A command that reads the settings exits 2 on a malformed ``LLMSHIM_*`` value, naming the variable
(``run`` checks them before the program starts); ``doctor`` exits 1 when something is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import get_args

from .values import CacheMode, OtelExporter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmshim", description="Caching, rate limiting, retries and "
                                     "OpenTelemetry for every LLM call in a Python process.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run real client calls against the bundled LLM server and show what llmshim saw")
    sub.add_parser("status", help="install llmshim from LLMSHIM_* settings and print what it patches")
    stats = sub.add_parser("stats", help="print the stats snapshot a process wrote to LLMSHIM_STATS_FILE")
    stats.add_argument("--file", default=None, help="snapshot path (default: $LLMSHIM_STATS_FILE, else the demo's)")
    stats.add_argument("--json", action="store_true", help="print the raw JSON")
    cache = sub.add_parser("cache", help="inspect and maintain the response cache (LLMSHIM_CACHE_PATH)")
    cache.add_argument("--path", default=None, help="cache file (default: LLMSHIM_CACHE_PATH, else the XDG default)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_sub.add_parser("stats", help="entries, bytes, hit rate, tokens saved")
    listing = cache_sub.add_parser("ls", help="the newest entries (redacted)")
    listing.add_argument("--limit", type=int, default=20)
    show = cache_sub.add_parser("show", help="one entry: redacted request and the stored response")
    show.add_argument("key", help="the key, or a unique prefix of it")
    purge = cache_sub.add_parser("purge", help="remove entries")
    purge.add_argument("--expired", action="store_true", required=True, help="remove expired entries")
    cache_sub.add_parser("clear", help="remove every entry and reset the counters")
    run_parser = sub.add_parser("run", help="run a program with llmshim installed from the start: "
                                "llmshim run -- python app.py")
    run_parser.add_argument("--cache", choices=get_args(CacheMode), default=None)
    run_parser.add_argument("--priority", default=None, help="default priority class (critical, high, normal, low)")
    run_parser.add_argument("--otel-exporter", choices=get_args(OtelExporter), default=None,
                     help="export spans to the console or over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT)")
    run_parser.add_argument("program", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sub.add_parser("doctor", help="what is installed and patched, settings, cache and store health, conflicts")
    sub.add_parser("settings", help="every LLMSHIM_* setting: default and meaning (the README's table, Markdown)")
    serve = sub.add_parser("serve", help="run the bundled local LLM server (see python -m llmshim.testing)")
    serve.add_argument("--port", type=int, default=8080)
    args, rest = parser.parse_known_args(argv)

    if args.command == "run":
        from .run import main as run_main

        program = list(args.program)
        if program[:1] == ["--"]:
            program = program[1:]
        return run_main(program, cache=args.cache, priority=args.priority, exporter=args.otel_exporter)
    if args.command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(sys.stdout)
    if args.command == "settings":
        from .settings import markdown_table

        print(markdown_table())
        return 0
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
    if args.command == "cache":
        return _cache(args)
    from .testing.__main__ import main as serve_main

    return serve_main(["serve", "--port", str(args.port), *rest])


def _cache(args: argparse.Namespace) -> int:
    import os
    import sqlite3
    import time

    from . import redact
    from .config import ConfigError, load
    from .store.cache_sqlite import SQLiteStore, default_path

    try:
        settings = load()
    except ConfigError as exc:
        print(f"llmshim: {exc}", file=sys.stderr)
        return 2
    path = args.path or settings.cache_path or default_path()
    if not os.path.exists(path):
        print(f"llmshim: no cache at {path}", file=sys.stderr)
        return 1
    store = SQLiteStore(path)
    try:
        if args.cache_command == "stats":
            stats = store.stats()
            rate = stats["hit_rate"]
            print(f"cache {stats['path']}\n  entries      {stats['entries']}\n  bytes        {stats['bytes']}\n"
                  f"  hits         {stats['hits']}\n  misses       {stats['misses']}\n"
                  f"  hit rate     {'-' if rate is None else f'{rate:.1%}'}\n  tokens saved {stats['tokens_saved']}")
        elif args.cache_command == "ls":
            for row in store.list(args.limit):
                usage = row.get("usage") or {}
                print(f"{row['key'][:16]}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['created_at']))}  "
                      f"{row.get('provider')} {row.get('endpoint')} model={row.get('model')} "
                      f"stream={row.get('stream')} tokens={usage.get('input_tokens')}+{usage.get('output_tokens')} "
                      f"{row['size']} B  {redact.public_url(str(row.get('url')))}")
        elif args.cache_command == "show":
            entry = store.find(args.key)
            if entry is None:
                print(f"llmshim: no single entry with key {args.key!r}", file=sys.stderr)
                return 1
            headers = [(k, redact.MASK if redact.is_secret_header(k) else v) for k, v in entry.headers]
            print(json.dumps({"key": entry.key, "created_at": entry.created_at, "expires_at": entry.expires_at,
                              "request": entry.meta, "response": {"status": entry.status, "headers": headers}},
                             indent=2, default=str))
            print(entry.body.decode("utf-8", "replace"))
        elif args.cache_command == "purge":
            print(f"removed {store.purge_expired(time.time())} expired entries")
        elif args.cache_command == "clear":
            print(f"removed {store.clear()} entries")
    except (sqlite3.Error, OSError) as exc:
        print(f"llmshim: cache {path}: {redact.scrub_text(str(exc))}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _print_stats(path: str | None, raw: bool) -> int:
    from .config import ConfigError, read
    from .demo import DEMO_STATS_FILE, format_stats

    try:
        path = path or read("stats_file") or DEMO_STATS_FILE
    except ConfigError as exc:
        print(f"llmshim: {exc}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
