"""The Gemini dialect, pure: what is recognised, how answers are read, what a retry waits for.

No sockets here: recognition over paths and bodies, the bundled server's own answers fed through
``BodyParser`` in every split, usage arithmetic, the retry decision and the price. The real
``google-genai`` SDK over real sockets is in ``test_gemini_sdk.py``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmshim import cost
from llmshim.call import Call, ResponseInfo, WireRequest
from llmshim.dialects import BodyParser, detect
from llmshim.dialects.gemini import GEMINI, retry_delay_seconds
from llmshim.policies.retry import decide
from llmshim.store import cache_keys
from llmshim.testing import gemini_wire

API = "https://generativelanguage.googleapis.com"
VERTEX = "https://us-central1-aiplatform.googleapis.com"
CONTENTS = [{"role": "user", "parts": [{"text": "say something nice"}]}]


def _wire(url: str, body: Any, method: str = "POST", headers: tuple[tuple[str, str], ...] = ()) -> WireRequest:
    return WireRequest(method, url, headers, json.dumps(body).encode())


# -- recognition -------------------------------------------------------------------------------

RECOGNISED = [
    # url, body, (provider, operation, endpoint, model, stream, generates)
    (API + "/v1beta/models/gemini-2.0-flash:generateContent", {"contents": CONTENTS},
     ("gcp.gemini", "generate_content", "generateContent", "gemini-2.0-flash", False, True)),
    (API + "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=AIzaSECRET", {"contents": CONTENTS},
     ("gcp.gemini", "generate_content", "streamGenerateContent", "gemini-2.0-flash", True, True)),
    (API + "/v1/models/gemini-2.5-pro:streamGenerateContent", {"contents": []},  # the JSON-array stream
     ("gcp.gemini", "generate_content", "streamGenerateContent", "gemini-2.5-pro", True, True)),
    (API + "/v1beta/tunedModels/my-tune-7:generateContent", {"contents": CONTENTS},
     ("gcp.gemini", "generate_content", "generateContent", "tunedModels/my-tune-7", False, True)),
    (API + "/v1beta/models/text-embedding-004:embedContent", {"content": {"parts": [{"text": "a"}]}},
     ("gcp.gemini", "embeddings", "embedContent", "text-embedding-004", False, True)),
    (API + "/v1beta/models/text-embedding-004:batchEmbedContents", {"requests": [{"content": {"parts": []}}]},
     ("gcp.gemini", "embeddings", "batchEmbedContents", "text-embedding-004", False, True)),
    (API + "/v1beta/models/gemini-2.0-flash:countTokens", {"contents": CONTENTS},
     ("gcp.gemini", "count_tokens", "countTokens", "gemini-2.0-flash", False, False)),
    (API + "/v1beta/models/gemini-2.0-flash:countTokens", {"generateContentRequest": {"contents": CONTENTS}},
     ("gcp.gemini", "count_tokens", "countTokens", "gemini-2.0-flash", False, False)),
    (VERTEX + "/v1/projects/p-1/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:generateContent",
     {"contents": CONTENTS},
     ("gcp.vertex_ai", "generate_content", "generateContent", "gemini-2.0-flash-001", False, True)),
    (VERTEX + "/v1/projects/p/locations/global/publishers/google/models/gemini-2.5-flash@001:streamGenerateContent"
     "?alt=sse", {"contents": CONTENTS},
     ("gcp.vertex_ai", "generate_content", "streamGenerateContent", "gemini-2.5-flash@001", True, True)),
    # Vertex AI's path names Vertex whatever host serves it (a local proxy, the bundled server)
    ("http://127.0.0.1:9/v1beta1/publishers/google/models/gemini-2.0-flash:generateContent", {"contents": CONTENTS},
     ("gcp.vertex_ai", "generate_content", "generateContent", "gemini-2.0-flash", False, True)),
    ("http://127.0.0.1:9/v1/models/gemini-2.0-flash:generateContent", {"contents": CONTENTS},
     ("gcp.gemini", "generate_content", "generateContent", "gemini-2.0-flash", False, True)),
    # Gemini's OpenAI-compatible routes are the OpenAI wire, served by Google
    (API + "/v1beta/openai/chat/completions",
     {"model": "gemini-2.0-flash", "messages": [{"role": "user", "content": "x"}]},
     ("gcp.gemini", "chat", "chat/completions", "gemini-2.0-flash", False, True)),
]


@pytest.mark.parametrize(("url", "body", "expected"), RECOGNISED, ids=[row[0].split("/", 3)[3] for row in RECOGNISED])
def test_recognition_table(url: str, body: dict[str, Any], expected: tuple[Any, ...]) -> None:
    found = detect(_wire(url, body))
    assert found is not None
    dialect, info = found
    assert (info.provider, info.operation, info.endpoint, info.model, info.stream,
            dialect.generates(info)) == expected


NOT_RECOGNISED = [
    (API + "/v1beta/models/gemini-2.0-flash:generateContent", {"contents": "a string"}),  # REST wants a list
    (API + "/v1beta/models/gemini-2.0-flash:generateContent", {"contents": ["a string"]}),
    (API + "/v1beta/models/gemini-2.0-flash:generateContent", {"prompt": "x"}),
    (API + "/v1beta/models/gemini-2.0-flash:embedContent", {"content": "x"}),
    (API + "/v1beta/models/gemini-2.0-flash:batchEmbedContents", {"requests": {"content": {}}}),
    (API + "/v1beta/models/gemini-2.0-flash:countTokens", {"generateContentRequest": "x"}),
    (API + "/v1beta/models/gemini-2.0-flash:predict", {"instances": []}),  # not an action of this wire
    (API + "/v1beta/models:generateContent", {"contents": CONTENTS}),  # no model
    (API + "/v1beta/files/abc:generateContent", {"contents": CONTENTS}),  # not a model resource
    (API + "/v1beta/models/a/b:generateContent", {"contents": CONTENTS}),
    (API + "/v1beta/cachedContents", {"contents": CONTENTS, "model": "models/gemini-2.0-flash"}),
]


@pytest.mark.parametrize(("url", "body"), NOT_RECOGNISED)
def test_shapes_that_are_not_gemini_calls_pass_through(url: str, body: Any) -> None:
    assert detect(_wire(url, body)) is None


def test_only_post_is_a_call() -> None:
    assert detect(_wire(API + "/v1beta/models/gemini-2.0-flash:generateContent", {"contents": CONTENTS}, "GET")) is None


def test_sampling_is_read_from_generation_config_in_either_spelling() -> None:
    for config in ({"maxOutputTokens": 12, "temperature": 0, "topP": 0.5, "seed": 7, "stopSequences": ["x"]},
                   {"max_output_tokens": 12, "temperature": 0, "top_p": 0.5, "seed": 7, "stop_sequences": ["x"]}):
        found = detect(_wire(API + "/v1beta/models/m:generateContent",
                             {"contents": CONTENTS, "generationConfig": config, "temperature": 1}))
        assert found is not None
        info = found[1]
        assert (info.max_output_tokens, info.temperature, info.seed) == (12, 0, 7)
        assert info.params == {"max_tokens": 12, "temperature": 0, "top_p": 0.5, "seed": 7, "stop_sequences": ["x"]}


def test_input_messages_map_roles_tools_and_the_system_instruction() -> None:
    contents = [{"role": "user", "parts": [{"text": "weather?"}]},
                {"role": "model", "parts": [{"thought": True, "text": "hmm"},
                                            {"functionCall": {"name": "get", "args": {"city": "Oslo"}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get", "response": {"t": 3}}}]}]
    found = detect(_wire(API + "/v1beta/models/m:generateContent",
                         {"contents": contents, "systemInstruction": {"parts": [{"text": "brief"}]}}))
    assert found is not None
    assert found[1].input_messages == [
        {"role": "system", "parts": [{"type": "text", "content": "brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "weather?"}]},
        {"role": "assistant",
         "parts": [{"type": "tool_call", "id": None, "name": "get", "arguments": {"city": "Oslo"}}]},
        {"role": "user", "parts": [{"type": "tool_call_response", "id": None, "response": {"t": 3}}]}]


# -- reading answers: the bundled server's bytes, in every split -------------------------------

def _info(action: str, body: dict[str, Any]) -> Any:
    found = detect(_wire(API + f"/v1beta/models/gemini-2.0-flash:{action}", body))
    assert found is not None
    return found[1]


def _answer_bytes(action: str, body: dict[str, Any], query: str = "") -> tuple[bytes, str]:
    answer = gemini_wire.answer(f"/v1beta/models/gemini-2.0-flash:{action}", query, body)
    content_type = dict((k.lower(), v) for k, v in answer.headers)["content-type"]
    return (b"".join(answer.chunks) if answer.chunks is not None else answer.body), content_type


def _parse(info: Any, content_type: str, pieces: list[bytes]) -> ResponseInfo:
    parser = BodyParser(GEMINI, info, content_type, capture=True)
    for piece in pieces:
        parser.feed(piece)
    return parser.finish()


STREAM_BODY = {"contents": [{"role": "user", "parts": [{"text": "one two three four"}]}],
               "generationConfig": {"thinkingConfig": {"thinkingBudget": 64}}, "cachedContent": "cachedContents/c1"}


@pytest.mark.parametrize("query", ["alt=sse", ""], ids=["sse", "json-array"])
def test_a_stream_reads_the_same_whole_and_split_at_every_byte(query: str) -> None:
    info = _info("streamGenerateContent", STREAM_BODY)
    raw, content_type = _answer_bytes("streamGenerateContent", STREAM_BODY, query)
    assert content_type.startswith("text/event-stream" if query else "application/json")
    whole = _parse(info, content_type, [raw])
    assert whole.done and whole.error is None and whole.finish_reasons == ["stop"]
    assert "".join(whole.output or []) == "Echo: one two three four"
    # 4 prompt words + 4 cached tokens (cached content is part of the prompt); 5 words + 3 thinking tokens
    assert (whole.usage.input_tokens, whole.usage.cached_input_tokens, whole.usage.output_tokens) == (8, 4, 8)
    assert whole.model == "gemini-2.0-flash" and whole.id
    for cut in range(1, len(raw)):
        assert _parse(info, content_type, [raw[:cut], raw[cut:]]) == whole, cut


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_stream_split_anywhere_reads_the_same(data: st.DataObject) -> None:
    info = _info("streamGenerateContent", STREAM_BODY)
    raw, content_type = _answer_bytes("streamGenerateContent", STREAM_BODY, "alt=sse")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert _parse(info, content_type, pieces) == _parse(info, content_type, [raw])


def test_whole_answers_embeddings_counts_and_function_calls() -> None:
    body = {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 2}}
    raw, content_type = _answer_bytes("generateContent", body)
    result = _parse(_info("generateContent", body), content_type, [raw])
    assert (result.done, result.finish_reasons, result.output) == (True, ["max_tokens"], ["Echo: say"])
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.cached_input_tokens) == (3, 2, None)

    tools = {"contents": CONTENTS, "tools": [{"functionDeclarations": [{"name": "lookup"}]}]}
    raw, content_type = _answer_bytes("generateContent", tools)
    assert json.loads(raw)["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == "lookup"
    result = _parse(_info("generateContent", tools), content_type, [raw])
    assert (result.done, result.finish_reasons, result.usage.output_tokens) == (True, ["stop"], 1)

    for action, body in (("embedContent", {"content": {"parts": [{"text": "a b"}]}}),
                         ("batchEmbedContents", {"requests": [{"content": {"parts": [{"text": "a"}]}}]})):
        raw, content_type = _answer_bytes(action, body)
        result = _parse(_info(action, body), content_type, [raw])
        assert result.done and result.usage.input_tokens is None  # Gemini reports no embedding usage

    raw, content_type = _answer_bytes("countTokens", {"contents": CONTENTS})
    assert json.loads(raw)["totalTokens"] == 3
    result = _parse(_info("countTokens", {"contents": CONTENTS}), content_type, [raw])
    assert result.done and result.usage.input_tokens is None  # a count is not usage: nothing was spent


def test_usage_counts_thoughts_and_tool_prompts_and_the_last_chunk_holds() -> None:
    info = _info("streamGenerateContent", {"contents": CONTENTS})
    into = ResponseInfo()
    GEMINI.absorb(info, {"usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}}, None, into)
    assert (into.usage.input_tokens, into.usage.output_tokens) == (10, None)
    GEMINI.absorb(info, {"candidates": [{"finishReason": "SAFETY", "index": 0}], "usageMetadata": {
        "promptTokenCount": 10, "toolUsePromptTokenCount": 5, "candidatesTokenCount": 7, "thoughtsTokenCount": 20,
        "cachedContentTokenCount": 6, "totalTokenCount": 42}}, None, into)
    assert (into.usage.input_tokens, into.usage.output_tokens, into.usage.cached_input_tokens) == (15, 27, 6)
    assert into.done and into.finish_reasons == ["safety"]


def test_errors_in_a_body_and_a_blocked_prompt() -> None:
    info = _info("streamGenerateContent", {"contents": CONTENTS})
    into = ResponseInfo()
    GEMINI.absorb(info, json.loads(gemini_wire.error_body(503)), None, into)
    assert into.error == "UNAVAILABLE" and not into.done
    blocked = ResponseInfo()
    GEMINI.absorb(info, {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}},
                  None, blocked)
    assert blocked.done and blocked.usage.input_tokens == 3


# -- what the server says about waiting ----------------------------------------------------------

def _rate_error(*details: dict[str, Any]) -> bytes:
    return json.dumps({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
                                 "details": list(details)}}).encode()


RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}
PER_MINUTE = {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
              "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]}
PER_DAY = {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
           "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}


def test_retry_info_is_read_from_the_error_body() -> None:
    assert retry_delay_seconds(_rate_error(PER_MINUTE, RETRY_INFO)) == 12.0
    assert retry_delay_seconds(_rate_error({"@type": "x.RetryInfo", "retryDelay": "0.25s"})) == 0.25
    for garbage in (b"", b"retryDelay", _rate_error({"retryDelay": "12"}), _rate_error({"retryDelay": "-3s"}),
                    _rate_error({"retryDelay": "\u0661s"}), _rate_error({"retryDelay": 12}), b'{"error": 1}'):
        assert retry_delay_seconds(garbage) is None, garbage
    assert GEMINI.retry_delay(429, _rate_error(RETRY_INFO)) == 12.0
    assert GEMINI.retry_delay(500, _rate_error(RETRY_INFO)) is None  # read only where the body is peeked


def test_a_per_day_quota_is_exhausted_a_per_minute_one_is_not() -> None:
    assert GEMINI.quota_exhausted(429, _rate_error(PER_DAY, RETRY_INFO)) == "RESOURCE_EXHAUSTED (per day)"
    assert GEMINI.quota_exhausted(429, _rate_error(PER_MINUTE, RETRY_INFO)) is None
    both = {**PER_DAY, "violations": [*PER_DAY["violations"], *PER_MINUTE["violations"]]}
    assert GEMINI.quota_exhausted(429, _rate_error(both)) is None  # the minute's quota refills: worth a wait
    assert GEMINI.quota_exhausted(503, _rate_error(PER_DAY)) is None


def test_the_retry_decision_waits_what_the_body_asks() -> None:
    common = {"attempt": 1, "max_attempts": 3, "max_delay": 20.0, "status": 429, "mode": "llmshim", "rand": 0.0}
    assert decide(**common, body_delay=12.0).delay == 12.0  # type: ignore[arg-type]
    assert decide(**common, body_delay=None).delay == 0.0  # type: ignore[arg-type]
    assert decide(**common, headers={"retry-after": "3"}, body_delay=12.0).delay == 3.0  # type: ignore[arg-type]
    refused = decide(**common, body_delay=45.0)  # type: ignore[arg-type]
    assert not refused.retry and "more than the 20 s cap" in refused.reason
    assert decide(**common, body_error="RESOURCE_EXHAUSTED (per day)", body_delay=1.0).retry is False  # type: ignore[arg-type]


# -- the key: ?key= scopes it and is not in it -----------------------------------------------------

def _call(url: str, headers: tuple[tuple[str, str], ...] = ()) -> Call:
    request = _wire(url, {"contents": CONTENTS}, headers=headers)
    found = detect(request)
    assert found is not None
    return Call(request=request, info=found[1], library="requests", dialect=found[0])


def test_a_query_key_scopes_the_cache_key_like_a_header_key() -> None:
    salt, url = b"s" * 32, API + "/v1beta/models/m:generateContent"
    one, two = _call(url + "?key=AIzaONE"), _call(url + "?key=AIzaTWO")
    assert cache_keys.cache_key(one, salt) != cache_keys.cache_key(two, salt)
    assert cache_keys.cache_key(one, salt, shared=True) == cache_keys.cache_key(two, salt, shared=True)
    head, _ = cache_keys.key_material(one, salt, shared=False)
    assert "AIzaONE" not in head and "key=" not in head
    # other parameters stay exactly as sent
    head, _ = cache_keys.key_material(_call(url + "?alt=sse&key=AIzaONE&x=%41"), salt, shared=True)
    assert "?alt=sse&x=%41" in head and "AIza" not in head
    assert cache_keys.credential_of((), url + "?alt=sse&key=AIzaONE") == "AIzaONE"
    assert cache_keys.credential_of((("x-goog-api-key", "AIzaH"),), url + "?key=AIzaQ") == "AIzaH"


def test_a_url_without_credential_parameters_keeps_its_key() -> None:
    """The split only moves credential parameters: any other URL's key material is unchanged."""
    salt = b"s" * 32
    call = _call("https://x.openai.azure.com/openai/deployments/d/models/m:generateContent?api-version=2024-10-21")
    head, _ = cache_keys.key_material(call, salt, shared=False)
    assert json.loads(head)[4] == "https://x.openai.azure.com/openai/deployments/d/models/m:generateContent" \
                                  "?api-version=2024-10-21"
    assert json.loads(head)[6] == "anonymous"


