"""Review 35: errors INSIDE successful (200) streams, and the Anthropic / Gemini wire.

The promises under test: only a complete, successful answer is cached (the next identical call
goes upstream otherwise); a hit replays the same bytes; outcome and usage are right once per call;
the caller's bytes are the same with and without llmshim. Each scenario is a hand-written body the
bundled server answers through its ``responder`` (as gateways, vLLM, LiteLLM, OpenRouter, Ollama,
llama.cpp and Google frame them), read with ``requests`` to its end, twice.

Bugs this file found (each test named below fails without its fix):

- OpenAI dialect: a chunk carrying both ``error`` and ``choices`` (OpenRouter's mid-stream error:
  ``"error": {...}`` plus ``choices[0].finish_reason: "error"``, then ``[DONE]``) was not an error:
  the failed stream was cached and reported ``ok``
  (``test_an_error_inside_a_200_is_never_cached_and_is_the_calls_error[openai chat, openrouter]``).
- OpenAI dialect, Responses API: a gateway's ``{"error": {...}}`` (no ``type``) in a stream or a
  whole 200 body was not an error: the call reported ``ok``
  (``...[openai responses, gateway error line]``, ``...[openai responses, gateway whole body]``).
- Gemini dialect: a stream asking ``candidateCount: 2`` was whole as soon as the first candidate
  finished: the stream closed before the second one did was cached
  (``test_a_gemini_stream_of_two_candidates_is_whole_only_when_both_have_finished``).
- Framing: a Gemini answer past ``JsonBody``'s 8 MB parse limit (only its edges kept) lost its
  ``usageMetadata``: no tokens, no cost (``test_a_gemini_answer_past_the_parse_limit_keeps_its_usage``).
- Gemini dialect: a ``finishReason`` that says generation failed (``MALFORMED_FUNCTION_CALL``,
  ``UNEXPECTED_TOOL_CALL``, ``MALFORMED_RESPONSE``, ``OTHER``...) was a complete answer, cached
  forever: a caller's retry got the same failure back
  (``test_gemini_finish_reasons_cache_a_verdict_but_not_a_failed_generation``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmshim
from llmshim.call import WireRequest
from llmshim.dialects import BodyParser, detect
from llmshim.testing import Answer, FakeLLMServer

SSE = [("Content-Type", "text/event-stream")]
NDJSON = [("Content-Type", "application/x-ndjson")]
JSON = [("Content-Type", "application/json; charset=UTF-8")]
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
GEMINI_SSE = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
GEMINI_ARRAY = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
GEMINI_WHOLE = "/v1beta/models/gemini-2.0-flash:generateContent"
MSG = [{"role": "user", "content": "hi"}]
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": "m", "messages": MSG, "stream": True, "temperature": 0},
    RESPONSES: {"model": "m", "input": "hi", "stream": True, "temperature": 0},
    MESSAGES: {"model": "claude", "max_tokens": 64, "messages": MSG, "stream": True, "temperature": 0},
    "/api/chat": {"model": "m", "messages": MSG, "options": {"temperature": 0}},
    "/completion": {"prompt": "hi", "stream": True, "temperature": 0},
    GEMINI_SSE: {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 0}},
}
BODIES[GEMINI_ARRAY] = BODIES[GEMINI_WHOLE] = BODIES[GEMINI_SSE]


# -- wire builders -----------------------------------------------------------------------------------

def sse(*events: Any, done: bool = False) -> list[bytes]:
    """SSE pieces: each event a dict (data only), a (name, dict) pair, or raw bytes."""
    out = []
    for event in events:
        if isinstance(event, bytes):
            out.append(event)
        elif isinstance(event, tuple):
            out.append(f"event: {event[0]}\ndata: {json.dumps(event[1])}\n\n".encode())
        else:
            out.append(f"data: {json.dumps(event)}\n\n".encode())
    return out + ([b"data: [DONE]\n\n"] if done else [])


def anthropic(*events: dict[str, Any]) -> list[bytes]:
    return sse(*((event["type"], event) for event in events))


def chunk(text: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


A_START = {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "stop_reason": None,
    "usage": {"input_tokens": 7, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5,
              "output_tokens": 1}}}
A_BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
A_DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}
A_DELTA2 = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}
A_STOP_BLOCK = {"type": "content_block_stop", "index": 0}
A_MSG_DELTA = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}
A_END = {"type": "message_stop"}


def a_error(kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": kind}}


R_CREATED = {"type": "response.created", "response": {"id": "resp_1", "model": "m", "status": "in_progress"}}
R_DELTA = {"type": "response.output_text.delta", "delta": "Hello"}


def r_final(kind: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "response": {"id": "resp_1", "model": "m", "status": status,
                                       "usage": {"input_tokens": 3, "output_tokens": 2}, **extra}}


def ollama(*lines: dict[str, Any]) -> list[bytes]:
    return [json.dumps(line).encode() + b"\n" for line in lines]


O_LINE = {"model": "m", "message": {"role": "assistant", "content": "Hel"}, "done": False}
O_DONE = {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
          "prompt_eval_count": 3, "eval_count": 2}


def gemini(text: str = "Hello", reason: str | None = None, **extra: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if reason is not None:
        candidate["finishReason"] = reason
    return {"candidates": [candidate], "modelVersion": "gemini-2.0-flash", "responseId": "r1",
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}, **extra}


def gemini_sse(*messages: dict[str, Any]) -> list[bytes]:
    return [b"data: " + json.dumps(message).encode() + b"\r\n\r\n" for message in messages]


G_ERROR = {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}
OPENAI_ERROR = {"error": {"message": "upstream died", "type": "server_error", "code": "server_error"}}


# -- scenarios: (path, answer pieces, headers) -> what must happen ---------------------------------------

# An error the provider reported inside a 200: never cached, the call's outcome is "error".
ERRORS: dict[str, tuple[str, list[bytes], list[tuple[str, str]]]] = {
    "anthropic, overloaded_error after deltas": (MESSAGES, anthropic(
        A_START, A_BLOCK, A_DELTA, {"type": "ping"}, A_DELTA2, a_error("overloaded_error")), SSE),
    "anthropic, api_error after deltas": (MESSAGES, anthropic(A_START, A_BLOCK, A_DELTA, a_error("api_error")), SSE),
    "anthropic, error then a message_stop": (MESSAGES, anthropic(A_START, A_DELTA, a_error("api_error"), A_END), SSE),
    "openai chat, vllm error line then [DONE]": (CHAT, sse(chunk("Hel"), OPENAI_ERROR, done=True), SSE),
    "openai chat, openrouter": (CHAT, sse(chunk("Hel"), chunk("", "error", error={
        "code": "server_error", "message": "Provider disconnected unexpectedly"}), done=True), SSE),
    "openai chat, finish_reason error alone": (CHAT, sse(chunk("Hel"), chunk("", "error"), done=True), SSE),
    "openai responses, error event": (RESPONSES, sse(R_CREATED, R_DELTA, {
        "type": "error", "code": "server_error", "message": "boom", "param": None}), SSE),
    "openai responses, response.failed": (RESPONSES, sse(R_CREATED, R_DELTA, r_final(
        "response.failed", "failed", error={"code": "server_error", "message": "boom"})), SSE),
    "openai responses, gateway error line": (RESPONSES, sse(R_CREATED, R_DELTA, OPENAI_ERROR), SSE),
    "openai responses, gateway whole body": (RESPONSES, [json.dumps(OPENAI_ERROR).encode()], JSON),
    "ollama, error as the last line": ("/api/chat", ollama(O_LINE, {"error": "llama runner process has terminated"}),
                                       NDJSON),
    "llama.cpp, error object": ("/completion", sse({"content": "Hel", "stop": False}, {
        "error": {"code": 500, "message": "slot crashed", "type": "server_error"}}), SSE),
    "gemini sse, error object": (GEMINI_SSE, gemini_sse(gemini(), G_ERROR), SSE),
    "gemini array, error element": (GEMINI_ARRAY, [b"[", json.dumps(gemini()).encode(), b",\r\n",
                                                   json.dumps(G_ERROR).encode(), b"]"], JSON),
}

# A stream that ends cleanly (the HTTP body is whole) without its end marker: never cached.
UNFINISHED: dict[str, tuple[str, list[bytes], list[tuple[str, str]]]] = {
    "openai chat without [DONE]": (CHAT, sse(chunk("Hel"), chunk("lo", "stop")), SSE),
    "responses without response.completed": (RESPONSES, sse(R_CREATED, R_DELTA), SSE),
    "anthropic without message_stop": (MESSAGES, anthropic(A_START, A_BLOCK, A_DELTA, A_STOP_BLOCK, A_MSG_DELTA), SSE),
    "ollama without done": ("/api/chat", ollama(O_LINE, O_LINE), NDJSON),
    "llama.cpp without stop": ("/completion", sse({"content": "Hel", "stop": False}), SSE),
    "gemini sse without finishReason": (GEMINI_SSE, gemini_sse(gemini(), gemini("lo")), SSE),
    "gemini array without its ]": (GEMINI_ARRAY, [b"[", json.dumps(gemini()).encode(), b",\n",
                                                  json.dumps(gemini("lo", "STOP")).encode()], JSON),
}

# Genuine complete answers: cached, and the hit replays the miss's bytes.
COMPLETE: dict[str, tuple[str, list[bytes], list[tuple[str, str]]]] = {
    "anthropic with thinking, tools, pings": (MESSAGES, anthropic(
        A_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "eA=="}},
        {"type": "content_block_stop", "index": 1},
        {"type": "ping"},
        {"type": "content_block_start", "index": 2,
         "content_block": {"type": "tool_use", "id": "tu_1", "name": "w", "input": {}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
        {"type": "content_block_delta", "index": 2,
         "delta": {"type": "input_json_delta", "partial_json": 'ty": "\u2028"}'}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 9, "input_tokens": 7, "cache_creation_input_tokens": 2,
                   "cache_read_input_tokens": 5}},
        A_END), SSE),
    "openai chat": (CHAT, sse(chunk("Hel"), chunk("lo", "stop"), done=True), SSE),
    "responses incomplete (max_output_tokens)": (RESPONSES, sse(R_CREATED, R_DELTA, r_final(
        "response.incomplete", "incomplete", incomplete_details={"reason": "max_output_tokens"})), SSE),
    "ollama": ("/api/chat", ollama(O_LINE, O_DONE), NDJSON),
    "gemini sse, safety verdict": (GEMINI_SSE, gemini_sse(gemini(), gemini("", "SAFETY")), SSE),
    "gemini array, pretty": (GEMINI_ARRAY, [b"[{\r\n  \"candidates\": ", json.dumps(gemini()["candidates"]).encode(),
                                            b"\r\n}\r\n,\r\n", json.dumps(gemini("lo", "STOP"), indent=2).encode(),
                                            b"\r\n]"], JSON),
}


class Scripted:
    """The bundled server answering every request with one scripted answer."""

    def __init__(self, server: FakeLLMServer) -> None:
        self.server, self.answer = server, Answer()
        server.responder = lambda received: self.answer

    def call(self, path: str, pieces: list[bytes], headers: list[tuple[str, str]]) -> requests.Response:
        self.answer = Answer(200, list(headers), chunks=list(pieces))
        response = requests.post(self.server.url + path, json=BODIES[path], timeout=10, stream=True)
        response._content = b"".join(response.iter_content(None))  # read to its end, as SDKs do
        return response


@pytest.fixture
def scripted(server: FakeLLMServer, installed_cached: Callable[..., object]) -> Iterator[Scripted]:
    installed_cached()
    yield Scripted(server)


def ended(records: list[llmshim.CallRecord]) -> list[llmshim.CallRecord]:
    return [record for record in records if record.event != "call_started"]


@pytest.mark.parametrize("name", list(ERRORS))
def test_an_error_inside_a_200_is_never_cached_and_is_the_calls_error(
        name: str, scripted: Scripted, records: list[llmshim.CallRecord]) -> None:
    path, pieces, headers = ERRORS[name]
    first, second = (scripted.call(path, pieces, headers) for _ in range(2))
    assert first.content == second.content == b"".join(pieces)  # the caller's bytes, untouched
    assert second.headers.get("x-llmshim-cache") != "hit" and len(scripted.server.received) == 2
    done = ended(records)
    assert [record.outcome for record in done] == ["error", "error"], [(r.outcome, r.error_type) for r in done]
    assert all(record.error_type for record in done)


@pytest.mark.parametrize("name", list(UNFINISHED))
def test_a_stream_closed_cleanly_before_its_end_marker_is_never_cached(
        name: str, scripted: Scripted, records: list[llmshim.CallRecord]) -> None:
    path, pieces, headers = UNFINISHED[name]
    first, second = (scripted.call(path, pieces, headers) for _ in range(2))
    assert first.content == second.content == b"".join(pieces)
    assert second.headers.get("x-llmshim-cache") != "hit" and len(scripted.server.received) == 2
    assert not any(record.cache_hit for record in ended(records))


@pytest.mark.parametrize("name", list(COMPLETE))
def test_a_complete_answer_is_cached_and_replayed_byte_for_byte(
        name: str, scripted: Scripted, records: list[llmshim.CallRecord]) -> None:
    path, pieces, headers = COMPLETE[name]
    first, second = (scripted.call(path, pieces, headers) for _ in range(2))
    assert first.content == second.content == b"".join(pieces)
    assert (first.headers.get("x-llmshim-cache"), second.headers.get("x-llmshim-cache")) == (None, "hit")
    assert len(scripted.server.received) == 1
    assert [r.outcome for r in ended(records)] == ["ok", "ok"]


# -- usage where the provider gave it, once ---------------------------------------------------------------

def parse(path: str, body: dict[str, Any], pieces: list[bytes], content_type: str) -> Any:
    found = detect(WireRequest("POST", "https://api.test" + path, (), json.dumps(body).encode()))
    assert found is not None
    parser = BodyParser(found[0], found[1], content_type)
    for piece in pieces:
        parser.feed(piece)
    return parser.finish()


def test_anthropic_usage_survives_an_error_event_and_counts_the_prompt_cache() -> None:
    failed = parse(MESSAGES, BODIES[MESSAGES], ERRORS["anthropic, api_error after deltas"][1], "text/event-stream")
    assert (failed.error, failed.done, failed.usage.input_tokens, failed.usage.cached_input_tokens,
            failed.usage.output_tokens) == ("api_error", False, 14, 5, 1)
    whole = parse(MESSAGES, BODIES[MESSAGES], COMPLETE["anthropic with thinking, tools, pings"][1], "text/event-stream")
    assert (whole.error, whole.done, whole.finish_reasons, whole.usage.input_tokens, whole.usage.cached_input_tokens,
            whole.usage.cache_write_tokens, whole.usage.output_tokens) == (None, True, ["tool_calls"], 14, 5, 2, 9)


def test_a_complete_anthropic_stream_split_at_every_byte_reads_the_same() -> None:
    raw = b"".join(COMPLETE["anthropic with thinking, tools, pings"][1]).replace(b"\n", b"\r\n")
    whole = parse(MESSAGES, BODIES[MESSAGES], [raw], "text/event-stream")
    split = parse(MESSAGES, BODIES[MESSAGES], [raw[i:i + 1] for i in range(len(raw))], "text/event-stream")
    assert whole == split and split.done and split.usage.output_tokens == 9 and split.chunks == 14


# -- Gemini: what a finishReason means -------------------------------------------------------------------

#: The provider's verdict on this prompt (as OpenAI's ``content_filter`` and Anthropic's ``refusal``,
#: which are cached): a complete answer. Or a limit reached: complete as ``length`` is.
VERDICTS = ("STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "LANGUAGE")
#: Generation failed: the model produced no usable answer, and the same request asked again may succeed.
FAILURES = ("MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "MALFORMED_RESPONSE", "OTHER",
            "FINISH_REASON_UNSPECIFIED")


def test_gemini_finish_reasons_cache_a_verdict_but_not_a_failed_generation() -> None:
    for path, frame in ((GEMINI_SSE, lambda m: gemini_sse(m)), (GEMINI_ARRAY, lambda m: [json.dumps([m]).encode()]),
                        (GEMINI_WHOLE, lambda m: [json.dumps(m).encode()])):
        kind = "text/event-stream" if path == GEMINI_SSE else "application/json"
        for reason in VERDICTS + FAILURES:
            result = parse(path, BODIES[path], frame(gemini("x", reason)), kind)
            failed = reason in FAILURES
            assert (result.error is not None, result.finish_reasons) == (failed, [reason.lower()]), (path, reason)
            assert result.usage.input_tokens == 3 and result.usage.output_tokens == 2


def test_a_gemini_stream_of_two_candidates_is_whole_only_when_both_have_finished() -> None:
    body = {**BODIES[GEMINI_SSE], "generationConfig": {"temperature": 0, "candidateCount": 2}}

    def pair(first: str | None, second: str | None) -> dict[str, Any]:
        message = gemini("a", first)
        message["candidates"].append({**gemini("b", second)["candidates"][0], "index": 1})
        return message

    first_done = pair("STOP", None)
    first_done["candidates"][1].pop("finishReason", None)
    second_only = gemini("c")
    second_only["candidates"][0]["index"] = 1
    cut = parse(GEMINI_SSE, body, gemini_sse(first_done, second_only), "text/event-stream")
    assert (cut.done, cut.finish_reasons) == (False, ["stop"])  # candidate 1 never finished: not whole
    ended_too = {**second_only, "candidates": [{**second_only["candidates"][0], "finishReason": "MAX_TOKENS"}]}
    whole = parse(GEMINI_SSE, body, gemini_sse(first_done, second_only, ended_too), "text/event-stream")
    assert (whole.done, whole.finish_reasons) == (True, ["stop", "max_tokens"])
    single = parse(GEMINI_SSE, BODIES[GEMINI_SSE], gemini_sse(gemini("a", "STOP")), "text/event-stream")
    assert single.done


def test_a_malformed_function_call_is_not_cached_end_to_end(
        scripted: Scripted, records: list[llmshim.CallRecord]) -> None:
    pieces = gemini_sse(gemini("", "MALFORMED_FUNCTION_CALL"))
    for _ in range(2):
        assert scripted.call(GEMINI_SSE, pieces, SSE).content == b"".join(pieces)
    assert len(scripted.server.received) == 2
    assert [(r.outcome, r.error_type) for r in ended(records)] == [("error", "malformed_function_call")] * 2


# -- Gemini without alt=sse: one JSON array, in pieces ------------------------------------------------------

SCRIPTS = "Hello \u2028 \u2029 \u0085 é ß 中文 日本語 한국어 العربية עברית हिन्दी ไทย 🙂 \U0001d11e"


def _array(pretty: bool, newline: str, complete: bool, big: int = 0) -> bytes:
    items = [gemini(SCRIPTS + "x" * big), gemini(SCRIPTS, "STOP")]
    text = json.dumps(items, indent=2 if pretty else None, ensure_ascii=False)
    text = text.replace("\n", newline)
    return (text if complete else text[:-1]).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pretty=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]), complete=st.booleans(), data=st.data())
def test_a_gemini_array_split_anywhere_is_complete_only_when_whole(
        pretty: bool, newline: str, complete: bool, data: st.DataObject) -> None:
    raw = _array(pretty, newline, complete)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    result = parse(GEMINI_ARRAY, BODIES[GEMINI_ARRAY], pieces, "application/json")
    assert result.done is complete and result.error is None
    assert (result.usage.input_tokens, result.usage.output_tokens) == ((3, 2) if complete else (None, None))


def test_a_gemini_array_split_at_every_byte() -> None:
    raw = _array(True, "\r\n", True)
    result = parse(GEMINI_ARRAY, BODIES[GEMINI_ARRAY], [raw[i:i + 1] for i in range(len(raw))], "application/json")
    assert result.done and result.finish_reasons == ["stop"] and result.usage.output_tokens == 2


def test_a_2mb_gemini_array_candidate_is_cached_whole_and_replayed(
        scripted: Scripted, records: list[llmshim.CallRecord]) -> None:
    raw = _array(True, "\r\n", True, big=2 * 1024 * 1024)
    pieces = [raw[i:i + 65536] for i in range(0, len(raw), 65536)]
    first, second = (scripted.call(GEMINI_ARRAY, pieces, JSON) for _ in range(2))
    assert first.content == second.content == raw and second.headers.get("x-llmshim-cache") == "hit"
    assert [(r.outcome, r.cache_hit, r.input_tokens, r.output_tokens) for r in ended(records)] == [
        ("ok", False, 3, 2), ("ok", True, None, None)]


@pytest.mark.parametrize("path", [GEMINI_WHOLE, GEMINI_ARRAY])
def test_a_gemini_answer_past_the_parse_limit_keeps_its_usage(path: str) -> None:
    """Past JsonBody's 8 MB only the body's edges are kept (an image model's inline data gets
    there): the usage at its end must still be read, and an array never counts as whole."""
    message = gemini("x" * (9 * 1024 * 1024), "STOP")
    raw = json.dumps([message] if path == GEMINI_ARRAY else message).encode()
    result = parse(path, BODIES[path], [raw[i:i + 2**20] for i in range(0, len(raw), 2**20)], "application/json")
    assert (result.usage.input_tokens, result.usage.output_tokens) == (3, 2)
    assert result.done is (path == GEMINI_WHOLE) and result.error is None


# -- the anthropic SDK's stream helper over a hit --------------------------------------------------------

def test_the_anthropic_stream_helper_reads_a_hit_as_it_read_the_miss(scripted: Scripted) -> None:
    import anthropic as sdk

    _, pieces, headers = COMPLETE["anthropic with thinking, tools, pings"]
    scripted.answer = Answer(200, list(headers), chunks=list(pieces))
    finals = []
    for _ in range(2):
        with sdk.Anthropic(base_url=scripted.server.url, api_key="sk-ant-x", max_retries=0) as client, \
                client.messages.stream(model="claude", max_tokens=64, messages=MSG,
                                        extra_body={"temperature": 0}) as stream:
            texts = list(stream.text_stream)
            finals.append((texts, stream.get_final_message().model_dump()))
    assert finals[0] == finals[1] and len(scripted.server.received) == 1
    message = finals[0][1]
    assert [block["type"] for block in message["content"]] == ["thinking", "redacted_thinking", "tool_use"]
    assert message["content"][2]["input"] == {"city": "\u2028"} and message["usage"]["cache_read_input_tokens"] == 5

