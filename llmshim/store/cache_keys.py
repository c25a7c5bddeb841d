"""Cache keys: pure functions over a call, no I/O and no clock.

A key is an HMAC, under the cache's salt, of canonical JSON over everything that can change the
answer. Two requests share a key only when they are the same request after this normalisation:

- **Body**: exactly the bytes on the wire, parsed as UTF-8 JSON. Whitespace and string escapes do
  not matter (``"\\u00e9"`` and ``"é"`` are one JSON value); every code point does, lone surrogates
  included (the key text is ASCII-escaped, never encoded with ``surrogateescape`` or latin-1).
  Object keys keep their order at every depth (property order drives structured output and
  grammar-constrained decoding) and duplicate keys are all kept, in order. An integer (``1``) is
  never a fraction or exponent (``1.0``, ``1e0``): servers typed in Go, Rust or C++ (and strict
  schemas) refuse ``"max_tokens": 100.0`` yet answer ``100``. Among themselves, integers are equal
  when they are the same integer (``-0`` is ``0``), the others when they are the same decimal value,
  sign of zero included (``1.0``, ``10e-1`` are equal; ``1.0000000000000001`` is not ``1.0``, nor
  ``-0.0`` ``0.0``). A top-level field is left out only where the call's dialect
  (``cache_ignored_fields``) proves that it cannot change what the server returns or keeps.
- **Headers**: deny by default. Every request header enters the key except ``NOISE_HEADERS`` /
  ``NOISE_PREFIXES`` (transport, tracing, SDK telemetry, idempotency keys) and the names a user adds
  with ``LLMSHIM_CACHE_IGNORE_HEADERS``; a header whose name looks like a credential can never be
  ignored. Credentials (URL user info, and query parameters named like one: Gemini's ``?key=``)
  make the *scope*: an HMAC under the salt, or ``"shared"`` when the user opts in to one answer
  for every credential.
- **URL**: scheme and host lower-cased, default port dropped; path and query exactly as sent, but
  for the credential parameters, which the scope holds instead.

The material is never stored: only the HMAC of it is, so no header value or secret leaves memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import redact
from ..call import Call

__all__ = ["CREDENTIAL_HEADERS", "KEY_VERSION", "NOISE_HEADERS", "NOISE_PREFIXES", "cache_key",
           "canonical_body", "credential_of", "hmac_sha256_hex", "is_credential_header", "key_material",
           "parse_ignored_headers", "split_headers", "split_query", "summary"]

KEY_VERSION = 2

# -- body --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([-+]?[0-9]+))?")


#: Integers with at most this many characters are written as plain JSON integers (the common case,
#: and cheap); longer ones as ``{"i": "<digits>"}``.
_INT_DIGITS = 40


def _number(text: str) -> dict[str, str]:
    """A JSON number with a fraction or an exponent as ``{"n": "<sign><digits>e<exponent>"}``, its
    exact decimal value; a zero keeps its sign (``-0.0`` is another double than ``0.0``).

    Pure string arithmetic: ``Decimal`` refuses huge exponents and floats round. A number whose
    exponent is too long for ``int`` keeps its own text (equal only to the same spelling)."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        return {"r": text}
    sign, whole, fraction, exponent = match.groups()
    digits = (whole + (fraction or "")).lstrip("0")
    if not digits:
        return {"n": sign + "0"}
    try:
        power = int(exponent or 0) - len(fraction or "")
    except ValueError:
        return {"r": text}
    significant = digits.rstrip("0")
    power += len(digits) - len(significant)
    return {"n": f"{sign}{significant}e{power}"}


def _int(text: str) -> int | dict[str, str]:
    """A JSON integer: itself, unless too long to be written plainly (see ``_INT_DIGITS``); never
    equal to a number written with a fraction or an exponent (``_number``)."""
    return int(text) if len(text) <= _INT_DIGITS else {"i": text}  # JSON spells an integer one way


#: An object's pairs as ``{"o": pairs}``: ``dict.fromkeys(("o",), pairs)``, called from C without a
#: Python frame (a request has an object per message, a hook call each).
_object: Callable[[list[tuple[str, Any]]], dict[str, Any]] = functools.partial(dict.fromkeys, ("o",))


