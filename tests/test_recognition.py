"""Only LLM calls are touched (issue 11, item 3): a route's path is not enough, its body shape is
required, and anything doubtful passes through untouched and uncached.

``SPEC`` below is the specification of each route's shape, written independently of the dialects:
the property tests check that ``detect`` recognises a body exactly when the spec says so, over
generated bodies on every LLM-looking path. Real clients (the OpenAI SDK, the ollama client, plain
requests to llama.cpp routes) and the recorded traffic in ../shared/cassettes must keep being
recognised.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ollama
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmshim
from conftest import SHARED_CASSETTES
from llmshim.call import WireRequest
from llmshim.dialects import detect
from llmshim.testing import Answer, FakeLLMServer, Received

with warnings.catch_warnings():  # Hypothesis imports libcst to report a failure; libcst warns on import
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

HYPOTHESIS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the specification --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return type(v) is int


def _texts_or_tokens(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(i, str) or _is_int(i) or (isinstance(i, list) and all(_is_int(t) for t in i)) for i in v))


def _messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in v)


def _llama_prompt(v: Any) -> bool:
    return isinstance(v, (str, dict)) or (isinstance(v, list) and all(
        isinstance(i, (str, dict, list)) or _is_int(i) for i in v))


def _stream_ok(b: dict[str, Any]) -> bool:
    return b.get("stream") is None or isinstance(b.get("stream"), bool)


def _model(b: dict[str, Any], path: str) -> bool:
    """OpenAI routes need a string model, or an Azure deployment path that names one."""
    if "model" in b:
        return isinstance(b["model"], str)
    return "/deployments/" in path


def _openai(field: str, shape: Callable[[Any], bool]) -> Callable[[str, dict[str, Any]], bool]:
    return lambda path, b: _model(b, path) and shape(b.get(field)) and _stream_ok(b)


def _ollama(field: str, shape: Callable[[Any], bool]) -> Callable[[str, dict[str, Any]], bool]:
    return lambda path, b: isinstance(b.get("model"), str) and shape(b.get(field)) and _stream_ok(b)


def _llama(shape: Callable[[dict[str, Any]], bool]) -> Callable[[str, dict[str, Any]], bool]:
    return lambda path, b: (shape(b) and _stream_ok(b) and ((b.get("model") is None and "model" not in b)
                                                              or isinstance(b.get("model"), str)))


def _responses(path: str, b: dict[str, Any]) -> bool:
    stored_prompt = isinstance(b.get("prompt"), dict)
    model = isinstance(b.get("model"), str) or ("model" not in b and (stored_prompt or "/deployments/" in path))
    inputs = b.get("input")
    good_input = isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(i, dict) for i in inputs))
    return model and (good_input or (stored_prompt and "input" not in b)) and _stream_ok(b)


#: (path pattern, (provider, endpoint), the body shape the route requires). First match wins.
SPEC: list[tuple[str, tuple[str, str], Callable[[str, dict[str, Any]], bool]]] = [
    (r".*/api/chat", ("ollama", "api/chat"), _ollama("messages", _messages)),
    (r".*/api/generate", ("ollama", "api/generate"), _ollama("prompt", lambda v: isinstance(v, str))),
    (r".*/api/embed", ("ollama", "api/embed"), _ollama("input", lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(i, str) for i in v)))),
    (r".*/api/embeddings", ("ollama", "api/embeddings"), _ollama("prompt", lambda v: isinstance(v, str))),
    (r"/completions?", ("llama_cpp", "completion"), _llama(lambda b: _llama_prompt(b.get("prompt")))),
    (r"/infill", ("llama_cpp", "infill"), _llama(
        lambda b: isinstance(b.get("input_prefix"), str) or isinstance(b.get("input_extra"), list))),
    (r"/embeddings?", ("llama_cpp", "embedding"), _llama(
        lambda b: _llama_prompt(b.get("content")) or _llama_prompt(b.get("input")))),
    (r".*/chat/completions", ("openai", "chat/completions"), _openai("messages", _messages)),
    (r".*/completions", ("openai", "completions"), _openai("prompt", _texts_or_tokens)),
    (r".*/embeddings", ("openai", "embeddings"), _openai("input", _texts_or_tokens)),
    (r".*/responses", ("openai", "responses"), _responses),
]


def expected(path: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """The first route whose path and shape both match (``/api/embeddings`` with an OpenAI body is an
    OpenAI-compatible base URL under ``/api``). A root /completions or /embeddings naming a model is
    OpenAI's; /chat/completions is never the completions route."""
    for pattern, found, shape in SPEC:
        if not re.fullmatch(pattern, path):
            continue
        if found[0] == "llama_cpp" and path in ("/completions", "/embeddings") and "model" in body:
            continue
        if shape(path, body):
            return found
        if found == ("openai", "chat/completions"):
            return None
    return None


