"""``llmshim run -- COMMAND ...``: run an unmodified program with llmshim installed from its start.

The command runs with ``llmshim/_boot`` first on ``PYTHONPATH``: its ``sitecustomize`` installs
llmshim as the interpreter starts (and chains any sitecustomize that was there before). Children
inherit the environment, so Python subprocesses, multiprocessing's spawn and forkserver workers
and server worker processes are covered too; fork children inherit the installed process.
Settings come from ``LLMSHIM_*`` and the flags; they are validated here, before anything starts
(a bad one exits 2, naming it). Then this process becomes the program (``exec``, as
``opentelemetry-instrument`` does): same PID, so a container's SIGTERM reaches the program, its exit
status is the command's, and nothing is left running when it stops. Where there is no ``exec``
(Windows) the program runs as a child and its exit code is returned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from . import config
from .settings import variable

__all__ = ["BOOT_DIR", "configure_exporter", "main"]

BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")


def configure_exporter(kind: str) -> None:
    """A global TracerProvider exporting to the console or over OTLP/HTTP (``OTEL_EXPORTER_OTLP_*``)."""
    import atexit

    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)


def environment(base: dict[str, str], *, cache: str | None, priority: str | None,
                exporter: str | None) -> dict[str, str]:
    """The program's environment: ``_boot`` first on PYTHONPATH, the flags as ``LLMSHIM_*`` variables."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (BOOT_DIR, env.get("PYTHONPATH", "")) if p)
    for name, value in (("cache", cache), ("priority", priority), ("run_otel_exporter", exporter)):
        if value:
            env[variable(name)] = value
    return env


def main(command: Sequence[str], *, cache: str | None = None, priority: str | None = None,
         exporter: str | None = None) -> int:
    if not command:
        print("llmshim run: nothing to run; usage: llmshim run [--cache MODE] [--priority P] "
              "[--otel-exporter console|otlp] -- COMMAND ...", file=sys.stderr)
        return 2
    env = environment(dict(os.environ), cache=cache, priority=priority, exporter=exporter)
    try:
        config.load(env)  # a malformed setting fails here, naming the variable, before the program starts
    except config.ConfigError as exc:
        print(f"llmshim run: {exc}", file=sys.stderr)
        return 2
    try:
        if os.name == "posix":
            # Become the program (same PID): signals such as a container's SIGTERM reach it
            # directly, and nothing is left running when it is stopped.
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvpe(command[0], list(command), env)
        return subprocess.call(list(command), env=env)
    except FileNotFoundError:
        print(f"llmshim run: command not found: {command[0]}", file=sys.stderr)
        return 127