def test_the_sdks_own_telemetry_header_is_not_in_the_key() -> None:
    salt, url = b"s" * 32, API + "/v1beta/models/m:generateContent"
    old = _call(url, (("x-goog-api-key", "k"), ("x-goog-api-client", "google-genai-sdk/1.0 gl-python/3.11")))
    new = _call(url, (("x-goog-api-key", "k"), ("x-goog-api-client", "google-genai-sdk/3.6 gl-python/3.13")))
    assert cache_keys.cache_key(old, salt) == cache_keys.cache_key(new, salt)


# -- cost ---------------------------------------------------------------------------------------

def test_cost_of_a_gemini_call_counts_thinking_as_output() -> None:
    genai_prices = pytest.importorskip("genai_prices")
    call = _call(API + "/v1beta/models/gemini-2.5-flash:generateContent")
    call.response = ResponseInfo(model="gemini-2.5-flash")
    GEMINI.absorb(call.info, {"modelVersion": "gemini-2.5-flash", "usageMetadata": {
        "promptTokenCount": 1000, "cachedContentTokenCount": 200, "candidatesTokenCount": 300,
        "thoughtsTokenCount": 700}}, None, call.response)
    expected = genai_prices.calc_price(genai_prices.Usage(input_tokens=1000, output_tokens=1000, cache_read_tokens=200),
                                       "gemini-2.5-flash", provider_id="google").total_price
    assert cost.cost_of(call) == expected > 0
    at = dt.datetime(2025, 9, 1, tzinfo=dt.timezone.utc)
    assert cost.price("gcp.gemini", "gemini-2.0-flash", 1_000_000, 1_000_000, at=at) == \
        genai_prices.calc_price(genai_prices.Usage(input_tokens=1_000_000, output_tokens=1_000_000), "gemini-2.0-flash",
                                provider_id="google", genai_request_timestamp=at).total_price
    assert cost.price("gcp.vertex_ai", "gemini-2.0-flash", 1000, 10) is not None
