"""Estimated token counts, for calls whose provider reported none.

Most OpenAI-compatible streams are requested without ``stream_options.include_usage`` (LangChain,
LiteLLM and the SDK send none by default), so their answers carry no token counts. llmshim does not
change the request to ask for them (see README, "Tokens for streams without usage"); it *estimates*:
input tokens from the request's messages, output tokens from the text the answer streamed. An
estimate is flagged wherever it goes (``llmshim.usage.estimator`` on the span, ``estimator`` on the
call record, ``estimated_*`` in ``stats()``) and never written to ``gen_ai.usage.*``, which means
"what the provider reported".

How: with ``tiktoken`` installed and knowing the model (``tiktoken.encoding_name_for_model``: the
GPT family), the model's own encoding counts the text, with OpenAI's documented chat framing (3
tokens per message, 3 to prime the reply). Otherwise (an unknown model, no tiktoken, or its
encoding file not loadable), :func:`approximate`, which counts GPT-style word pieces for ASCII
text and UTF-8 bytes for the rest: within about 15 % of ``cl100k_base`` for English, French, JSON
and code, 25 % for Russian, Chinese, Japanese, Korean and Hindi, up to a third under for German
and Arabic (other models' tokenizers differ more: it is an estimate, and flagged as one).

tiktoken loads an encoding from a file it downloads once and caches (``TIKTOKEN_CACHE_DIR``), so an
encoding is loaded on a background thread, never inside a call: the first calls of a process may be
estimated by the approximation until it is ready (:func:`load` waits for it, for programs that want
tiktoken's counts from the first call). An encoding that fails to load is not asked for again.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .call import Usage

if TYPE_CHECKING:
    from .call import CallInfo, ResponseInfo

__all__ = ["APPROXIMATION", "GENERATIONS", "TextTally", "approximate", "count", "encoding_for", "estimate", "load",
           "prompt_tokens", "tally_for"]

#: The estimator's name when no tiktoken encoding counted the text.
APPROXIMATION = "approximation"
#: The operations whose answers are generated text, which an estimate can count.
GENERATIONS = frozenset({"chat", "text_completion", "generate_content"})
#: OpenAI's chat framing, as its cookbook counts it: tokens per message and to prime the reply.
MESSAGE_TOKENS = 3
REPLY_TOKENS = 3

_lock = threading.Lock()
_encodings: dict[str, Any] = {}  # encoding name -> tiktoken Encoding, or None once it failed to load
_loaders: dict[str, threading.Thread] = {}


#: ASCII text cut as GPT tokenizers pre-split it (a word with its leading space, up to 3 digits, a
#: run of punctuation, whitespace): for English prose and code each piece is about one token.
_ASCII_PIECE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*|\s+(?!\S)|\s+")


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def approximate(text: str) -> float:
    """Tokens in ``text`` without a tokenizer. ASCII: one per pre-split piece (``_ASCII_PIECE``; a
    run of other characters splits a word, as ``è`` splits ``lumière``), one more per 8 letters of a
    long word; every other character: 0.55 per UTF-8 byte past its first (about ½ for Cyrillic,
    Greek or Arabic letters, 1 for CJK, Hangul or Devanagari, 1½ for an emoji). Against
    ``cl100k_base``: English, French, JSON and code within about 15 %; Russian, Chinese, Japanese,
    Korean and Hindi within about 25 %; German (long compounds) and Arabic up to a third under."""
    pieces = _ASCII_PIECE.findall(_NON_ASCII.sub(" ", text))
    long_words = sum(len(piece.lstrip(" ")) // 8 for piece in pieces if len(piece) > 8)
    extra_bytes = len(text.encode("utf-8", "surrogatepass")) - len(text)
    return len(pieces) + long_words + 0.55 * extra_bytes


@functools.lru_cache(maxsize=256)
def _encoding_name(model: str) -> str | None:
    if importlib.util.find_spec("tiktoken") is None:
        return None
    try:
        name: str = importlib.import_module("tiktoken").encoding_name_for_model(model)
    except Exception:  # KeyError: tiktoken does not know the model
        return None
    return name


def _load(name: str) -> None:
    try:
        encoding = importlib.import_module("tiktoken").get_encoding(name)
    except Exception:  # no network for the first download, a bad cache file: approximate instead
        encoding = None
    _encodings[name] = encoding


def encoding_for(model: str | None, *, wait: float | None = 0.0) -> Any | None:
    """The tiktoken encoding of ``model`` if it is loaded, else None. The first ask for an encoding
    starts loading it on a thread (joined at exit); ``wait``: seconds to wait for it (None: until
    loaded). Never raises."""
    name = _encoding_name(model) if model else None
    if name is None:
        return None
    if name in _encodings:
        return _encodings[name]
    with _lock:
        loader = _loaders.get(name)
        if loader is None:
            loader = _loaders[name] = threading.Thread(target=_load, args=(name,), name="llmshim-tokenizer",
                                                       daemon=True)
            loader.start()
            import atexit  # an interpreter ending inside a daemon thread's import can abort;

            atexit.register(loader.join, 2.0)  # a download that hangs delays the exit 2 s at most
    if wait is None or wait > 0:
        loader.join(wait)
    return _encodings.get(name)


def _forget_loaders_in_child() -> None:
    """A forked child has none of its parent's threads: a load the parent had under way would never
    end in the child, so it is forgotten there (asked again on the next estimate)."""
    global _lock
    _lock = threading.Lock()
    for name in [name for name in _loaders if name not in _encodings]:
        del _loaders[name]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loaders_in_child)


def load(model: str, timeout: float | None = 30.0) -> bool:
    """Load ``model``'s tiktoken encoding now, so estimates use it from the first call. True when
    tiktoken knows the model and its encoding loaded."""
    return encoding_for(model, wait=timeout) is not None


def _encode_count(encoding: Any, text: str) -> int:
    # disallowed_special=(): a user's text that contains "<|endoftext|>" is text, not an error
    return len(encoding.encode(text.encode("utf-8", "replace").decode("utf-8"), disallowed_special=()))


def count(texts: Iterable[str], model: str | None) -> tuple[int, str]:
    """(tokens, estimator) of ``texts`` for ``model``: tiktoken's encoding name, or
    :data:`APPROXIMATION`."""
    encoding = encoding_for(model)
    if encoding is not None:
        try:
            return sum(_encode_count(encoding, text) for text in texts), f"tiktoken:{encoding.name}"
        except Exception:
            pass
    return round(sum(approximate(text) for text in texts)), APPROXIMATION


def prompt_tokens(messages: Sequence[dict[str, Any]], extras: Sequence[Any], model: str | None,
                  *, chat: bool) -> tuple[int, str]:
    """(tokens, estimator) of a prompt: ``messages`` in the GenAI shape (``{"role", "parts": [{"type":
    "text", "content"}]}``, from the dialect), ``extras`` (tool definitions and the like, counted as
    their JSON), with the chat framing when ``chat``."""
    texts: list[str] = []
    for message in messages:
        if chat:
            texts.append(str(message.get("role", "")))
        texts.extend(str(part.get("content", "")) for part in message.get("parts", ()) if isinstance(part, dict))
    texts.extend(json.dumps(extra, ensure_ascii=False) for extra in extras)
    tokens, estimator = count(texts, model)
    if chat:
        tokens += MESSAGE_TOKENS * len(messages) + REPLY_TOKENS
    return tokens, estimator


class TextTally:
    """The text an answer generated, kept to be counted only if the provider reports no usage.

    Memory stays bounded whatever the answer's size: past ``keep`` characters the pieces held are
    counted (by the approximation: no tokenizer runs inside a read) and dropped. Most answers are
    far smaller, and most carry usage, so the pieces are only held, never counted."""

    __slots__ = ("_chars", "_counted", "_keep", "_pieces")

    def __init__(self, keep: int = 256 * 1024) -> None:
        self._pieces: list[str] = []
        self._chars = 0
        self._counted = 0.0  # approximate tokens of pieces already dropped
        self._keep = keep

    def add(self, text: str) -> None:
        self._pieces.append(text)
        self._chars += len(text)
        if self._chars > self._keep:
            self._counted += approximate("".join(self._pieces))
            self._pieces, self._chars = [], 0

    def tokens(self, model: str | None) -> tuple[int, str]:
        """(tokens, estimator) of everything added."""
        if self._counted:
            return round(self._counted + approximate("".join(self._pieces))), APPROXIMATION
        return count(["".join(self._pieces)], model)


def estimate(info: CallInfo, response: ResponseInfo) -> None:
    """Fill ``response.estimated`` and ``response.estimator`` for a generation whose provider
    reported no usage (the tally is then dropped: the estimate is all that is kept of it). Never
    raises: a call without an estimate is a call without token counts, as before."""
    tally, response.tally = response.tally, None
    if tally is None or response.tokens is not None:
        return
    try:
        model = response.model or info.model
        dialect = info.dialect
        extras = dialect.prompt_extras(info) if dialect is not None else []
        input_tokens, input_estimator = prompt_tokens(info.input_messages, extras, model, chat=info.operation == "chat")
        output_tokens, output_estimator = tally.tokens(model)
    except Exception:
        return
    response.estimated = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    response.estimator = input_estimator if input_estimator == output_estimator else APPROXIMATION


def tally_for(info: CallInfo) -> TextTally | None:
    """A tally for a generation's answer (None for embeddings and the like). When the dialect says
    the answer will carry no usage, the model's tokenizer starts loading now, on its thread."""
    if info.operation not in GENERATIONS:
        return None
    dialect = info.dialect
    if dialect is not None and not dialect.reports_usage(info):
        encoding_for(info.model)
    return TextTally()
