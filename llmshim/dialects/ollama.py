"""Ollama's native dialect: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``.

A request is recognised only with its route's shape: a string ``model`` and ``messages`` (chat,
a list of role objects), ``prompt`` (generate, embeddings: a string) or ``input`` (embed).
Chat and generate stream NDJSON by default (``"stream"`` absent means true); the last line has
``"done": true`` with ``prompt_eval_count`` / ``eval_count``. Sampling parameters sit in
``options`` (a top-level ``temperature`` or ``seed`` is ignored by the server, and so here).
"""

from __future__ import annotations

from typing import Any

from ..call import CallInfo, ResponseInfo
from . import _shapes as shapes
from ._base import Dialect, Framing


def _texts(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


# route -> operation, the field it requires besides a string model, and that field's shape
_ROUTES: dict[str, tuple[str, str, shapes.Check]] = {
    "/api/chat": ("chat", "messages", shapes.messages),
    "/api/generate": ("text_completion", "prompt", shapes.text),
    "/api/embed": ("embeddings", "input", _texts),
    "/api/embeddings": ("embeddings", "prompt", shapes.text),
}
_KEEP_ALIVE = frozenset({"keep_alive"})
_WORK = {"api/chat": "messages", "api/generate": "prompt"}  # without it, a call only (un)loads the model
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_predict": "max_tokens",
    "seed": "seed",
    "stop": "stop_sequences",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}


class OllamaDialect(Dialect):
    name = "ollama"
    suffixes = tuple(_ROUTES)
    param_names = _OPTIONS

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        for route, (operation, field, shape) in _ROUTES.items():
            if path.endswith(route):
                model = body.get("model")
                if not isinstance(model, str) or not shape(body.get(field)) or not shapes.flag_ok(body):
                    return None
                options = body.get("options")
                streams = operation != "embeddings" and body.get("stream", True) is not False
                return self.call_info(operation=operation, endpoint=route.lstrip("/"), model=model, stream=streams,
                                      body=body, params=options if isinstance(options, dict) else {})
        return None

    def cache_ignored_fields(self, info: CallInfo) -> frozenset[str]:
        """``keep_alive`` (how long the model stays loaded) never changes the answer of a call that
        generates or embeds. A chat without messages or a generate without a prompt only loads the
        model, or with ``keep_alive: 0`` unloads it: there it is the request, and stays in the key."""
        work = _WORK.get(info.endpoint)
        if work is not None and not info.body.get(work):
            return frozenset()
        return _KEEP_ALIVE

    def framing(self, content_type: str | None, info: CallInfo) -> Framing:
        """Ollama streams NDJSON, whatever content type a proxy in between claims, except an
        explicit application/json (an error answer)."""
        framing = super().framing(content_type, info)
        kind = (content_type or "").split(";")[0].strip().lower()
        if framing == "json" and info.stream and kind != "application/json":
            return "ndjson"
        return framing

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if not isinstance(message, dict):
            return
        if message.get("error"):  # Ollama's {"error": "..."}; a gateway's {"error": {...}} likewise
            into.error = "error"
            return
        if isinstance(message.get("model"), str):
            into.model = message["model"]
        if info.operation == "embeddings":
            into.done = True
        elif into.wants_text:
            chat_message = message.get("message")
            into.add_text(chat_message.get("content") if isinstance(chat_message, dict) else message.get("response"))
        if message.get("done") is True:
            into.done = True
            reason = message.get("done_reason")
            into.finish_reasons = [reason] if isinstance(reason, str) else ["stop"]
        for field, attr in (("prompt_eval_count", "input_tokens"), ("eval_count", "output_tokens")):
            value = message.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(into.usage, attr, value)


OLLAMA = OllamaDialect()
