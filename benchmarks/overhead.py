"""What llmshim adds to each call, measured side by side in one run.

    python benchmarks/overhead.py [--calls 3000] [--block 50] [--against /path/to/earlier/tree]

Each mode runs in its own worker process, so that one mode's imports and patches cannot slow
another's (openllmetry's instrumentor, for one, leaves the SDK slower after ``uninstrument()``).
The parent hands out blocks of calls round-robin over the modes, one worker at a time, so all
modes see the same moment-to-moment machine; workers share one core, the bundled LLM server has the
other. Modes, for each client:

- off: no llmshim;
- floor: a minimal hand-written shim (``_floor_shim.py``): the least any shim must do to hand a
  hook the model and usage of a call (parse the request, wrap the stream, parse the answer);
- llmshim with every feature off and one ``call_completed`` hook (recognition, body reading, record);
- llmshim with OpenTelemetry on (real SDK, in-memory exporter and metric reader);
- for the OpenAI SDK: openllmetry's openai instrumentation, and the official
  ``opentelemetry-instrumentation-openai-v2``, on the same SDK setup, when installed and able to
  instrument this openai version (otherwise the reason is printed).

Reported per mode: calls per second, median and p99 latency, and the difference to "off". A last
line isolates llmshim's own work per call without sockets, in a hot loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import pct, pin, start_server

MSG: Any = [{"role": "user", "content": "benchmark me please"}]
CLIENTS = ("openai-sync", "openai-async", "requests-ollama")
MODES = ("off", "floor", "llmshim-hook", "llmshim-otel", "openllmetry", "openai-v2")
LABELS = {
    "off": "off", "floor": "floor: a minimal hand-written shim + hook",
    "llmshim-hook": "llmshim (features off, 1 hook)", "llmshim-otel": "llmshim + OpenTelemetry",
    "openllmetry": "openllmetry openai instrumentation", "openai-v2": "opentelemetry-instrumentation-openai-v2",
    "openai-sync": "OpenAI SDK sync -> /v1/chat", "openai-async": "AsyncOpenAI -> /v1/chat",
    "requests-ollama": "requests -> Ollama /api/chat",
}





# -- worker side ---------------------------------------------------------------------------------

def _sdk() -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()])


def set_up_mode(mode: str) -> None:
    """Switch the mode on for the life of this worker; raise if it cannot be."""
    if mode == "off":
        return
    if mode == "floor":
        import _floor_shim

        _floor_shim.install()
        return
    if mode.startswith("llmshim"):
        import llmshim

        llmshim.on("call_completed", lambda record: None)
        only = {"cache": "off", "retry_mode": "off"}  # exactly the features the mode names, whatever the defaults
        if mode == "llmshim-hook":
            llmshim.install(telemetry=False, **only)
        else:
            tracer_provider, meter_provider = _sdk()
            llmshim.install(tracer_provider=tracer_provider, meter_provider=meter_provider, telemetry=True, **only)
        return
    module = {"openllmetry": "opentelemetry.instrumentation.openai",
              "openai-v2": "opentelemetry.instrumentation.openai_v2"}[mode]
    instrumentor = __import__(module, fromlist=["OpenAIInstrumentor"]).OpenAIInstrumentor()
    tracer_provider, meter_provider = _sdk()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    if not instrumentor.is_instrumented_by_opentelemetry:
        raise RuntimeError("instrument() returned without instrumenting")


def make_client(client: str, url: str) -> Callable[[int], list[float]]:
    if client == "requests-ollama":
        import requests

        session = requests.Session()
        body = {"model": "llama3.2", "messages": MSG, "stream": False}

        def block(n: int) -> list[float]:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                session.post(url + "/api/chat", json=body, timeout=10).json()
                out.append(time.perf_counter() - start)
            return out

        return block
    import openai

    if client == "openai-sync":
        sync_client = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0)

        def sync_block(n: int) -> list[float]:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                sync_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
                out.append(time.perf_counter() - start)
            return out

        return sync_block
    loop = asyncio.new_event_loop()
    async_client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0)

    async def many(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await async_client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            out.append(time.perf_counter() - start)
        return out

    return lambda n: loop.run_until_complete(many(n))


def worker(mode: str, client: str, url: str) -> int:
    """Serve blocks: read a count per line, answer one JSON list of latencies per line."""
    try:
        set_up_mode(mode)
        run = make_client(client, url)
        run(20)  # warm up
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 0
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(int(line))), flush=True)
    return 0


# -- parent side ---------------------------------------------------------------------------------







def bench_client(client: str, url: str, calls: int, block: int, against: str | None = None) -> None:
    modes: list[str] = list(MODES if client.startswith("openai") else MODES[:4])
    if against:  # the same llmshim modes, imported from another source tree (an earlier commit)
        modes[2:4] = [modes[2], f"{modes[2]}@before", modes[3], f"{modes[3]}@before"]
    workers: dict[str, subprocess.Popen[str]] = {}
    for mode in modes:
        env = dict(os.environ)
        if mode.endswith("@before") and against:
            env["PYTHONPATH"] = against + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen([sys.executable, __file__, "--worker", mode.removesuffix("@before"), client, url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        pin(proc.pid, 0)
        assert proc.stdout is not None
        answer = json.loads(proc.stdout.readline())
        if "error" in answer:
            print(f"- {LABELS[client]}: {_label(mode)} not measured ({answer['error']})")
            proc.communicate()
            continue
        workers[mode] = proc
    samples: dict[str, list[float]] = {mode: [] for mode in workers}
    try:
        for _ in range(calls // block):
            for mode, proc in workers.items():  # one worker at a time: they never compete
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{block}\n")
                proc.stdin.flush()
                samples[mode] += json.loads(proc.stdout.readline())
    finally:
        for proc in workers.values():
            proc.communicate("")
    off = samples["off"]
    off_p50, off_p99 = statistics.median(off) * 1e6, pct(off, 0.99) * 1e6
    for mode, values in samples.items():
        p50, p99 = statistics.median(values) * 1e6, pct(values, 0.99) * 1e6
        added = "       - |        -" if mode == "off" else f"{p50 - off_p50:+8.0f} | {p99 - off_p99:+8.0f}"
        print(f"| {LABELS[client]:<28} | {_label(mode):<40} | {len(values) / sum(values):7.0f} | {p50:7.0f} | "
              f"{p99:7.0f} | {added} |", flush=True)


def _label(mode: str) -> str:
    return LABELS[mode.removesuffix("@before")] + (" [before]" if mode.endswith("@before") else "")


def in_process_cost(iterations: int) -> tuple[float, float]:
    """llmshim's own per-call work with a stand-in send, hot: no sockets, same code path otherwise."""
    import llmshim
    from llmshim.call import Call, Reply, WireRequest
    from llmshim.runtime import STATE, begin

    try:
        from llmshim.tap import Tap
    except ImportError:  # an earlier llmshim (--against): the tap lived in call.py
        from llmshim.call import Tap  # type: ignore[attr-defined,no-redef]

    body = json.dumps({"model": "gpt-4o-mini", "messages": MSG}).encode()
    answer = json.dumps({"id": "x", "model": "gpt-4o-mini", "choices": [{"finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    headers = {"content-type": "application/json"}
    wire = WireRequest("POST", "http://127.0.0.1:1/v1/chat/completions", (("content-type", "application/json"),),
                       body)

    def send(call: Call) -> Reply:
        return Reply(200, headers, Tap(), None)

    def one() -> None:
        call = begin("bench", lambda: wire)
        assert call is not None
        reply = STATE.pipeline.run(call, send)
        reply.tap.chunk(answer)
        reply.tap.complete()

    llmshim.on("call_completed", lambda record: None)
    llmshim.install(telemetry=False, cache="off", retry_mode="off")
    try:
        for _ in range(1000):
            one()
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            one()
            samples.append(time.perf_counter() - start)
    finally:
        llmshim.uninstall()
    return statistics.median(samples) * 1e6, pct(samples, 0.99) * 1e6


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:5])
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000, help="calls per mode per client")
    parser.add_argument("--block", type=int, default=50, help="calls per block; blocks go round-robin over modes")
    parser.add_argument("--against", default=None,
                        help="a source tree of an earlier llmshim (e.g. a git worktree): its llmshim modes run "
                             "side by side, marked [before]")
    parser.add_argument("--hot-loop-only", action="store_true",
                        help="only llmshim's own work per call (no sockets); run it under each tree to compare")
    args = parser.parse_args()
    if args.hot_loop_only:
        p50, p99 = in_process_cost(20000)
        print(f"llmshim's own work per call, no sockets, hot loop (20000 calls, 1 hook): p50 {p50:.1f} us, "
              f"p99 {p99:.1f} us")
        return 0
    import openai

    import llmshim

    server, url = start_server()  # pinned to the last core
    try:
        print(f"llmshim {llmshim.__version__}, openai {openai.__version__}, python {sys.version.split()[0]}; "
              f"{args.calls} calls per mode in blocks of {args.block}, round-robin; one process per mode\n")
        print("| client -> dialect            | mode                                     |     rps |  p50 us |"
              "  p99 us |  +p50 us |  +p99 us |")
        print("|------------------------------|------------------------------------------|---------|---------|"
              "---------|----------|----------|")
        for client in CLIENTS:
            bench_client(client, url, args.calls, args.block, args.against)
        p50, p99 = in_process_cost(20000)
        print(f"\nllmshim's own work per call, no sockets, hot loop (20000 calls, 1 hook): p50 {p50:.1f} us, "
              f"p99 {p99:.1f} us")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
