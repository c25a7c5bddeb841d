"""Who answers a call: the provider named from the request's host, apart from the wire it speaks.

A dialect says how a request is spoken (``openai``, ``ollama``, ``llama_cpp``); it cannot say who
serves it: Azure OpenAI, Groq, DeepSeek, Mistral, xAI, OpenRouter, Together, vLLM and Ollama's
``/v1`` all speak the OpenAI wire. The host can, for the public services whose hosts are known:
:func:`known_provider` names those with the GenAI semantic conventions' well-known values of
``gen_ai.provider.name`` (``azure.ai.openai``, ``groq``, ``mistral_ai``, ``x_ai``...) and, for
services the conventions do not list, a lower-case name of our own (``openrouter``, ``together``,
``fireworks``...: the ``PROVIDERS`` table is the documentation).

A host that is not in the table (a local server, a company gateway, a self-hosted vLLM) is named by
its wire, as before: :func:`provider_for` answers the dialect's name. That is a decision, not a
guess: ``localhost:11434/v1`` may be Ollama, llama.cpp, vLLM or a proxy to OpenAI, and the port says
nothing reliable; the wire is the one thing known. Cost is only ever computed for a known provider
(``llmshim.cost``), so an unknown or local server never gets a made-up price.

The cache key does not use any of this: it keys on the dialect's name, as it always has, so naming
the provider changed no key (``tests/test_providers.py`` pins the keys).

Everything here is pure: (host, path) in, a name out. Hosts are compared lower-case without a
trailing dot; a host matches an entry exactly or as a sub-domain (``*.openai.azure.com``), never
as a mere string suffix (``evilopenai.azure.com`` is not ``openai.azure.com``'s).
"""

from __future__ import annotations

import functools
import re

__all__ = ["PROVIDERS", "is_local", "known_provider", "provider_for"]

#: (host or parent domain, path pattern or "" for any path, provider name). First match wins, so a
#: path-specific entry comes before the catch-all of the same domain.
PROVIDERS: tuple[tuple[str, str, str], ...] = (
    # semantic conventions' well-known values
    ("api.openai.com", "", "openai"),
    ("openai.azure.com", "", "azure.ai.openai"),  # <resource>.openai.azure.com
    ("cognitiveservices.azure.com", "", "azure.ai.openai"),  # <resource>.cognitiveservices.azure.com
    ("services.ai.azure.com", r"/openai/", "azure.ai.openai"),  # Azure AI Foundry, OpenAI routes
    ("services.ai.azure.com", "", "azure.ai.inference"),  # Azure AI Foundry, model inference routes
    ("models.ai.azure.com", "", "azure.ai.inference"),  # serverless deployments
    ("inference.ai.azure.com", "", "azure.ai.inference"),
    ("azure-api.net", r"/openai/", "azure.ai.openai"),  # API Management in front of Azure OpenAI
    ("api.cognitive.microsoft.com", r"/openai/", "azure.ai.openai"),  # <region>.api.cognitive...
    ("openai.azure.us", "", "azure.ai.openai"),  # Azure Government
    ("openai.azure.cn", "", "azure.ai.openai"),  # Azure China
    ("api.groq.com", "", "groq"),
    ("api.deepseek.com", "", "deepseek"),
    ("api.mistral.ai", "", "mistral_ai"),
    ("api.x.ai", "", "x_ai"),
    ("api.perplexity.ai", "", "perplexity"),
    ("api.anthropic.com", "", "anthropic"),  # its OpenAI-compatible /v1/chat/completions
    ("api.cohere.ai", "", "cohere"),
    ("api.cohere.com", "", "cohere"),
    ("generativelanguage.googleapis.com", "", "gcp.gemini"),  # /v1beta/openai/...
    ("googleapis.com", r"^(?:[a-z0-9-]+-)?aiplatform\.", "gcp.vertex_ai"),  # <region>-aiplatform...
    ("amazonaws.com", r"^bedrock-runtime\.|^bedrock-mantle\.", "aws.bedrock"),  # matched on the host
    # no well-known value: our own lower-case names
    ("openrouter.ai", "", "openrouter"),
    ("api.together.xyz", "", "together"),
    ("api.together.ai", "", "together"),
    ("api.fireworks.ai", "", "fireworks"),
    ("api.cerebras.ai", "", "cerebras"),
    ("api.novita.ai", "", "novita"),
    ("api.deepinfra.com", "", "deepinfra"),
    ("api.sambanova.ai", "", "sambanova"),
    ("api.hyperbolic.xyz", "", "hyperbolic"),
    ("router.huggingface.co", "", "huggingface"),
    ("api.moonshot.ai", "", "moonshot"),
    ("api.moonshot.cn", "", "moonshot"),
    ("ollama.com", "", "ollama"),  # Ollama's cloud
)

_LOOPBACK = ("localhost", "::1", "0:0:0:0:0:0:0:1")


def _normal(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 literal as written in a URL
        host = host[1:-1]
    return host


def _matches(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


@functools.lru_cache(maxsize=1024)
def known_provider(host: str, path: str = "") -> str | None:
    """The provider a public service's ``host`` (and, where one domain serves two APIs, ``path``)
    names, or None for a host not in :data:`PROVIDERS` (local, self-hosted, a gateway)."""
    host = _normal(host)
    for domain, pattern, provider in PROVIDERS:
        if not _matches(host, domain):
            continue
        if not pattern:
            return provider
        subject = host if pattern.startswith("^") else path  # "^..." patterns read the host
        if re.search(pattern, subject):
            return provider
    return None


def provider_for(host: str, dialect_name: str, path: str = "") -> str:
    """``gen_ai.provider.name`` of a request to ``host``/``path`` spoken in ``dialect_name``: the
    known provider of the host, else the dialect's own name (local and unknown servers)."""
    return known_provider(host, path) or dialect_name


def is_local(host: str, local_hosts: frozenset[str] = frozenset()) -> bool:
    """Whether ``host`` is this machine (loopback) or one of the configured ``local_hosts``
    (``LLMSHIM_LOCAL_HOSTS``)."""
    host = _normal(host)
    return host in local_hosts or host in _LOOPBACK or host.startswith("127.")