def _constant(text: str) -> dict[str, str]:  # NaN, Infinity, -Infinity: not JSON, but Python parses them
    return {"c": text}


_canonical_decoder = json.JSONDecoder(object_pairs_hook=_object, parse_float=_number, parse_int=_int,
                                      parse_constant=_constant)
_canonical_scan: Callable[[str, int], tuple[Any, int]] = _canonical_decoder.scan_once  # type: ignore[attr-defined]
#: The one encoder of every canonical text: ``json.dumps`` with arguments builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def _parse_canonical(text: str) -> Any:
    """``_canonical_decoder.decode(text)``; a text without whitespace around it (what clients
    send) straight through the scanner, as ``decode`` would after skipping none."""
    try:
        value, end = _canonical_scan(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else _canonical_decoder.decode(text)


def canonical_body(raw: bytes, ignored: frozenset[str] = frozenset()) -> str:
    """The body's canonical text (see the module docstring), top-level ``ignored`` fields removed.

    Every JSON type maps to a distinct shape, so the text is injective on JSON values: an object
    is ``{"o": [[key, value], ...]}`` (order and duplicates kept), an integer itself (or
    ``{"i": "<digits>"}``: ``_int``), any other number ``{"n": "<digits>e<exponent>"}``
    (``_number``), an array a list, a string a string.
    ``ensure_ascii`` escapes every non-ASCII code point, lone surrogates included.
    Raises ValueError for a body that is not UTF-8 JSON."""
    value = _parse_canonical(raw.decode("utf-8"))
    if ignored and isinstance(value, dict) and "o" in value:
        value = {"o": [pair for pair in value["o"] if pair[0] not in ignored]}
    return _encode(value)


# -- headers -----------------------------------------------------------------------------------

#: Request headers that never change the answer: transport, tracing, SDK telemetry, idempotency.
NOISE_HEADERS = frozenset({
    "accept", "accept-encoding", "connection", "content-length", "expect", "keep-alive", "proxy-connection",
    "te", "transfer-encoding", "upgrade", "user-agent",
    "traceparent", "tracestate", "baggage", "sentry-trace", "b3", "uber-trace-id", "x-amzn-trace-id",
    "x-cloud-trace-context", "elastic-apm-traceparent", "newrelic", "x-request-id", "request-id",
    "x-correlation-id", "x-client-request-id",
    "idempotency-key", "x-idempotency-key",
    "x-goog-api-client",  # google-genai's SDK and Python versions, as x-stainless-* are the OpenAI SDK's
})
#: Header name prefixes that are noise likewise (``x-llmshim-*`` are llmshim's own controls).
NOISE_PREFIXES = ("x-stainless-", "x-b3-", "x-datadog-", "uberctx-", "x-llmshim-")

#: Headers that carry a credential in the clients llmshim knows; any name matching
#: ``_CREDENTIAL_NAME`` counts too. They make the scope and can never be ignored.
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "api-key", "x-api-key", "x-goog-api-key", "cookie",
    "ocp-apim-subscription-key",
})
_CREDENTIAL_NAME = re.compile(r"key|token|secret|auth|cookie|session|passw|credential|signature|jwt|bearer")
_HEADER_NAME = re.compile(r"[!#$%&'+.^_`|~0-9a-z-]+\*?")


def is_credential_header(name: str) -> bool:
    """A known credential header, or any name that looks like one (the noise list's own
    ``idempotency-key`` excepted); ``x-datadog-api-key`` is a credential despite its prefix."""
    lowered = name.lower()
    if lowered in CREDENTIAL_HEADERS:
        return True
    return lowered not in NOISE_HEADERS and _CREDENTIAL_NAME.search(lowered) is not None


def parse_ignored_headers(raw: Any) -> frozenset[str]:
    """``LLMSHIM_CACHE_IGNORE_HEADERS``: comma-separated header names, ``x-trace-*`` for a prefix.

    Raises ValueError for a malformed name or one that looks like a credential: ignoring those
    would let one tenant's answer reach another."""
    items = [str(x) for x in raw] if isinstance(raw, (list, tuple, set, frozenset)) else str(raw or "").split(",")
    names = {item.strip().lower() for item in items if item.strip()}
    for name in sorted(names):
        if not _HEADER_NAME.fullmatch(name) or name == "*":
            raise ValueError(f"comma-separated header names (a trailing * for a prefix); {name!r} is not one")
        if is_credential_header(name.rstrip("*")):
            raise ValueError(f"header names that are not credentials; {name!r} looks like a credential "
                             "(key/token/secret/auth/cookie/session...) and is always part of the cache scope")
    return frozenset(names)


