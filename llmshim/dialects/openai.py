"""The OpenAI wire dialect, spoken by OpenAI, Azure OpenAI and every OpenAI-compatible server.

Routes are recognised by suffix under any base-URL prefix (``/v1``, ``/openai/deployments/X``,
llama.cpp's and Ollama's ``/v1``, vLLM, ...) and by body shape: a string ``model`` (or an Azure
deployment path) and the route's own field — ``messages`` (a list of role objects), ``prompt``,
``input`` (strings or token ids), or for ``/responses`` an ``input`` or a stored ``prompt`` object.
Streams are SSE ending in ``data: [DONE]``; the Responses API streams typed events ending in
``response.completed``. The server states its rate limits in ``x-ratelimit-*`` headers and an
exhausted quota as a 429 with the code ``insufficient_quota``. llama.cpp's ``/v1`` routes speak this
dialect too, so its "Loading model" answer is recognised here as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..call import CallInfo, ResponseInfo, WireRequest
from . import _shapes as shapes
from . import llamacpp
from ._base import Dialect, ServerLimits, count, positive_int


def _responses_input(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, dict) for item in value))


# path suffix, endpoint, operation, the field the route requires and its shape. A model is
# required too, except under an Azure deployment path (which names it) and, on /responses, with a
# stored prompt object (which may carry it).
_ROUTES: tuple[tuple[str, str, str, str, shapes.Check], ...] = (
    ("/chat/completions", "chat/completions", "chat", "messages", shapes.messages),
    ("/completions", "completions", "text_completion", "prompt", shapes.tokens_or_texts),
    ("/embeddings", "embeddings", "embeddings", "input", shapes.tokens_or_texts),
    ("/responses", "responses", "chat", "input", _responses_input),
)
_AZURE_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/")

# request body field -> gen_ai.request.* attribute suffix. Of the max-tokens fields the first present
# wins, for the span and the limiter's reservation alike: max_completion_tokens replaced max_tokens.
PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_completion_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "max_output_tokens": "max_tokens",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop": "stop_sequences",
    "n": "choice.count",
    "encoding_format": "encoding_formats",
    "dimensions": "embeddings.dimension.count",
}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_PROMPT_CACHE_KEY = frozenset({"prompt_cache_key"})
_PROMPT_EXTRAS = ("tools", "functions", "response_format", "text")
_RESET = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_RESET_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` durations: ``6m0s``, ``1.5s``, ``12ms`` → seconds."""
    if not value:
        return None
    parts = _RESET.findall(value.strip())
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    return sum(float(number) * _RESET_SCALE[unit] for number, unit in parts)


def header_number(raw: str | None) -> float | None:
    """A finite, non-negative number from a rate-limit header, or None (``nan``, ``inf``, a
    negative value, non-ASCII digits)."""
    if not raw or not raw.strip().isascii():
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 <= value < float("inf") else None


def _reset_seconds(raw: str | None) -> float | None:
    """``parse_reset`` held to ``header_number``'s rules: ASCII, finite, non-negative."""
    if not raw or not raw.isascii():
        return None
    seconds = parse_reset(raw)
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _choices(info: CallInfo) -> int:
    """How many choices an answer holds: ``n`` (1 when it does not say), times the prompts of a
    text completion given several (a list of strings or of token lists). A list holding a token id
    is one prompt: a list of token ids, or llama.cpp's mixed ``["text", 13, "text"]``."""
    choices = positive_int(count(info.param_source.get("n"))) or 1
    prompt = info.body.get("prompt") if info.endpoint == "completions" else None
    if isinstance(prompt, list) and not any(isinstance(item, int) for item in prompt):
        choices *= len(prompt) or 1
    return choices


