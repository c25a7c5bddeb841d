"""llama.cpp server's native dialect: ``/completion(s)``, ``/infill``, ``/embedding(s)`` at the root.

Streams are SSE whose last event has ``"stop": true`` with ``tokens_evaluated``,
``tokens_predicted`` and ``timings``. The same server's ``/v1/...`` routes speak the OpenAI
dialect. A root ``/completions`` or ``/embeddings`` that names a model is taken as OpenAI's.
A request is recognised only with its route's shape: ``prompt`` for completions, ``input_prefix``
or ``input_extra`` for infill, ``content`` or ``input`` for embeddings.

While it loads a model the server answers every route (its ``/v1`` ones too) 503 "Loading model",
and its ``/health`` answers 200 once it is ready: it has no way to push that news.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..call import CallInfo, ResponseInfo, WireRequest
from . import _shapes as shapes
from ._base import Dialect


def _infill(body: dict[str, Any]) -> bool:
    return isinstance(body.get("input_prefix"), str) or isinstance(body.get("input_extra"), list)


def _embedding(body: dict[str, Any]) -> bool:
    return shapes.prompt(body.get("content")) or shapes.prompt(body.get("input"))


def _completion(body: dict[str, Any]) -> bool:
    return shapes.prompt(body.get("prompt"))


# root route -> endpoint, operation, the body shape it requires
_ROUTES: dict[str, tuple[str, str, Callable[[dict[str, Any]], bool]]] = {
    "/completion": ("completion", "text_completion", _completion),
    "/completions": ("completion", "text_completion", _completion),
    "/infill": ("infill", "text_completion", _infill),
    "/embedding": ("embedding", "embeddings", _embedding),
    "/embeddings": ("embedding", "embeddings", _embedding),
}
_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "n_predict": "max_tokens",
    "max_tokens": "max_tokens",
    "seed": "seed",
    "stop": "stop_sequences",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}
_STOP_TYPES = {"eos": "stop", "word": "stop", "limit": "length"}


def loading_answer(status: int, body: bytes) -> bool:
    """llama.cpp's answer while it loads its model: 503 with "Loading model" in the body."""
    return status == 503 and b"Loading model" in body


def root_health_url(request: WireRequest) -> str | None:
    """``/health`` at the root of the server a request went to (no user info, no query)."""
    parts = urlsplit(request.public_url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}/health"


class LlamaCppDialect(Dialect):
    name = "llama_cpp"
    suffixes = tuple(_ROUTES)
    param_names = _PARAMS
    loading_statuses = frozenset({503})

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        route = _ROUTES.get(path)  # root routes only: a prefix means an OpenAI-style base URL
        if route is None or (path in ("/completions", "/embeddings") and "model" in body):
            return None
        endpoint, operation, shape = route
        if not shape(body) or not shapes.flag_ok(body) or not shapes.model_ok(body, required=False):
            return None
        return self.call_info(operation=operation, endpoint=endpoint, model=body.get("model"),
                              stream=body.get("stream") is True, body=body)

    def loading(self, status: int, body: bytes) -> bool:
        return loading_answer(status, body)

    def health_url(self, request: WireRequest) -> str | None:
        return root_health_url(request)

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if isinstance(message, dict) and "error" in message and "content" not in message:
            into.error = "error"  # an error object, even in a 200 (an embedding's answer too)
            return
        if info.operation == "embeddings":
            into.done = True
            return
        if not isinstance(message, dict):
            return
        if isinstance(message.get("model"), str):
            into.model = message["model"]
        into.add_text(message.get("content"))
        if message.get("stop") is True or not info.stream:
            into.done = True
            stop_type = message.get("stop_type")
            if isinstance(stop_type, str) and stop_type != "none":
                into.finish_reasons = [_STOP_TYPES.get(stop_type, stop_type)]
            elif message.get("stopped_limit"):
                into.finish_reasons = ["length"]
            else:
                into.finish_reasons = ["stop"]
        raw_timings = message.get("timings")
        timings: dict[str, Any] = raw_timings if isinstance(raw_timings, dict) else {}
        for fields, attr in (
            (("tokens_evaluated", "prompt_n"), "input_tokens"),
            (("tokens_predicted", "predicted_n"), "output_tokens"),
        ):
            value = message.get(fields[0], timings.get(fields[1]))
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(into.usage, attr, value)


LLAMACPP = LlamaCppDialect()