def _noise(name: str, ignored: frozenset[str]) -> bool:
    if name in NOISE_HEADERS or name.startswith(NOISE_PREFIXES) or name in ignored:
        return True
    return any(pattern.endswith("*") and name.startswith(pattern[:-1]) for pattern in ignored)


_CREDENTIAL, _HOST, _NOISE, _KEPT = range(4)
#: Per set of ignored headers, each header name as sent -> (its kind, lower-cased). Names repeat on
#: every call (an SDK sends the same dozen or more); values are never kept here. Bounded: when
#: full it is emptied, and the names in use are learnt again.
_KINDS: dict[frozenset[str], dict[str, tuple[int, str]]] = {}
_KINDS_PER_SET = 1024


def _kind(lowered: str, ignored: frozenset[str]) -> int:
    if is_credential_header(lowered):
        return _CREDENTIAL
    if _noise(lowered, ignored):
        return _NOISE
    return _HOST if lowered == "host" else _KEPT  # Host: kept unless it names the URL's own host


def _first(item: tuple[str, str]) -> str:
    return item[0]


def split_headers(headers: Iterable[tuple[str, str]], authority: str, ignored: frozenset[str] = frozenset(),
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(headers that select the answer, credential headers), each sorted by name (the relative order
    of repeated names kept); noise dropped. ``Host`` is noise only when it names the URL's own host."""
    kinds = _KINDS.get(ignored)
    if kinds is None:
        kinds = _KINDS.setdefault(ignored, {}) if len(_KINDS) < 64 else {}
    kept: list[tuple[str, str]] = []
    credentials: list[tuple[str, str]] = []
    for name, value in headers:
        known = kinds.get(name)
        if known is None:
            lowered = name.lower()
            known = (_kind(lowered, ignored), lowered)
            if len(kinds) >= _KINDS_PER_SET:  # full: begin again with the names in use now
                kinds.clear()
            kinds[name] = known
        kind, lowered = known
        if kind == _KEPT or (kind == _HOST and value.lower() != authority):
            kept.append((lowered, value))
        elif kind == _CREDENTIAL:
            credentials.append((lowered, value))
    kept.sort(key=_first)
    credentials.sort(key=_first)
    return kept, credentials


_API_KEY_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")


def credential_of(headers: tuple[tuple[str, str], ...], url: str = "") -> str | None:
    """The API key a request carries in a provider's own header, else in its URL's ``key``
    query parameter (Gemini's ``?key=``), or None: rate limiting budgets per API key (a session
    cookie must not split one key's budget)."""
    for name, value in headers:
        if name.lower() in _API_KEY_HEADERS and value:
            return value
    _, credentials = split_query(urlsplit(url).query) if "?" in url else ("", [])
    return next((value for name, value in credentials if name == "key" and value), None)


def split_query(query: str) -> tuple[str, list[tuple[str, str]]]:
    """(the query without its credential parameters, exactly as sent otherwise; those parameters
    as (name, raw value) pairs). A parameter is a credential's when its name is one a header's
    would be (``key``, ``api_key``, ``access_token``...)."""
    if not query:
        return query, []
    kept: list[str] = []
    credentials: list[tuple[str, str]] = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name and is_credential_header(name):
            credentials.append((name, value))
        else:
            kept.append(pair)
    return ("&".join(kept), credentials) if credentials else (query, [])


# -- URL and key -------------------------------------------------------------------------------

#: ``normalise_url`` of URLs without user info or query (never a credential): the few endpoints
#: a program calls, each normalised once. Bounded: emptied when full.
_PLAIN_URLS: dict[str, tuple[str, str, str]] = {}
_PLAIN_URLS_MAX = 256


def normalise_url(url: str) -> tuple[str, str, str]:
    """(URL without user info, its authority ``host[:port]``, the user info): scheme and host
    lower-cased, default port dropped, path and query exactly as sent, fragment dropped."""
    known = _PLAIN_URLS.get(url)
    if known is not None:
        return known
    normalised = _normalise_url(url)
    if "@" not in url and "?" not in url:
        if len(_PLAIN_URLS) >= _PLAIN_URLS_MAX:  # full: begin again with the URLs in use now
            _PLAIN_URLS.clear()
        _PLAIN_URLS[url] = normalised
    return normalised


def _normalise_url(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    authority = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        authority += f":{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit((scheme, authority, parts.path or "/", parts.query, "")), authority, userinfo


def _url_credentials(url: str) -> tuple[str, list[tuple[str, str]]]:
    """(the normalised URL without credential query parameters, those parameters as ``?name``
    pairs for the scope). The URL is untouched when its query names no credential."""
    if "?" not in url:
        return url, []
    parts = urlsplit(url)
    query, found = split_query(parts.query)
    if not found:
        return url, []
    return urlunsplit(parts._replace(query=query)), [("?" + name, value) for name, value in found]


def _text(value: Any) -> str:
    return _encode(value)


#: Per user setting, the ignored header names that may be ignored (never a credential's).
_IGNORABLE: dict[frozenset[str], frozenset[str]] = {}


def _ignorable(ignored_headers: frozenset[str]) -> frozenset[str]:
    if not ignored_headers:
        return ignored_headers
    found = _IGNORABLE.get(ignored_headers)
    if found is None:
        found = frozenset(name for name in ignored_headers if not is_credential_header(name.rstrip("*")))
        if len(_IGNORABLE) < 64:
            _IGNORABLE[ignored_headers] = found
    return found


#: Bodies above this size are keyed by their exact bytes rather than their normalised JSON: the
#: normalisation would build three more copies of a body this big (a JSON text never starts with
#: "exact:", so the two forms cannot meet).
EXACT_BODY_BYTES = 1024 * 1024


def key_material(call: Call, salt: bytes, shared: bool, ignored_headers: frozenset[str] = frozenset(),
                 ) -> tuple[str, str]:
    """What the key is made of, as canonical ASCII texts: (everything but the body, the body).
    Never stored: the key is an HMAC of them."""
    request = call.request
    url, authority, userinfo = normalise_url(request.url)
    ignored_headers = _ignorable(ignored_headers)
    headers, credentials = split_headers(request.headers, authority, ignored_headers)
    url, query_credentials = _url_credentials(url)
    credentials += query_credentials  # appended only when present: other keys stay as they were
    if shared:
        scope = "shared"
    elif credentials or userinfo:
        scope = hmac_sha256_hex(salt, _text([credentials, userinfo]).encode("ascii"))
    else:
        scope = "anonymous"
    fields = call.dialect.cache_ignored_fields(call.info)  # routing hints the server never acts on
    # the wire's name, not the provider's: naming providers from hosts must not change any key
    head = _text([KEY_VERSION, call.dialect.name, call.info.endpoint, request.method.upper(), url, headers, scope])
    if len(request.body) > EXACT_BODY_BYTES:  # stricter, never looser: no second parse of a huge body
        return head, "exact:" + hashlib.sha256(request.body).hexdigest()
    return head, canonical_body(request.body, fields)


_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))  # bytes.translate tables: the key XOR 0x36, XOR 0x5c
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))
#: Per salt, SHA-256 states that have already hashed the key's inner and outer pads. Holds only salts
#: (one per cache store, which holds it too); bounded.
_PADS: dict[bytes, tuple[Any, Any]] = {}