def recognised(path: str, body: Any) -> tuple[str, str] | None:
    found = detect(WireRequest("POST", "http://api.test" + path, (), json.dumps(body).encode()))
    return None if found is None else (found[1].provider, found[1].endpoint)


# -- generated bodies on LLM-looking paths ------------------------------------------------------

SUFFIXES = ["/chat/completions", "/completions", "/completion", "/embeddings", "/embedding", "/responses", "/infill",
            "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"]
PREFIXES = ["", "/v1", "/api/tasks/7", "/openai/deployments/gpt", "/proxy/v2", "/todo"]
FIELDS = ["model", "messages", "prompt", "input", "content", "input_prefix", "input_extra", "stream", "role",
          "title", "done", "user", "message", "text", "due"]

leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=5), st.floats(allow_nan=False))
values = st.recursive(
    leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["role", "content", "type", "id", "title"]), inner, max_size=3)),
    max_leaves=8)
paths = st.builds(lambda p, s: p + s, st.sampled_from(PREFIXES), st.sampled_from(SUFFIXES))


@HYPOTHESIS
@given(paths, st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
def test_a_body_is_recognised_exactly_when_its_route_shape_holds(path: str, body: dict[str, Any]) -> None:
    assert recognised(path, body) == expected(path, body)


@st.composite
def shaped(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A body that has its route's shape (so the test above also sees many positives)."""
    path = draw(paths)
    texts = st.text(max_size=5)
    body: dict[str, Any] = {"model": draw(texts)}
    body["messages"] = draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                            "content": texts}), max_size=2))
    body["prompt"] = draw(st.one_of(texts, st.lists(texts, max_size=2), st.lists(st.integers(0, 9), max_size=3)))
    body["input"] = draw(st.one_of(texts, st.lists(texts, max_size=2)))
    body["input_prefix"] = draw(texts)
    for field in draw(st.lists(st.sampled_from(list(body)), max_size=3)):
        body.pop(field, None)
    if draw(st.booleans()):
        body["stream"] = draw(st.one_of(st.booleans(), st.none(), st.sampled_from(["yes", 1])))
    return path, body


@HYPOTHESIS
@given(shaped())
def test_shaped_bodies_are_recognised_by_the_spec_and_nothing_else(case: tuple[str, dict[str, Any]]) -> None:
    path, body = case
    assert recognised(path, body) == expected(path, body)


TODO_FIELDS = ["title", "done", "user", "due", "note", "text", "message", "tags", "assignee", "model", "priority"]


@HYPOTHESIS
@given(paths, st.dictionaries(st.sampled_from(TODO_FIELDS), values, min_size=1, max_size=6))
def test_application_bodies_on_llm_looking_paths_are_never_recognised(path: str, body: dict[str, Any]) -> None:
    assert recognised(path, body) is None


# -- the example: a to-do API through a real client, with the cache on ------------------

@pytest.fixture
def todo_api() -> Iterator[FakeLLMServer]:
    """A local server that answers every request with a new record, whatever the route."""
    counter = itertools.count(1)

    def answer(received: Received) -> Answer:
        record = {"id": next(counter), "path": received.path, "owner": received.header("x-user")}
        return Answer(200, [("Content-Type", "application/json")], json.dumps(record).encode())

    with FakeLLMServer(responder=answer) as server:
        yield server


