"""Review 38: try to break "a streamed answer is cached only when whole; a cut one is an error".

The streams real servers send (vLLM with n>1 and interleaved indices, llama.cpp's and Ollama's OpenAI
routes, Azure, OpenRouter, Groq, DeepSeek, LiteLLM, Anthropic, Gemini SSE and JSON arrays), read to
their end by requests, httpx and the OpenAI SDK, each twice: whole ones are stored and replayed
byte-for-byte, cut ones never stored, the outcome what the stream was.

Bugs found and fixed:

- **A count the server reads as a number was read as 1** (``_choices`` / ``_candidates`` took only a
  JSON integer). vLLM's pydantic models coerce ``"n": "2"`` and ``"n": 2.0`` to 2, Google's proto
  JSON reads ``"candidateCount": "2"`` as 2 (proto3 JSON accepts an int32 as a string): the server
  answers two choices, llmshim counted one. A Gemini stream cut after its first candidate finished
  was whole (``done`` set mid-stream) and stored; an OpenAI one too when a gateway closed it with
  ``[DONE]``. Fix: ``_base.count`` reads an integer, an integral float or a decimal string.
  (``test_a_count_sent_as_a_string_or_float_counts_as_the_server_reads_it``)
- **A string ``index`` finished choice 0** (``finish_choice``): ``"index": "1"`` counted as choice 0,
  so an n=2 stream numbering its choices with strings was never whole, never stored. Fix: the same
  ``count`` reads the index. (``test_a_string_index_numbers_its_choice``)
- **The OpenAI SDK's read of a stream that was not whole at ``[DONE]`` was "aborted"**
  (``ResponseTracker.on_abort``): the SDK stops at ``[DONE]`` and closes the response, leaving the
  chunked terminator unread; the tracker took such a close for a completed call only when the
  answer was *whole* (``done``), which since the change needs every choice. So through the SDK a
  cut stream (``[DONE]`` after half an answer) was ``aborted``, not ``incomplete_stream``, and an
  Ollama answer to n=2 ``aborted``, not ``ok``. Fix: ``ResponseInfo.marker`` records that
  ``[DONE]`` came; a clean close after it is judged as a completion (still stored only when whole).
  (``test_the_openai_sdk_reads_the_same_and_caches_only_whole_streams[cut]``, ``[ollama ignores n]``)
- **llama.cpp's mixed prompt was counted as several** (``_choices``): llama.cpp reads a top-level
  list holding both strings and token ids (``["Hello", 13, "world"]``) as ONE prompt (its
  ``json_is_array_of_mixed_numbers_strings``), and answers one choice; llmshim counted one per
  element when the list began with a string, so that whole stream was never stored. Fix: a list is
  several prompts only when every element is a string or every one a token list.
  (``test_a_mixed_prompt_is_one_prompt``)

Held (see the tables below): vLLM's interleaved n>1 and batched prompts, usage chunks after the
finish, Azure's filter chunks and ``content_filter`` finish, OpenRouter's comments, Groq's ``x_groq``,
DeepSeek's ``reasoning_content`` and keep-alives, LiteLLM's chunks, ``data:[DONE]`` / ``data: [DONE] ``,
CRLF, a repeated finish, a missing index (n=1), ``n`` 0 / negative / huge, ``best_of``, prompts as
lists of strings / token lists / one token list, Anthropic pings and a missing ``message_stop``,
Gemini SSE and arrays with ``candidateCount``; the bytes each client reads are the server's.

By design (not changed): a server ignoring ``n`` (Ollama, llama.cpp) is ``ok`` and never stored; a
stream with n>1 whose chunks carry no ``index`` is never stored (its finishes cannot be told apart).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_review_35 import (
    A_BLOCK,
    A_DELTA,
    A_END,
    A_MSG_DELTA,
    A_START,
    A_STOP_BLOCK,
    BODIES,
    CHAT,
    GEMINI_ARRAY,
    GEMINI_SSE,
    MESSAGES,
    anthropic,
    gemini,
    gemini_sse,
    parse,
)

import llmshim
from llmshim.testing import Answer, FakeLLMServer

COMPLETIONS = "/v1/completions"
SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8")]
JSON_HEADERS = [("Content-Type", "application/json; charset=UTF-8")]


def data(event: Any, *, crlf: bool = False) -> bytes:
    line = b"data: " + json.dumps(event).encode()
    return line + (b"\r\n\r\n" if crlf else b"\n\n")


def frames(*events: Any, done: bytes | None = b"data: [DONE]\n\n") -> list[bytes]:
    """SSE pieces: dicts as data events, bytes as they are; ``done``: the closing marker's bytes."""
    out = [event if isinstance(event, bytes) else data(event) for event in events]
    return out + ([done] if done is not None else [])


