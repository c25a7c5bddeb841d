"""``llmshim demo``: llmshim doing its job under unmodified client code, against the bundled server.

It starts the local LLM server, installs llmshim, and makes real calls the way applications do:
the OpenAI SDK (sync, async, streaming; chat, embeddings, Responses), ``requests`` speaking
Ollama's NDJSON, ``aiohttp`` speaking llama.cpp's SSE, ``httpx`` and the ``ollama`` client. Then it
prints what llmshim saw of each call. A library that is not installed is skipped, with the
command that installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, TextIO

from . import install, off, on, stats, uninstall
from .policies.events import CallRecord
from .testing import FakeLLMServer

#: Where the demo writes its stats snapshot (read by `llmshim stats` when LLMSHIM_STATS_FILE is unset).
DEMO_STATS_FILE = os.path.join(tempfile.gettempdir(), "llmshim-demo-stats.json")

MSG: Any = [{"role": "user", "content": "Name three colours of the rainbow"}]


#: Modules whose distribution on PyPI has another name.
_DISTRIBUTIONS = {"google.genai": "google-genai"}


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported. ``find_spec`` of a dotted name imports its parent first,
    and raises when the parent is missing (``google.genai`` without any ``google`` package)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _steps(url: str) -> list[tuple[str, str, Callable[[], Any]]]:
    """(title, module it needs, function) for each demo call."""
    v1 = url + "/v1"

    def openai_chat() -> Any:
        import openai

        with openai.OpenAI(base_url=v1, api_key="sk-demo") as client:
            return client.chat.completions.create(model="gpt-4o-mini", messages=MSG).choices[0].message.content

    def openai_stream() -> Any:
        import openai

        with openai.OpenAI(base_url=v1, api_key="sk-demo") as client:
            stream = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True,
                                                    stream_options={"include_usage": True})
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def openai_async_stream() -> Any:
        import openai

        async def go() -> str:
            async with openai.AsyncOpenAI(base_url=v1, api_key="sk-demo") as client:
                stream = await client.chat.completions.create(  # no usage asked: llmshim estimates it
                    model="gpt-4o", messages=MSG, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return asyncio.run(go())

    def openai_embeddings() -> Any:
        import openai

        with openai.OpenAI(base_url=v1, api_key="sk-demo") as client:
            data = client.embeddings.create(model="text-embedding-3-small", input=["red", "green"]).data
            return f"{len(data)} vectors of {len(data[0].embedding)}"

    def openai_responses() -> Any:
        import openai

        with openai.OpenAI(base_url=v1, api_key="sk-demo") as client:
            return client.responses.create(model="gpt-4.1", input="Say hi").output_text

    def requests_ollama_stream() -> Any:
        import requests

        with requests.post(url + "/api/chat", json={"model": "llama3.2", "messages": MSG}, stream=True,
                           timeout=10) as response:
            return "".join(json.loads(line)["message"]["content"] for line in response.iter_lines() if line)

    def requests_ollama_generate() -> Any:
        import requests

        body: Any = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False}
        return requests.post(url + "/api/generate", json=body, timeout=10).json()["response"]

    def aiohttp_llamacpp_stream() -> Any:
        import aiohttp

        async def go() -> str:
            text = []
            async with aiohttp.ClientSession() as session, session.post(
                    url + "/completion", json={"prompt": "Once upon a time", "stream": True, "n_predict": 16}) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        text.append(json.loads(line[6:])["content"])
            return "".join(text)

        return asyncio.run(go())

    def httpx_ollama_embed() -> Any:
        import httpx

        body: Any = {"model": "nomic-embed-text", "input": "a rainbow"}
        return f"{len(httpx.post(url + '/api/embed', json=body).json()['embeddings'][0])} dims"

    def ollama_client_chat() -> Any:
        import ollama

        with ollama.Client(host=url) as client:
            return client.chat(model="llama3.2", messages=MSG).message.content

    def anthropic_stream() -> Any:
        import anthropic

        with anthropic.Anthropic(base_url=url, api_key="sk-ant-demo") as client, client.messages.stream(
                model="claude-haiku-4-5", max_tokens=64, messages=MSG) as stream:
            return "".join(stream.text_stream)

    def gemini_stream() -> Any:
        from google import genai
        from google.genai import types

        with genai.Client(api_key="AIza-demo", http_options=types.HttpOptions(base_url=url)) as client:
            return "".join(chunk.text or "" for chunk in client.models.generate_content_stream(
                model="gemini-2.0-flash", contents="Name three colours of the rainbow"))

    return [
        ("OpenAI SDK chat", "openai", openai_chat),
        ("OpenAI SDK chat, same question again", "openai", openai_chat),
        ("OpenAI SDK chat, streamed", "openai", openai_stream),
        ("AsyncOpenAI chat, streamed without usage (llmshim estimates it)", "openai", openai_async_stream),
        ("OpenAI SDK embeddings", "openai", openai_embeddings),
        ("OpenAI SDK Responses API", "openai", openai_responses),
        ("requests -> Ollama /api/chat (NDJSON)", "requests", requests_ollama_stream),
        ("requests -> Ollama /api/generate", "requests", requests_ollama_generate),
        ("aiohttp -> llama.cpp /completion (SSE)", "aiohttp", aiohttp_llamacpp_stream),
        ("httpx -> Ollama /api/embed", "httpx", httpx_ollama_embed),
        ("ollama client chat", "ollama", ollama_client_chat),
        ("Anthropic SDK messages, streamed", "anthropic", anthropic_stream),
        ("google-genai SDK, streamed (Gemini)", "google.genai", gemini_stream),
    ]


def _retry_and_priorities(out: TextIO, server: FakeLLMServer, tracer_provider: Any) -> int:
    """A 503 injected into the server and retried by llmshim; then four low-priority calls and one
    critical call under a 120 requests/minute limit, in the order the server saw them."""
    import threading

    import requests

    from .testing import Fault

    url = server.url
    server.inject(Fault(status=503, body="server busy, please try again", path="/api/generate"))
    before = len(server.received)
    body: Any = {"model": "llama3.2", "prompt": "Retry me", "stream": False}
    answer = requests.post(url + "/api/generate", json=body, timeout=10)
    attempts = len(server.received) - before
    out.write(f"\n  Injected fault: the server answered 503 once; llmshim retried\n"
              f"      caller saw: HTTP {answer.status_code}, {answer.json().get('response')!r} "
              f"after {attempts} attempts on the wire\n")
    install(tracer_provider=tracer_provider, limits="llama-limited=120rpm", ratelimit_burst="0.5", cache="off",
            retry_mode="auto")
    from .policies.ratelimit import RateLimitPolicy
    from .runtime import STATE

    policy = STATE.pipeline.find(RateLimitPolicy)
    assert policy is not None  # installed with limits just above
    limiter = policy.limiter

    def queued() -> int:
        with limiter._lock:
            return sum(len(q) for key in limiter._keys.values() for q in key.queues.values())

    def ask(label: str, level: str) -> None:
        requests.post(url + "/api/chat", json={"model": "llama-limited", "stream": False, "messages": [
            {"role": "user", "content": label}]}, headers={"x-llmshim-priority": level}, timeout=30)

    start = len(server.received)
    threads = [threading.Thread(target=ask, args=(f"low #{i}", "low")) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    ready = threading.Event()
    for _ in range(2000):  # until three low calls wait behind the first (a state, not a duration)
        if queued() >= 3:
            break
        ready.wait(0.005)
    ask("critical", "critical")
    for thread in threads:
        thread.join()
    order = [json.loads(r.body)["messages"][0]["content"] for r in server.received[start:]]
    out.write("\n  Priorities under a limit of 120 requests/minute: four low calls queued, then one critical\n"
              f"      order the server saw: {', '.join(order)}\n")
    return 0 if answer.status_code == 200 and attempts == 2 and order.index("critical") <= 1 else 1


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _span_tree(spans: list[Any]) -> list[str]:
    """Finished spans as an indented tree: name, duration and the attributes worth a glance."""
    children: dict[Any, list[Any]] = {}
    ids = {span.context.span_id for span in spans}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    keys = {"gen_ai.provider.name": "provider", "llmshim.cache.hit": "cache_hit",
            "gen_ai.usage.input_tokens": "tokens_in",
            "gen_ai.usage.output_tokens": "tokens_out", "gen_ai.response.time_to_first_chunk": "first_chunk_s",
            "llmshim.client.library": "library", "llmshim.outcome": "outcome"}
    lines: list[str] = []

    def walk(parent: Any, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time):
            attributes = span.attributes or {}
            shown = " ".join(f"{label}={attributes[k]:.4f}" if isinstance(attributes[k], float)
                             else f"{label}={attributes[k]}" for k, label in keys.items() if k in attributes)
            millis = (span.end_time - span.start_time) / 1e6
            lines.append(f"  {'  ' * depth}{span.name} ({millis:.1f} ms) {shown}")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


def run(out: TextIO, chunk_delay: float = 0.005) -> int:
    """Run the demo, writing to ``out``. Returns a process exit code (non-zero if a call failed)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    app_tracer = tracer_provider.get_tracer("llmshim.demo")
    seen: list[CallRecord] = []
    on("call_completed", seen.append)
    on("call_failed", seen.append)
    failures = 0
    stats(reset=True)
    stats_file = os.environ.get("LLMSHIM_STATS_FILE") or DEMO_STATS_FILE
    if stats_file == DEMO_STATS_FILE:  # the demo's own file shows this run: earlier demos' sections go
        with contextlib.suppress(OSError):
            os.unlink(DEMO_STATS_FILE)
    with FakeLLMServer(chunk_delay=chunk_delay) as server:
        cache_dir = tempfile.mkdtemp(prefix="llmshim-demo-")  # a fresh cache: the first call is a miss
        install(tracer_provider=tracer_provider, stats_file=stats_file,
                cache=os.environ.get("LLMSHIM_CACHE", "on"), retry_mode="auto",
                cache_path=os.environ.get("LLMSHIM_CACHE_PATH") or os.path.join(cache_dir, "cache.sqlite3"))
        try:
            out.write(f"llmshim demo: bundled LLM server on {server.url}, llmshim installed\n\n")
            for title, module, step in _steps(server.url):
                if not _importable(module):
                    out.write(f"  skipped {title}: `pip install {_DISTRIBUTIONS.get(module, module)}` to include it\n")
                    continue
                before = len(seen)
                try:
                    with app_tracer.start_as_current_span(f"demo: {title}"):
                        answer = step()
                except Exception as exc:  # the demo reports and goes on
                    failures += 1
                    out.write(f"  FAILED {title}: {type(exc).__name__}: {exc}\n")
                    continue
                record = seen[before] if len(seen) > before else None
                out.write(f"  {title}\n      answer: {str(answer)[:70]!r}\n")
                if record is None:
                    failures += 1
                    out.write("      llmshim saw: nothing (this is a bug)\n")
                    continue
                tokens = (f"tokens saved in={record.saved_input_tokens} out={record.saved_output_tokens}"
                          if record.cache_hit else f"tokens in={record.input_tokens} out={record.output_tokens}")
                if record.estimator is not None:
                    tokens += f" (estimated: {record.estimator})"
                paid = record.saved_cost_usd if record.cache_hit else record.cost_usd
                money = f"cost ${paid:.6f}" if paid is not None else "cost - (a local server has no price)"
                out.write(
                    f"      llmshim saw: {record.library} | {record.provider} {record.operation} "
                    f"model={record.model or '-'} stream={str(record.stream).lower()} | {tokens} | {money} | "
                    f"{_ms(record.duration)} ms, first chunk {_ms(record.time_to_first_chunk)} ms | "
                    f"{'cache hit' if record.cache_hit else 'live'} | {record.outcome}\n")
            if _importable("requests"):
                failures += _retry_and_priorities(out, server, tracer_provider)
        finally:
            from .policies.stats import STATS

            STATS.write()
            uninstall()
            off("call_completed", seen.append)
            off("call_failed", seen.append)
    out.write("\nOpenTelemetry spans llmshim emitted (under the demo's own spans):\n")
    out.write("\n".join(_span_tree(list(exporter.get_finished_spans()))) + "\n")
    out.write("\n" + format_stats(stats(), source=f"this demo (also in {DEMO_STATS_FILE}: `llmshim stats`)") + "\n")
    out.write(f"\n{len(seen)} LLM calls seen by llmshim, {failures} failures\n")
    return 1 if failures else 0