@pytest.mark.parametrize(("path", "body"), [
    ("/api/tasks/7/completions", {"done": True, "note": "finished"}),
    ("/api/tasks/7/completions", {"model": "weekly", "prompt": 7}),
    ("/v1/chat/completions", {"model": "m", "messages": "hello"}),
    ("/v1/chat/completions", {"model": 3, "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"content": "x"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
    ("/shop/api/chat", {"user": "bob", "message": "where is my order?"}),
    ("/api/generate", {"model": "report", "template": "monthly"}),
    ("/reports/embeddings", {"text": "quarterly"}),
    ("/v1/embeddings", {"model": "m", "input": {"a": 1}}),
    ("/v1/responses", {"model": "m"}),
    ("/completion", {"task": 7}),
    ("/infill", {"form": "address"}),
])
def test_non_llm_posts_reach_the_server_every_time(todo_api: FakeLLMServer, tmp_path: Path, path: str,
                                                   body: dict[str, Any], records: list[llmshim.CallRecord]) -> None:
    llmshim.install(cache="on", cache_path=str(tmp_path / "cache.sqlite3"))
    try:
        first = requests.post(todo_api.url + path, json=body, headers={"x-user": "alice"}, timeout=10).json()
        second = requests.post(todo_api.url + path, json=body, headers={"x-user": "bob"}, timeout=10).json()
    finally:
        llmshim.uninstall()
    assert len(todo_api.received) == 2
    assert (first["id"], first["owner"]) == (1, "alice")
    assert (second["id"], second["owner"]) == (2, "bob")
    assert records == []


# -- real clients' calls are still recognised ---------------------------------------------------

@pytest.fixture
def observed(installed: Callable[..., object], records: list[llmshim.CallRecord]) -> list[llmshim.CallRecord]:
    installed()
    return records


def _calls(records: list[llmshim.CallRecord]) -> list[tuple[str, str]]:
    return [(r.provider, r.operation) for r in records if r.event == "call_completed"]


def test_openai_sdk_calls_are_recognised(server: FakeLLMServer, observed: list[llmshim.CallRecord]) -> None:
    with openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0) as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        client.completions.create(model="m", prompt="x")
        client.completions.create(model="m", prompt=[[1, 2, 3]])
        client.embeddings.create(model="m", input=["a", "b"])
        client.responses.create(model="m", input="x")
        client.responses.create(model="m", input=[{"role": "user", "content": "x"}])
        client.responses.create(prompt={"id": "pmpt_1", "variables": {"city": "Paris"}})
    with openai.AzureOpenAI(azure_endpoint=server.url, api_key="k", api_version="2024-10-21", max_retries=0,
                            azure_deployment="my-gpt") as azure:
        azure.chat.completions.create(model="my-gpt", messages=[{"role": "user", "content": "x"}])
    assert _calls(observed) == [
        ("openai", "chat"), ("openai", "text_completion"), ("openai", "text_completion"), ("openai", "embeddings"),
        ("openai", "chat"), ("openai", "chat"), ("openai", "chat"), ("openai", "chat")]


def test_ollama_client_calls_are_recognised(server: FakeLLMServer, observed: list[llmshim.CallRecord]) -> None:
    with ollama.Client(host=server.url) as client:
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
        client.generate(model="llama3.2", prompt="x")
        client.embed(model="nomic", input=["a", "b"])
        # The legacy embeddings route, with the body the client sends (the bundled server answers
        # /api/embeddings in OpenAI's shape, which this client cannot parse: the request is what counts).
        requests.post(server.url + "/api/embeddings", json={"model": "nomic", "prompt": "x", "options": None,
                                                            "keep_alive": None}, timeout=10)
    assert _calls(observed) == [
        ("ollama", "chat"), ("ollama", "text_completion"), ("ollama", "embeddings"), ("ollama", "embeddings")]


def test_llama_cpp_native_calls_are_recognised(server: FakeLLMServer, observed: list[llmshim.CallRecord]) -> None:
    requests.post(server.url + "/completion", json={"prompt": "x", "n_predict": 4}, timeout=10)
    requests.post(server.url + "/completion", json={"prompt": [1, 2, "x"]}, timeout=10)
    requests.post(server.url + "/infill", json={"input_prefix": "def f(", "input_suffix": "):"}, timeout=10)
    requests.post(server.url + "/embedding", json={"content": "x"}, timeout=10)
    assert _calls(observed) == [
        ("llama_cpp", "text_completion"), ("llama_cpp", "text_completion"), ("llama_cpp", "text_completion"),
        ("llama_cpp", "embeddings")]


def _cassette_posts() -> list[tuple[str, str, bytes]]:
    catalog = SHARED_CASSETTES / "catalog.json"
    yaml = pytest.importorskip("yaml")
    if not catalog.exists():
        pytest.skip(f"recorded cassettes not found at {SHARED_CASSETTES}")
    found = []
    for entry in json.loads(catalog.read_text())["cassettes"]:
        data = yaml.load((SHARED_CASSETTES / entry["file"]).read_text(), Loader=getattr(yaml, "CSafeLoader",
                                                                                         yaml.SafeLoader))
        for item in data.get("interactions") or []:
            request = item["request"]
            body = request.get("body")
            raw = body.get("string", b"") if isinstance(body, dict) else body
            raw = raw.encode() if isinstance(raw, str) else (raw or b"")
            if request["method"] == "POST":
                found.append((entry["file"], urlsplit(request["uri"]).path, raw))
    return found


def test_every_recorded_llm_call_is_still_recognised() -> None:
    posts = _cassette_posts()
    llm_routes = [(f, p, raw) for f, p, raw in posts if p.rstrip("/").endswith(tuple(SUFFIXES))]
    missed = [(f, p) for f, p, raw in llm_routes if detect(WireRequest("POST", "http://x" + p, (), raw)) is None]
    assert llm_routes and not missed
    others = [(f, p) for f, p, raw in posts if (f, p, raw) not in llm_routes
              and detect(WireRequest("POST", "http://x" + p, (), raw)) is not None]
    assert others == []
