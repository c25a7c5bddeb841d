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
        except Exception as exc:  # noqa: BLE001 - the comparison is of the answer, error or not
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


def variables(_: Any) -> Any:
    from llmshim import config

    return sorted(option.env for option in config.OPTIONS)


def main() -> None:
    handlers = {"recognise": recognise, "settings": settings, "variables": variables}
    for line in sys.stdin:
        question = json.loads(line)
        try:
            answer = handlers[question["kind"]](question["input"])
        except Exception as exc:  # noqa: BLE001
            answer = {"probe_raised": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer, sort_keys=True) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
