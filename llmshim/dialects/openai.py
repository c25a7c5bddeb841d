"""The OpenAI wire dialect, spoken by OpenAI, Azure OpenAI and every OpenAI-compatible server.

Routes are recognised by suffix under any base-URL prefix (``/v1``, ``/openai/deployments/X``,
llama.cpp's and Ollama's ``/v1``, vLLM, ...) and by body shape: a string ``model`` (or an Azure
deployment path) and the route's own field — ``messages`` (a list of role objects), ``prompt``,
``input`` (strings or token ids), or for ``/responses`` an ``input`` or a stored ``prompt`` object.
Streams are SSE ending in ``data: [DONE]``; the Responses API streams typed events ending in
``response.completed``.
"""

from __future__ import annotations

import re
from typing import Any

from ..call import CallInfo, ResponseInfo
from . import _shapes as shapes


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

# request body field -> gen_ai.request.* attribute suffix
PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
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


class OpenAIDialect:
    name = "openai"

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        for suffix, endpoint, operation, field, shape in _ROUTES:
            if not path.endswith(suffix) or (endpoint == "completions" and path.endswith("/chat/completions")):
                continue
            deployment = _AZURE_DEPLOYMENT.search(path + "/")
            stored_prompt = endpoint == "responses" and shapes.obj(body.get("prompt"))
            if not shapes.model_ok(body, required=deployment is None and not stored_prompt):
                return None
            if not (shape(body.get(field)) or (stored_prompt and field not in body)) or not shapes.flag_ok(body):
                return None
            model = body.get("model")
            if not isinstance(model, str) and deployment is not None:
                model = deployment.group(1)
            return CallInfo(
                provider="openai", operation=operation, endpoint=endpoint, model=model,
                stream=body.get("stream") is True, param_source=body, param_names=PARAMS, body=body,
            )
        return None

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if not isinstance(message, dict):
            return
        if info.endpoint == "responses":
            self._absorb_response(message, into)
            return
        if "error" in message and "choices" not in message:
            into.error = _error_type(message.get("error"))
            return
        if isinstance(message.get("model"), str):
            into.model = message["model"]
        if isinstance(message.get("id"), str):
            into.id = message["id"]
        for choice in message.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                into.finish_reasons.append(reason)
            if into.output is not None:
                part = choice.get("message") or choice.get("delta")
                into.add_text(part.get("content") if isinstance(part, dict) else choice.get("text"))
        self._usage(message.get("usage"), into)
        if not info.stream:
            into.done = True  # a whole JSON body that parsed is complete

    def _absorb_response(self, message: dict[str, Any], into: ResponseInfo) -> None:
        kind = message.get("type")
        if kind == "error":
            into.error = _error_type(message)
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
            if kind is None and into.output is not None:  # a whole response: its text is in `output`
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


def _error_type(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "error")
    return "error"


OPENAI = OpenAIDialect()
