"""What a call cost in US dollars, from pydantic's ``genai-prices`` (the ``llmshim[cost]`` extra).

llmshim keeps no price table of its own: prices change monthly and ``genai-prices`` follows them
(providers, models and their dated snapshots, cached-input rates, tiers, price history). It is an
optional dependency because it is not light: it brings pydantic and httpx2 with it and its first
import takes about 0.3 s, which an ``import llmshim`` at a program's start must not pay. It is
imported on the first call that is priced, never at ``install()``.

Flow: :func:`cost_of` (the observer's one call, at a call's end) names the provider from the
request's *host* (``llmshim.providers.known_provider``), takes the model the response names (a
deployment's request ``model`` is often the user's alias: Azure) and the usage the provider
reported, and asks :func:`price`, which maps llmshim's provider names to ``genai-prices``' ids and
asks the library. The answer is a ``Decimal`` of US dollars, or None when there is no honest
price: the library is not installed, the host is not a known provider (a local server, a gateway,
a self-hosted model: its wire's name is not a price list), the model is unknown to the library, or
the provider reported no tokens. Never a made-up zero, and never an exception: a price lookup that
fails is a call without a cost, not a broken call.

The library's calculation takes about 0.2 ms, so answers are remembered per (provider, model,
tokens, day): cache hits, which save the same tokens every time, cost a dictionary lookup.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .providers import known_provider

if TYPE_CHECKING:
    from .call import Call

__all__ = ["GENAI_PRICES_IDS", "cost_of", "forget", "price", "warm_up"]

#: llmshim's provider name (``llmshim.providers``) -> the ``genai-prices`` provider id. A provider
#: not here (huggingface's router, deepinfra, sambanova, hyperbolic, ollama, llama_cpp...) has no
#: price: the library does not list it.
GENAI_PRICES_IDS: dict[str, str] = {
    "openai": "openai",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "groq": "groq",
    "deepseek": "deepseek",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
    "perplexity": "perplexity",
    "anthropic": "anthropic",
    "cohere": "cohere",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "aws.bedrock": "aws",
    "openrouter": "openrouter",
    "together": "together",
    "fireworks": "fireworks",
    "cerebras": "cerebras",
    "novita": "novita",
    "moonshot": "moonshotai",
}

_NOT_LOADED: Any = object()
#: The ``genai_prices`` module once imported, None once its import failed (not searched for again on
#: every call), ``_NOT_LOADED`` before the first priced call or after :func:`forget`.
_loaded: list[Any] = [_NOT_LOADED]
#: (genai-prices provider id, model) the library does not know: not asked again (a lookup that
#: fails costs as much as one that succeeds, and an unknown model is asked for on every call).
_unknown: set[tuple[str, str]] = set()


def _library() -> Any | None:
    """The ``genai_prices`` module, or None when it is not installed (remembered until
    :func:`forget`)."""
    library = _loaded[0]
    if library is _NOT_LOADED:
        try:
            library = importlib.import_module("genai_prices")
        except Exception:  # ImportError, or a broken install: no price rather than a broken call
            library = None
        _loaded[0] = library
    return library


def _count(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


@functools.lru_cache(maxsize=4096)
def _priced(provider_id: str, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int | None,
            cache_write_tokens: int | None, service_tier: str | None, at: _dt.datetime | None,
            _day: tuple[int, int, int] | None, library: Any) -> Decimal | None:
    """The library's price; ``_day`` only keys the memory (prices have dates), ``library`` too
    (another snapshot or a re-installed library is another price list)."""
    cache = {name: count for name, count in (("cache_read_tokens", cached_input_tokens),
                                             ("cache_write_tokens", cache_write_tokens)) if count is not None}
    usage = library.Usage(input_tokens=input_tokens, output_tokens=output_tokens, **cache)
    context = {"service_tier": service_tier} if service_tier else None  # flex, priority...: their own rates
    calculation = library.calc_price(usage, model, provider_id=provider_id, genai_request_timestamp=at,
                                     price_context=context)
    total = calculation.total_price
    return total if isinstance(total, Decimal) else Decimal(str(total))


def price(provider: str | None, model: str | None, input_tokens: int | None, output_tokens: int | None,
          cached_input_tokens: int | None = None, *, cache_write_tokens: int | None = None,
          service_tier: str | None = None, at: _dt.datetime | None = None) -> Decimal | None:
    """US dollars for this usage of ``model`` at ``provider`` (llmshim's name of a known host's
    provider, :func:`llmshim.providers.known_provider`; None for an unknown host), at time ``at``
    (default: now). ``input_tokens`` counts the whole prompt, cached tokens included (OpenAI's
    convention); ``cached_input_tokens`` of them were read from the provider's prompt cache and
    ``cache_write_tokens`` written to it (Anthropic bills a write above the input rate);
    ``service_tier`` is the tier the provider says it served (``flex``, ``priority``...: priced at
    that tier's rates where the library lists them, else at the standard ones).

    None, never 0 and never an exception, when there is no honest answer: no provider, no model,
    no tokens at all (a count missing beside a known one counts 0: embeddings have no output),
    a negative or non-integer count, a provider or model ``genai-prices`` does not know, or
    ``genai-prices`` not installed."""
    provider_id = GENAI_PRICES_IDS.get(provider or "")
    if provider_id is None or not model or (input_tokens is None and output_tokens is None):
        return None
    library = _library()
    if library is None:
        return None
    if (provider_id, model) in _unknown:
        return None
    try:
        day = None if at is not None else time.gmtime()[:3]
        return _priced(provider_id, model, _count(input_tokens) or 0, _count(output_tokens) or 0,
                       _count(cached_input_tokens), _count(cache_write_tokens), service_tier, at, day, library)
    except LookupError:  # the provider or the model is not in the library's list
        _unknown.add((provider_id, model))
        return None
    except Exception:  # ValueError (a negative count...), anything else the library raises
        return None


def cost_of(call: Call) -> Decimal | None:
    """What ``call`` cost (or, for a cache hit, what it would have cost: the replayed answer's
    usage), from its host's provider, the model its response names (else the request's) and the
    usage the provider reported, else llmshim's estimate of it (``ResponseInfo.tokens``). None when
    :func:`price` has no answer or the call has no response. Never raises."""
    try:
        response = call.response
        if response is None:
            return None
        host, _ = call.request.server
        usage = response.tokens
        if usage is None:
            return None
        return price(known_provider(host, call.request.path), response.model or call.info.model,
                     usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
                     cache_write_tokens=usage.cache_write_tokens, service_tier=response.service_tier)
    except Exception:
        return None


def warm_up() -> bool:
    """Import ``genai-prices`` and load its price list now (about 0.3 s, then 0.1 s), so that the
    first priced call does not pay for it: for a background thread at ``install()``. True when
    prices are available. Never raises."""
    library = _library()
    if library is None:
        return False
    try:
        library.data_snapshot.get_snapshot()
    except Exception:
        return False
    return True


def forget() -> None:
    """Forget remembered prices and a failed import of ``genai-prices``: after installing or
    updating it in a running process (or in tests)."""
    _priced.cache_clear()
    _unknown.clear()
    _loaded[0] = _NOT_LOADED
