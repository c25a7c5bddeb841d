"""Deterministic LLM answers in each wire dialect, as real servers frame them.

The answer text is derived from the request (``"Echo: <last prompt>"``), so the same request
always gets the same bytes, and different requests get different ones. Token counts are
whitespace words: deterministic and easy to assert. Every function returns ``Answer``: status,
headers, and either a whole body or a list of stream pieces (each one flushed on its own).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct
from typing import Any

__all__ = ["Answer", "answer_for"]

CREATED = 1_700_000_000


@dataclasses.dataclass
class Answer:
    status: int = 200
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    chunks: list[bytes] | None = None  # a streamed body, one piece per flush

    @property
    def streamed(self) -> bool:
        return self.chunks is not None


def _json(status: int, obj: Any) -> Answer:
    return Answer(status, [("Content-Type", "application/json")], json.dumps(obj).encode())


def _sse(events: list[tuple[str | None, Any]], done: bool) -> Answer:
    chunks = []
    for event, data in events:
        head = f"event: {event}\n" if event else ""
        chunks.append(f"{head}data: {json.dumps(data)}\n\n".encode())
    if done:
        chunks.append(b"data: [DONE]\n\n")
    return Answer(200, [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")],
                  chunks=chunks)


def _ndjson(lines: list[Any]) -> Answer:
    return Answer(200, [("Content-Type", "application/x-ndjson")],
                  chunks=[(json.dumps(line) + "\n").encode() for line in lines])


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(p.get("text", p.get("content", ""))) if isinstance(p, dict) else str(p)
                        for p in content)
    return "" if content is None else str(content)


def words(text: str) -> int:
    return len(text.split())


def _prompt(body: dict[str, Any]) -> tuple[str, int]:
    """The text to echo and the prompt token count, for any dialect's request body."""
    if isinstance(body.get("messages"), list):
        texts = [_text_of(m.get("content")) for m in body["messages"] if isinstance(m, dict)]
    elif "input" in body:
        raw = body["input"]
        texts = [_text_of(i.get("content") if isinstance(i, dict) else i) for i in raw] \
            if isinstance(raw, list) else [_text_of(raw)]
    else:
        texts = [_text_of(body.get("prompt"))]
    last = next((t for t in reversed(texts) if t), "")
    return last, sum(words(t) for t in texts)


def _limit(body: dict[str, Any]) -> int | None:
    raw_options = body.get("options")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    for value in (body.get("max_tokens"), body.get("max_completion_tokens"), body.get("max_output_tokens"),
                  body.get("n_predict"), options.get("num_predict")):
        if isinstance(value, int) and value >= 0:
            return value
    return None


def _reply_tokens(body: dict[str, Any]) -> tuple[list[str], str, int]:
    """(pieces of the answer, finish reason, prompt tokens). Pieces keep their leading spaces."""
    prompt, prompt_tokens = _prompt(body)
    tokens = f"Echo: {prompt or 'hello'}".split(" ")
    pieces = [tokens[0]] + [" " + t for t in tokens[1:]]
    limit = _limit(body)
    if limit is not None and limit < len(pieces):
        return pieces[:limit], "length", prompt_tokens
    return pieces, "stop", prompt_tokens


def _vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 128) / 128, 6) for i in range(dims)]


def _inputs(body: dict[str, Any], field: str = "input") -> list[str]:
    raw = body.get(field)
    if isinstance(raw, list):
        return [r if isinstance(r, str) else json.dumps(r) for r in raw]
    return [raw if isinstance(raw, str) else json.dumps(raw)]


# -- OpenAI ------------------------------------------------------------------------------------

def _openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object of a chat or text completion (also the last event of a stream that asks for it)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_chat(body: dict[str, Any]) -> Answer:
    model = body.get("model", "gpt-fake")
    pieces, finish, prompt_tokens = _reply_tokens(body)
    ident = "chatcmpl-" + _digest("chat", body)
    usage = _openai_usage(prompt_tokens, len(pieces))
    if not body.get("stream"):
        return _json(200, {
            "id": ident, "object": "chat.completion", "created": CREATED, "model": model,
            "system_fingerprint": "fp_llmshim",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces),
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        })
    base = {"id": ident, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_llmshim"}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    events: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant", "content": ""}))]
    events += [(None, chunk({"content": p})) for p in pieces]
    events.append((None, chunk({}, finish)))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**base, "choices": [], "usage": usage}))
    return _sse(events, done=True)


