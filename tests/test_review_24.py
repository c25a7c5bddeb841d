"""Review 24: trio cancellation during a send, and the Redis write scripts against a real server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llmshim
from llmshim.policies.ratelimit import RateLimitPolicy
from llmshim.runtime import STATE
from llmshim.testing import FakeLLMServer, Fault


def body(question: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": stream}


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    def install(**settings: str) -> Any:
        llmshim.install(cache="on", cache_path=str(tmp_path / "c.sqlite3"), **settings)
        return STATE.pipeline

    yield install
    llmshim.uninstall()


def _limiter() -> Any:
    return next(p.limiter for p in STATE.pipeline.policies if isinstance(p, RateLimitPolicy))


# -- trio: a call cancelled while its request is upstream ----------------------------------------

@pytest.mark.timeout(30)  # the upstream answers after 60 s: a send the cancellation misses fails here
@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_a_trio_call_cancelled_during_its_send_stops_the_request_and_frees_its_slot(
        library: str, server: FakeLLMServer, installed: Callable[..., Any]) -> None:
    """trio runs the worker's send as a system task, outside the caller's cancel scopes: before,
    the cancelled call's request stayed upstream until it was answered (billed, its slot held), and
    the next call waited behind it. Without llmshim the cancellation closes the request at once."""
    trio = pytest.importorskip("trio")
    module = pytest.importorskip(library)
    installed(max_concurrency="1", queue_timeout="60")
    server.reset()
    server.inject(Fault(delay=60), times=1)

    async def main() -> tuple[bool, int]:
        async with module.AsyncClient(base_url=server.openai_base_url, timeout=90) as client:
            with trio.move_on_after(0.3) as scope:
                await client.post("/chat/completions", json=body("slow, cancelled"))
            # Queued behind the cancelled call's slot: answered once its request has stopped.
            after = await client.post("/chat/completions", json=body("after"))
            return scope.cancelled_caught, after.status_code

    assert trio.run(main) == (True, 200)
    assert _limiter().held() == (0, 0)
    asked = [json.loads(r.body)["messages"][0]["content"] for r in server.received]
    assert asked == ["slow, cancelled", "after"]
