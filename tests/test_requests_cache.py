"""Under requests-cache, a tool users already have: the program sees what it saw without llmshim.

requests-cache answers its own hits in ``CachedSession.send`` (llmshim never sees them); its
misses go through ``HTTPAdapter.send``, which llmshim wraps, and it then stores what llmshim handed
back. Both caches on at once, or llmshim's off: every answer, every ``from_cache`` flag and every
request the server sees are the same as without llmshim, for each requests-cache backend and for
``install_cache()``'s global patch, streamed or not, in any alphabet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import llmshim
from llmshim.testing import FakeLLMServer

requests_cache = pytest.importorskip("requests_cache")

QUESTIONS = ["héllo", "你好\uff0c世界", "مرحبا", "Привет 👋"]


def _ask(session: requests.Session, server: FakeLLMServer) -> list[tuple[int, bool, bytes]]:
    seen = []
    for stream in (False, True):
        for question in QUESTIONS:
            body = {"model": "m", "messages": [{"role": "user", "content": question}], "stream": stream}
            for _ in range(2):
                answer = session.post(server.openai_base_url + "/chat/completions", json=body, stream=stream)
                text = b"".join(answer.iter_content(7)) if stream else answer.content
                seen.append((answer.status_code, bool(getattr(answer, "from_cache", False)), text))
    return seen


def _cached_session(path: Path, backend: str) -> Iterator[requests.Session]:
    with requests_cache.CachedSession(str(path / "http"), backend=backend, allowable_methods=("GET", "POST")) as s:
        yield s


def _global_patch(path: Path, backend: str) -> Iterator[requests.Session]:
    requests_cache.install_cache(str(path / "http"), backend=backend, allowable_methods=("GET", "POST"))
    try:
        with requests.Session() as session:
            yield session
    finally:
        requests_cache.uninstall_cache()


SESSIONS: dict[str, Callable[[Path, str], Iterator[requests.Session]]] = {
    "CachedSession": _cached_session, "install_cache": _global_patch}


def _run(server: FakeLLMServer, path: Path, how: str, backend: str) -> tuple[list[tuple[int, bool, bytes]], int]:
    server.reset()
    for session in SESSIONS[how](path, backend):
        return _ask(session, server), len(server.received)
    raise AssertionError("no session")


@pytest.mark.parametrize("backend", ["sqlite", "memory", "filesystem"])
@pytest.mark.parametrize("how", list(SESSIONS))
@pytest.mark.parametrize("llmshim_cache", ["off", "on"])
def test_requests_cache_sees_the_same_answers_with_llmshim(server: FakeLLMServer, tmp_path: Path, backend: str,
                                                           how: str, llmshim_cache: str) -> None:
    without, sent_without = _run(server, tmp_path / "without", how, backend)
    llmshim.install(cache=llmshim_cache, cache_path=str(tmp_path / "llmshim.sqlite3"))
    try:
        with_llmshim, sent_with = _run(server, tmp_path / "with", how, backend)
        stats: dict[str, Any] = llmshim.stats()
    finally:
        llmshim.uninstall()
    # The fake server's answers are deterministic per question: the same bytes either way.
    assert with_llmshim == without
    assert [from_cache for _, from_cache, _ in without] == [False, True] * (2 * len(QUESTIONS))
    assert sent_with == sent_without == 2 * len(QUESTIONS)  # requests-cache answered every repeat
    # llmshim saw exactly requests-cache's misses, each to its end.
    assert stats["total_calls"] == stats["completed"] == 2 * len(QUESTIONS)