def hmac_sha256_hex(salt: bytes, message: bytes) -> str:
    """``hmac.digest(salt, message, "sha256").hex()``, from SHA-256 states primed once per salt with
    the key's pads (RFC 2104): OpenSSL 3 looks the digest up by name on every one-shot call, which
    costs about as much as hashing a request (30 k instructions here against 20 k)."""
    pads = _PADS.get(salt)
    if pads is None:
        key = (hashlib.sha256(salt).digest() if len(salt) > 64 else salt).ljust(64, b"\0")
        pads = (hashlib.sha256(key.translate(_INNER_PAD)), hashlib.sha256(key.translate(_OUTER_PAD)))
        if len(_PADS) >= 8:  # full: begin again with the salts in use now
            _PADS.clear()
        _PADS[salt] = pads
    inner = pads[0].copy()  # the primed states are never updated: copies from any thread are safe
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return str(outer.hexdigest())


def cache_key(call: Call, salt: bytes, shared: bool = False, ignored_headers: frozenset[str] = frozenset()) -> str:
    """HMAC-SHA256 under the cache's salt of the material; the head is one JSON line without a
    raw newline (``ensure_ascii``), so the separator cannot be forged by a header or URL.

    The same request sent again (a hit, a coalesced follower) gets its key from a memo: SHA-256 of
    the request exactly as sent (method, URL, headers, body, the dialect's name and endpoint; one
    memo per salt, scope setting and ignored headers: everything the key is a function of) names the
    key worked out the first time. The parts are joined with NUL, so a request where any part holds
    a NUL itself is not memoised (its joined text could be another request's); the body follows the
    head's length. Several times cheaper than the canonical body and two HMACs; the memo holds
    digests and keys only, never a header value. Bodies over ``MEMO_BODY_BYTES`` are not memoised."""
    request = call.request
    if len(request.body) > MEMO_BODY_BYTES:
        return _cache_key(call, salt, shared, ignored_headers)
    memo = _KEYS.get((salt, shared, ignored_headers))
    if memo is None:
        if len(_KEYS) >= 16:  # settings that come and go (tests): begin again
            _KEYS.clear()
        memo = _KEYS.setdefault((salt, shared, ignored_headers), {})
    parts = [call.dialect.name, call.info.endpoint, request.method, request.url, *chain.from_iterable(request.headers)]
    head = "\0".join(parts)
    if head.count("\0") != len(parts) - 1:  # a part holds NUL itself: the joined text could be another's
        return _cache_key(call, salt, shared, ignored_headers)
    raw = head.encode("utf-8", "surrogatepass")
    digest = _SHA256.copy()  # a copy of an empty state: hashlib.sha256() looks the digest up by name
    digest.update(len(raw).to_bytes(8, "big"))  # the head's length: where the body begins
    digest.update(raw)
    digest.update(request.body)
    sent = digest.digest()
    key = memo.get(sent)
    if key is None:
        key = _cache_key(call, salt, shared, ignored_headers)
        if len(memo) >= MEMO_KEYS:  # full: begin again with the requests in use now
            memo.clear()
        memo[sent] = key
    return key


