"""The Anthropic Messages dialect, the pure part (issue 16, item 1): recognition, the SSE events
read at any split, usage with prompt-cache tokens, stop reasons, errors, the rate-limit headers,
spend-limit 429s, count_tokens kept out of the cache and the limiter, and cost.

The real SDK over real sockets is in ``tests/test_anthropic_sdk.py``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmshim import cost
from llmshim.call import Call, ResponseInfo, Usage, WireRequest
from llmshim.dialects import BodyParser, ServerLimits, detect
from llmshim.dialects.anthropic import ANTHROPIC, absorb_usage, parse_time, server_limits_at
from llmshim.policies import cache as cache_policy
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.testing import anthropic_wire

MESSAGES = [{"role": "user", "content": "hi there"}]
BODY = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": MESSAGES}


def _wire(path: str, body: Any, url: str = "https://api.anthropic.com") -> WireRequest:
    return WireRequest("POST", url + path, (("x-api-key", "sk-ant-secret"),), json.dumps(body).encode())


def _call(path: str, body: Any, url: str = "https://api.anthropic.com") -> Call:
    wire = _wire(path, body, url)
    found = detect(wire)
    assert found is not None
    return Call(request=wire, info=found[1], library="test", dialect=found[0])


# -- recognition -------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/messages", BODY, ("messages", "chat", False)),
    ("/v1/messages", {**BODY, "stream": True}, ("messages", "chat", True)),
    ("/v1/messages/", {**BODY, "stream": False}, ("messages", "chat", False)),
    ("/anthropic/v1/messages", BODY, ("messages", "chat", False)),  # a gateway's prefix
    ("/api/v1/messages", {**BODY, "system": [{"type": "text", "text": "x"}]}, ("messages", "chat", False)),
    ("/v1/messages/count_tokens", {"model": "claude-haiku-4-5", "messages": MESSAGES},
     ("messages/count_tokens", "count_tokens", False)),
    ("/v1/messages/count_tokens", {"model": "m", "messages": MESSAGES, "stream": True},  # never a stream
     ("messages/count_tokens", "count_tokens", False)),
    ("/v1/messages", {"model": "m", "messages": []}, ("messages", "chat", False)),  # the server says 400
    # not this wire, or not its shape: passed through untouched
    ("/v1/threads/thread_1/messages", {"role": "user", "content": "x"}, None),  # OpenAI Assistants
    ("/v1/threads/thread_1/messages", {"model": "m", "messages": MESSAGES}, None),
    ("/v1/messages/batches", {"requests": [{"custom_id": "a", "params": BODY}]}, None),
    ("/v2/messages", BODY, None),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 5}, None),  # no model
    ("/v1/messages", {"model": 7, "messages": MESSAGES}, None),
    ("/v1/messages", {"model": "m", "messages": "hi"}, None),
    ("/v1/messages", {"model": "m", "messages": [{"content": "no role"}]}, None),
    ("/v1/messages", {**BODY, "stream": "yes"}, None),
    ("/v1/messages/count_tokens", {"model": "m"}, None),
])
def test_recognition(path: str, body: Any, expected: tuple[str, str, bool] | None) -> None:
    found = detect(_wire(path, body))
    if expected is None:
        assert found is None
        return
    assert found is not None
    dialect, info = found
    assert dialect is ANTHROPIC and info.provider == "anthropic"
    assert (info.endpoint, info.operation, info.stream, info.model) == (*expected, body["model"])


def test_a_get_or_a_local_host_keeps_its_meaning() -> None:
    assert detect(WireRequest("GET", "https://api.anthropic.com/v1/messages", (), b"")) is None
    found = detect(_wire("/v1/messages", BODY, url="http://127.0.0.1:8080"))
    assert found is not None and found[1].provider == "anthropic"  # the wire names an unknown host


def test_request_parameters_for_the_span_and_the_limiter() -> None:
    body = {**BODY, "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"], "seed": 1,
            "system": "be brief"}
    info = detect(_wire("/v1/messages", body))[1]  # type: ignore[index]
    assert info.params == {"max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop_sequences": ["END"]}
    assert (info.max_output_tokens, info.temperature, info.seed) == (64, 0.2, None)  # no seed on this wire
    assert info.input_chars == len(json.dumps([MESSAGES, "be brief"]))  # the system prompt is prompt too


# -- streams, read at any split ------------------------------------------------------------------

def _events(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n".encode() for e in events)


#: A stream with every kind of event: usage with both cache counts, a text block with multi-byte
#: characters, a ping, a tool_use block streamed as JSON pieces, cumulative usage at the end.
STREAM = _events(
    {"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
                  "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Héllo 🙂"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " wörld"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1,
     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 37}},
    {"type": "message_stop"},
)
EXPECTED = ResponseInfo(model="claude-haiku-4-5-20251001", id="msg_01", finish_reasons=["tool_calls"],
                        usage=Usage(input_tokens=2112, output_tokens=37, cached_input_tokens=2000,
                                    cache_write_tokens=100), done=True,
                        output=["Héllo 🙂", " wörld"], chunks=12)


def _parse(pieces: list[bytes], body: dict[str, Any] | None = None, content_type: str = "text/event-stream",
           ) -> ResponseInfo:
    call = _call("/v1/messages", body or {**BODY, "stream": True})
    parser = BodyParser(call.dialect, call.info, content_type, capture=True)
    for piece in pieces:
        parser.feed(piece)
    return parser.finish()


def test_a_stream_split_at_every_byte_reads_the_same() -> None:
    assert _parse([STREAM]) == EXPECTED
    for cut in range(len(STREAM) + 1):
        assert _parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_a_stream_in_any_pieces_reads_the_same(cuts: list[int]) -> None:
    edges = [0, *sorted(cuts), len(STREAM)]
    assert _parse([STREAM[a:b] for a, b in itertools.pairwise(edges)]) == EXPECTED


def test_the_bundled_servers_stream_and_whole_answer_read_alike() -> None:
    body = {**BODY, "system": [{"type": "text", "text": "a b c", "cache_control": {"type": "ephemeral"}}],
            "stop_sequences": ["there"]}
    streamed = anthropic_wire.messages({**body, "stream": True})
    whole = anthropic_wire.messages(body)
    live = _parse(list(streamed.chunks or ()), {**body, "stream": True})
    read = _parse([whole.body], body, "application/json")
    assert live.usage == read.usage == Usage(input_tokens=5, output_tokens=3, cached_input_tokens=3,
                                             cache_write_tokens=0)
    assert live.finish_reasons == read.finish_reasons == ["stop"]  # stop_sequence
    assert "".join(live.output or ()) == "".join(read.output or ()) == "Echo: hi "
    assert live.done and read.done and str(live.id).startswith("msg_") and str(read.id).startswith("msg_")


# -- usage, stop reasons, errors -------------------------------------------------------------------

@pytest.mark.parametrize(("usages", "expected"), [
    ([{"input_tokens": 10, "output_tokens": 1}], Usage(10, 1, None)),
    ([{"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1},
      {"output_tokens": 9}], Usage(10, 9, 0, 0)),  # an older message_delta: only the output count
    ([{"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 1},
      {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 9}],
     Usage(35, 9, 20, 5)),  # a newer one restates them all
    ([{"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 1},
      {"input_tokens": 14, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 26, "output_tokens": 9}],
     Usage(45, 9, 26, 5)),  # server tools grew the prompt: the later counts win
    ([{"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 1},
      {"input_tokens": None, "cache_creation_input_tokens": None, "cache_read_input_tokens": 30, "output_tokens": 2}],
     Usage(45, 2, 30, 5)),  # null keeps; the cache read alone is known apart
    ([{"cache_creation_input_tokens": 7, "output_tokens": 0}], Usage(7, 0, None, 7)),
    ([{"input_tokens": -1, "output_tokens": True, "cache_read_input_tokens": "9"}], Usage()),  # not counts
    (["usage", None, {}], Usage()),
])
def test_usage_counts_the_whole_prompt_and_the_cache_read(usages: list[Any], expected: Usage) -> None:
    usage = Usage()
    for said in usages:
        absorb_usage(said, usage)
    assert usage == expected


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("pause_turn", "pause_turn"), ("refusal", "refusal")])
def test_stop_reasons_as_opentelemetrys_anthropic_instrumentation_names_them(stop_reason: str, finish: str) -> None:
    answer = {"id": "msg_1", "type": "message", "model": "m", "content": [], "stop_reason": stop_reason,
              "usage": {"input_tokens": 1, "output_tokens": 1}}
    assert _parse([json.dumps(answer).encode()], BODY, "application/json").finish_reasons == [finish]


def test_an_error_event_after_the_200_is_the_calls_error() -> None:
    cut = STREAM.index(b"event: content_block_start")
    stream = STREAM[:cut] + _events({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    read = _parse([stream])
    assert read.error == "overloaded_error" and not read.done
    error = anthropic_wire.error_body(529, None)
    assert _parse([error], BODY, "application/json").error == "overloaded_error"


def test_count_tokens_reports_no_usage_and_is_not_a_generation() -> None:
    call = _call("/v1/messages/count_tokens", {"model": "claude-haiku-4-5", "messages": MESSAGES})
    parser = BodyParser(call.dialect, call.info, "application/json")
    parser.feed(b'{"input_tokens": 2095}')
    read = parser.finish()
    assert read.done and read.usage == Usage()  # a measure: nothing was spent, nothing to price
    assert not call.dialect.generates(call.info) and ANTHROPIC.generates(_call("/v1/messages", BODY).info)
    decided = cache_policy.plan(call, "on", None, "cache")
    assert (decided.lookup, decided.store, decided.reason) == (False, False, "not a generation")
    limiter = RateLimitPolicy(rpm=1, tpm=1000, per_model={}, burst=1.0, default_priority="normal", queue_timeout=1,
                              default_output_tokens=100)
    try:
        assert limiter._plan(call) is None  # no permit taken from the generation limits
        assert limiter._plan(_call("/v1/messages", BODY)) is not None
    finally:
        limiter.close()


# -- what the server says about itself ---------------------------------------------------------

NOW = dt.datetime(2025, 6, 12, 18, 30, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize(("raw", "seconds"), [
    ("2025-06-12T18:30:30Z", 30.0), ("2025-06-12T18:31:00.5Z", 60.5), ("2025-06-12t18:30:10z", 10.0),
    ("2025-06-12T20:30:20+02:00", 20.0), ("2025-06-12T18:00:00-00:30", 0.0), ("2025-06-12T18:29:00Z", -60.0),
    ("2025-06-12 18:30:05Z", 5.0), ("2025-06-12T18:30:00", None), ("soon", None), ("", None), (None, None),
    ("2025-13-12T18:30:00Z", None), ("\uff12\uff10\uff12\uff15-06-12T18:30:00Z", None)])
def test_rfc3339_times(raw: str | None, seconds: float | None) -> None:
    at = parse_time(raw)
    assert (None if at is None else at - NOW) == seconds


def test_the_limiter_learns_the_anthropic_ratelimit_headers() -> None:
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
               "anthropic-ratelimit-requests-reset": "2025-06-12T18:30:01Z",
               "anthropic-ratelimit-tokens-limit": "30000", "anthropic-ratelimit-tokens-remaining": "29000",
               "anthropic-ratelimit-tokens-reset": "2025-06-12T18:30:02Z",
               "anthropic-ratelimit-input-tokens-limit": "40000", "anthropic-ratelimit-output-tokens-limit": "8000"}
    assert server_limits_at(headers, NOW) == ServerLimits(50.0, 49.0, 1.0, 30000.0, 29000.0, 2.0)
    # without the tokens-* summary, the lower of the input and output limits (one bucket charges both)
    split = {"anthropic-ratelimit-input-tokens-limit": "40000", "anthropic-ratelimit-input-tokens-remaining": "100",
             "anthropic-ratelimit-input-tokens-reset": "2025-06-12T18:30:05Z",
             "anthropic-ratelimit-output-tokens-limit": "8000", "anthropic-ratelimit-output-tokens-remaining": "7000",
             "anthropic-ratelimit-output-tokens-reset": "2025-06-12T18:30:03Z"}
    assert server_limits_at(split, NOW) == ServerLimits(tokens_limit=8000.0, tokens_remaining=100.0, tokens_reset=5.0)
    hostile = {"anthropic-ratelimit-requests-limit": "nan", "anthropic-ratelimit-requests-remaining": "-1",
               "anthropic-ratelimit-requests-reset": "1.5s", "anthropic-ratelimit-tokens-limit": "inf",
               "anthropic-ratelimit-tokens-remaining": "\u0661", "anthropic-ratelimit-tokens-reset": "tomorrow"}
    assert server_limits_at(hostile, NOW) == ServerLimits()
    assert ANTHROPIC.server_limits({"x-ratelimit-limit-requests": "60"}) == ServerLimits()  # OpenAI's: not this wire
    live = ANTHROPIC.server_limits({"anthropic-ratelimit-requests-reset": "2999-01-01T00:00:00Z"})
    assert live.requests_reset is not None and live.requests_reset > 0  # measured from now


@pytest.mark.parametrize(("status", "body", "code"), [
    (429, {"error": {"type": "rate_limit_error", "details": {"error_code": "enforced_spend_limit_reached"}}},
     "enforced_spend_limit_reached"),
    (429, {"error": {"type": "rate_limit_error", "details": {"error_code": "contract_spend_limit_reached"}}},
     "contract_spend_limit_reached"),
    (429, {"error": {"type": "rate_limit_error", "details": {"error_code": "ramp_limit_exceeded"}}}, None),  # load
    (429, {"error": {"type": "rate_limit_error", "message": "spend_limit soon"}}, None),
    (400, {"error": {"details": {"error_code": "enforced_spend_limit_reached"}}}, None),
    (429, "enforced_spend_limit_reached", None), (429, b"\xff spend_limit", None)])
def test_a_spend_limit_429_is_an_exhausted_quota(status: int, body: Any, code: str | None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert ANTHROPIC.quota_exhausted(status, raw) == code


# -- cost ----------------------------------------------------------------------------------------

def test_a_claude_call_costs_what_the_library_says_with_cached_input_cheaper() -> None:
    genai_prices = pytest.importorskip("genai_prices")
    cost.forget()
    call = _call("/v1/messages", {**BODY, "stream": True})
    call.response = _parse([STREAM])  # 2112 prompt tokens, 2000 of them read from the prompt cache
    paid = cost.cost_of(call)
    library = genai_prices.calc_price(genai_prices.Usage(input_tokens=2112, output_tokens=37, cache_read_tokens=2000,
                                                         cache_write_tokens=100),
                                      "claude-haiku-4-5-20251001", provider_id="anthropic").total_price
    assert paid is not None and paid == Decimal(str(library))
    uncached = cost.price("anthropic", "claude-haiku-4-5-20251001", 2112, 37)
    assert uncached is not None and 0 < paid < uncached
    assert cost.cost_of(_call("/v1/messages", BODY, url="http://127.0.0.1:8080")) is None  # a local server: no price
