"""Dialects and framing as pure functions: recognition, response reading, any split of the bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmshim.call import WireRequest
from llmshim.dialects import BodyParser, detect
from llmshim.dialects._framing import NdjsonReader, SseReader
from llmshim.testing import responses


def _req(path: str, body: Any, method: str = "POST") -> WireRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return WireRequest(method, "http://h:1" + path, (), raw)


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "temperature": 0.1, "stop": "x"},
     ("openai", "chat", "gpt-4o", False)),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "stream": True}, ("openai", "chat", "gpt-4o", True)),
    ("/v1/completions", {"model": "davinci", "prompt": "x"}, ("openai", "text_completion", "davinci", False)),
    ("/v1/embeddings", {"model": "e", "input": "x"}, ("openai", "embeddings", "e", False)),
    ("/v1/responses", {"model": "gpt-4.1", "input": "x", "stream": True}, ("openai", "chat", "gpt-4.1", True)),
    ("/openai/deployments/my-gpt/chat/completions", {"messages": []}, ("openai", "chat", "my-gpt", False)),
    ("/ollama/v1/chat/completions", {"model": "llama3", "messages": []}, ("openai", "chat", "llama3", False)),
    ("/chat/completions", {"model": "m", "messages": []}, ("openai", "chat", "m", False)),
    ("/completions", {"model": "m", "prompt": "p"}, ("openai", "text_completion", "m", False)),
    ("/api/chat", {"model": "llama3", "messages": []}, ("ollama", "chat", "llama3", True)),
    ("/api/chat", {"model": "llama3", "messages": [], "stream": False}, ("ollama", "chat", "llama3", False)),
    ("/api/generate", {"model": "llama3", "prompt": "p"}, ("ollama", "text_completion", "llama3", True)),
    ("/api/embed", {"model": "nomic", "input": "p"}, ("ollama", "embeddings", "nomic", False)),
    ("/api/embeddings", {"model": "nomic", "prompt": "p"}, ("ollama", "embeddings", "nomic", False)),
    ("/completion", {"prompt": "p", "stream": True}, ("llama_cpp", "text_completion", None, True)),
    ("/completions", {"prompt": "p"}, ("llama_cpp", "text_completion", None, False)),
    ("/infill", {"input_prefix": "a"}, ("llama_cpp", "text_completion", None, False)),
    ("/embedding", {"content": "p"}, ("llama_cpp", "embeddings", None, False)),
])
def test_recognises_every_route(path: str, body: Any, expected: tuple[Any, ...]) -> None:
    found = detect(_req(path, body))
    assert found is not None
    info = found[1]
    assert (info.provider, info.operation, info.model, info.stream) == expected


@pytest.mark.parametrize(("path", "body", "method"), [
    ("/v1/models", {"model": "x"}, "GET"),
    ("/v1/files", {"model": "x"}, "POST"),
    ("/v1/chat/completions", b"not json", "POST"),
    ("/v1/chat/completions", b"[1, 2]", "POST"),
    ("/v1/responses/resp_1/cancel", {}, "POST"),
    ("/api/tags", {}, "POST"),
    ("/v1/threads/t/runs", {"assistant_id": "a"}, "POST"),
])
def test_anything_else_is_not_an_llm_call(path: str, body: Any, method: str) -> None:
    assert detect(_req(path, body, method)) is None


def test_request_parameters_use_semconv_names() -> None:
    found = detect(_req("/v1/chat/completions", {
        "model": "m", "messages": [], "temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 50,
        "seed": 7, "stop": "END", "n": 2, "frequency_penalty": 0.1, "presence_penalty": 0.3}))
    assert found is not None
    assert dict(found[1].params) == {
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "seed": 7, "stop_sequences": ["END"],
        "choice.count": 2, "frequency_penalty": 0.1, "presence_penalty": 0.3}
    ollama = detect(_req("/api/chat", {"model": "m", "messages": [],
                                       "options": {"num_predict": 9, "temperature": 0, "stop": ["a"]}}))
    assert ollama is not None
    assert dict(ollama[1].params) == {"max_tokens": 9, "temperature": 0, "stop_sequences": ["a"]}


def _read(path: str, body: dict[str, Any], split: int | None = None) -> Any:
    """Generate a real answer with the bundled server's code, feed it to the dialect in pieces."""
    found = detect(_req(path, body))
    assert found is not None
    dialect, info = found
    answer = responses.answer_for("POST", path, body)
    content_type = dict((k.lower(), v) for k, v in answer.headers)["content-type"]
    data = b"".join(answer.chunks) if answer.chunks is not None else answer.body
    parser = BodyParser(dialect, info, content_type)
    step = split or len(data) or 1
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
    return parser.finish()


CASES = [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a b c"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a b c"}], "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": "m", "prompt": "a b c", "max_tokens": 2, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/responses", {"model": "m", "input": "a b c"}),
    ("/v1/responses", {"model": "m", "input": "a b c", "stream": True}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "a b c"}]}),
    ("/api/generate", {"model": "m", "prompt": "a b c", "stream": False}),
    ("/completion", {"prompt": "a b c", "stream": True, "n_predict": 2}),
    ("/completion", {"prompt": "a b c"}),
]


@pytest.mark.parametrize(("path", "body"), CASES)
@pytest.mark.parametrize("split", [None, 1, 7])
def test_reads_model_usage_and_finish_from_any_split(path: str, body: dict[str, Any], split: int | None) -> None:
    info = _read(path, body, split)
    limited = body.get("max_tokens") or body.get("n_predict")
    assert info.done is True and info.error is None
    assert info.model == body.get("model", "llama-fake.gguf")
    assert info.usage.input_tokens == 3
    assert info.usage.output_tokens == (limited or 4)
    if path.endswith("/responses"):
        assert info.finish_reasons == ["stop"] and info.id.startswith("resp_")
    else:
        assert info.finish_reasons == (["length"] if limited else ["stop"])


def test_stream_without_done_marker_is_not_done() -> None:
    body = {"model": "m", "messages": [], "stream": True}
    found = detect(_req("/v1/chat/completions", body))
    assert found is not None
    parser = BodyParser(found[0], found[1], "text/event-stream")
    parser.feed(b'data: {"id":"x","model":"m","choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n')
    info = parser.finish()
    assert info.done is False and info.model == "m"


def test_error_event_inside_a_stream_is_reported() -> None:
    found = detect(_req("/v1/chat/completions", {"model": "m", "messages": [], "stream": True}))
    assert found is not None
    parser = BodyParser(found[0], found[1], "text/event-stream")
    parser.feed(b'data: {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}\n\n')
    assert parser.finish().error == "overloaded"


def test_sse_reader_handles_crlf_comments_multiline_and_split_characters() -> None:
    raw = ": keep-alive\r\nevent: e1\r\ndata: {\"a\":\r\ndata: \"é\"}\r\n\r\ndata: [DONE]\r\n\r\n".encode()
    for step in range(1, len(raw) + 1):
        reader = SseReader()
        events = []
        for i in range(0, len(raw), step):
            events += list(reader.feed(raw[i:i + step]))
        events += list(reader.feed(b"", final=True))
        assert events == [("e1", '{"a":\n"é"}'), (None, "[DONE]")], step


def test_ndjson_reader_skips_blank_and_broken_lines() -> None:
    reader = NdjsonReader()
    out = list(reader.feed(b'{"a": 1}\n\nnot json\n{"b"')) + list(reader.feed(b": 2}", final=True))
    assert out == [{"a": 1}, {"b": 2}]
