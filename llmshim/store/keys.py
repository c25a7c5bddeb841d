"""Cache keys: pure functions over a call, no I/O and no clock.

A key is the sha256 of canonical JSON over everything that can change the answer and nothing that
cannot:

- the key-schema version, the dialect (provider) and its endpoint, the HTTP method;
- the normalised URL (scheme and host lower-cased, default port dropped, query sorted) — the
  same request to another server or path is another request;
- the output-affecting headers (``OpenAI-Organization``, ``OpenAI-Project``, ``OpenAI-Beta``);
- the credential scope: an HMAC of the API key under a per-cache salt (so the key is never
  stored, and two caches never agree on a scope), or ``"shared"`` when the user opts in;
- the whole request body, canonicalised (keys sorted at every depth; ``1`` and ``1.0`` equal),
  minus a short denylist of fields that cannot change the answer (``user``, ``metadata``,
  ``store``, ``service_tier``, ``keep_alive``, ...).

Transport noise — ``x-stainless-*``, ``traceparent``, ``user-agent``, idempotency keys — never
enters the key, because only the headers named above are read at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..call import Call

__all__ = ["BODY_DENYLIST", "KEY_VERSION", "OUTPUT_HEADERS", "cache_key", "canonical", "credential_of",
           "credential_scope", "normalise_url"]

KEY_VERSION = 1

#: Request fields that cannot change the answer: identification, storage and routing hints.
BODY_DENYLIST = frozenset({
    "user", "metadata", "store", "service_tier", "keep_alive", "prompt_cache_key", "safety_identifier",
})

#: Headers that select the account, project or API behaviour, and so the answer.
OUTPUT_HEADERS = ("openai-organization", "openai-project", "openai-beta")

#: Where each dialect's client puts the credential.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")


def canonical(value: Any) -> Any:
    """The value with dict keys sorted at every depth and integral floats turned into ints."""
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalise_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        netloc += f":{port}"
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return urlunsplit((scheme, netloc, parts.path.rstrip("/") or "/", query, ""))


def credential_of(headers: tuple[tuple[str, str], ...]) -> str | None:
    """The credential a request carries (whatever header its client used), or None."""
    for name, value in headers:
        if name.lower() in CREDENTIAL_HEADERS and value:
            return value
    return None


def credential_scope(credential: str | None, salt: bytes) -> str:
    """An HMAC of the credential under the cache's salt: stable per key, useless without the salt."""
    if credential is None:
        return "anonymous"
    return hmac.new(salt, credential.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]


def key_material(call: Call, salt: bytes, shared: bool) -> dict[str, Any]:
    """What the key is made of, as plain values (also shown, redacted, by ``llmshim cache show``)."""
    request = call.request
    headers = {name.lower(): value for name, value in request.headers if name.lower() in OUTPUT_HEADERS}
    body = {k: v for k, v in call.info.body.items() if k not in BODY_DENYLIST}
    return {
        "v": KEY_VERSION,
        "dialect": call.info.provider,
        "endpoint": call.info.endpoint,
        "method": request.method.upper(),
        "url": normalise_url(request.url),
        "headers": dict(sorted(headers.items())),
        "scope": "shared" if shared else credential_scope(credential_of(request.headers), salt),
        "body": canonical(body),
    }


def cache_key(call: Call, salt: bytes, shared: bool = False) -> str:
    material = key_material(call, salt, shared)
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()


def summary(call: Call) -> Mapping[str, Any]:
    """A redacted description of the request for ``llmshim cache ls/show``: never headers."""
    return {"provider": call.info.provider, "endpoint": call.info.endpoint, "model": call.info.model,
            "stream": call.info.stream, "url": call.request.public_url,
            "body": {k: v for k, v in call.info.body.items() if k not in BODY_DENYLIST}}
