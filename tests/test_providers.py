"""The real provider (issue 14, item 3): ``gen_ai.provider.name`` is named from the request's host
where the host is a known service, the wire's dialect name otherwise; the cache key never changes.

Tables of hosts through the pure functions, the same through ``detect`` on whole URLs (ports, case,
IPv6, IDNA, user info), the cache keys pinned to their values from before providers were named,
and the name as the real OpenAI SDK's calls report it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

import llmshim
from llmshim.call import Call, WireRequest
from llmshim.dialects import detect
from llmshim.providers import PROVIDERS, is_local, known_provider, provider_for
from llmshim.store.cache_keys import cache_key

AZURE_PATH = "/openai/deployments/gpt4o-prod/chat/completions"

KNOWN = [
    ("api.openai.com", "/v1/chat/completions", "openai"),
    ("myres.openai.azure.com", AZURE_PATH, "azure.ai.openai"),
    ("my-res-2.openai.azure.com", "/openai/v1/chat/completions", "azure.ai.openai"),
    ("myres.cognitiveservices.azure.com", AZURE_PATH, "azure.ai.openai"),
    ("eastus.api.cognitive.microsoft.com", AZURE_PATH, "azure.ai.openai"),  # a regional endpoint
    ("myres.openai.azure.us", AZURE_PATH, "azure.ai.openai"),
    ("myres.openai.azure.cn", AZURE_PATH, "azure.ai.openai"),
    ("gw.azure-api.net", "/proxy" + AZURE_PATH, "azure.ai.openai"),
    ("proj.services.ai.azure.com", AZURE_PATH, "azure.ai.openai"),  # Foundry, the OpenAI routes
    ("proj.services.ai.azure.com", "/models/chat/completions", "azure.ai.inference"),  # Foundry, models
    ("llama-70b.eastus2.models.ai.azure.com", "/v1/chat/completions", "azure.ai.inference"),
    ("api.groq.com", "/openai/v1/chat/completions", "groq"),
    ("api.deepseek.com", "/chat/completions", "deepseek"),
    ("api.mistral.ai", "/v1/chat/completions", "mistral_ai"),
    ("api.x.ai", "/v1/chat/completions", "x_ai"),
    ("api.perplexity.ai", "/chat/completions", "perplexity"),
    ("api.anthropic.com", "/v1/chat/completions", "anthropic"),
    ("api.cohere.ai", "/compatibility/v1/chat/completions", "cohere"),
    ("generativelanguage.googleapis.com", "/v1beta/openai/chat/completions", "gcp.gemini"),
    ("us-central1-aiplatform.googleapis.com", "/v1/projects/p/locations/l/endpoints/openapi/chat/completions",
     "gcp.vertex_ai"),
    ("bedrock-runtime.us-west-2.amazonaws.com", "/openai/v1/chat/completions", "aws.bedrock"),
    ("openrouter.ai", "/api/v1/chat/completions", "openrouter"),
    ("api.together.xyz", "/v1/chat/completions", "together"),
    ("api.fireworks.ai", "/inference/v1/chat/completions", "fireworks"),
    ("api.cerebras.ai", "/v1/chat/completions", "cerebras"),
    ("router.huggingface.co", "/v1/chat/completions", "huggingface"),
    ("api.moonshot.ai", "/v1/chat/completions", "moonshot"),
    ("ollama.com", "/api/chat", "ollama"),
]

UNKNOWN = [  # named by their wire: local servers, self-hosted ones, lookalikes
    "localhost", "127.0.0.1", "::1", "gpu-box", "llm.corp.example", "vllm.internal",
    "evilopenai.azure.com",  # not a sub-domain of openai.azure.com
    "api.openai.com.evil.example", "openai.com", "xapi.groq.com", "api.groq.co",
    "s3.us-west-2.amazonaws.com",  # AWS, but not Bedrock
    "proj.services.ai.azure.com.example",
    "xn--pi-7ka.openai.example",  # an IDNA host
    "",
]


@pytest.mark.parametrize(("host", "path", "provider"), KNOWN)
def test_a_known_host_names_its_provider(host: str, path: str, provider: str) -> None:
    assert known_provider(host, path) == provider
    assert provider_for(host, "openai", path) == provider
    assert known_provider(host.upper() + ".", path) == provider  # DNS is case-insensitive; a root dot


@pytest.mark.parametrize("host", UNKNOWN)
@pytest.mark.parametrize("dialect", ["openai", "ollama", "llama_cpp"])
def test_an_unknown_or_local_host_is_named_by_its_wire(host: str, dialect: str) -> None:
    assert known_provider(host, "/v1/chat/completions") is None
    assert provider_for(host, dialect, "/v1/chat/completions") == dialect


def test_the_azure_gateway_and_foundry_split_on_the_path() -> None:
    assert known_provider("gw.azure-api.net", "/v1/chat/completions") is None  # any API behind APIM
    assert known_provider("proj.services.ai.azure.com", "/openai/v1/responses") == "azure.ai.openai"


def test_every_table_entry_is_a_lower_case_domain_and_a_name() -> None:
    for domain, pattern, provider in PROVIDERS:
        assert domain == domain.lower().strip(".") and " " not in domain
        assert provider == provider.lower() and provider.strip() == provider and provider
        assert not pattern or pattern.startswith(("/", "^"))


@pytest.mark.parametrize(("host", "local"), [
    ("localhost", True), ("LOCALHOST", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
    ("[::1]", True), ("gpu-box", True), ("api.openai.com", False), ("10.0.0.5", False), ("128.0.0.1", False)])
def test_local_hosts(host: str, local: bool) -> None:
    assert is_local(host, frozenset({"gpu-box"})) is local


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}).encode()


def _detect(url: str) -> tuple[str, str]:
    found = detect(WireRequest("POST", url, (("content-type", "application/json"),), CHAT))
    assert found is not None, url
    return found[0].name, found[1].provider


@pytest.mark.parametrize(("url", "dialect", "provider"), [
    ("https://api.openai.com/v1/chat/completions", "openai", "openai"),
    ("https://API.GROQ.COM/openai/v1/chat/completions", "openai", "groq"),
    ("https://api.groq.com:443/openai/v1/chat/completions", "openai", "groq"),
    ("https://api.mistral.ai:8443/v1/chat/completions?x=1", "openai", "mistral_ai"),
    ("https://user:secret@api.x.ai/v1/chat/completions", "openai", "x_ai"),
    ("https://api.deepseek.com./chat/completions", "openai", "deepseek"),
    ("https://myres.openai.azure.com" + AZURE_PATH + "?api-version=2024-10-21", "openai", "azure.ai.openai"),
    ("https://ollama.com/api/chat", "ollama", "ollama"),
    ("http://127.0.0.1:11434/v1/chat/completions", "openai", "openai"),  # Ollama's /v1: the wire's name
    ("http://127.0.0.1:11434/api/chat", "ollama", "ollama"),
    ("http://localhost:8080/completion", "llama_cpp", "llama_cpp"),
    ("http://[::1]:8000/v1/chat/completions", "openai", "openai"),
    ("http://[2001:db8::1]:8000/v1/chat/completions", "openai", "openai"),
    ("http://xn--bcher-kva.example/v1/chat/completions", "openai", "openai"),
    ("http://vllm.internal:8000/v1/chat/completions", "openai", "openai"),
])
def test_detect_names_the_provider_and_keeps_the_dialect(url: str, dialect: str, provider: str) -> None:
    assert _detect(url) == (dialect, provider)


# The cache keys of these requests (salt b"k" * 32) as computed before providers were named
# (main at d3fe2b8): a provider's name must not move any entry out of reach.
KEYS_BEFORE = {
    "https://api.openai.com/v1/chat/completions":
        "33b37da85fadccc188d6a52431a3fc3caebfab340778c15034c700975f73a239",
    "https://myres.openai.azure.com" + AZURE_PATH.replace("gpt4o-prod", "gpt4o") + "?api-version=2024-10-21":
        "19d6262ba2f063f1fbb19c3add3a76ee49cc8b291110f56a136daa41530cad0a",
    "https://api.groq.com/openai/v1/chat/completions":
        "1760cc0f2b37e6e1ae28dd61d6dc57536248d279551e39ad24c3189bab4f4ca0",
    "https://api.deepseek.com/chat/completions":
        "f5ffe2d96dbe49f957ae7d5fffc176913e0a61a7462aa61d736261e8844f5942",
    "https://api.mistral.ai/v1/chat/completions":
        "65d2b4a524cc4d794fd9282a30290935a22e05fe83e7fee166ffb85ea5759f49",
    "https://api.x.ai/v1/chat/completions":
        "2884ea9f35900affb0a5057bd618826143e89a913cb394a73bca52e6393b04de",
    "https://openrouter.ai/api/v1/chat/completions":
        "e4951eeed03d76c262c43cb450be45dcd3b6545d7608ab35acfd8b2310ab7e91",
    "https://api.together.xyz/v1/chat/completions":
        "206dbcf01a370f844f19d8689c0670658217d419ea2296eb4e11848b5e6e8afa",
    "http://127.0.0.1:11434/v1/chat/completions":
        "26df4d50fcc96dd1b48debccbe7f02464bfca79fce3201aa30e41b345e4cae96",
    "http://127.0.0.1:11434/api/chat":
        "ab528babf40a32eb2e9aec6383b1e6eb927ec41f57aa3e9500a20ec16245f154",
    "http://localhost:8080/completion":
        "164b5fbde7e30a806d07300fed90a5084293324f6695ed91281e9bc91465867c",
}


@pytest.mark.parametrize("url", list(KEYS_BEFORE))
def test_naming_the_provider_changed_no_cache_key(url: str) -> None:
    wire = WireRequest("POST", url, (("content-type", "application/json"),), CHAT)
    found = detect(wire)
    assert found is not None
    call = Call(request=wire, info=found[1], library="t", dialect=found[0])
    assert cache_key(call, b"k" * 32) == KEYS_BEFORE[url]


def _completion(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})


@pytest.mark.parametrize(("client", "provider"), [
    (lambda http: openai.OpenAI(api_key="sk-test", base_url="https://api.groq.com/openai/v1", http_client=http),
     "groq"),
    (lambda http: openai.AzureOpenAI(api_key="k", azure_endpoint="https://myres.openai.azure.com",
                                     api_version="2024-10-21", http_client=http), "azure.ai.openai"),
    (lambda http: openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1", http_client=http), "openai"),
])
def test_the_sdk_call_reports_the_real_provider(client: Any, provider: str, records: list[llmshim.CallRecord]) -> None:
    llmshim.install()
    try:
        with httpx.Client(transport=httpx.MockTransport(_completion)) as http:
            client(http).chat.completions.create(model="gpt4o-prod", messages=[{"role": "user", "content": "hi"}])
    finally:
        llmshim.uninstall()
    assert [(r.event, r.provider) for r in records] == [("call_started", provider), ("call_completed", provider)]
