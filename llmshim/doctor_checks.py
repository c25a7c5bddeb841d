"""What ``llmshim doctor`` judges, as pure decisions over plain values, and the thin probes that
gather those values.

Three questions: is the cache file usable for what the cache mode needs (``judge_cache_path``)?
Which client libraries in this process send LLM traffic llmshim cannot see (``BLIND_SPOTS``)? Which
other GenAI instrumentations would give the same call a second span (``INSTRUMENTATIONS``)?
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Mapping

__all__ = ["BLIND_SPOTS", "INSTRUMENTATIONS", "Library", "PathState", "found", "judge_cache_path", "probe_path"]


@dataclasses.dataclass(frozen=True)
class Library:
    """A module doctor looks for: ``module`` in ``sys.modules`` means imported in this process;
    ``distribution`` installed means it could be."""

    module: str
    distribution: str
    what: str  # who sends LLM calls through it
    why: str  # why llmshim does not see them (blind spots) or what it does (instrumentations)


#: Client libraries that send LLM calls outside httpx, httpx2, requests and aiohttp (the libraries
#: llmshim patches), or in a wire dialect llmshim does not recognise: their calls are not cached,
#: limited, retried or traced.
BLIND_SPOTS = (
    Library("botocore", "botocore", "AWS Bedrock (boto3, langchain-aws, LiteLLM's bedrock)",
            "botocore sends through its own urllib3 pool, not requests"),
    Library("grpc", "grpcio", "Vertex AI / Gemini over gRPC (google-cloud-aiplatform), gRPC model servers",
            "gRPC's HTTP/2 runs in its C core"),
    Library("urllib3", "urllib3", "code calling urllib3 directly",
            "only urllib3 under requests is seen (requests' HTTPAdapter.send is patched, urllib3 is not)"),
    Library("pycurl", "pycurl", "code calling libcurl", "libcurl opens its own sockets"),
    Library("curl_cffi", "curl_cffi", "curl_cffi sessions (browser-impersonating HTTP)",
            "libcurl-impersonate opens its own sockets"),
    Library("niquests", "niquests", "niquests sessions (a requests fork with HTTP/2 and HTTP/3)",
            "its adapters are its own, not requests'"),
    Library("websockets", "websockets", "realtime APIs (OpenAI Realtime) over WebSocket",
            "a WebSocket is not an HTTP request/response"),
    Library("google.genai", "google-genai", "the Gemini API (google-genai SDK)",
            "on httpx/aiohttp, but not a dialect llmshim recognises (Gemini's OpenAI-compatible endpoint is)"),
)

#: Other instrumentations that emit GenAI client spans for the same calls: with one active, a call
#: gets its span and llmshim's, and dashboards that sum spans count it twice.
INSTRUMENTATIONS = (
    Library("opentelemetry.instrumentation.openai", "opentelemetry-instrumentation-openai",
            "openllmetry's OpenAI instrumentation", "a GenAI span per OpenAI SDK call"),
    Library("opentelemetry.instrumentation.openai_v2", "opentelemetry-instrumentation-openai-v2",
            "OpenTelemetry's official OpenAI instrumentation", "a GenAI span per OpenAI SDK call"),
    Library("opentelemetry.instrumentation.ollama", "opentelemetry-instrumentation-ollama",
            "openllmetry's Ollama instrumentation", "a GenAI span per Ollama SDK call"),
    Library("opentelemetry.instrumentation.langchain", "opentelemetry-instrumentation-langchain",
            "openllmetry's LangChain instrumentation", "LLM spans per LangChain model call"),
    Library("traceloop.sdk", "traceloop-sdk", "Traceloop's SDK", "turns on every openllmetry instrumentation"),
    Library("openinference.instrumentation", "openinference-instrumentation",
            "OpenInference (Arize Phoenix) instrumentations", "LLM spans per SDK or framework call"),
    Library("logfire", "logfire", "Logfire", "instrument_openai() / instrument_pydantic_ai() emit GenAI spans"),
    Library("pydantic_ai", "pydantic-ai", "pydantic-ai",
            "Agent.instrument_all() / instrument=True emits a GenAI span per model request"),
)


def found(table: Iterable[Library], imported: Mapping[str, object], installed: Mapping[str, str | None]
          ) -> list[tuple[Library, str]]:
    """The table's libraries present, each with how: ``"imported"`` (in this process) or
    ``"installed <version>"``; absent ones are left out."""
    present = []
    for library in table:
        if library.module in imported:
            present.append((library, "imported"))
        elif installed.get(library.distribution):
            present.append((library, f"installed {installed[library.distribution]}"))
    return present


def versions(table: Iterable[Library]) -> dict[str, str | None]:
    """Each table entry's distribution version, or None: read from metadata, nothing is imported."""
    out: dict[str, str | None] = {}
    for library in table:
        try:
            out[library.distribution] = importlib.metadata.version(library.distribution)
        except importlib.metadata.PackageNotFoundError:
            out[library.distribution] = None
    return out


def active_instrumentors() -> set[str]:
    """Modules of the OpenTelemetry instrumentors that have instrumented this process (their
    ``instrument()`` ran): the difference between "installed" and "doubling spans now"."""
    module = sys.modules.get("opentelemetry.instrumentation.instrumentor")
    base = getattr(module, "BaseInstrumentor", None)
    active: set[str] = set()
    if base is None:
        return active
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        with contextlib.suppress(Exception):  # a third-party class: read, never trust
            instance = cls.__dict__.get("_instance")
            if instance is not None and getattr(instance, "_is_instrumented_by_opentelemetry", False):
                active.add(cls.__module__)
    return active


@dataclasses.dataclass(frozen=True)
class PathState:
    """What the file system says about a cache path, as this process would use it."""

    path: str
    exists: bool  # the path exists (file or not)
    is_file: bool
    file_writable: bool
    nearest_directory: str  # the directory itself, or the closest ancestor that exists
    directory_exists: bool  # the file's own directory exists
    directory_usable: bool  # nearest_directory is a directory this process can write and enter


def probe_path(path: str) -> PathState:
    """The file system's answers for ``path`` (``os.access`` with this process's ids: it also says
    no on a read-only mount)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    nearest = directory
    while not os.path.exists(nearest) and os.path.dirname(nearest) != nearest:
        nearest = os.path.dirname(nearest)
    return PathState(
        path=path, exists=os.path.exists(path), is_file=os.path.isfile(path),
        file_writable=os.access(path, os.R_OK | os.W_OK), nearest_directory=nearest,
        directory_exists=os.path.isdir(directory),
        directory_usable=os.path.isdir(nearest) and os.access(nearest, os.W_OK | os.X_OK))


def judge_cache_path(state: PathState, needs_write: bool) -> str | None:
    """The problem with using ``state.path`` as the SQLite cache, or None.

    SQLite writes its WAL and index next to the file, so a writable file in a read-only folder is as
    read-only as the file itself. ``needs_write`` is False for the modes that only read
    (``readonly``, ``replay``): a read-only file is then fine, a missing one is not."""
    if state.exists and not state.is_file:
        return f"{state.path} exists and is not a file"
    if not needs_write:
        return None
    if state.exists and not state.file_writable:
        return f"{state.path} is read-only for this user: hits are served, nothing new is stored"
    if not state.directory_usable:
        where = state.nearest_directory
        if state.exists or state.directory_exists:
            return (f"the folder {where} is not writable for this user: SQLite cannot write its journal next to "
                    "the cache, nothing new is stored")
        return f"{where} is not a folder this user can create the cache folder in: nothing will be cached"
    return None
