"""What OpenTelemetry costs llmshim per call, against what the OpenTelemetry SDK itself costs.

    python benchmarks/otel_floor.py [--rounds 9] [--calls 2000] [--against TREE] [--instructions]

Three variants of one non-streamed chat call, hot, in one process, no sockets (llmshim's own work
with a stand-in send, as ``overhead.py --hot-loop-only`` measures it):

- **floor**: no llmshim; the bare OpenTelemetry SDK doing exactly what llmshim asks of it for this
  call: a CLIENT span started with the same start attributes, made current and detached, given the
  same end attributes, ended (SimpleSpanProcessor, in-memory exporter), and the same three
  histogram points (duration, input tokens, output tokens) with the same attribute sets. The
  attribute sets are checked against what llmshim really exported before anything is timed;
- **off**: llmshim with every feature off and one ``call_completed`` hook;
- **otel**: the same plus OpenTelemetry (real SDK, the same exporter and an in-memory metric reader).

llmshim's OpenTelemetry share is ``otel - off``; the part of it above the SDK is
``otel - off - floor``. Wall clock: the variants take turns in blocks, round after round, and each
figure is the median over rounds of each round's median (the machine is shared: compare side by
side, never across runs). ``--against TREE`` runs another llmshim checkout's variants in a second
process, round-robin with this tree's.

``--instructions`` counts instructions instead (valgrind callgrind; the collector off, hashing
seeded), which does not move with the machine's load: per call = (count after N calls - count
after none) / N, after the same warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import callgrind_count

VARIANTS = ("floor", "off", "otel")
MSG: Any = [{"role": "user", "content": "benchmark me please"}]
BODY = json.dumps({"model": "gpt-4o-mini", "messages": MSG}).encode()
ANSWER = json.dumps({"id": "x", "model": "gpt-4o-mini", "choices": [{"finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
URL = "http://127.0.0.1:1/v1/chat/completions"

# What llmshim puts on this call's span and metric points (checked by ``_check`` before timing).
START = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "server.address": "127.0.0.1",
         "gen_ai.request.stream": False, "llmshim.client.library": "bench", "server.port": 1,
         "gen_ai.request.model": "gpt-4o-mini"}
END = {"llmshim.outcome": "ok", "gen_ai.response.model": "gpt-4o-mini", "gen_ai.response.id": "x",
       "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 4,
       "http.response.status_code": 200}
METRIC = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "server.address": "127.0.0.1",
          "server.port": 1, "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini",
          "llmshim.cache.hit": False}
METRIC_IN = {**METRIC, "gen_ai.token.type": "input"}
METRIC_OUT = {**METRIC, "gen_ai.token.type": "output"}


def _sdk() -> tuple[Any, Any, Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider, MeterProvider(metric_readers=[reader]), exporter, reader


class Bench:
    """The three variants, each a zero-argument call; ``exporter`` is cleared between blocks."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind

        import llmshim
        from llmshim.call import Reply, WireRequest
        from llmshim.runtime import STATE, begin
        from llmshim.tap import Tap

        self.llmshim = llmshim
        tracer_provider, meter_provider, self.exporter, self.reader = _sdk()
        self.providers = tracer_provider, meter_provider
        headers = {"content-type": "application/json"}
        wire = WireRequest("POST", URL, (("content-type", "application/json"),), BODY)

        def shim() -> None:
            call = begin("bench", lambda: wire)
            assert call is not None
            reply = STATE.pipeline.run(call, lambda call: Reply(200, headers, Tap(), None))
            reply.tap.chunk(ANSWER)
            reply.tap.complete()

        # The floor: an SDK-only instrumentation of the same call, its attribute sets ready-made.
        floor_tp, floor_mp, self.floor_exporter, _ = _sdk()
        tracer = floor_tp.get_tracer("floor")
        meter = floor_mp.get_meter("floor")
        duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s")
        tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}")
        attach, detach, set_span_in_context = context.attach, context.detach, trace.set_span_in_context
        perf_counter = time.perf_counter

        def floor() -> None:
            started = perf_counter()
            span = tracer.start_span("chat gpt-4o-mini", kind=SpanKind.CLIENT, attributes=START)
            detach(attach(set_span_in_context(span)))
            span.set_attributes(END)
            span.end()
            duration.record(perf_counter() - started, METRIC)
            tokens.record(3, METRIC_IN)
            tokens.record(4, METRIC_OUT)

        self.shim, self.floor = shim, floor
        llmshim.on("call_completed", lambda record: None)

    def use(self, variant: str) -> Callable[[], None]:
        """Install llmshim as the variant needs (a second install applies settings in place)."""
        if variant == "floor":
            self.llmshim.uninstall()
            return self.floor
        tracer_provider, meter_provider = self.providers
        self.llmshim.install(tracer_provider=tracer_provider, meter_provider=meter_provider,
                             telemetry=variant == "otel", cache="off", retry_mode="off")
        return self.shim

    def check(self) -> None:
        """llmshim's span and metric points carry exactly the floor's attributes (else the floor
        would measure other work than llmshim asks of the SDK)."""
        self.use("otel")()
        span = self.exporter.get_finished_spans()[-1]
        expected = {**START, **END, "gen_ai.response.finish_reasons": ("stop",)}
        if dict(span.attributes or {}) != expected:
            raise SystemExit(f"the floor's span attributes are not llmshim's: {dict(span.attributes or {})}")
        data = self.reader.get_metrics_data()
        points = sorted(json.dumps(dict(point.attributes), sort_keys=True)
                        for resource in data.resource_metrics for scope in resource.scope_metrics
                        for metric in scope.metrics for point in metric.data.data_points)
        want = sorted(json.dumps(a, sort_keys=True) for a in (METRIC, METRIC_IN, METRIC_OUT))
        if points != want:
            raise SystemExit(f"the floor's metric points are not llmshim's: {points}")
        self.exporter.clear()

    def block(self, variant: str, calls: int) -> float:
        """The median of ``calls`` timed calls of ``variant``, in µs."""
        run = self.use(variant)
        for _ in range(50):
            run()
        samples = []
        perf_counter = time.perf_counter
        for _ in range(calls):
            start = perf_counter()
            run()
            samples.append(perf_counter() - start)
        self.exporter.clear()
        self.floor_exporter.clear()
        return statistics.median(samples) * 1e6


