"""Whose wrapper is it? The test-double check looks through llmshim's own wrappers and wrapt's.

llmshim used to mark its wrappers with a ``__llmshim__`` attribute; they are now recognised by where
their code is defined (``llmshim.adapters``), as every other function is. These tests try to break
that: llmshim's wrapper left in place under someone else's by an uninstall, then wrapped again by
the next install, must still count as the network (the cache answers); a wrapper defined anywhere
else must still count as a double (fail closed)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import wrapt
from requests.adapters import HTTPAdapter

import llmshim
from llmshim.adapters import _doubles
from llmshim.testing import FakeLLMServer

BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def _wrapt_wrapper(function: Any) -> Any:
    return wrapt.FunctionWrapper(function, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))


def _plain_wrapper(function: Any) -> Any:
    @functools.wraps(function)
    def send(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return send


def test_a_wrapt_proxy_of_a_genuine_function_is_genuine() -> None:
    genuine_send = HTTPAdapter.__dict__["send"]
    assert _doubles._is_wrapt(_wrapt_wrapper(genuine_send))  # wrapt 2's FunctionWrapper, too
    assert _doubles.genuine(_wrapt_wrapper(genuine_send), "requests")
    assert not _doubles.genuine(_wrapt_wrapper(lambda *a: None), "requests")


def test_llmshims_own_wrapper_is_looked_through_and_nothing_else_is(installed: Callable[..., object]) -> None:
    genuine_send = HTTPAdapter.__dict__["send"]
    installed()
    ours = HTTPAdapter.__dict__["send"]
    assert ours is not genuine_send and not hasattr(ours, "__llmshim__")
    assert _doubles.genuine(ours, "requests")
    assert _doubles.requests_double(HTTPAdapter(), ours) is None
    # functools.wraps copies the name and module, not the code: still a double
    assert str(_doubles.requests_double(HTTPAdapter(), _plain_wrapper(genuine_send))).startswith("mocked (")


@pytest.mark.parametrize(("wrap", "upstream_calls"), [(_wrapt_wrapper, 1), (_plain_wrapper, 2)],
                         ids=["wrapt-wrapper: network, cached", "unknown-wrapper: a double, not cached"])
def test_a_reinstall_over_a_wrapper_left_in_place(server: FakeLLMServer, tmp_path: Path,
                                                  installed: Callable[..., object], wrap: Any,
                                                  upstream_calls: int) -> None:
    genuine_send = HTTPAdapter.__dict__["send"]
    try:
        installed()
        HTTPAdapter.send = wrap(HTTPAdapter.__dict__["send"])  # someone wraps llmshim's wrapper
        llmshim.uninstall()  # ours stays in place under theirs, as a pass-through
        installed(cache="on", cache_path=str(tmp_path / "cache.sqlite3"))
        answers = [requests.post(server.url + "/api/chat", json=BODY, timeout=10) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].content == answers[1].content
        assert len(server.received) == upstream_calls
        assert llmshim.stats()["cache_hits"] == 2 - upstream_calls
    finally:
        llmshim.uninstall()
        HTTPAdapter.send = genuine_send
