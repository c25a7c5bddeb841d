"""Redaction: every text llmshim prints or records goes through here first.

Pure functions over strings, no I/O:

- :func:`scrub_setting_url` for a connection setting (``LLMSHIM_CACHE_URL``,
  ``LLMSHIM_RATELIMIT_STORE``): everything before the last ``@`` after the scheme is credentials,
  whatever characters it holds (a Redis URL has no other use for ``@``), and query values are
  masked. It works on malformed values too, so a mistyped scheme never echoes a password.
- :func:`scrub_url` for a request URL: userinfo masked, query and fragment values masked, the path
  kept (``@`` is legal there: Vertex AI routes carry ``model@version``).
- :func:`public_url` for records: ``scheme://host[:port]/path``, nothing else.
- :func:`scrub_text` for free text (exception messages, tracebacks, log lines): every URL-looking
  word is scrubbed as above; ``name=value`` / ``"name": "value"`` pairs whose name looks like a
  credential, ``Bearer``/``Basic`` tokens, query pairs of relative URLs (``/v1/x?key=...``) and
  well-known key shapes (``sk-...``, ``AIza...``, ``hf_...``) are masked.
- :func:`is_secret_header` names the headers whose values are credentials.

:data:`LOG_FILTER` applies :func:`scrub_text` to every record of the ``llmshim`` logger (message,
arguments and traceback), so a warning that formats an exception text cannot leak what the
exception carried. It replaces ``exc_info`` by the scrubbed ``exc_text``: handlers that render the
exception object themselves would otherwise print it unscrubbed.

Scrubbing is best effort for free text (a secret in no recognisable position cannot be found) and
errs towards masking too much: a masked word in an error message costs little, a leaked key a lot.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["LOG_FILTER", "MASK", "RedactingFilter", "is_secret_header", "mask_secret_fields", "public_url",
           "scrub_setting_url", "scrub_text", "scrub_url"]

MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:/*")
#: A clean authority (host[:port]) followed by the path, query or fragment: an "@" after it is not userinfo.
_CLEAN_AUTHORITY = re.compile(r"[^/?#@:\s]*(?::[0-9]*)?(?=[/?#])")
#: Schemes whose URLs never carry "@" outside the userinfo: the last "@" ends the credentials.
_SETTING_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "sqlite", "memcached", "amqp", "postgres",
                    "postgresql", "mysql", "mongodb", "mongodb+srv")


def _mask_query(query: str) -> str:
    """``a=1&b=2`` → ``a=***&b=***``; a value without a name is masked whole."""
    parts = re.split(r"([&;])", query)
    return "".join(part if part in ("&", ";") or not part
                   else (part.split("=", 1)[0] + "=" + MASK if "=" in part else MASK) for part in parts)


def _split_tail(rest: str) -> tuple[str, str]:
    """(authority and path, ``?query#fragment`` masked)."""
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head, tail = rest[:cut], rest[cut:]
    if not tail:
        return head, ""
    query, hash_, fragment = tail[1:].partition("#") if tail[0] == "?" else ("", "#", tail[1:])
    out = ("?" + _mask_query(query)) if tail[0] == "?" else ""
    if hash_:
        out += "#" + (MASK if fragment else "")
    return head, out


def scrub_setting_url(value: str) -> str:
    """A connection setting with its credentials and query values masked, even when malformed."""
    text = str(value)
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    at = text.rfind("@")
    if at >= start:
        text = text[:start] + MASK + text[at:]
        start += len(MASK) + 1
    head, tail = _split_tail(text[start:])
    return text[:start] + head + tail


def scrub_url(url: str) -> str:
    """A request URL with userinfo, query values and fragment masked; scheme, host and path kept."""
    text = str(url)
    scheme = _SCHEME.match(text)
    if scheme is None:
        return scrub_setting_url(text)
    if scheme.group().split(":", 1)[0].lower() in _SETTING_SCHEMES:
        return scrub_setting_url(text)
    start, rest = scheme.end(), text[scheme.end():]
    authority_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, authority_end)
    if at >= 0:  # a valid URL: the userinfo is the authority up to its last "@"
        rest = MASK + rest[at:]
    elif "@" in rest and not _CLEAN_AUTHORITY.match(rest):
        rest = MASK + rest[rest.rfind("@"):]  # a raw "/", "?" or "#" in a password broke the authority
    head, tail = _split_tail(rest)
    return text[:start] + head + tail


_ALREADY_PUBLIC: dict[str, None] = {}  # URLs found to have nothing to remove (so holding them holds no secret)


def public_url(url: str) -> str:
    """``scheme://host[:port]/path``: no userinfo, no query, no fragment; never raises.

    It runs as every call ends: a URL found to be public already is remembered (a few hundred
    at most), so the usual endpoint is scanned once, not per call."""
    text = str(url)
    if text in _ALREADY_PUBLIC:
        return text
    if "@" not in text and "?" not in text and "#" not in text:  # the common case: nothing to remove
        public = _KEY_SHAPES.sub(_key_shape, text)
        if public == text:
            if len(_ALREADY_PUBLIC) >= 512:
                _ALREADY_PUBLIC.clear()
            _ALREADY_PUBLIC[text] = None
        return public
    scrubbed = scrub_url(text)
    cut = min((i for i in (scrubbed.find("?"), scrubbed.find("#")) if i >= 0), default=len(scrubbed))
    head = scrubbed[:cut]
    scheme = _SCHEME.match(head)
    start = scheme.end() if scheme else 0
    if head.startswith(MASK + "@", start):
        head = head[:start] + head[start + len(MASK) + 1:]
    return _KEY_SHAPES.sub(_key_shape, head)


# -- free text ---------------------------------------------------------------------------------------

