"""httpx clients that send with aiohttp: the OpenAI SDK's ``DefaultAioHttpClient``.

OpenAI documents ``AsyncOpenAI(http_client=DefaultAioHttpClient())`` for high concurrency: an
httpx client whose transport (the vendored httpx-aiohttp ``AiohttpTransport``) sends with aiohttp.
Its calls were never cached: to the httpx seam a transport it cannot look through is a possible
test double. Now the aiohttp seam takes them. Tried here: whole and streamed answers cached and
replayed as the live call read; the raw response's headers; an error status not stored; many
concurrent calls; and a user's aioresponses mock under it still answers (and is not cached).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import llmshim
from llmshim.testing import FakeLLMServer, Fault


@pytest.fixture
def cached(installed: Callable[..., object], tmp_path: Path, records: list[llmshim.CallRecord]) -> Ended:
    """llmshim with the cache on; the records of the calls that ended (completed or failed)."""
    installed(cache="on", cache_path=str(tmp_path / "c.sqlite3"))
    return Ended(records)


class Ended:
    """The records of the calls that ended so far (``call_started`` left out)."""

    def __init__(self, records: list[llmshim.CallRecord]) -> None:
        self._records = records

    def __iter__(self) -> Iterator[llmshim.CallRecord]:
        return (record for record in self._records if record.event != "call_started")

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _run(server: FakeLLMServer, ask: Callable[[openai.AsyncOpenAI], Any]) -> Any:
    async def main() -> Any:
        async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0,
                                      http_client=openai.DefaultAioHttpClient()) as client:
            return await ask(client)

    return asyncio.run(main())


async def _whole(client: openai.AsyncOpenAI, prompt: str = "héllo 世界") -> Any:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    return raw.headers.get("x-llmshim-cache"), raw.parse().model_dump(exclude={"created"})


async def _streamed(client: openai.AsyncOpenAI) -> Any:
    stream = await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                  messages=[{"role": "user", "content": "stream me"}],
                                                  stream_options={"include_usage": True})
    return [chunk.model_dump(exclude={"created"}) async for chunk in stream]


def test_a_whole_answer_is_cached_and_the_same(server: FakeLLMServer, cached: Ended) -> None:
    first, second = _run(server, _whole), _run(server, _whole)
    assert (first[0], second[0]) == (None, "hit") and first[1] == second[1]
    assert len(server.received) == 1
    tokens = first[1]["usage"]["prompt_tokens"]
    assert [(r.library, r.cache_hit, r.input_tokens or r.saved_input_tokens) for r in cached] == [
        ("aiohttp", False, tokens), ("aiohttp", True, tokens)]
    llmshim.uninstall()
    assert _run(server, _whole)[1] == first[1]  # as without llmshim


def test_a_stream_is_cached_and_replays_every_chunk(server: FakeLLMServer,
                                                    cached: Ended) -> None:
    first, second = _run(server, _streamed), _run(server, _streamed)
    assert first == second and len(first) > 2 and first[-1]["usage"] is not None
    assert len(server.received) == 1 and [r.cache_hit for r in cached] == [False, True]


def test_an_error_status_is_not_stored(server: FakeLLMServer, cached: Ended) -> None:
    server.inject(Fault(status=500), times=1)
    with pytest.raises(openai.InternalServerError):
        _run(server, _whole)
    assert _run(server, _whole)[0] is None and len(server.received) == 2  # asked again, then stored
    assert [r.outcome for r in cached] == ["error", "ok"]


def test_concurrent_identical_calls_reach_the_server_once(server: FakeLLMServer,
                                                          cached: Ended) -> None:
    async def many(client: openai.AsyncOpenAI) -> list[Any]:
        return list(await asyncio.gather(*(_whole(client, "together") for _ in range(20))))

    answers = _run(server, many)
    assert len({repr(answer[1]) for answer in answers}) == 1 and len(server.received) == 1
    assert len(cached) == 20


def test_a_users_aioresponses_mock_still_answers_and_is_not_cached(server: FakeLLMServer,
                                                                    cached: Ended) -> None:
    aioresponses = pytest.importorskip("aioresponses", reason="aioresponses is in the test extra")
    canned = {"id": "m1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "mocked"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    for _ in range(2):
        with aioresponses.aioresponses() as mocked:
            mocked.post(server.openai_base_url + "/chat/completions", payload=canned)
            header, answer = _run(server, _whole)
        assert (header, answer["choices"][0]["message"]["content"]) == (None, "mocked")
    # aioresponses replaces aiohttp's _request, inside which middlewares run: the httpx seam keeps
    # these calls, reports them, and does not cache them (a mocked answer never answers a later call)
    assert not server.received and [(r.library, r.cache_hit) for r in cached] == [("httpx2", None)] * 2


def test_the_anthropic_sdks_aiohttp_client_is_cached_too(server: FakeLLMServer, cached: Ended) -> None:
    """The Anthropic SDK vendors the same transport (``anthropic.DefaultAioHttpClient``)."""
    anthropic = pytest.importorskip("anthropic", reason="anthropic is in the test extra")

    async def ask() -> Any:
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0,
                                            http_client=anthropic.DefaultAioHttpClient()) as client:
            message = await client.messages.create(model="claude-3-5-haiku-latest", max_tokens=32,
                                                   messages=[{"role": "user", "content": "héllo"}])
            return message.model_dump()

    first, second = asyncio.run(ask()), asyncio.run(ask())
    assert first == second and len(server.received) == 1
    assert [(r.library, r.cache_hit) for r in cached] == [("aiohttp", False), ("aiohttp", True)]