def chat(index: Any, text: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"delta": {} if text is None else {"content": text}, "finish_reason": finish,
                              "logprobs": None}
    if index is not None:
        choice["index"] = index
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [choice], **extra}


def text(index: int, piece: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": finish}]}


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
AZURE_FILTER = {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": [
    {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}]}
FILTERED = {"hate": {"filtered": True, "severity": "high"}}


def body(path: str, **more: Any) -> dict[str, Any]:
    if path == COMPLETIONS:
        return {"model": "m", "prompt": "hi", "stream": True, "temperature": 0, **more}
    if path in (GEMINI_SSE, GEMINI_ARRAY):
        base = BODIES[path]
        return {**base, "generationConfig": {**base["generationConfig"], **more}}
    return {**BODIES[path], **more}


def gem2(first: str | None, second: str | None, texts: tuple[str, str] = ("a", "b")) -> dict[str, Any]:
    """A Gemini chunk of two candidates (index 0 left out, as proto JSON leaves out a zero)."""
    message = gemini(texts[0], first)
    del message["candidates"][0]["index"]
    message["candidates"].append({**gemini(texts[1], second)["candidates"][0], "index": 1})
    return message


Case = tuple[str, dict[str, Any], list[bytes], list[tuple[str, str]]]

# whole answers: stored on the first call, replayed byte-for-byte on the second
WHOLE: dict[str, Case] = {
    "vllm chat n=3, interleaved, usage after the finishes": (CHAT, body(
        CHAT, n=3, stream_options={"include_usage": True}), frames(
        chat(0, ""), chat(2, ""), chat(1, ""), chat(1, "b"), chat(0, "a"), chat(2, "c", "length"),
        chat(0, "", "stop"), chat(1, "!", "stop"), USAGE), SSE_HEADERS),
    "vllm completions n=2 of 2 prompts, indices 0..3": (COMPLETIONS, body(COMPLETIONS, prompt=["a", "b"], n=2),
                                                        frames(*(text(i, "x") for i in (3, 1, 0, 2)),
                                                               *(text(i, "", "stop") for i in (2, 0, 3, 1))),
                                                        SSE_HEADERS),
    "completions of 2 token-list prompts": (COMPLETIONS, body(COMPLETIONS, prompt=[[1, 2], [3]]), frames(
        text(0, "x", "stop"), text(1, "y", "length")), SSE_HEADERS),
    "completions of one token list": (COMPLETIONS, body(COMPLETIONS, prompt=[1, 2, 3]), frames(
        text(0, "x", "stop")), SSE_HEADERS),
    "completions of a one-string list": (COMPLETIONS, body(COMPLETIONS, prompt=["a"]), frames(
        text(0, "x", "stop")), SSE_HEADERS),
    "completions best_of=2, n=1": (COMPLETIONS, body(COMPLETIONS, best_of=2), frames(
        text(0, "x"), text(0, "", "stop")), SSE_HEADERS),
    "llama.cpp chat (timings on the last chunk)": (CHAT, body(CHAT), frames(
        chat(0, None, None, system_fingerprint="b4500"), chat(0, "Hi"),
        chat(0, None, "stop", timings={"prompt_n": 3, "predicted_n": 2}),
        chat(0, None, None, usage={"prompt_tokens": 3, "completion_tokens": 2})), SSE_HEADERS),
    "ollama chat, one choice": (CHAT, body(CHAT), frames(
        chat(0, "Hi", system_fingerprint="fp_ollama"), chat(0, "", "stop", system_fingerprint="fp_ollama")),
        SSE_HEADERS),
    "azure, filter chunks and a content_filter finish": (CHAT, body(CHAT), frames(
        AZURE_FILTER, chat(0, "Hel"), chat(0, None, "content_filter", content_filter_results=FILTERED),
        {**chat(0, None), "choices": [{"index": 0, "delta": {}, "finish_reason": None,
                                       "content_filter_offsets": {"start_offset": 0}}]}), SSE_HEADERS),
    "openrouter, processing comments": (CHAT, body(CHAT), frames(
        b": OPENROUTER PROCESSING\n\n", b": OPENROUTER PROCESSING\n\n", chat(0, "Hi", provider="X"),
        b": OPENROUTER PROCESSING\n\n", chat(0, "", "stop", native_finish_reason="end_turn"),
        {**USAGE, "provider": "X"}), SSE_HEADERS),
    "groq, x_groq chunks": (CHAT, body(CHAT), frames(
        chat(0, "", x_groq={"id": "req_1"}), chat(0, "Hi"),
        chat(0, None, "stop", x_groq={"id": "req_1", "usage": {"prompt_tokens": 3, "completion_tokens": 1}})),
        SSE_HEADERS),
    "deepseek, reasoning then content, keep-alives": (CHAT, body(CHAT), frames(
        b": keep-alive\n\n",
        {**chat(0), "choices": [{"index": 0, "delta": {"reasoning_content": "hmm", "content": None},
                                 "finish_reason": None}]},
        b": keep-alive\n\n", chat(0, "Hi"), chat(0, "", "stop", usage=USAGE["usage"])), SSE_HEADERS),
    "litellm proxy chunks": (CHAT, body(CHAT), frames(
        chat(0, "Hi", provider_specific_fields=None, citations=None),
        chat(0, None, "stop", system_fingerprint=None)), SSE_HEADERS),
    "data:[DONE] without a space": (CHAT, body(CHAT), frames(chat(0, "a", "stop"), done=b"data:[DONE]\n\n"),
                                    SSE_HEADERS),
    "data: [DONE] with a trailing space, no blank line": (CHAT, body(CHAT), frames(
        chat(0, "a", "stop"), done=b"data: [DONE] "), SSE_HEADERS),
    "CRLF line ends": (CHAT, body(CHAT), [data(chat(0, "a"), crlf=True), data(chat(0, "", "stop"), crlf=True),
                                         b"data: [DONE]\r\n\r\n"], SSE_HEADERS),
    "a finish_reason repeated": (CHAT, body(CHAT), frames(chat(0, "a", "stop"), chat(0, "", "stop")), SSE_HEADERS),
    "index missing, n=1": (CHAT, body(CHAT), frames(chat(None, "a"), chat(None, "", "stop")), SSE_HEADERS),
    "n=0 (read as 1)": (CHAT, body(CHAT, n=0), frames(chat(0, "a", "stop")), SSE_HEADERS),
    "n=-3 (read as 1)": (CHAT, body(CHAT, n=-3), frames(chat(0, "a", "stop")), SSE_HEADERS),
    "anthropic with pings": (MESSAGES, BODIES[MESSAGES], anthropic(
        A_START, {"type": "ping"}, A_BLOCK, A_DELTA, {"type": "ping"}, A_STOP_BLOCK, A_MSG_DELTA, A_END),
        SSE_HEADERS),
    "gemini sse, candidateCount=2": (GEMINI_SSE, body(GEMINI_SSE, candidateCount=2), gemini_sse(
        gem2(None, None), gem2("STOP", None), gem2(None, "MAX_TOKENS")), SSE_HEADERS),
    "gemini array, candidateCount=2": (GEMINI_ARRAY, body(GEMINI_ARRAY, candidateCount=2), [
        b"[", json.dumps(gem2(None, None)).encode(), b",\r\n", json.dumps(gem2("STOP", "STOP")).encode(), b"]"],
        JSON_HEADERS),
}