def format_stats(snapshot: dict[str, object], source: str = "this process") -> str:
    """The stats snapshot as a short human-readable table."""
    def show(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    def dollars(value: object) -> str:  # "-": no call had an honest price (a local server, an unknown model)
        return f"${value:.6f}" if isinstance(value, float) else "-"

    lines = [f"llmshim stats from {source}"]
    for key in ("total_calls", "completed", "failed", "aborted", "throttled_calls", "retries", "cache_hits",
                "cache_misses", "cache_hit_rate", "average_latency_s", "input_tokens", "output_tokens",
                "estimated_input_tokens", "estimated_output_tokens", "tokens_saved"):
        lines.append(f"  {key:<18} {show(snapshot.get(key))}")
    for key in ("cost_usd", "estimated_cost_usd", "saved_cost_usd"):
        lines.append(f"  {key:<18} {dollars(snapshot.get(key))}")
    by_model = snapshot.get("by_model") or {}
    if isinstance(by_model, dict) and by_model:
        lines.append("  by provider/model:")
        for name, counts in by_model.items():
            lines.append(f"    {name:<36} calls={counts['calls']} in={counts['input_tokens']} "
                         f"out={counts['output_tokens']} saved={counts.get('tokens_saved', 0)} "
                         f"cost={dollars(counts.get('cost_usd'))} saved_cost={dollars(counts.get('saved_cost_usd'))}")
    return "\n".join(lines)
