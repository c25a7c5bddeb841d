"""Instructions llmshim adds to one OpenAI SDK call, counted by valgrind (callgrind), not timed.

Wall-clock medians on a shared 2-core VM move by ±100 µs between runs; instruction counts do not
depend on what else the machine is doing, so a change to the hot path can be judged on a loaded
machine. Only the measured loop is counted: the loop runs inside ``functools.reduce`` and callgrind
collects inside that C function alone (``--toggle-collect=functools_reduce``), so start-up, imports
and warm-up are never in the count. (An earlier version subtracted whole-process counts with and
without the loop; start-up alone moves by ±12 M instructions between identical runs, ±200 k per
call at 60 calls: more than the changes it was meant to judge.) The garbage collector is off and
hashing seeded; repeated runs agree within a few thousand instructions per call.

The SDK talks to an in-memory transport (httpx2's ``MockTransport``, the body streamed as a socket's
is): a real socket makes the count depend on how the answer happened to arrive. Modes, each setting
exactly what it names:

- off: no llmshim;
- floor: ``_floor_shim.py``, the least any shim must do to hand a hook a call's model and usage;
- hook: llmshim, every feature off, one ``call_completed`` hook;
- otel: llmshim with OpenTelemetry (real SDK, in-memory span exporter and metric reader), one hook;
- hit: llmshim with the cache on (a SQLite file in a new temporary folder), one hook: the same
  question every time, so every measured call is a cache hit (compare with off: the SDK's floor);
- floor-hit: ``_floor_shim.py`` with its minimal SQLite cache, the same calls: the least a cache
  hit can cost above the SDK's floor;
- openllmetry: openllmetry's OpenAI instrumentation (``opentelemetry-instrumentation-openai``) on
  the same OpenTelemetry SDK set-up as otel, llmshim not installed: what otel is compared with.

    python benchmarks/instructions.py [--calls 40] [--modes off,floor,hook,otel] [--against TREE]

``--against TREE`` counts another checkout (say, the commit before a change) the same way in the
same run. Needs valgrind (Debian's ``valgrind`` package). About a minute per mode.
"""

from __future__ import annotations

import argparse
import os

from _common import callgrind_count

CLIENT = """
import sys
sys.path.insert(0, {tree!r})
import functools, gc, json, httpx2, openai, llmshim
ANSWER = json.dumps({{"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                      "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "Red, green, blue."}},
                                   "finish_reason": "stop"}}],
                      "usage": {{"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19}}}}).encode()

class Body(httpx2.SyncByteStream):  # streamed to the caller as a socket's body is, not preloaded
    def __iter__(self):
        yield ANSWER

def answer(request):
    return httpx2.Response(200, headers={{"content-type": "application/json"}}, stream=Body())

client = openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="sk-bench", max_retries=0,
                       http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))
MSG = [{{"role": "user", "content": "Name three colours of the rainbow"}}]
mode = {mode!r}
if mode in ("hit", "floor-hit"):  # a test double bypasses llmshim's cache: answers come from a real server
    import tempfile
    from llmshim.testing import FakeLLMServer
    server = FakeLLMServer().start()
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="sk-bench", max_retries=0)
if mode == "floor-hit":
    sys.path.insert(0, {benchmarks!r})
    import _floor_shim
    _floor_shim.install(cache=tempfile.mkdtemp() + "/floor.sqlite3")
elif mode == "floor":
    sys.path.insert(0, {benchmarks!r})
    import _floor_shim
    _floor_shim.install()
elif mode == "openllmetry":  # openllmetry's OpenAI instrumentation on the same OpenTelemetry SDK set-up
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider,
                            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))
    assert instrumentor.is_instrumented_by_opentelemetry
elif mode != "off":
    llmshim.on("call_completed", lambda record: None)
    if mode == "otel":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        llmshim.install(telemetry=True, tracer_provider=tracer_provider,
                        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
                        cache="off", retry_mode="off")
    elif mode == "hit":
        llmshim.install(telemetry=False, cache="on", cache_path=tempfile.mkdtemp() + "/cache.sqlite3",
                        retry_mode="off")
    else:
        llmshim.install(telemetry=False, cache="off", retry_mode="off")

def one(acc, _):
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    return acc

for _ in range(50):  # warm-up, not counted
    one(0, 0)
served = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
assert (served.headers.get("x-llmshim-cache") == "hit") == (mode == "hit"), served.headers
if mode in ("hit", "floor-hit"):
    server.stop()  # every measured call is answered from the cache
gc.collect()
gc.disable()  # a collection is millions of instructions: counts would be noise
functools.reduce(one, range({calls}), 0)  # the only code callgrind counts
"""


def per_call(tree: str, mode: str, calls: int) -> int:
    """Instructions per SDK call in ``mode``, with llmshim imported from ``tree``."""
    benchmarks = os.path.dirname(os.path.abspath(__file__))
    script = CLIENT.format(tree=tree, mode=mode, calls=calls, benchmarks=benchmarks)
    return callgrind_count(script, "--toggle-collect=functools_reduce") // calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--modes", default="off,floor,hook,otel")
    parser.add_argument("--against", metavar="TREE", help="another llmshim checkout, counted the same way")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modes = args.modes.split(",")
    print(f"instructions per OpenAI SDK call (sync, chat, in-memory transport), {args.calls} calls after 50 "
          "warm-up, callgrind inside the loop only")
    print("| tree | mode | per call | added to off |")
    print("|---|---|---|---|")
    off = per_call(here, "off", args.calls)
    print(f"| - | off | {off:,} | - |", flush=True)
    for name, tree in [("this tree", here)] + ([("--against", args.against)] if args.against else []):
        for mode in modes:
            if mode == "off" or ((mode.startswith("floor") or mode == "openllmetry") and name != "this tree"):
                continue
            count = per_call(tree, mode, args.calls)
            print(f"| {name} | {mode} | {count:,} | {count - off:+,} ({(count - off) / off:.1%}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