def openai_completion(body: dict[str, Any]) -> Answer:
    model = body.get("model", "gpt-fake-instruct")
    pieces, finish, prompt_tokens = _reply_tokens(body)
    ident = "cmpl-" + _digest("completion", body)
    usage = _openai_usage(prompt_tokens, len(pieces))
    base = {"id": ident, "object": "text_completion", "created": CREATED, "model": model}
    if not body.get("stream"):
        return _json(200, {**base, "choices": [{"index": 0, "text": "".join(pieces), "logprobs": None,
                                                "finish_reason": finish}], "usage": usage})
    events: list[tuple[str | None, Any]] = [
        (None, {**base, "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": None}]})
        for p in pieces
    ]
    events.append((None, {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": finish}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**base, "choices": [], "usage": usage}))
    return _sse(events, done=True)


def openai_embeddings(body: dict[str, Any]) -> Answer:
    texts = _inputs(body)
    data = []
    for index, text in enumerate(texts):
        vector = _vector(text, int(body.get("dimensions") or 8))
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(words(t) for t in texts)
    return _json(200, {"object": "list", "data": data, "model": body.get("model", "text-embedding-fake"),
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def openai_responses(body: dict[str, Any]) -> Answer:
    model = body.get("model", "gpt-fake")
    pieces, finish, prompt_tokens = _reply_tokens(body)
    ident = "resp_" + _digest("responses", body)
    text = "".join(pieces)
    message_id = "msg_" + ident[5:]
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"type": "message", "id": message_id, "status": "completed", "role": "assistant", "content": [part]}
    usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": len(pieces), "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": prompt_tokens + len(pieces)}
    status = "completed" if finish == "stop" else "incomplete"
    response = {
        "id": ident, "object": "response", "created_at": CREATED, "model": model, "status": status,
        "incomplete_details": None if status == "completed" else {"reason": "max_output_tokens"},
        "output": [item], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "usage": usage,
        "error": None, "instructions": body.get("instructions"), "metadata": {},
    }
    if not body.get("stream"):
        return _json(200, response)
    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    seq = iter(range(10_000))
    events: list[tuple[str | None, Any]] = []

    def add(kind: str, **fields: Any) -> None:
        events.append((kind, {"type": kind, "sequence_number": next(seq), **fields}))

    add("response.created", response=pending)
    add("response.in_progress", response=pending)
    add("response.output_item.added", output_index=0,
        item={**item, "status": "in_progress", "content": []})
    add("response.content_part.added", item_id=message_id, output_index=0, content_index=0,
        part={"type": "output_text", "text": "", "annotations": []})
    for piece in pieces:
        add("response.output_text.delta", item_id=message_id, output_index=0, content_index=0, delta=piece,
            logprobs=[])
    add("response.output_text.done", item_id=message_id, output_index=0, content_index=0, text=text, logprobs=[])
    add("response.content_part.done", item_id=message_id, output_index=0, content_index=0, part=part)
    add("response.output_item.done", output_index=0, item=item)
    add("response.completed" if status == "completed" else "response.incomplete", response=response)
    return _sse(events, done=False)


# -- Ollama ------------------------------------------------------------------------------------

_OLLAMA_TIME = "2024-01-01T00:00:00.000000Z"


def _ollama_final(model: str, prompt_tokens: int, pieces: list[str], finish: str) -> dict[str, Any]:
    return {"model": model, "created_at": _OLLAMA_TIME, "done": True, "done_reason": finish,
            "total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 200_000, "eval_count": len(pieces), "eval_duration": 700_000}


def ollama_chat(body: dict[str, Any]) -> Answer:
    model = body.get("model", "llama3.2")
    pieces, finish, prompt_tokens = _reply_tokens(body)
    final = _ollama_final(model, prompt_tokens, pieces, finish)
    if body.get("stream", True) is False:
        return _json(200, {**final, "message": {"role": "assistant", "content": "".join(pieces)}})
    lines: list[Any] = [{"model": model, "created_at": _OLLAMA_TIME,
                         "message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
    lines.append({**final, "message": {"role": "assistant", "content": ""}})
    return _ndjson(lines)


def ollama_generate(body: dict[str, Any]) -> Answer:
    model = body.get("model", "llama3.2")
    pieces, finish, prompt_tokens = _reply_tokens(body)
    final = {**_ollama_final(model, prompt_tokens, pieces, finish), "context": [1, 2, 3]}
    if body.get("stream", True) is False:
        return _json(200, {**final, "response": "".join(pieces)})
    lines: list[Any] = [{"model": model, "created_at": _OLLAMA_TIME, "response": p, "done": False}
                        for p in pieces]
    lines.append({**final, "response": ""})
    return _ndjson(lines)


def ollama_embed(body: dict[str, Any]) -> Answer:
    texts = _inputs(body)
    return _json(200, {"model": body.get("model", "nomic-embed-text"),
                       "embeddings": [_vector(t) for t in texts], "total_duration": 1_000_000,
                       "load_duration": 100_000, "prompt_eval_count": sum(words(t) for t in texts)})


def ollama_embeddings(body: dict[str, Any]) -> Answer:
    return _json(200, {"embedding": _vector(str(body.get("prompt", "")))})


# -- llama.cpp ---------------------------------------------------------------------------------

def llamacpp_completion(body: dict[str, Any]) -> Answer:
    model = body.get("model", "llama-fake.gguf")
    pieces, finish, prompt_tokens = _reply_tokens(body)
    timings = {"prompt_n": prompt_tokens, "prompt_ms": 1.5, "predicted_n": len(pieces), "predicted_ms": 4.5,
               "predicted_per_second": 222.2}
    final = {"content": "", "id_slot": 0, "stop": True, "model": model, "tokens_predicted": len(pieces),
             "tokens_evaluated": prompt_tokens, "stop_type": "eos" if finish == "stop" else "limit",
             "stopping_word": "", "tokens_cached": 0, "truncated": False, "timings": timings}
    if not body.get("stream"):
        return _json(200, {**final, "content": "".join(pieces), "index": 0})
    events: list[tuple[str | None, Any]] = [
        (None, {"content": p, "id_slot": 0, "stop": False, "index": 0}) for p in pieces
    ]
    events.append((None, final))
    return _sse(events, done=False)


def llamacpp_embedding(body: dict[str, Any]) -> Answer:
    texts = _inputs(body, "content")
    return _json(200, [{"index": i, "embedding": [_vector(t)]} for i, t in enumerate(texts)])


_POST_ROUTES = (
    ("/chat/completions", openai_chat),
    ("/responses", openai_responses),
    ("/embeddings", openai_embeddings),
    ("/api/chat", ollama_chat),
    ("/api/generate", ollama_generate),
    ("/api/embed", ollama_embed),
    ("/api/embeddings", ollama_embeddings),
)


def answer_for(method: str, path: str, body: Any) -> Answer:
    """The server's answer to one request; unknown routes get 404 in the OpenAI error shape."""
    if method == "GET":
        if path.endswith("/models"):
            return _json(200, {"object": "list", "data": [
                {"id": "gpt-fake", "object": "model", "created": CREATED, "owned_by": "llmshim"}]})
        if path == "/api/tags":
            return _json(200, {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest",
                                           "size": 1, "digest": "0" * 64}]})
        if path == "/api/version":
            return _json(200, {"version": "0.0.0-llmshim"})
        if path == "/health":
            return _json(200, {"status": "ok"})
    if method == "POST" and isinstance(body, dict):
        if path in ("/completion", "/completions", "/infill") and "model" not in body:
            return llamacpp_completion(body)
        if path in ("/embedding",) or (path == "/embeddings" and "content" in body):
            return llamacpp_embedding(body)
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            return openai_completion(body)
        for suffix, handler in _POST_ROUTES:
            if path.endswith(suffix):
                return handler(body)
    if method == "POST" and not isinstance(body, dict):
        return _json(400, {"error": {"message": "We could not parse the JSON body of your request.",
                                     "type": "invalid_request_error", "param": None, "code": None}})
    return _json(404, {"error": {"message": f"Unknown route {method} {path}", "type": "invalid_request_error",
                                 "param": None, "code": "unknown_url"}})