_URL_WORD = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
#: A name is a credential's when it ends so: api_key, x-api-key, access_token, password, Authorization, ...
_CREDENTIAL_NAME = re.compile(r"(?:key|token|secret|passw(?:or)?d|pwd|auth\w*|credential|signature|sig|session"
                              r"|cookie)s?$", re.IGNORECASE)
#: Any name (a whole word: the lookbehind keeps the scan linear), checked against _CREDENTIAL_NAME afterwards.
_NAME = r"(?P<name>(?<![\w.\-])[\w.\-]+)"
#: name = "quoted value" (also 'name': 'value' and ('name', 'value')): the value up to its closing quote.
_QUOTED_PAIR = re.compile(
    _NAME + r"(?P<sep>['\"]?\s*[:=]\s*(?P<q>['\"])|['\"]\s*,\s*(?P<q2>['\"]))(?P<value>[^'\"\n]*)")
#: name=value, name: value (an authorization scheme word included): the value up to a delimiter.
_BARE_PAIR = re.compile(
    _NAME + r"(?P<sep>\s*[:=]\s*)(?P<value>(?:(?i:bearer|basic|token|digest)\s+)?[^\s'\"&;,<>)}\]]+)")
_SCHEME_TOKEN = re.compile(r"\b(?P<scheme>bearer|basic|digest)\s+(?!\*\*\*)[^\s'\"<>,;)}\]]+", re.IGNORECASE)
_RELATIVE_QUERY = re.compile(r"(?P<lead>[?&;][^\s=&;#?'\"<>]+=)(?P<value>[^\s&;'\"<>]*)")  # a fragment too
#: A key starts a word, or follows a percent-escape (``%40sk-...``, ``%2Fsk-...`` in an encoded URL:
#: the escape's last hex digit is a word character, so ``\b`` alone would not see the key start).
_KEY_SHAPES = re.compile(
    r"(?:\b|(?<=%[0-9A-Fa-f]{2}))"
    r"(?:(?P<prefix>sk-|rk-|pk-|sk_live_|sk_test_|AIza|hf_|gh[pousr]_|github_pat_|xox[abprs]-|gsk_|r8_|AKIA|"
    r"glpat-|npm_|pypi-)[\w\-]{8,}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})"
)


def _mask_pairs(pattern: re.Pattern[str], text: str) -> str:
    """Mask the value of every pair whose name is a credential's. A pair with another name is
    skipped by its name only, so ``0: x-api-key: SECRET`` still finds the second pair."""
    out, pos = [], 0
    while (match := pattern.search(text, pos)) is not None:
        value = match.group("value")
        if value and value != MASK and _CREDENTIAL_NAME.search(match.group("name")):
            out += [text[pos:match.start("value")], MASK]
            pos = match.end()
        else:
            out.append(text[pos:match.end("name")])
            pos = match.end("name")
    out.append(text[pos:])
    return "".join(out)


def _key_shape(match: re.Match[str]) -> str:
    return (match.group("prefix") or "") + MASK


def _scrub_words(text: str) -> str:
    """Credential pairs, authorization schemes and key shapes, outside or inside URLs."""
    text = _SCHEME_TOKEN.sub(lambda m: m.group("scheme") + " " + MASK, text)
    text = _mask_pairs(_QUOTED_PAIR, text)
    text = _mask_pairs(_BARE_PAIR, text)
    text = _RELATIVE_QUERY.sub(lambda m: m.group("lead") + (MASK if m.group("value") else ""), text)
    return _KEY_SHAPES.sub(_key_shape, text)


def scrub_text(text: str) -> str:
    """Free text with every credential llmshim can recognise masked. Never raises."""
    try:
        text = str(text)
    except Exception:
        return MASK
    return _scrub_words(_URL_WORD.sub(lambda m: scrub_url(m.group(0)), text))


_SECRET_HEADER = re.compile(
    r"(?:^|[-_])(?:authorization|auth|cookie|set-cookie|api[-_]?key|apikey|key|token|secret|password|passwd"
    r"|credentials?|session|signature)(?:$|[-_])",
    re.IGNORECASE,
)


def is_secret_header(name: str) -> bool:
    """Whether a header's value is a credential: authorization, cookies, ``*-api-key``, ``*-token``, ...

    ``x-ratelimit-remaining-tokens`` is not: a count of tokens, not a token."""
    return bool(_SECRET_HEADER.search(str(name)))


def mask_secret_fields(value: Any) -> Any:
    """A JSON value as llmshim shows or keeps it outside the wire (a cache entry's description, a
    cassette): the string value of every field named like a credential (``api_key``,
    ``access_token``, ``password``...) masked, at any depth. A copy; the value is not changed."""
    if isinstance(value, dict):
        return {k: MASK if isinstance(v, str) and is_secret_header(str(k)) else mask_secret_fields(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secret_fields(v) for v in value]
    return value


# -- the llmshim logger ---------------------------------------------------------------------------------

class RedactingFilter(logging.Filter):
    """Scrubs a record's message, arguments, traceback and stack before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg = scrub_text(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = scrub_text(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
            elif record.exc_text:
                record.exc_text = scrub_text(record.exc_text)
            if record.stack_info:
                record.stack_info = scrub_text(record.stack_info)
        except Exception:  # never break the caller's logging; never let an unscrubbed text through
            record.msg, record.args, record.exc_info, record.exc_text = (
                "llmshim: a log message was withheld (it could not be redacted)", None, None, None)
        return True


LOG_FILTER = RedactingFilter()


def protect_logger(name: str = "llmshim") -> None:
    """Attach :data:`LOG_FILTER` to the named logger (idempotent)."""
    logger = logging.getLogger(name)
    if LOG_FILTER not in logger.filters:
        logger.addFilter(LOG_FILTER)
