"""A streamed answer is whole only when every choice asked for has finished and the end marker came.

Two promises, tried with the streams gateways and servers send when something upstream goes wrong:

- **Never cache a cut answer.** ``data: [DONE]`` ends an OpenAI stream, but a gateway that lost its
  upstream closes the stream the same way: ``[DONE]`` after half an answer (no ``finish_reason``), or
  after one of the ``n`` choices asked for. Only a stream in which each choice has finished (``n``
  choices, times the prompts of a batched text completion) and ``[DONE]`` arrived is stored. A
  Responses API stream is whole at ``response.completed`` / ``response.incomplete``, never at a
  ``[DONE]`` a gateway added.
- **Report a cut answer as what it is.** A stream that ended cleanly (the HTTP body whole) with no
  end marker and no finish reason stopped mid-answer: the call's outcome is ``error`` with
  ``error.type`` ``incomplete_stream`` (in the hook's record, the span, the stats), where it was
  ``ok``. A stream in which some choice finished (every one, but the server left out the marker;
  or some of the ``n`` asked for, as from a server that ignores ``n``) is ``ok``, and not cached. The caller's
  bytes are untouched either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_review_35 import (
    BODIES,
    CHAT,
    GEMINI_SSE,
    MESSAGES,
    RESPONSES,
    SSE,
    UNFINISHED,
    Scripted,
    parse,
    sse,
)

import llmshim
from llmshim.testing import FakeLLMServer

COMPLETIONS = "/v1/completions"


def choice_chunk(index: int, text: str | None = None, finish: str | None = None, *,
                 kind: str = "chat") -> dict[str, Any]:
    if kind == "text":
        choice: dict[str, Any] = {"index": index, "text": text or "", "finish_reason": finish}
        return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]}
    delta = {} if text is None else {"content": text}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


USAGE_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def body(path: str, **more: Any) -> dict[str, Any]:
    if path == COMPLETIONS:
        return {"model": "m", "prompt": "hi", "stream": True, "temperature": 0, **more}
    return {**BODIES[path], **more}


# name -> (path, request body, answer pieces): cut answers, never stored, the call an error
CUT: dict[str, tuple[str, dict[str, Any], list[bytes]]] = {
    "chat, [DONE] with no finish_reason": (CHAT, body(CHAT), sse(choice_chunk(0, "Hel"), choice_chunk(0, "lo"),
                                                                 done=True)),
    "chat, [DONE] after half an answer and a usage chunk": (CHAT, body(CHAT, stream_options={"include_usage": True}),
                                                            sse(choice_chunk(0, "Hel"), USAGE_CHUNK, done=True)),
    "chat, no finish_reason and no [DONE]": (CHAT, body(CHAT), sse(choice_chunk(0, "Hel"))),
    "chat, an empty 200 stream": (CHAT, body(CHAT), []),
    "chat, finish_reason \"\" on every chunk, [DONE] mid-answer": (CHAT, body(CHAT), sse(
        choice_chunk(0, "Hel", ""), choice_chunk(0, "lo", ""), done=True)),
    "chat, only keep-alive comments": (CHAT, body(CHAT), [b": keep-alive\n\n", b": keep-alive\n\n"]),
    "responses, [DONE] before response.completed": (RESPONSES, body(RESPONSES), sse(
        {"type": "response.created", "response": {"id": "r1", "model": "m", "status": "in_progress"}},
        {"type": "response.output_text.delta", "delta": "Hel"}, done=True)),
}

# cut after some of the choices asked for finished: never stored; not called an error (a server
# that ignores n, as Ollama's OpenAI routes do, answers one choice and [DONE])
PARTLY: dict[str, tuple[str, dict[str, Any], list[bytes]]] = {
    "chat n=2, one choice finished, [DONE]": (CHAT, body(CHAT, n=2), sse(
        choice_chunk(0, "a"), choice_chunk(1, "b"), choice_chunk(0, "", "stop"), done=True)),
    "chat n=3, two finished, [DONE]": (CHAT, body(CHAT, n=3), sse(
        choice_chunk(0, "a", "stop"), choice_chunk(1, "b", "length"), choice_chunk(2, "c"), done=True)),
    "chat n=2, one choice finished twice, [DONE]": (CHAT, body(CHAT, n=2), sse(
        choice_chunk(0, "a", "stop"), choice_chunk(1, "b"), choice_chunk(0, "", "stop"), done=True)),
    "completions of 2 prompts, one finished, [DONE]": (COMPLETIONS, body(COMPLETIONS, prompt=["a", "b"]), sse(
        choice_chunk(0, "x", "stop", kind="text"), choice_chunk(1, "y", kind="text"), done=True)),
    "completions n=2 of 2 prompts, three finished, [DONE]": (COMPLETIONS, body(COMPLETIONS, prompt=["a", "b"], n=2),
                                                            sse(*(choice_chunk(i, "x", "stop", kind="text")
                                                                  for i in range(3)), done=True)),
}

# whole answers: stored, and the hit replays the miss's bytes
WHOLE: dict[str, tuple[str, dict[str, Any], list[bytes]]] = {
    "chat n=2, both finished, [DONE]": (CHAT, body(CHAT, n=2), sse(
        choice_chunk(0, "a"), choice_chunk(1, "b"), choice_chunk(1, "", "stop"), choice_chunk(0, "", "length"),
        done=True)),
    "chat, finish then a usage chunk, [DONE]": (CHAT, body(CHAT, stream_options={"include_usage": True}), sse(
        choice_chunk(0, "Hel"), choice_chunk(0, "lo", "stop"), USAGE_CHUNK, done=True)),
    "chat, a tool call": (CHAT, body(CHAT), sse(choice_chunk(0), choice_chunk(0, None, "tool_calls"), done=True)),
    "chat, finish_reason \"\" until the last chunk": (CHAT, body(CHAT), sse(
        choice_chunk(0, "Hel", ""), choice_chunk(0, "lo", "stop"), done=True)),
    "chat, Azure's prompt_filter_results chunk first": (CHAT, body(CHAT), sse(
        {"id": "", "object": "", "model": "", "choices": [], "prompt_filter_results": [
            {"prompt_index": 0, "content_filter_results": {}}]},
        choice_chunk(0, "Hel"), choice_chunk(0, "lo", "stop"), done=True)),
    "completions of 2 prompts, both finished, [DONE]": (COMPLETIONS, body(COMPLETIONS, prompt=["a", "b"]), sse(
        choice_chunk(1, "y", "stop", kind="text"), choice_chunk(0, "x", "length", kind="text"), done=True)),
    "completions of one tokenised prompt, [DONE]": (COMPLETIONS, body(COMPLETIONS, prompt=[1, 2, 3]), sse(
        choice_chunk(0, "x", "stop", kind="text"), done=True)),
}


class Stream(Scripted):
    """The bundled server answering each request with one scripted stream; any request body."""

    def ask(self, path: str, request: dict[str, Any], pieces: list[bytes]) -> Any:
        import requests

        self.answer = type(self.answer)(200, list(SSE), chunks=list(pieces))
        response = requests.post(self.server.url + path, json=request, timeout=10, stream=True)
        response._content = b"".join(response.iter_content(None))
        return response


@pytest.fixture
def stream(server: FakeLLMServer, installed_cached: Callable[..., object]) -> Iterator[Stream]:
    installed_cached()
    yield Stream(server)


def ended(records: list[llmshim.CallRecord]) -> list[llmshim.CallRecord]:
    return [record for record in records if record.event != "call_started"]


def _twice(stream: Stream, case: tuple[str, dict[str, Any], list[bytes]]) -> list[Any]:
    path, request, pieces = case
    replies = [stream.ask(path, request, pieces) for _ in range(2)]
    assert [reply.content for reply in replies] == [b"".join(pieces)] * 2  # the caller's bytes, untouched
    return replies


@pytest.mark.parametrize("name", list(CUT))
def test_a_cut_stream_is_never_stored_and_its_call_is_an_error(
        name: str, stream: Stream, records: list[llmshim.CallRecord]) -> None:
    replies = _twice(stream, CUT[name])
    assert replies[1].headers.get("x-llmshim-cache") != "hit" and len(stream.server.received) == 2
    assert [(r.outcome, r.error_type) for r in ended(records)] == [("error", "incomplete_stream")] * 2
    assert (llmshim.stats()["failed"], llmshim.stats()["completed"]) == (2, 0)


@pytest.mark.parametrize("name", list(PARTLY))
def test_a_stream_cut_after_some_choices_finished_is_never_stored(
        name: str, stream: Stream, records: list[llmshim.CallRecord]) -> None:
    replies = _twice(stream, PARTLY[name])
    assert replies[1].headers.get("x-llmshim-cache") != "hit" and len(stream.server.received) == 2
    assert [(r.outcome, r.error_type) for r in ended(records)] == [("ok", None)] * 2


@pytest.mark.parametrize("name", list(WHOLE))
def test_a_whole_stream_is_stored_and_replayed(name: str, stream: Stream, records: list[llmshim.CallRecord]) -> None:
    replies = _twice(stream, WHOLE[name])
    assert [reply.headers.get("x-llmshim-cache") for reply in replies] == [None, "hit"]
    assert len(stream.server.received) == 1
    assert [r.outcome for r in ended(records)] == ["ok", "ok"]


@pytest.mark.parametrize("name", ["openai chat without [DONE]", "anthropic without message_stop"])
def test_a_finished_answer_without_its_end_marker_is_ok_but_not_stored(
        name: str, stream: Stream, records: list[llmshim.CallRecord]) -> None:
    path, pieces, _ = UNFINISHED[name]
    _twice(stream, (path, BODIES[path], pieces))
    assert len(stream.server.received) == 2
    assert [r.outcome for r in ended(records)] == ["ok", "ok"]


@pytest.mark.parametrize("name", ["responses without response.completed", "ollama without done",
                                  "llama.cpp without stop", "gemini sse without finishReason",
                                  "gemini array without its ]"])  # its last element is read at the ]
def test_every_dialects_cut_stream_is_an_incomplete_stream(
        name: str, stream: Stream, records: list[llmshim.CallRecord]) -> None:
    path, pieces, _ = UNFINISHED[name]
    _twice(stream, (path, BODIES[path], pieces))
    assert [(r.outcome, r.error_type) for r in ended(records)] == [("error", "incomplete_stream")] * 2


def test_the_span_of_a_cut_stream_is_an_error(server: FakeLLMServer, installed: Callable[..., object]) -> None:
    """What a tracing backend shows: the span of a cut stream has status ERROR and its error.type."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    installed(tracer_provider=provider, cache="off")
    stream = Stream(server)
    path, request, pieces = CUT["chat, [DONE] with no finish_reason"]
    stream.ask(path, request, pieces)
    (span,) = [s for s in exporter.get_finished_spans() if s.instrumentation_scope.name == "llmshim"]
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "incomplete_stream"


