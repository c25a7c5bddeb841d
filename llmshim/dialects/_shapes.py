"""Body shapes: what a request body must look like before a dialect calls it an LLM call.

A path suffix alone proves nothing (``POST /api/tasks/7/completions`` on a to-do API ends like an
OpenAI route), so each route names the fields its dialect requires, with their types. The checks
are strict on purpose: a body that does not have the shape passes through untouched and is never
cached; a real client always sends the shape (the OpenAI SDK, the ollama client, llama.cpp's own
web UI, and the recorded traffic in ``tests/test_cassettes.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Check", "flag_ok", "messages", "model_ok", "obj", "prompt", "text", "tokens_or_texts"]

Check = Callable[[Any], bool]


def text(value: Any) -> bool:
    return isinstance(value, str)


def obj(value: Any) -> bool:
    return isinstance(value, dict)


def messages(value: Any) -> bool:
    """A chat history: a list of objects, each with a string ``role``."""
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)


def _token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tokens_or_texts(value: Any) -> bool:
    """A prompt or embedding input: a string, or a list of strings, token ids or lists of token ids."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    return all(isinstance(item, str) or _token(item)
               or (isinstance(item, list) and all(_token(t) for t in item)) for item in value)


def prompt(value: Any) -> bool:
    """llama.cpp's native prompt: also mixed lists and multimodal objects ({prompt_string, ...})."""
    return isinstance(value, (str, dict)) or (isinstance(value, list) and all(
        isinstance(item, (str, dict, list)) or _token(item) for item in value))


def model_ok(body: Mapping[str, Any], required: bool) -> bool:
    """``model`` is a string; absent only where the route allows it."""
    model = body.get("model")
    return isinstance(model, str) or (model is None and "model" not in body and not required)


def flag_ok(body: Mapping[str, Any], name: str = "stream") -> bool:
    """An optional boolean flag is a boolean (or null): ``"stream": "yes"`` is not a shape we read."""
    return body.get(name) is None or isinstance(body.get(name), bool)
