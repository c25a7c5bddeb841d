"""Cost in US dollars (issue 14, item 2, the pure part): ``llmshim.cost`` asks ``genai-prices``.

The answers are the library's own (never a table of ours), for the provider the *host* names; and
None, never 0 and never an exception, whenever there is no honest price: an unknown model, a local
or unknown server, no usage, a library that is missing or fails.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from llmshim import cost
from llmshim.call import Call, ResponseInfo, Usage, WireRequest
from llmshim.cost import GENAI_PRICES_IDS, cost_of, price
from llmshim.dialects import BodyParser, detect
from llmshim.providers import PROVIDERS

AZURE = "https://myres.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    cost.forget()
    yield
    cost.forget()


@pytest.fixture
def genai_prices() -> Any:
    return pytest.importorskip("genai_prices")


@pytest.fixture
def asked(genai_prices: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every question put to the library's ``calc_price``, which still answers."""
    questions: list[dict[str, Any]] = []
    real = genai_prices.calc_price

    def counted(usage: Any, model: str, **kwargs: Any) -> Any:
        questions.append({"model": model, **kwargs})
        return real(usage, model, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", counted)
    return questions


def _library_price(genai_prices: Any, provider_id: str, model: str, **usage: int) -> Decimal:
    return Decimal(genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider_id).total_price)


def test_an_openai_model_costs_what_the_library_says(genai_prices: Any) -> None:
    paid = price("openai", "gpt-4o-mini", 1000, 100)
    assert isinstance(paid, Decimal) and paid > 0
    assert paid == _library_price(genai_prices, "openai", "gpt-4o-mini", input_tokens=1000, output_tokens=100)
    assert price("openai", "gpt-4o-mini", 2000, 200) == 2 * paid
    cached = price("openai", "gpt-4o-mini", 1000, 100, cached_input_tokens=800)
    assert cached is not None and 0 < cached < paid  # cached input is billed at a lower rate
    assert cached == _library_price(genai_prices, "openai", "gpt-4o-mini", input_tokens=1000, output_tokens=100,
                                    cache_read_tokens=800)
    assert price("openai", "text-embedding-3-small", 1000, None) == _library_price(
        genai_prices, "openai", "text-embedding-3-small", input_tokens=1000, output_tokens=0)  # no output tokens


def test_an_azure_model_is_priced_at_azure_from_the_model_the_response_names(genai_prices: Any) -> None:
    paid = price("azure.ai.openai", "gpt-4o-2024-08-06", 1000, 100)
    assert paid is not None and paid > 0
    assert paid == _library_price(genai_prices, "azure", "gpt-4o-2024-08-06", input_tokens=1000, output_tokens=100)
    # the request's "model" is the deployment's alias; the response names the model
    assert cost_of(_ended(AZURE, "gpt4o-prod", response_model="gpt-4o-2024-08-06")) == paid
    assert cost_of(_ended(AZURE, "gpt4o-prod", response_model=None)) is None  # an alias is not a model


@pytest.mark.parametrize(("provider", "model"), [
    ("groq", "llama-3.3-70b-versatile"), ("mistral_ai", "mistral-large-latest"), ("x_ai", "grok-3"),
    ("deepseek", "deepseek-chat"), ("openrouter", "openai/gpt-4o"), ("gcp.gemini", "gemini-2.0-flash"),
    ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo")])
def test_other_known_providers_are_priced(genai_prices: Any, provider: str, model: str) -> None:
    paid = price(provider, model, 1000, 100)
    assert paid is not None and paid > 0
    assert paid == _library_price(genai_prices, GENAI_PRICES_IDS[provider], model, input_tokens=1000,
                                  output_tokens=100)


def test_an_unknown_model_has_no_cost_and_is_asked_for_once(asked: list[dict[str, Any]]) -> None:
    assert price("openai", "my-fine-tune-xyz", 1000, 100) is None
    assert price("openai", "my-fine-tune-xyz", 5, 7) is None
    assert len(asked) == 1


def test_the_same_usage_is_priced_once(asked: list[dict[str, Any]]) -> None:
    first = price("openai", "gpt-4o-mini", 1000, 100)
    assert [price("openai", "gpt-4o-mini", 1000, 100) for _ in range(3)] == [first] * 3
    assert len(asked) == 1
    assert price("openai", "gpt-4o-mini", 1001, 100) != first and len(asked) == 2


def test_a_timestamp_reaches_the_library(asked: list[dict[str, Any]]) -> None:
    at = dt.datetime(2025, 1, 15, tzinfo=dt.timezone.utc)
    assert price("openai", "gpt-4o-mini", 10, 10, at=at) is not None
    assert asked[-1]["genai_request_timestamp"] == at and asked[-1]["provider_id"] == "openai"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1/chat/completions", "http://localhost:11434/v1/chat/completions",
                                 "http://[::1]:8080/v1/chat/completions", "https://llm.corp.example/v1/chat/completions"])