#: Bodies up to this size have their keys memoised (see ``cache_key``); bigger ones are rarely
#: repeated and hashing them whole again costs what the memo would save.
MEMO_BODY_BYTES = 64 * 1024
MEMO_KEYS = 4096
_SHA256 = hashlib.sha256()  # never updated: copies from any thread are safe
#: Per (salt, shared, ignored headers): SHA-256 of a request as sent -> its key.
_KEYS: dict[tuple[bytes, bool, frozenset[str]], dict[bytes, str]] = {}


def _cache_key(call: Call, salt: bytes, shared: bool, ignored_headers: frozenset[str]) -> str:
    head, body = key_material(call, salt, shared, ignored_headers)
    return hmac_sha256_hex(salt, f"{head}\n{body}".encode("ascii"))


#: Requests up to this size keep their whole body in the entry's description (``llmshim cache show``).
SUMMARY_BODY_BYTES = 64 * 1024


def summary(call: Call) -> Mapping[str, Any]:
    """A redacted description of the request for ``llmshim cache ls/show`` (kept in the entry, and
    shown by cassettes): never headers, no credential field of the body (``api_key``...: masked)."""
    ignored = call.dialect.cache_ignored_fields(call.info)
    described: dict[str, Any] = {"provider": call.info.provider, "endpoint": call.info.endpoint,
                                 "model": call.info.model, "stream": call.info.stream, "url": call.request.public_url,
                                 "body_bytes": len(call.request.body)}
    if len(call.request.body) <= SUMMARY_BODY_BYTES:
        described["body"] = redact.mask_secret_fields({k: v for k, v in call.info.body.items() if k not in ignored})
    else:  # a big request is described, not copied into every entry's metadata
        described["body_preview"] = redact.scrub_text(
            call.request.body[:SUMMARY_BODY_BYTES // 16].decode("utf-8", "replace"))
    return described