# cut after something finished (or finished without its end marker): ok, never stored
PARTLY: dict[str, Case] = {
    "ollama ignores n=2": (CHAT, body(CHAT, n=2), frames(chat(0, "Hi"), chat(0, "", "stop")), SSE_HEADERS),
    "llama.cpp ignores n=3": (CHAT, body(CHAT, n=3), frames(chat(0, "Hi", "stop")), SSE_HEADERS),
    "a huge n": (CHAT, body(CHAT, n=10**12), frames(chat(0, "Hi", "stop")), SSE_HEADERS),
    "vllm n=2, choice 1 cut, [DONE] from a gateway": (CHAT, body(CHAT, n=2), frames(
        chat(0, "a"), chat(1, "b"), chat(0, "", "stop")), SSE_HEADERS),
    "finished, no [DONE], CRLF": (CHAT, body(CHAT), [data(chat(0, "a", "stop"), crlf=True)], SSE_HEADERS),
    "finished, then a usage chunk, no [DONE]": (CHAT, body(CHAT), frames(chat(0, "a", "stop"), USAGE, done=None),
                                                SSE_HEADERS),
    "anthropic message_delta, no message_stop": (MESSAGES, BODIES[MESSAGES], anthropic(
        A_START, {"type": "ping"}, A_BLOCK, A_DELTA, A_STOP_BLOCK, A_MSG_DELTA), SSE_HEADERS),
    "gemini sse, candidateCount=2, only one finished": (GEMINI_SSE, body(GEMINI_SSE, candidateCount=2), gemini_sse(
        gem2(None, None), gem2("STOP", None)), SSE_HEADERS),
}