def test_a_local_or_unknown_server_has_no_cost(genai_prices: Any, url: str) -> None:
    """Serving a model named like OpenAI's does not make a local server OpenAI's price list."""
    assert cost_of(_ended(url, "gpt-4o-mini")) is None
    assert cost_of(_ended("https://api.openai.com/v1/chat/completions", "gpt-4o-mini")) is not None


def test_no_price_for_a_wire_name_or_no_provider(genai_prices: Any) -> None:
    for provider in (None, "", "ollama", "llama_cpp", "huggingface", "deepinfra"):
        assert price(provider, "gpt-4o-mini", 10, 10) is None


@pytest.mark.parametrize(("model", "tokens"), [
    (None, (10, 10, None)), ("", (10, 10, None)), ("gpt-4o-mini", (None, None, None)),
    ("gpt-4o-mini", (-1, 10, None)), ("gpt-4o-mini", (10, -1, None)), ("gpt-4o-mini", (True, 10, None)),
    ("gpt-4o-mini", (10.5, 10, None)), ("gpt-4o-mini", (10, 10, -3)), ("gpt-4o-mini", ("10", 10, None)),
])
def test_no_usage_or_a_bad_count_has_no_cost(genai_prices: Any, model: str | None, tokens: tuple[Any, Any, Any]
                                             ) -> None:
    assert price("openai", model, *tokens) is None


def test_a_call_without_a_response_has_no_cost() -> None:
    call = _ended("https://api.openai.com/v1/chat/completions", "gpt-4o-mini")
    call.response = None
    assert cost_of(call) is None


def test_without_genai_prices_there_is_no_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "genai_prices", None)  # "import genai_prices" raises ImportError
    assert price("openai", "gpt-4o-mini", 1000, 100) is None
    assert cost_of(_ended("https://api.openai.com/v1/chat/completions", "gpt-4o-mini")) is None
    assert cost.warm_up() is False
    monkeypatch.undo()
    assert price("openai", "gpt-4o-mini", 1000, 100) is None  # the failed import is remembered...
    cost.forget()
    if _installed():
        assert cost.warm_up() is True
        assert price("openai", "gpt-4o-mini", 1000, 100) is not None  # ...until forgotten


def test_a_library_that_fails_is_no_cost_not_an_error(genai_prices: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("snapshot corrupt")

    monkeypatch.setattr(genai_prices, "calc_price", broken)
    assert price("openai", "gpt-4o-mini", 1000, 100) is None
    assert cost_of(_ended("https://api.openai.com/v1/chat/completions", "gpt-4o-mini")) is None


def test_every_priced_provider_is_one_we_name_and_one_the_library_lists(genai_prices: Any) -> None:
    from genai_prices.data_snapshot import find_provider_by_id, get_snapshot

    named = {provider for _, _, provider in PROVIDERS}
    assert set(GENAI_PRICES_IDS) <= named
    for provider_id in GENAI_PRICES_IDS.values():
        found = find_provider_by_id(get_snapshot().providers, provider_id)
        assert found is not None and found.id == provider_id


@pytest.mark.parametrize(("path", "content_type", "body", "usage"), [
    ("/v1/chat/completions", "application/json",
     {"id": "c", "model": "gpt-4o", "choices": [], "usage": {
         "prompt_tokens": 2006, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 1920}}},
     Usage(2006, 300, 1920)),
    ("/v1/responses", "application/json",
     {"id": "r", "model": "gpt-4o", "status": "completed", "output": [], "usage": {
         "input_tokens": 50, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 0}}},
     Usage(50, 5, 0)),
    ("/v1/chat/completions", "text/event-stream",
     b'data: {"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
     b'data: {"id":"c","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,'
     b'"prompt_tokens_details":{"cached_tokens":8}}}\n\ndata: [DONE]\n\n',
     Usage(9, 1, 8)),
    ("/v1/chat/completions", "application/json",
     {"id": "c", "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
     Usage(3, 1, None)),  # not reported: unknown, not 0
])
def test_the_openai_dialect_reads_cached_input_tokens(path: str, content_type: str, body: Any, usage: Usage) -> None:
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    found = detect(WireRequest("POST", "https://api.openai.com" + path, (), json.dumps(request).encode()))
    assert found is not None
    parser = BodyParser(found[0], found[1], content_type)
    parser.feed(body if isinstance(body, bytes) else json.dumps(body).encode())
    assert parser.finish().usage == usage


