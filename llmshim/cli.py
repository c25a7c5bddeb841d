"""The ``llmshim`` command line: ``demo``, ``status``, ``stats``, ``cache``, ``run``, ``doctor``,
``settings`` and ``serve``.

A command that reads the settings exits 2 on a malformed ``LLMSHIM_*`` value, naming the variable
(``run`` checks them before the program starts); ``doctor`` exits 1 when something is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from typing import get_args

from .clocks import wall
from .values import CacheMode, OtelExporter


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .testing.__main__ import SERVE_PARSER, add_serve_options

    parser = argparse.ArgumentParser(prog="llmshim", description="Caching, rate limiting, retries and "
                                     "OpenTelemetry for every LLM call in a Python process.")
    parser.add_argument("--version", action="version", version=f"llmshim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run real client calls against the bundled LLM server and show what llmshim saw")
    sub.add_parser("status", help="install llmshim from LLMSHIM_* settings and print what it patches")
    stats = sub.add_parser("stats", help="print the totals of every process that writes to LLMSHIM_STATS_FILE")
    stats.add_argument("--file", default=None, help="snapshot path (default: $LLMSHIM_STATS_FILE; when unset, the "
                       "snapshot `llmshim demo` wrote, announced as such)")
    stats.add_argument("--json", action="store_true", help="print the totals, the sections and the exited aggregate "
                       "as JSON")
    stats.add_argument("--processes", action="store_true", help="also list each process's section (pid, start, "
                       "calls, whether it still runs)")
    cache = sub.add_parser("cache", help="inspect and maintain the response cache (LLMSHIM_CACHE_PATH)")
    cache.add_argument("--path", default=None, help="cache file (default: LLMSHIM_CACHE_PATH, else the XDG default); "
                       "given before the subcommand: llmshim cache --path F stats")
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
    run_parser.add_argument("program", nargs=argparse.REMAINDER,
                            help="-- COMMAND [ARGS...]: everything after -- reaches the program untouched")
    sub.add_parser("doctor", help="what is installed and patched, settings, cache and store health, conflicts, "
                   "client libraries llmshim cannot see")
    sub.add_parser("settings", help="every LLMSHIM_* setting: default and meaning (the README's table, Markdown)")
    add_serve_options(sub.add_parser("serve", help="run the bundled local LLM server (OpenAI, Ollama, llama.cpp "
                                     "and Anthropic dialects, fault injection)", **SERVE_PARSER))
    return parser


def split_program(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``argv`` cut at its first ``--``: (llmshim's own arguments, the program's or None).

    The program's part never reaches argparse, so its flags (and any ``--`` of its own) pass through
    untouched whatever Python's argparse does with ``--``."""
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def program_of(parsed: list[str], after_cut: list[str] | None) -> list[str]:
    """The command ``llmshim run`` starts. ``parsed``: what argparse left for the program before the
    cut (``llmshim run python app.py``); when the program began there, the ``--`` was the program's own."""
    if after_cut is None:
        return list(parsed)
    return [*parsed, "--", *after_cut] if parsed else list(after_cut)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    own, program = split_program(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(own)  # unknown flags are errors (exit 2), for every command
    if program is not None and args.command != "run":
        parser.error(f"unrecognized arguments: -- {' '.join(program)}")

    if args.command == "run":
        from .run import main as run_main

        return run_main(program_of(args.program, program), cache=args.cache, priority=args.priority,
                        exporter=args.otel_exporter)
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
        return _print_stats(args.file, args.json, args.processes)
    if args.command == "cache":
        return _cache(args)
    from .testing.__main__ import serve

    return serve(args)


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
            print(f"removed {store.purge_expired(wall())} expired entries")
        elif args.cache_command == "clear":
            print(f"removed {store.clear()} entries")
    except (sqlite3.Error, OSError) as exc:
        print(f"llmshim: cache {path}: {redact.scrub_text(str(exc))}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


@dataclasses.dataclass(frozen=True)
class StatsSource:
    """Which snapshot ``llmshim stats`` reads and why: ``origin`` is ``--file``, ``LLMSHIM_STATS_FILE``
    or ``demo`` (the file ``llmshim demo`` writes), or None when there is nothing to read."""

    path: str
    origin: str | None


def stats_source(given: str | None, variable: str | None, demo_path: str, demo_exists: bool) -> StatsSource:
    """Where the snapshot comes from. The demo's file is read only when nothing else is named and it
    exists, and then it is announced: it is another process's numbers, not the caller's program's."""
    if given:
        return StatsSource(given, "--file")
    if variable:
        return StatsSource(variable, "LLMSHIM_STATS_FILE")
    return StatsSource(demo_path, "demo" if demo_exists else None)


def stats_view(document: object) -> tuple[dict[str, object], list[tuple[str, dict[str, object]]]]:
    """What ``llmshim stats`` shows of a file's JSON: the totals (``--json`` prints them, with the
    sections), and the sections to list with ``--processes`` (key, section; the exited aggregate
    last). A file of llmshim before sections is one process's snapshot, shown as it is. Raises
    ValueError for JSON that is not an llmshim stats file."""
    from .policies import stats_merge

    sections, exited, legacy = stats_merge.parse(document)
    if legacy:
        assert isinstance(document, dict)
        return dict(document), [(f"{document.get('pid')}:{document.get('since')}", exited)]
    assert isinstance(document, dict)
    total = stats_merge.totals(sections, exited)
    shown: dict[str, object] = {**stats_merge.derive(total), "pid": document.get("pid"),
                                "process_count": total["processes"], "processes": sections, "exited": exited}
    listed = [*sections.items(), *([("exited", exited)] if exited["processes"] else [])]
    return shown, listed


def _process_lines(listed: list[tuple[str, dict[str, object]]]) -> list[str]:
    import time

    from .policies import stats_merge
    from .policies.stats import alive  # the writer's own test: what it folds, this calls exited

    lines = ["  processes:"]
    for key, section in listed:
        since = section.get("since")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, float) else "-"
        if key == "exited":
            where = f"exited   ({section['processes']} processes, folded)"
        else:
            pid = stats_merge.pid_of(key) or 0
            state = "running" if alive(pid) else "exited"
            where = f"pid {pid:<7} {state}"
        lines.append(f"    {where:<36} since {started} calls={section['total_calls']} "
                     f"completed={section['completed']} failed={section['failed']}")
    return lines


def _print_stats(path: str | None, raw: bool, processes: bool = False) -> int:
    import os
    import time

    from .config import ConfigError, read
    from .demo import DEMO_STATS_FILE, format_stats

    try:
        source = stats_source(path, read("stats_file"), DEMO_STATS_FILE, os.path.exists(DEMO_STATS_FILE))
    except ConfigError as exc:
        print(f"llmshim: {exc}", file=sys.stderr)
        return 2
    if source.origin is None:
        print(f"llmshim: no stats snapshot: no --file, LLMSHIM_STATS_FILE is unset, and `llmshim demo` has written "
              f"none at {source.path}. Set LLMSHIM_STATS_FILE=/some/file.json in the process to watch (and here), "
              "or pass --file", file=sys.stderr)
        return 1
    try:
        with open(source.path, "rb") as handle:
            content = handle.read()
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(source.path)))
    except OSError as exc:
        print(f"llmshim: no stats snapshot at {source.path} (from {source.origin}: {exc}); set LLMSHIM_STATS_FILE "
              "in the process to watch, or run `llmshim demo`", file=sys.stderr)
        return 1
    try:
        document = json.loads(content)
        shown, listed = stats_view(document)
    except (ValueError, RecursionError) as exc:
        print(f"llmshim: {source.path} (from {source.origin}) is not a readable llmshim stats file: "
              f"{str(exc)[:200]}. The next write of a process with LLMSHIM_STATS_FILE set replaces it",
              file=sys.stderr)
        return 1
    if source.origin == "demo":
        print(f"llmshim: showing the snapshot `llmshim demo` wrote at {written} ({source.path}, pid "
              f"{shown.get('pid')}), not your program's: --file and LLMSHIM_STATS_FILE are unset",
              file=sys.stderr if raw else sys.stdout)
    if raw:
        print(json.dumps(shown, indent=2))
        return 0
    count = shown.get("process_count")
    origin = (f"pid {shown.get('pid')}, written {written}" if count is None else
              f"{count} process{'' if count == 1 else 'es'}, written {written} by pid {shown.get('pid')}")
    print(format_stats(shown, source=f"{source.path} ({origin})"))
    if processes:
        print("\n".join(_process_lines(listed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