# cut before anything finished: the call's error incomplete_stream, never stored
CUT: dict[str, Case] = {
    "azure filter chunk, half an answer, [DONE]": (CHAT, body(CHAT), frames(AZURE_FILTER, chat(0, "Hel")),
                                                    SSE_HEADERS),
    "openrouter comments then [DONE]": (CHAT, body(CHAT), frames(b": OPENROUTER PROCESSING\n\n"), SSE_HEADERS),
    "deepseek reasoning only, no [DONE]": (CHAT, body(CHAT), frames(
        b": keep-alive\n\n", {**chat(0), "choices": [{"index": 0, "delta": {"reasoning_content": "hm"},
                                                      "finish_reason": None}]}, done=None), SSE_HEADERS),
    "vllm n=2, nothing finished, data:[DONE]": (CHAT, body(CHAT, n=2), frames(
        chat(0, "a"), chat(1, "b"), done=b"data:[DONE]\r\n\r\n"), SSE_HEADERS),
    "completions of 2 prompts, usage, [DONE]": (COMPLETIONS, body(COMPLETIONS, prompt=["a", "b"]), frames(
        text(0, "x"), text(1, "y"), {**text(0, ""), "choices": [], "usage": USAGE["usage"]}), SSE_HEADERS),
    "anthropic ping and a delta": (MESSAGES, BODIES[MESSAGES], anthropic(A_START, {"type": "ping"}, A_BLOCK, A_DELTA),
                                   SSE_HEADERS),
    "gemini sse, candidateCount=2, none finished": (GEMINI_SSE, body(GEMINI_SSE, candidateCount=2), gemini_sse(
        gem2(None, None)), SSE_HEADERS),
}


# -- clients -----------------------------------------------------------------------------------------------

def read_requests(url: str, request: dict[str, Any]) -> tuple[bytes, str | None]:
    response = requests.post(url, json=request, timeout=10, stream=True)
    return b"".join(response.iter_content(None)), response.headers.get("x-llmshim-cache")


def read_httpx(url: str, request: dict[str, Any]) -> tuple[bytes, str | None]:
    with httpx.Client(timeout=10) as client, client.stream("POST", url, json=request) as response:
        return b"".join(response.iter_raw()), response.headers.get("x-llmshim-cache")


CLIENTS: dict[str, Callable[[str, dict[str, Any]], tuple[bytes, str | None]]] = {
    "requests": read_requests, "httpx": read_httpx}


class Server:
    """The bundled server answering each request with the current scripted answer."""

    def __init__(self, server: FakeLLMServer) -> None:
        self.server, self.answer = server, Answer()
        server.responder = lambda received: self.answer

    def twice(self, case: Case, client: str) -> list[str | None]:
        path, request, pieces, headers = case
        self.answer = Answer(200, list(headers), chunks=list(pieces))
        replies = [CLIENTS[client](self.server.url + path, request) for _ in range(2)]
        assert [reply[0] for reply in replies] == [b"".join(pieces)] * 2  # the caller's bytes, untouched
        return [reply[1] for reply in replies]