def _installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("genai_prices") is not None


def _ended(url: str, model: str, response_model: str | None = "=", input_tokens: int = 1000,
           output_tokens: int = 100) -> Call:
    """A call to ``url`` for ``model`` that ended with the provider's usage and response model."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    wire = WireRequest("POST", url, (("content-type", "application/json"),), body)
    found = detect(wire)
    assert found is not None
    call = Call(request=wire, info=found[1], library="test", dialect=found[0])
    call.response = ResponseInfo(model=model if response_model == "=" else response_model,
                                 usage=Usage(input_tokens, output_tokens))
    return call


@pytest.mark.parametrize("tier", ["flex", "priority"])
def test_the_service_tier_the_provider_served_is_priced_at_its_rates(genai_prices: Any, tier: str) -> None:
    """The response names the tier (OpenAI: ``service_tier``), streamed or whole: it is read by the
    dialect and priced at that tier's rates; a tier the library has no rates for is the standard."""
    standard = price("openai", "o4-mini", 10_000, 2_000)
    tiered = price("openai", "o4-mini", 10_000, 2_000, service_tier=tier)
    assert standard is not None and tiered is not None and tiered != standard
    assert tiered == Decimal(genai_prices.calc_price(genai_prices.Usage(input_tokens=10_000, output_tokens=2_000),
                                                     "o4-mini", provider_id="openai",
                                                     price_context={"service_tier": tier}).total_price)
    assert price("openai", "o4-mini", 10_000, 2_000, service_tier="default") == standard
    body = json.dumps({"id": "c", "object": "chat.completion", "model": "o4-mini-2025-04-16", "service_tier": tier,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 10_000, "completion_tokens": 2_000}}).encode()
    request = WireRequest("POST", "https://api.openai.com/v1/chat/completions", (),
                          json.dumps({"model": "o4-mini", "messages": [{"role": "user", "content": "hi"}]}).encode())
    dialect, info = detect(request) or (None, None)
    assert dialect is not None and info is not None
    parser = BodyParser(dialect, info, "application/json")
    parser.feed(body)
    call = Call(request=request, info=info, library="test", dialect=dialect, response=parser.finish())
    assert call.response is not None and call.response.service_tier == tier
    assert cost_of(call) == tiered


def test_a_prompt_cache_write_is_priced_at_its_own_rate(genai_prices: Any) -> None:
    """Anthropic bills writing the prompt cache above the input rate and reading it below: both
    parts of the prompt reach the library, read from the answer's usage by the dialect."""
    from llmshim.dialects.anthropic import absorb_usage

    usage = Usage()
    absorb_usage({"input_tokens": 2000, "cache_creation_input_tokens": 8000, "cache_read_input_tokens": 0,
                  "output_tokens": 100}, usage)
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cached_input_tokens) == (10_000, 8000, 0)
    plain = price("anthropic", "claude-sonnet-4-5", 10_000, 100)
    written = price("anthropic", "claude-sonnet-4-5", 10_000, 100, cached_input_tokens=0, cache_write_tokens=8000)
    assert plain is not None and written is not None and written > plain
    assert written == Decimal(genai_prices.calc_price(
        genai_prices.Usage(input_tokens=10_000, output_tokens=100, cache_read_tokens=0, cache_write_tokens=8000),
        "claude-sonnet-4-5", provider_id="anthropic").total_price)
