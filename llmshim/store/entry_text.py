"""Reading an entry's JSON texts back, fast: a cache hit decodes them on every lookup.

A store writes an entry's headers and description with ``json.dumps`` (defaults: ASCII, ``", "``
and ``": "`` separators). Reading them with ``json.loads`` cost a hit more than the SQLite read
itself: ``loads``' Python wrappers, and the whole description (the request, up to 64 KB of its
body) when the hit needs only its last fields. So, each a pure function over the text:

- ``headers_of``: ``[["name", "value"], ...]`` as a list of pairs.
- ``outcome_of``: the description's trailing ``"status"``, ``"usage"`` and ``"estimator"`` fields,
  decoded alone, or None (the caller then decodes the whole description).
- ``decode``: ``json.loads`` through the decoder's scanner alone.

Every shortcut answers exactly what ``json.loads`` would for that text, or defers to it; a text
that is not JSON raises ValueError, which the cache turns into a miss.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["decode", "description", "headers_of", "outcome_of"]

#: The decoder's scanner (C when available): (value, end), or StopIteration where no value starts.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def decode(text: str) -> Any:
    """``json.loads(text)``, through the decoder's scanner alone for text as ``json.dumps`` writes
    it (no whitespace around it): ``loads`` spends more in its Python wrappers than in decoding a
    short text. Anything else takes ``json.loads``, which raises ValueError for what is not JSON."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else json.loads(text)


def headers_of(text: str) -> list[tuple[str, str]]:
    """``[tuple(pair) for pair in json.loads(text)]``: the stored [name, value] pairs. (Splitting
    the text on its delimiters instead was measured slower than the C scanner: 17.8k against 11.8k
    instructions for three headers.)"""
    return list(map(tuple, decode(text)))


#: ``json.dumps``' own spelling of the first field of what a write appends after the description.
_OUTCOME_START = '"status": '
#: How far from the end the outcome starts, at most, for the search to find it (status, two
#: counts and an estimator's name take under 150 characters): a long prompt is never searched.
_OUTCOME_WITHIN = 512


def outcome_of(meta_text: str) -> dict[str, Any] | None:
    """The trailing fields of a description as llmshim writes it (``{..., "status": ..., "usage":
    ..., "estimator": ...}``), decoded without the request before them; None when the text does
    not end that way (the caller then decodes it all). Pure.

    Sound whatever the request holds: a quote inside a JSON string is escaped, so the text
    ``"status": `` unescaped is a key; a key nested at depth d leaves d - 1 closing brackets after
    its object's end, which the decoder refuses as extra data. A successful decode therefore started
    at a top-level ``status`` key: the last one, since ``rfind`` finds it."""
    start = meta_text.rfind(_OUTCOME_START, max(0, len(meta_text) - _OUTCOME_WITHIN))
    if start < 0:
        return None
    try:
        decoded = decode("{" + meta_text[start:])
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def description(text: str) -> dict[str, Any]:
    """A whole description: a JSON object, else ValueError."""
    value = decode(text)
    if not isinstance(value, dict):
        raise ValueError(f"an entry's description is a JSON object, not {type(value).__name__}")
    return value