# -- the rule, over every way to cut a stream -------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 3), texts=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4),
       reasons=st.lists(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]), min_size=3, max_size=3),
       order=st.permutations(range(3)), data=st.data())
def test_only_a_stream_whose_every_choice_finished_before_done_is_whole(
        n: int, texts: list[str], reasons: list[str], order: list[int], data: st.DataObject) -> None:
    """Any prefix of a complete n-choice stream (choices interleaved and finishing in any order, any
    text), with or without ``[DONE]`` after it, split anywhere: whole exactly when every choice's
    finish is in the prefix and ``[DONE]`` follows it."""
    events = [choice_chunk(i, text) for text in texts for i in range(n)]
    finishes = [choice_chunk(i, "", reasons[i]) for i in order if i < n]
    complete = events + finishes
    cut = data.draw(st.integers(0, len(complete)), label="events kept")
    marker = data.draw(st.booleans(), label="[DONE]")
    raw = b"".join(sse(*complete[:cut], done=marker))
    splits = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=4), label="splits"))
    pieces = [raw[a:b] for a, b in zip([0, *splits], [*splits, len(raw)], strict=True)]
    result = parse(CHAT, body(CHAT, n=n), pieces, "text/event-stream")
    finished = sum(1 for event in complete[:cut] if event["choices"][0]["finish_reason"])
    assert result.done == (finished == n and marker)
    assert len(result.finish_reasons) == finished


def test_the_other_dialects_end_markers_are_unchanged() -> None:
    """Anthropic's message_stop, Gemini's finishReason: whole as before (review 35's complete answers)."""
    from test_review_35 import COMPLETE

    for name in ("anthropic with thinking, tools, pings", "gemini sse, safety verdict"):
        path, pieces, _ = COMPLETE[name]
        assert path in (MESSAGES, GEMINI_SSE)
        assert parse(path, BODIES[path], pieces, "text/event-stream").done, name
    assert json.dumps(BODIES[CHAT])  # the shared request bodies are plain JSON
