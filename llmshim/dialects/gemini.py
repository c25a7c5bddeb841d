"""Google's Gemini wire: the Gemini API (``generativelanguage.googleapis.com``) and Vertex AI.

Routes are a model resource and an action, ``.../models/{model}:{action}``: ``/v1beta/models/M``
on the Gemini API, ``/v1/projects/P/locations/L/publishers/google/models/M`` on Vertex AI (and
``/v1beta1/publishers/google/models/M`` in its express mode). The model is read from the path,
never the body. Recognised actions and the body field each requires:

- ``generateContent`` (a whole JSON answer) and ``streamGenerateContent`` (SSE with ``?alt=sse``,
  the SDK's choice; without it, one JSON array sent piece by piece): ``contents``, a list of
  ``{"role", "parts"}`` objects. Sampling parameters sit in ``generationConfig``.
- ``embedContent`` (``content``, an object) and ``batchEmbedContents`` (``requests``, a list).
- ``countTokens`` (``contents``, or a whole ``generateContentRequest``): recognised so that it is
  seen and traced, but it is not a generation (``generates`` answers False): it is neither cached
  nor rate-limited as one, and its token count is not usage (nothing was generated).

Usage is ``usageMetadata``: ``promptTokenCount`` includes ``cachedContentTokenCount`` (the
convention llmshim's ``Usage`` shares with OpenAI); output tokens are ``candidatesTokenCount`` plus
``thoughtsTokenCount``, because Gemini reports the model's thinking apart from the answer but bills
it at the output rate (as OpenAI's ``completion_tokens`` include its reasoning tokens), so cost and
token budgets see what was spent. A stream repeats the usage on every chunk; the last one holds.

Errors are ``{"error": {"code", "message", "status"}}``; a 429 ``RESOURCE_EXHAUSTED`` may carry a
``google.rpc.RetryInfo`` detail (``"retryDelay": "12s"``) that says how long to wait, and a
``QuotaFailure`` naming a per-day quota, which no retry within minutes can help.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from ..call import CallInfo, ResponseInfo
from ._base import Dialect, count, positive_int

__all__ = ["GEMINI", "GeminiDialect", "retry_delay_seconds"]

# action -> (operation, endpoint, streams). The endpoint is the action itself: the cache key's route.
_ACTIONS: dict[str, tuple[str, bool]] = {
    "generateContent": ("generate_content", False),
    "streamGenerateContent": ("generate_content", True),
    "embedContent": ("embeddings", False),
    "batchEmbedContents": ("embeddings", False),
    "countTokens": ("count_tokens", False),
}
#: ``.../models/M:action`` or ``.../tunedModels/M:action``: the model resource and the action.
_ROUTE = re.compile(r"/(models|tunedModels)/([^/:]+):([A-Za-z]+)$")
#: Vertex AI's resource path for a publisher's model (the Gemini API has no ``publishers`` segment).
_VERTEX = re.compile(r"/projects/[^/]+/locations/[^/]+/publishers/|^/v1beta1/publishers/")
_VERTEX_PROVIDER = "gcp.vertex_ai"

# generationConfig field (both spellings proto JSON accepts) -> gen_ai.request.* suffix.
PARAMS = {
    "temperature": "temperature",
    "topP": "top_p", "top_p": "top_p",
    "topK": "top_k", "top_k": "top_k",
    "maxOutputTokens": "max_tokens", "max_output_tokens": "max_tokens",
    "seed": "seed",
    "stopSequences": "stop_sequences", "stop_sequences": "stop_sequences",
    "candidateCount": "choice.count", "candidate_count": "choice.count",
    "presencePenalty": "presence_penalty", "presence_penalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty", "frequency_penalty": "frequency_penalty",
    "outputDimensionality": "embeddings.dimension.count", "output_dimensionality": "embeddings.dimension.count",
}
_ROLES = {"model": "assistant"}
#: Finish reasons that say the generation failed: no usable answer, and the same request asked
#: again may well succeed (or the account, not the prompt, is the cause). Such an answer is the
#: call's error, never cached. The others are complete answers: the model's end or a limit
#: (``STOP``, ``MAX_TOKENS``, ``TOO_MANY_TOOL_CALLS``), or the provider's verdict on this prompt
#: (``SAFETY``, ``RECITATION``, ``PROHIBITED_CONTENT``...), cached as OpenAI's ``content_filter``
#: and Anthropic's ``refusal`` are.
_FAILED = frozenset({"FINISH_REASON_UNSPECIFIED", "OTHER", "MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL",
                     "MALFORMED_RESPONSE", "MISSING_THOUGHT_SIGNATURE", "IMAGE_OTHER", "NO_IMAGE",
                     "PUP_LIMITED_DISABLED"})
_RETRY_DELAY = re.compile(r"\s*(\d+(?:\.\d+)?)s\s*")


def _contents(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _generate_body(body: Mapping[str, Any]) -> bool:
    return _contents(body.get("contents"))


def _count_body(body: dict[str, Any]) -> bool:
    inner = body.get("generateContentRequest", body.get("generate_content_request"))
    return _generate_body(body) or (isinstance(inner, dict) and _generate_body(inner))


_SHAPES = {
    "generateContent": _generate_body,
    "streamGenerateContent": _generate_body,
    "embedContent": lambda body: isinstance(body.get("content"), dict),
    "batchEmbedContents": lambda body: _contents(body.get("requests")),
    "countTokens": _count_body,
}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _candidates(info: CallInfo) -> int:
    """How many candidates the request asked for (``candidateCount``; 1 when it does not say)."""
    params = info.param_source
    return positive_int(count(params.get("candidateCount", params.get("candidate_count")))) or 1


def _parts(content: Any) -> list[dict[str, Any]]:
    """A Gemini ``Content``'s parts in the GenAI spec's shape: text, tool calls, tool results."""
    parts = content.get("parts") if isinstance(content, dict) else None
    found: list[dict[str, Any]] = []
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict) or part.get("thought") is True:
            continue
        call = part.get("functionCall", part.get("function_call"))
        answer = part.get("functionResponse", part.get("function_response"))
        if isinstance(part.get("text"), str):
            found.append({"type": "text", "content": part["text"]})
        elif isinstance(call, dict):
            found.append({"type": "tool_call", "id": call.get("id"), "name": call.get("name"),
                          "arguments": call.get("args")})
        elif isinstance(answer, dict):
            found.append({"type": "tool_call_response", "id": answer.get("id"), "response": answer.get("response")})
    return found


def retry_delay_seconds(body: bytes) -> float | None:
    """The ``retryDelay`` of a ``google.rpc.RetryInfo`` detail in an error body (``"12s"``,
    ``"0.5s"``), in seconds; None when there is none or it cannot be read."""
    if b"retryDelay" not in body:
        return None
    for detail in _details(body):
        raw = detail.get("retryDelay")
        match = _RETRY_DELAY.fullmatch(raw) if isinstance(raw, str) and raw.isascii() else None
        if match is not None:
            return float(match.group(1))
    return None


def _details(body: bytes) -> list[dict[str, Any]]:
    try:
        error = json.loads(body).get("error")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return []
    details = error.get("details") if isinstance(error, dict) else None
    return [detail for detail in details if isinstance(detail, dict)] if isinstance(details, list) else []


class GeminiDialect(Dialect):
    # The Gemini API's gen_ai.provider.name: the wire's name for hosts llmshim.providers does not know.
    name = "gcp.gemini"
    suffixes = tuple(f":{action}" for action in _ACTIONS)
    param_names = PARAMS
    prompt_fields = ("systemInstruction", "system_instruction", "contents", "content", "requests",
                     "generateContentRequest")
    quota_statuses = frozenset({429})  # a per-day quota, and RetryInfo's delay, are read from its body

    def recognise(self, path: str, body: dict[str, Any]) -> CallInfo | None:
        route = _ROUTE.search(path)
        if route is None or route.group(3) not in _ACTIONS:
            return None
        resource, model, action = route.groups()
        if not _SHAPES[action](body):
            return None
        operation, streams = _ACTIONS[action]
        config = body.get("generationConfig", body.get("generation_config"))
        params = body if operation == "embeddings" else config if isinstance(config, dict) else {}
        info = self.call_info(operation=operation, endpoint=action, stream=streams, body=body, params=params,
                              model=model if resource == "models" else f"{resource}/{model}")
        if _VERTEX.search(path):  # the path alone says Vertex AI, whatever host serves it
            info = dataclasses.replace(info, provider=_VERTEX_PROVIDER)
        return info

    def input_messages(self, info: CallInfo) -> list[dict[str, Any]]:
        """``systemInstruction`` as the system message, then ``contents`` (role ``model`` is the
        assistant); an embedding's ``content`` as one user message."""
        body = info.body
        if info.endpoint == "countTokens" and not _generate_body(body):
            inner = body.get("generateContentRequest", body.get("generate_content_request"))
            body = inner if isinstance(inner, dict) else {}
        messages = []
        system = body.get("systemInstruction", body.get("system_instruction"))
        if isinstance(system, dict):
            messages.append({"role": "system", "parts": _parts(system)})
        contents = body.get("contents")
        if not isinstance(contents, list):
            contents = [body["content"]] if isinstance(body.get("content"), dict) else []
        for content in contents:
            if isinstance(content, dict):
                role = str(content.get("role") or "user")
                messages.append({"role": _ROLES.get(role, role), "parts": _parts(content)})
        return messages

    def generates(self, info: CallInfo) -> bool:
        return info.endpoint != "countTokens"

    def prompt_extras(self, info: CallInfo) -> list[Any]:
        """Function declarations and a response schema: the model reads them as tokens."""
        config = info.body.get("generationConfig", info.body.get("generation_config"))
        schema = config.get("responseSchema", config.get("response_schema")) if isinstance(config, dict) else None
        return [extra for extra in (info.body.get("tools"), schema) if extra is not None]

    def quota_exhausted(self, status: int, body: bytes) -> str | None:
        """A 429 whose ``QuotaFailure`` names only per-day quotas: the day's budget is spent, and
        no wait a retry can afford refills it."""
        if status != 429 or b"PerDay" not in body:
            return None
        violations = [violation for detail in _details(body) if str(detail.get("@type", "")).endswith("QuotaFailure")
                      for violation in detail.get("violations") or () if isinstance(violation, dict)]
        if violations and all("PerDay" in str(violation.get("quotaId", "")) for violation in violations):
            return "RESOURCE_EXHAUSTED (per day)"
        return None

    def retry_delay(self, status: int, body: bytes) -> float | None:
        return retry_delay_seconds(body) if status in self.quota_statuses else None

    def finished(self, info: CallInfo, into: ResponseInfo) -> bool:
        """Each candidate finishes on its own: the answer has ended when every one asked for has (a
        blocked prompt or a whole body is done outright)."""
        return into.done or len(into.finished_choices or ()) >= _candidates(info)

    def absorb(self, info: CallInfo, message: Any, event: str | None, into: ResponseInfo) -> None:
        if isinstance(message, list):  # a stream without alt=sse: one JSON array of responses
            for item in message:
                self.absorb(info, item, event, into)
            return
        if not isinstance(message, dict):
            return
        error = message.get("error")
        if error:  # Google's {"error": {...}}; a gateway's {"error": "..."} likewise
            into.error = str(error.get("status") or error.get("code") or "error") if isinstance(error, dict) \
                else "error"
            return
        if info.operation != "generate_content":  # embeddings and token counts: a whole answer
            into.done = True
            if info.operation == "embeddings":
                self._usage(message.get("usageMetadata"), into)
            return
        if isinstance(message.get("modelVersion"), str):
            into.model = message["modelVersion"]
        if isinstance(message.get("responseId"), str):
            into.id = message["responseId"]
        for candidate in message.get("candidates") or ():
            if not isinstance(candidate, dict):
                continue
            reason = candidate.get("finishReason")
            if isinstance(reason, str) and reason:  # an empty one finishes nothing
                into.finish_choice(count(candidate.get("index")), reason.lower())
                # Each candidate finishes on its own: the answer is whole when all asked for have.
                into.done = into.done or self.finished(info, into)
                if reason.upper() in _FAILED:
                    into.error = into.error or reason.lower()
            for part in _parts(candidate.get("content")):  # add_text keeps it only where it is wanted
                if part["type"] == "tool_call":  # a function call's arguments: generated, for the tally
                    into.add_generated(json.dumps(part.get("arguments"), ensure_ascii=False))
                else:
                    into.add_text(part.get("content"))
        feedback = message.get("promptFeedback")
        if isinstance(feedback, dict) and isinstance(feedback.get("blockReason"), str):
            into.done = True  # the prompt was blocked: this is the whole answer
        self._usage(message.get("usageMetadata"), into)
        if not info.stream:
            into.done = True  # a whole JSON body that parsed is complete

    @staticmethod
    def _usage(usage: Any, into: ResponseInfo) -> None:
        """Input: the prompt (cached content included) and any tool-use prompt; output: the answer
        and the thinking (both billed as output)."""
        if not isinstance(usage, dict):
            return
        prompt, tool_prompt = _int(usage.get("promptTokenCount")), _int(usage.get("toolUsePromptTokenCount"))
        answer, thoughts = _int(usage.get("candidatesTokenCount")), _int(usage.get("thoughtsTokenCount"))
        cached = _int(usage.get("cachedContentTokenCount"))
        if prompt is not None or tool_prompt is not None:
            into.usage.input_tokens = (prompt or 0) + (tool_prompt or 0)
        if answer is not None or thoughts is not None:
            into.usage.output_tokens = (answer or 0) + (thoughts or 0)
        if cached is not None:
            into.usage.cached_input_tokens = cached


GEMINI = GeminiDialect()
