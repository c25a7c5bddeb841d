"""A probe run under either tree (the pre-redesign commit or this one) through PYTHONPATH: it answers
JSON questions on stdin, one per line, with JSON on stdout, using only what both trees share.

Used by ``tests/test_redesign_compare.py`` to compare the two trees' answers on the same inputs:
recognition (dialect, call info, cache key, cache plan, token estimate, input messages), settings
(accepted or refused, the masked values) and whole scenarios against a FakeLLMServer (stats,
spans, metric points, hook records). Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

SALT = b"0123456789abcdef"


def _plain(value: Any) -> Any:
    """JSON-able, order-stable."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


# -- recognition -----------------------------------------------------------------------------------

def _call(request: dict[str, Any]) -> Any:
    from llmshim.call import Call, WireRequest
    from llmshim.dialects import detect

    wire = WireRequest(request["method"], request["url"], tuple(tuple(h) for h in request["headers"]),
                       base64.b64decode(request["body"]))
    found = detect(wire)
    if found is None:
        return None
    dialect, info = found
    return Call(request=wire, info=info, library="httpx", dialect=dialect)


def _estimate(call: Any) -> list[int]:
    try:
        from llmshim.policies.ratelimit import estimate_tokens  # the old tree
    except ImportError:
        info = call.info
        return [max(1, info.input_chars // 4), info.max_output_tokens or 777]
    return list(estimate_tokens(call.info.body, 777))


def _input_messages(call: Any) -> Any:
    from llmshim.policies import telemetry

    return telemetry._input_messages(call)


def _cache_key(call: Any, shared: bool) -> str:
    try:
        from llmshim.store.cache_keys import cache_key
    except ImportError:
        from llmshim.store.keys import cache_key  # type: ignore[no-redef]
    return cache_key(call, SALT, shared, frozenset())


def recognise(request: dict[str, Any]) -> Any:
    call = _call(request)
    if call is None:
        return None
    from llmshim.policies.cache import plan

    info = call.info
    answers: dict[str, Any] = {
        "dialect": type(call.dialect).__name__, "provider": info.provider, "operation": info.operation,
        "endpoint": info.endpoint, "model": info.model, "stream": info.stream, "params": info.params,
        "estimate": _estimate(call), "input_messages": _input_messages(call),
        "plan_skip": plan(call, "on", None, "skip").reason, "plan_store": plan(call, "on", None, "store").reason,
    }
    for shared in (False, True):
        try:
            answers[f"key_shared_{shared}"] = _cache_key(call, shared)
        except Exception as exc:
            answers[f"key_shared_{shared}"] = f"raised {type(exc).__name__}"
    return _plain(answers)


# -- settings --------------------------------------------------------------------------------------

def settings(environ: dict[str, str]) -> Any:
    from llmshim import config

    try:
        loaded = config.load(environ)
    except config.ConfigError as exc:
        return {"refused": str(exc)}
    return {"masked": _plain(loaded.masked())}


# -- scenarios: real clients over real sockets to a FakeLLMServer -------------------------------------

VOLATILE = ("server.port", "llmshim.cache.age_s", "gen_ai.response.id", "gen_ai.response.time_to_first_chunk")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def _post(url: str, body: dict[str, Any], **headers: str) -> int:
    import requests

    return requests.post(url, json=body, timeout=10, headers=headers).status_code


def _stream(url: str, body: dict[str, Any], read: bool = True) -> int:
    import gc

    import httpx

    with httpx.Client(timeout=10) as client:
        response = client.send(client.build_request("POST", url, json={**body, "stream": True}), stream=True)
        status = response.status_code
        if read:
            response.read()
            response.close()
        else:
            del response
            gc.collect()
    return status


def _run(name: str, server: Any, tmp: str) -> list[Any]:
    """The scenario's actions; what each returned, for the comparison too."""
    import llmshim
    from llmshim.testing import Fault

    chat = server.openai_base_url + "/chat/completions"
    cache_path = f"{tmp}/cache.sqlite3"
    results: list[Any] = []
    if name == "plain":
        llmshim.install()
        results += [_post(chat, CHAT), _stream(chat, CHAT), _post(server.url + "/api/chat", {**CHAT, "stream": False})]
    elif name == "cache":
        llmshim.install(cache="on", cache_path=cache_path)
        results += [_post(chat, CHAT) for _ in range(3)] + [_stream(chat, CHAT) for _ in range(2)]
    elif name == "retry":
        llmshim.install(retry_mode="llmshim", retry_max_delay="0")
        server.inject(Fault(status=500), times=2)
        results += [_post(chat, CHAT)]
        server.inject(Fault(status=500), times=5)
        results += [_post(chat, CHAT)]
    elif name == "replay_miss":
        llmshim.install(cache="replay", cache_path=cache_path)
        results += [_post(chat, CHAT), _stream(chat, CHAT)]
    elif name == "queue_timeout":
        llmshim.install(rpm="1", ratelimit_burst="0", queue_timeout="0")
        results += [_post(chat, CHAT), _post(chat, CHAT)]
    elif name == "throttled_retries":
        llmshim.install(rpm="600", ratelimit_burst="0", retry_mode="llmshim", retry_max_delay="0")
        server.inject(Fault(status=500), times=2)
        results += [_post(chat, CHAT)]
    elif name == "reset":
        llmshim.install()
        server.inject(Fault(reset="before_headers"), times=1)
        try:
            _post(chat, CHAT)
        except Exception as exc:
            results.append(type(exc).__name__)
        server.inject(Fault(reset="after_chunks", after_chunks=2), times=1)
        try:
            _stream(chat, CHAT)
        except Exception as exc:
            results.append(type(exc).__name__)
    elif name == "dropped_stream":
        llmshim.install()
        results += [_stream(chat, CHAT, read=False)]
    elif name == "broken_cache_file":
        with open(cache_path, "wb") as handle:
            handle.write(b"this is not a database" * 100)
        llmshim.install(cache="on", cache_path=cache_path)
        results += [_post(chat, CHAT), _post(chat, CHAT)]
    elif name == "error_statuses":
        llmshim.install()
        for status in (400, 401, 429, 503):
            server.inject(Fault(status=status), times=1)
            results.append(_post(chat, CHAT))
    elif name == "reset_retried":
        llmshim.install(retry_mode="llmshim", retry_max_delay="0")
        server.inject(Fault(reset="before_headers"), times=1)
        results += [_post(chat, CHAT), _stream(chat, CHAT)]
    elif name == "redis_down":
        llmshim.install(cache="on", cache_path=cache_path, cache_url="redis://127.0.0.1:9/0", cache_local="false")
        results += [_post(chat, CHAT), _post(chat, CHAT)]
    elif name == "limits_store_broken":
        with open(f"{tmp}/limits.sqlite3", "wb") as handle:
            handle.write(b"this is not a database" * 100)
        llmshim.install(rpm="6000", ratelimit_store=f"sqlite:///{tmp}/limits.sqlite3")
        results += [_post(chat, CHAT), _post(chat, CHAT)]
    elif name == "limits_store_healthy":
        llmshim.install(rpm="600000", ratelimit_store=f"sqlite:///{tmp}/limits.sqlite3")
        results += [_post(chat, CHAT) for _ in range(20)]
    elif name == "aiohttp":
        import asyncio

        import aiohttp

        async def calls() -> list[Any]:
            async with aiohttp.ClientSession() as session:
                async with session.post(chat, json=CHAT) as response:
                    await response.read()
                    first = response.status
                async with session.post(chat, json={**CHAT, "stream": True}) as response:
                    async for _ in response.content:
                        pass
                    return [first, response.status]

        llmshim.install(cache="on", cache_path=cache_path)
        results += asyncio.run(calls()) + asyncio.run(calls())
    elif name == "uninstall_mid_stream":
        import httpx

        llmshim.install()
        with httpx.Client(timeout=10) as client:
            response = client.send(client.build_request("POST", chat, json={**CHAT, "stream": True}), stream=True)
            llmshim.uninstall()
            response.read()
            response.close()
            results.append(response.status_code)
    elif name == "install_churn":
        import httpx

        llmshim.install(cache="on", cache_path=cache_path)
        with httpx.Client(timeout=10) as client:
            response = client.send(client.build_request("POST", chat, json={**CHAT, "stream": True}), stream=True)
            llmshim.install(cache="off")
            llmshim.install(cache="on", cache_path=cache_path)
            response.read()
            response.close()
            results += [response.status_code, _post(chat, {**CHAT, "stream": True})]
    else:
        raise ValueError(name)
    return results


def scenario(question: dict[str, Any]) -> Any:
    import logging
    import tempfile

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import llmshim
    from llmshim.testing import FakeLLMServer

    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage().split(" (")[0])

    logging.getLogger("llmshim").addHandler(Keep(logging.WARNING))
    hooks: list[Any] = []
    for event in ("call_started", "call_completed", "call_failed"):
        llmshim.on(event, lambda record: hooks.append(  # type: ignore[arg-type]
            [record.event, record.outcome, record.status, record.cache_hit, record.error_type]))
    telemetry = question.get("telemetry", True)
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])
    original = llmshim.install

    def install(**settings: Any) -> Any:
        if telemetry:
            return original(tracer_provider=tracer_provider, meter_provider=meter_provider, **settings)
        return original(telemetry="false", **settings)

    llmshim.install = install  # type: ignore[assignment]
    llmshim.stats(reset=True)
    with tempfile.TemporaryDirectory() as tmp, FakeLLMServer() as server:
        os.environ.update(XDG_CACHE_HOME=tmp, LLMSHIM_CACHE="off", LLMSHIM_RETRY_MODE="off")
        try:
            results = _run(question["name"], server, tmp)
        finally:
            llmshim.uninstall()
    stats = llmshim.stats()
    for volatile in ("average_latency_s", "since", "pid"):
        stats.pop(volatile)
    spans = sorted([[span.name, str(span.status.status_code), [event.name for event in span.events],
                     {k: v for k, v in sorted(span.attributes.items()) if k not in VOLATILE
                      and k != "llmshim.ratelimit.wait_s"},
                     "llmshim.ratelimit.wait_s" in span.attributes] for span in exporter.get_finished_spans()],
                   key=json.dumps)
    points: list[Any] = []
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = {k: v for k, v in sorted(point.attributes.items()) if k not in VOLATILE}
                    value = getattr(point, "value", None)
                    if value is None:  # a histogram: how many, and the sum where it is not a time
                        value = [point.count, point.sum if metric.unit != "s" else None]
                    points.append([metric.name, attributes, value])
    return _plain({"results": results, "stats": stats, "spans": spans, "metrics": sorted(points, key=json.dumps),
                   "hooks": hooks, "warnings": sorted(set(warnings)), "warning_count": len(warnings)})


def variables(_: Any) -> Any:
    from llmshim import config

    return sorted(option.env for option in config.OPTIONS)


def main() -> None:
    if sys.argv[1:2] == ["scenario"]:
        print(json.dumps(scenario(json.loads(sys.argv[2])), sort_keys=True))
        return
    handlers = {"recognise": recognise, "settings": settings, "variables": variables}
    for line in sys.stdin:
        question = json.loads(line)
        try:
            answer = handlers[question["kind"]](question["input"])
        except Exception as exc:
            answer = {"probe_raised": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer, sort_keys=True) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
