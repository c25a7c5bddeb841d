"""Cassettes of the pytest plugin (``pytest_plugin.py``): the file, its name, and the policy that
records into it or replays from it.

A cassette is readable JSON, one file per test (``cassette_name``: one-to-one with test ids). Each
interaction holds the request's cache key (shared scope, fixed ``SALT``: header noise, whitespace
and API keys never change it), the redacted request (no headers, the URL without user info or
query, credential-named body fields masked: ``_request``) and the response (status, headers as the
cache keeps them, minus the account's organization and project: no credential, no cookie; body
pieces as they arrived). Replay matches by key, each interaction
once, in recorded order.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from . import redact
from .call import Call, Reply
from .pipeline import AsyncHandler, Handler, track
from .policies.cache_recorder import stored_headers
from .store import cache_keys
from .tap import OnEnd

__all__ = ["ACCOUNT_HEADERS", "SALT", "Cassette", "CassetteError", "CassettePolicy", "cassette_name"]


#: Response headers that name the account (a cassette is committed to a repository, often a public one).
ACCOUNT_HEADERS = frozenset({"openai-organization", "openai-project", "anthropic-organization-id"})


class CassetteError(Exception):
    """A cassette that cannot be read or written; the message names the file and why."""


SALT = b"llmshim-cassette-v1"


@dataclasses.dataclass
class Cassette:
    path: Path
    mode: str  # record | replay
    interactions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unmatched: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def load(self) -> None:
        """The recorded interactions; none when there is no file. A file that is not a cassette of
        this version raises CassetteError naming its path and the reason."""
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            version = data.get("version") if isinstance(data, dict) else None
            if version != 1 or not isinstance(data.get("interactions"), list):
                raise ValueError(f"not a version 1 cassette (version {version!r})")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CassetteError(f"llmshim replay: cannot read cassette {self.path}: {exc}; record it again "
                                "with --llmshim-record") from None
        self.interactions = data["interactions"]

    def explain(self) -> str:
        """The first unmatched request and the closest recorded one."""
        wanted = json.dumps(self.unmatched[0]["request"], sort_keys=True)
        recorded = [json.dumps(i["request"], sort_keys=True) for i in self.interactions]
        closest = difflib.get_close_matches(wanted, recorded, n=1, cutoff=0.0)
        return (f"llmshim replay: request not in cassette {self.path}:\n  {wanted}\n"
                f"closest recorded:\n  {closest[0] if closest else '(the cassette is empty)'}")

    def save(self) -> None:
        """Written whole to a temporary file beside it, then renamed over it: an interrupted
        write never leaves a truncated cassette. A folder that cannot be written raises
        CassetteError naming the path and the reason."""
        text = json.dumps({"version": 1, "interactions": self.interactions}, indent=2, ensure_ascii=False) + "\n"
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise CassetteError(f"llmshim record: cannot write cassette {self.path}: {exc}") from None


def _piece(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}


def _bytes(piece: dict[str, str]) -> bytes:
    return piece["text"].encode() if "text" in piece else base64.b64decode(piece["base64"])


def _request(call: Call) -> dict[str, Any]:
    """The redacted request a cassette shows: no headers, the URL without userinfo or query, no
    credential in the body."""
    request = dict(cache_keys.summary(call))  # credential fields of the body already masked there
    request["url"] = redact.public_url(call.request.url)
    return request


class CassettePolicy:
    """Records or replays at the cache's place in the pipeline. A call a test double or another
    recorder answers is neither replayed nor recorded."""

    serves_answers = True

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette
        self._used: set[int] = set()

    def _key(self, call: Call) -> str:
        return cache_keys.cache_key(call, SALT, shared=True)

    def _answer(self, call: Call) -> Reply | None:
        key = self._key(call)
        for index, item in enumerate(self.cassette.interactions):
            if item["key"] == key and index not in self._used:
                self._used.add(index)
                response = item["response"]
                body = b"".join(_bytes(p) for p in response["body"])
                headers = [(k, v) for k, v in response["headers"]] + [("content-length", str(len(body)))]
                assert call.replay is not None
                return track(call, call.replay(response["status"], headers, body))
        self.cassette.unmatched.append({"key": key, "request": _request(call)})
        body = json.dumps({"error": {"message": self.cassette.explain(), "type": "llmshim_cassette_miss"}}).encode()
        assert call.replay is not None
        return track(call, call.replay(504, [("content-type", "application/json"), ("x-should-retry", "false"),
                                             ("content-length", str(len(body)))], body))

    def _record(self, call: Call, reply: Reply) -> Reply:
        pieces: list[bytes] = []

        class Tee:
            def on_chunk(self, data: bytes) -> None:
                pieces.append(data)

            def on_complete(self) -> None:
                pass

            def on_abort(self, error: BaseException | None) -> None:
                pass

        reply.tap.subscribe(Tee())
        headers = [(k, v) for k, v in stored_headers(reply.headers) if k.lower() not in ACCOUNT_HEADERS]

        def store() -> None:
            self.cassette.interactions.append({
                "key": self._key(call), "request": _request(call),
                "response": {"status": reply.status, "headers": headers, "body": [_piece(p) for p in pieces]}})

        reply.tap.subscribe(OnEnd(store))
        return reply

    def handle(self, call: Call, next: Handler) -> Reply:
        if call.cache_bypass:  # a mock or another recorder answers: never hidden, never recorded
            return next(call)
        if self.cassette.mode == "replay" and call.replay is not None:
            answer = self._answer(call)
            assert answer is not None
            return answer
        return self._record(call, next(call))

    async def ahandle(self, call: Call, anext: AsyncHandler) -> Reply:
        if call.cache_bypass:
            return await anext(call)
        if self.cassette.mode == "replay" and call.replay is not None:
            answer = self._answer(call)
            assert answer is not None
            return answer
        return self._record(call, await anext(call))


#: Characters a cassette's file name keeps as they are; any other is written ``%XX`` (each UTF-8
#: byte), ``%`` included, so two test ids never share a file.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]]")
_LONGEST_NAME = 150  # bytes; file systems allow 255


def cassette_name(nodeid: str) -> str:
    """The file name (without ``.json``) of a test's cassette, from its node id: the classes and
    the test's name, ``Class.test_name[params]``. One-to-one, and short enough for any file
    system: a long name is cut and ends with a digest of the whole id instead."""
    rest = nodeid.partition("::")[2] or nodeid
    test, bracket, params = rest.partition("[")  # a parameter id may hold "::" itself
    name = test.replace("::", ".") + bracket + params
    safe = _UNSAFE.sub(lambda m: "".join(f"%{byte:02X}" for byte in m.group().encode("utf-8")), name)
    if len(safe) > _LONGEST_NAME:
        safe = safe[:_LONGEST_NAME - 17] + "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return safe