class OpenAIDialect(Dialect):
    name = "openai"
    suffixes = tuple(route[0] for route in _ROUTES)
    param_names = PARAMS
    quota_statuses = frozenset({429})
    loading_statuses = frozenset({503})  # llama.cpp's /v1 routes

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        for suffix, endpoint, operation, field, shape in _ROUTES:
            if not path.endswith(suffix) or (endpoint == "completions" and path.endswith("/chat/completions")):
                continue
            deployment = _AZURE_DEPLOYMENT.search(path + "/") if "/deployments/" in path else None
            stored_prompt = endpoint == "responses" and shapes.obj(body.get("prompt"))
            if not shapes.model_ok(body, required=deployment is None and not stored_prompt):
                return None
            if not (shape(body.get(field)) or (stored_prompt and field not in body)) or not shapes.flag_ok(body):
                return None
            model = body.get("model")
            if not isinstance(model, str) and deployment is not None:
                model = deployment.group(1)
            return self.call_info(operation=operation, endpoint=endpoint, model=model,
                                  stream=body.get("stream") is True, body=body)
        return None

    def finished(self, info: CallInfo, into: ResponseInfo) -> bool:
        """A Responses API answer ends at ``response.completed`` / ``response.incomplete`` (never at a
        ``[DONE]`` a gateway adds); a chat or text completion when each of its choices has finished:
        ``n`` of them, for each prompt of a batched text completion."""
        if info.endpoint == "responses":
            return into.done
        return len(into.finished_choices or ()) >= _choices(info)

    def prompt_extras(self, info: CallInfo) -> list[Any]:
        """Tool and function definitions and a response schema: the model reads them as tokens."""
        return [info.body[field] for field in _PROMPT_EXTRAS if info.body.get(field) is not None]

    def reports_usage(self, info: CallInfo) -> bool:
        """Whole answers and Responses API streams carry usage; a chat or text completion stream
        only when the request asked (``stream_options.include_usage``)."""
        if not info.stream or info.endpoint == "responses":
            return True
        options = info.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def cache_ignored_fields(self, info: CallInfo) -> frozenset[str]:
        """``prompt_cache_key`` routes to OpenAI's prompt cache; chat completions never echo it
        (the Responses API does, so there it stays in the key)."""
        return _PROMPT_CACHE_KEY if info.endpoint == "chat/completions" else frozenset()

    def quota_exhausted(self, status: int, body: bytes) -> str | None:
        """A 429 whose body says ``insufficient_quota``: billing, not load; waiting cannot help."""
        return "insufficient_quota" if status == 429 and b"insufficient_quota" in body else None

    def loading(self, status: int, body: bytes) -> bool:
        return llamacpp.loading_answer(status, body)

    def health_url(self, request: WireRequest) -> str | None:
        return llamacpp.root_health_url(request)

    def server_limits(self, headers: Mapping[str, str]) -> ServerLimits:
        """``x-ratelimit-limit-{requests,tokens}`` (per minute), ``x-ratelimit-remaining-*`` and
        ``x-ratelimit-reset-*`` (a duration such as ``6m0s``)."""
        return ServerLimits(
            requests_limit=header_number(headers.get("x-ratelimit-limit-requests")),
            requests_remaining=header_number(headers.get("x-ratelimit-remaining-requests")),
            requests_reset=_reset_seconds(headers.get("x-ratelimit-reset-requests")),
            tokens_limit=header_number(headers.get("x-ratelimit-limit-tokens")),
            tokens_remaining=header_number(headers.get("x-ratelimit-remaining-tokens")),
            tokens_reset=_reset_seconds(headers.get("x-ratelimit-reset-tokens")),
        )

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if not isinstance(message, dict):
            return
        if info.endpoint == "responses":
            self._absorb_response(message, into)
            return
        error = message.get("error")
        # An error object, alone or beside ``choices`` (OpenRouter's mid-stream error: ``error`` plus
        # ``finish_reason: "error"``, then ``[DONE]``): a failed answer, never a complete one.
        if error or ("error" in message and "choices" not in message):
            into.error = _error_type(error)
            return
        if isinstance(message.get("model"), str):
            into.model = message["model"]
        if isinstance(message.get("id"), str):
            into.id = message["id"]
        if isinstance(message.get("service_tier"), str):
            into.service_tier = message["service_tier"]
        for choice in message.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:  # some servers send "" on every chunk before the last
                into.finish_choice(count(choice.get("index")), reason)
                if reason == "error":  # a gateway's failed generation, with or without an error object
                    into.error = into.error or "error"
            if into.wants_text:
                part = choice.get("message") or choice.get("delta")
                if isinstance(part, dict):
                    into.add_text(part.get("content"))
                    for tool_call in part.get("tool_calls") or ():
                        function = tool_call.get("function") if isinstance(tool_call, dict) else None
                        if isinstance(function, dict):
                            into.add_generated(function.get("arguments"))
                else:
                    into.add_text(choice.get("text"))
        self._usage(message.get("usage"), into)
        if not info.stream:
            into.done = True  # a whole JSON body that parsed is complete

    def _absorb_response(self, message: dict[str, Any], into: ResponseInfo) -> None:
        kind = message.get("type")
        if kind == "error":
            into.error = _error_type(message)
            return
        if kind is None and message.get("error") and "status" not in message:  # a gateway's {"error": ...}
            into.error = _error_type(message["error"])
            return
        if kind == "response.output_text.delta":
            into.add_text(message.get("delta"))
            return
        response = message.get("response") if isinstance(kind, str) else message
        if not isinstance(response, dict):
            return
        if isinstance(response.get("model"), str):
            into.model = response["model"]
        if isinstance(response.get("id"), str):
            into.id = response["id"]
        if isinstance(response.get("service_tier"), str):
            into.service_tier = response["service_tier"]
        status = response.get("status")
        if kind is None or kind in ("response.completed", "response.incomplete", "response.failed"):
            if status == "failed" or kind == "response.failed":
                into.error = _error_type(response.get("error")) or "response.failed"
            elif status == "incomplete":
                details = response.get("incomplete_details") or {}
                into.finish_reasons = [str(details.get("reason") or "incomplete")]
            elif status == "completed":
                into.finish_reasons = ["stop"]
            if status in ("completed", "incomplete"):
                into.done = True
            self._usage(response.get("usage"), into)
            if kind is None and into.wants_text:  # a whole response: its text is in `output`
                for item in response.get("output") or ():
                    for part in (item.get("content") or ()) if isinstance(item, dict) else ():
                        if isinstance(part, dict) and part.get("type") == "output_text":
                            into.add_text(part.get("text"))

    @staticmethod
    def _usage(usage: Any, into: ResponseInfo) -> None:
        if not isinstance(usage, dict):
            return
        prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
        output = _int(usage.get("completion_tokens", usage.get("output_tokens")))
        if prompt is not None:
            into.usage.input_tokens = prompt
        if output is not None:
            into.usage.output_tokens = output
        details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
        if cached is not None:
            into.usage.cached_input_tokens = cached


def _error_type(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "error")
    return "error"


OPENAI = OpenAIDialect()