@pytest.fixture
def scripted(server: FakeLLMServer, installed_cached: Callable[..., object]) -> Iterator[Server]:
    installed_cached()
    yield Server(server)


def ended(records: list[llmshim.CallRecord]) -> list[tuple[str | None, str | None]]:
    return [(r.outcome, r.error_type) for r in records if r.event != "call_started"]


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("name", list(WHOLE))
def test_a_whole_stream_is_stored_and_replayed(
        name: str, client: str, scripted: Server, records: list[llmshim.CallRecord]) -> None:
    assert scripted.twice(WHOLE[name], client) == [None, "hit"]
    assert len(scripted.server.received) == 1
    assert ended(records) == [("ok", None)] * 2


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("name", list(PARTLY))
def test_a_partly_finished_stream_is_ok_and_never_stored(
        name: str, client: str, scripted: Server, records: list[llmshim.CallRecord]) -> None:
    assert scripted.twice(PARTLY[name], client) == [None, None]
    assert len(scripted.server.received) == 2
    assert ended(records) == [("ok", None)] * 2


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("name", list(CUT))
def test_a_cut_stream_is_an_incomplete_stream_and_never_stored(
        name: str, client: str, scripted: Server, records: list[llmshim.CallRecord]) -> None:
    assert scripted.twice(CUT[name], client) == [None, None]
    assert len(scripted.server.received) == 2
    assert ended(records) == [("error", "incomplete_stream")] * 2
    assert (llmshim.stats()["failed"], llmshim.stats()["completed"]) == (2, 0)


# -- the OpenAI SDK, reading each stream to its end -----------------------------------------------------------

SDK_CASES = {
    "whole": (WHOLE["vllm chat n=3, interleaved, usage after the finishes"], True, ("ok", None)),
    "azure": (WHOLE["azure, filter chunks and a content_filter finish"], True, ("ok", None)),
    "openrouter": (WHOLE["openrouter, processing comments"], True, ("ok", None)),
    "deepseek": (WHOLE["deepseek, reasoning then content, keep-alives"], True, ("ok", None)),
    "ollama ignores n": (PARTLY["ollama ignores n=2"], False, ("ok", None)),
    "cut": (CUT["azure filter chunk, half an answer, [DONE]"], False, ("error", "incomplete_stream")),
    "completions": (WHOLE["vllm completions n=2 of 2 prompts, indices 0..3"], True, ("ok", None)),
}


@pytest.mark.parametrize("name", list(SDK_CASES))
def test_the_openai_sdk_reads_the_same_and_caches_only_whole_streams(
        name: str, scripted: Server, records: list[llmshim.CallRecord]) -> None:
    import openai

    (path, request, pieces, headers), stored, outcome = SDK_CASES[name]
    scripted.answer = Answer(200, list(headers), chunks=list(pieces))
    client = openai.OpenAI(base_url=scripted.server.openai_base_url, api_key="sk-test", max_retries=0)
    create = client.chat.completions.create if path == CHAT else client.completions.create
    seen = []
    for _ in range(2):
        with create(**request) as stream:  # type: ignore[call-overload]
            seen.append([chunk.model_dump() for chunk in stream])
    assert seen[0] == seen[1] and seen[0]
    assert len(scripted.server.received) == (1 if stored else 2)
    assert ended(records) == [outcome] * 2