def worker(calls: int) -> int:
    """One tree's process: a line in = one round (a block of each variant), a JSON line out."""
    bench = Bench()
    bench.check()
    for variant in VARIANTS:  # warm up
        bench.block(variant, 500)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        print(json.dumps({variant: bench.block(variant, calls) for variant in VARIANTS}), flush=True)
    return 0


def wall_clock(trees: list[tuple[str, str]], rounds: int, calls: int) -> None:
    procs = {}
    for name, tree in trees:
        env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, __file__, "--worker", "--calls", str(calls)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())
        procs[name] = proc
    results: dict[str, list[dict[str, float]]] = {name: [] for name in procs}
    try:
        for _ in range(rounds):
            for name, proc in procs.items():  # one process at a time: they never compete
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("round\n")
                proc.stdin.flush()
                results[name].append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            proc.communicate("")
    print(f"µs per call, median over {rounds} rounds of each round's median ({calls} calls per block)\n")
    print("| tree | floor (bare SDK) | llmshim off | llmshim + OTel | llmshim's OTel share | share above floor |")
    print("|---|---|---|---|---|---|")
    for name, tree in trees:
        med = {v: statistics.median(r[v] for r in results[name]) for v in VARIANTS}
        share = med["otel"] - med["off"]
        print(f"| {name} ({tree}) | {med['floor']:.1f} | {med['off']:.1f} | {med['otel']:.1f} | "
              f"+{share:.1f} | {share - med['floor']:+.1f} |", flush=True)


COUNT = """
import gc, sys
sys.path.insert(0, {tree!r})
sys.path.insert(0, {here!r})
gc.disable()
from otel_floor import Bench
bench = Bench()
bench.check()
run = bench.use({variant!r})
for _ in range(300):
    run()
for _ in range({calls}):
    run()
"""


def count(tree: str, variant: str, calls: int) -> int:
    return callgrind_count(COUNT.format(tree=tree, here=os.path.dirname(os.path.abspath(__file__)), variant=variant,
                                        calls=calls))


def instructions(trees: list[tuple[str, str]], calls: int) -> None:
    print(f"instructions per call, callgrind, {calls} calls after 300 warm-up, collector off\n")
    print("| tree | floor (bare SDK) | llmshim off | llmshim + OTel | llmshim's OTel share | share above floor |")
    print("|---|---|---|---|---|---|")
    for name, tree in trees:
        per = {v: (count(tree, v, calls) - count(tree, v, 0)) // calls for v in VARIANTS}
        share = per["otel"] - per["off"]
        print(f"| {name} ({tree}) | {per['floor']:,} | {per['off']:,} | {per['otel']:,} | +{share:,} | "
              f"{share - per['floor']:+,} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000, help="calls per block (wall clock) or counted calls")
    parser.add_argument("--against", metavar="TREE", help="another llmshim checkout, measured the same way")
    parser.add_argument("--instructions", action="store_true", help="count instructions (callgrind), not time")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.calls)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this tree", here)] + ([("--against", os.path.abspath(args.against))] if args.against else [])
    if args.instructions:
        instructions(trees, args.calls)
    else:
        wall_clock(trees, args.rounds, args.calls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