# -- the bugs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "request_body", "pieces", "whole"), [
    # vLLM reads "n": "2" and 2.0 as 2 (pydantic); a gateway closes the cut stream with [DONE]
    (CHAT, body(CHAT, n="2"), frames(chat(0, "a"), chat(1, "b"), chat(0, "", "stop")), False),
    (CHAT, body(CHAT, n=2.0), frames(chat(0, "a"), chat(1, "b"), chat(0, "", "stop")), False),
    (CHAT, body(CHAT, n="2"), frames(chat(0, "a", "stop"), chat(1, "b", "stop")), True),
    (COMPLETIONS, body(COMPLETIONS, n=" 2", prompt=["a", "b"]), frames(*(text(i, "", "stop") for i in range(2))),
     False),
    # Google reads "candidateCount": "2" as 2 (proto3 JSON); no end marker: done at the finishes
    (GEMINI_SSE, body(GEMINI_SSE, candidateCount="2"), gemini_sse(gem2(None, None), gem2("STOP", None)), False),
    (GEMINI_SSE, body(GEMINI_SSE, candidateCount="2"), gemini_sse(gem2("STOP", None), gem2(None, "STOP")), True),
])
def test_a_count_sent_as_a_string_or_float_counts_as_the_server_reads_it(
        path: str, request_body: dict[str, Any], pieces: list[bytes], whole: bool,
        scripted: Server, records: list[llmshim.CallRecord]) -> None:
    headers = SSE_HEADERS
    assert scripted.twice((path, request_body, pieces, headers), "requests") == [None, "hit" if whole else None]
    assert len(scripted.server.received) == (1 if whole else 2)
    assert ended(records) == [("ok", None)] * 2


def test_a_string_index_numbers_its_choice(scripted: Server, records: list[llmshim.CallRecord]) -> None:
    case = (CHAT, body(CHAT, n=2), frames(chat("0", "a"), chat("1", "b"), chat("1", "", "stop"),
                                          chat("0", "", "stop")), SSE_HEADERS)
    assert scripted.twice(case, "httpx") == [None, "hit"]
    cut = frames(chat("1", "a", "stop"), chat("1", "", "stop"))  # the same choice twice: one of two
    assert not parse(CHAT, body(CHAT, n=2), cut, "text/event-stream").done


@pytest.mark.parametrize(("prompt", "prompts"), [(["Hello", 13, "world"], 1), ([13, "Hello"], 1), (["a", [1, 2]], 2)])
def test_a_mixed_prompt_is_one_prompt(prompt: list[Any], prompts: int, scripted: Server,
                                      records: list[llmshim.CallRecord]) -> None:
    """llama.cpp's /v1/completions reads a list mixing strings and token ids as one prompt (and a
    list of a string and a token list as two)."""
    one = frames(text(0, "x"), text(0, "", "stop"))
    assert parse(COMPLETIONS, body(COMPLETIONS, prompt=prompt), one, "text/event-stream").done == (prompts == 1)
    case = (COMPLETIONS, body(COMPLETIONS, prompt=prompt), frames(*(text(i, "x", "stop") for i in range(prompts))),
            SSE_HEADERS)
    assert scripted.twice(case, "requests") == [None, "hit"]


# -- the rule over decorated vLLM streams -------------------------------------------------------------------

DECORATIONS = st.sampled_from([b": OPENROUTER PROCESSING\n\n", b": keep-alive\n\n", data(AZURE_FILTER), data(USAGE),
                               data(chat(0, "", x_groq={"id": "r"}))])
DONES = st.sampled_from([b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data: [DONE] \r\n\r\n", b"data: [DONE]"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), rounds=st.integers(0, 3), draw=st.data())
def test_a_decorated_interleaved_stream_is_whole_exactly_when_every_choice_finished_and_done_came(
        n: int, rounds: int, draw: st.DataObject) -> None:
    events: list[tuple[bytes, int | None]] = [(data(chat(i, "t")), None) for _ in range(rounds) for i in range(n)]
    events += [(data(chat(i, "", draw.draw(st.sampled_from(["stop", "length", "content_filter"])))), i)
               for i in draw.draw(st.permutations(range(n)))]
    events = draw.draw(st.permutations(events))
    for _ in range(draw.draw(st.integers(0, 3))):
        events.insert(draw.draw(st.integers(0, len(events))), (draw.draw(DECORATIONS), None))
    kept = events[: draw.draw(st.integers(0, len(events)))]
    marker = draw.draw(st.booleans())
    crlf = draw.draw(st.booleans())
    raw = b"".join(piece for piece, _ in kept) + (draw.draw(DONES) if marker else b"")
    if crlf:
        raw = raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    cuts = sorted(draw.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=4)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    finished = {i for _, i in kept if i is not None}
    result = parse(CHAT, body(CHAT, n=n), pieces, "text/event-stream")
    assert result.done == (len(finished) == n and marker)
    assert result.error is None
