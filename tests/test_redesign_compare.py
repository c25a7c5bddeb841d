"""Old against new: the same inputs through the pre-redesign tree (commit 9efe5a3, checked out at
/work/old) and this one, each in its own interpreter (``tests/redesign_probe.py``), answers compared.

These comparisons need the old tree, so they are skipped without it: they belong in the review's
report, not in CI. What the redesign changed on purpose is named where it is allowed for.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
OLD = Path(os.environ.get("LLMSHIM_REVIEW_OLD_TREE_DIR", "/work/old"))
PROBE = Path(__file__).with_name("redesign_probe.py")

pytestmark = pytest.mark.skipif(not (OLD / "llmshim" / "__init__.py").exists(),
                                reason=f"the pre-redesign tree (git worktree add {OLD} 9efe5a3) is absent")


class Probe:
    """One interpreter running the probe on one tree: a question in, an answer out."""

    def __init__(self, tree: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
        env["PYTHONPATH"] = str(tree)
        self.process = subprocess.Popen([sys.executable, str(PROBE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, cwd=str(tree))

    def ask(self, kind: str, question: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"kind": kind, "input": question}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the probe died"
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def probes() -> Iterator[tuple[Probe, Probe]]:
    old, new = Probe(OLD), Probe(ROOT)
    try:
        yield old, new
    finally:
        old.close()
        new.close()


def _both(probes: tuple[Probe, Probe], kind: str, question: Any) -> tuple[Any, Any]:
    old, new = probes
    return old.ask(kind, question), new.ask(kind, question)


# -- recognition and the cache key ---------------------------------------------------------------

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/api/chat",
          "/api/generate", "/api/embed", "/api/embeddings", "/completion", "/completions", "/infill",
          "/embedding", "/embeddings", "/chat/completions", "/openai/deployments/x/chat/completions",
          "/v1/chat/completions/", "/api/tags", "/v1/models", "/health", "/v1/chat/completion"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
FIELDS = st.sampled_from([
    "model", "messages", "prompt", "input", "content", "temperature", "seed", "max_tokens", "max_completion_tokens",
    "max_output_tokens", "n_predict", "stream", "input_prefix", "input_suffix", "system", "instructions", "options",
    "top_p", "top_k", "stop", "n", "encoding_format", "dimensions", "user", "metadata", "store", "keep_alive",
    "prompt_cache_key", "background", "previous_response_id", "conversation", "stream_options", "format", "tools"])
VALUES = (st.integers(-2, 60) | st.floats(-1, 2, allow_nan=False) | st.booleans() | st.sampled_from(["0", "0.5", "x"])
          | st.just([{"role": "user", "content": "hi"}]) | JSON)
OPTIONS = st.dictionaries(st.sampled_from(["num_predict", "temperature", "seed", "stop", "top_k"]), VALUES, max_size=3)
SHAPES = st.sampled_from([{"model": "m", "messages": [{"role": "user", "content": "x"}]}, {"model": "m", "prompt": "x"},
                          {"prompt": "x"}, {"model": "m", "input": "x"}, {"input_prefix": "a"}, {"content": "x"}, {}])
BODIES = st.builds(lambda extra, options, shape: {**shape, **extra, **({"options": options} if options else {})},
                   st.dictionaries(FIELDS, VALUES, max_size=6), st.none() | OPTIONS, SHAPES)


def _request(path: str, body: Any, raw: bytes | None = None, query: str = "") -> dict[str, Any]:
    payload = raw if raw is not None else json.dumps(body).encode()
    return {"method": "POST", "url": f"http://127.0.0.1:8080{path}{query}",
            "headers": [["content-type", "application/json"], ["authorization", "Bearer sk-test-1234567890"]],
            "body": base64.b64encode(payload).decode()}


#: What the redesign changed on purpose, named in issue 13 or in the dialects merge: the limiter
#: reserves the max-tokens value the span reports (each dialect reads its own wire's fields: "the
#: limiter reserving one max_tokens while the span reports another"), and the cache's sampling test
#: reads temperature and seed where the dialect puts them (Ollama: options only).
NAMED_CHANGES = ("estimate", "plan_skip")


def _compare(old: Any, new: Any) -> None:
    if old is None or new is None:
        assert old == new
        return
    for field in sorted(set(old) | set(new)):
        if field in NAMED_CHANGES:
            continue
        assert old.get(field) == new.get(field), field
    assert old["estimate"][0] == new["estimate"][0], "the input token estimate changed"
    max_tokens = new["params"].get("max_tokens")
    expected = max_tokens if type(max_tokens) is int and max_tokens > 0 else 777
    assert new["estimate"][1] == expected, "the limiter reserves what the span reports"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ROUTES), body=BODIES, query=st.sampled_from(["", "?api-version=1", "?key=abc"]))
def test_recognition_and_cache_key_unchanged(probes: tuple[Probe, Probe], path: str, body: dict[str, Any],
                                             query: str) -> None:
    _compare(*_both(probes, "recognise", _request(path, body, query=query)))


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(ROUTES), raw=st.binary(max_size=40) | st.sampled_from(
    [b"", b"null", b"[]", b'"x"', b"{", b'{"model": "m", "messages": [], "model": "n"}', b'{"prompt": NaN}',
     b'\xef\xbb\xbf{"model": "m", "prompt": "x"}', b'{"model": "m", "prompt": "x", "temperature": 1e400}']))
def test_recognition_of_odd_bytes_unchanged(probes: tuple[Probe, Probe], path: str, raw: bytes) -> None:
    _compare(*_both(probes, "recognise", _request(path, None, raw=raw)))


def _sampling_answers(probes: tuple[Probe, Probe], path: str, body: dict[str, Any]) -> tuple[str, str]:
    old, new = _both(probes, "recognise", _request(path, body))
    return old["plan_skip"], new["plan_skip"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "m", "messages": [], "temperature": "0"}),
    ("/v1/chat/completions", {"model": "m", "messages": [], "options": {"temperature": 0}}),
    ("/completion", {"prompt": "x", "options": {"temperature": 0}}),
    ("/api/generate", {"model": "m", "prompt": "x", "temperature": 0}),
])
def test_which_requests_count_as_nondeterministic(probes: tuple[Probe, Probe], path: str, body: dict[str, Any]) -> None:
    """Not a pass/fail of the redesign: records, for the report, the requests that the old tree
    cached under cache_nondeterministic=skip and the new one does not (or the other way round)."""
    old, new = _sampling_answers(probes, path, body)
    print(f"{path} {body}: old {old!r}, new {new!r}")


# -- settings ------------------------------------------------------------------------------------

def test_the_same_variables_are_settings(probes: tuple[Probe, Probe]) -> None:
    """Every old variable is still a setting; the one the redesign brings into the table (the
    hidden LLMSHIM_RUN_OTEL_EXPORTER, issue 13 item 5) is the only new one."""
    old, new = _both(probes, "variables", None)
    assert set(new) - set(old) <= {"LLMSHIM_RUN_OTEL_EXPORTER"}
    assert set(old) <= set(new)


SETTING_VALUES = st.sampled_from([
    "", " ", "0", "1", "-1", "2", "8", "0.5", "1e3", "1_000", "inf", "-inf", "nan", "NaN", "auto", "AUTO", "none",
    "on", "off", "ON", "true", "false", "True", "yes", "no", "y", "readonly", "replay", "refresh", "skip", "store",
    "shared", "private", "safe", "aggressive", "high", "low", "normal", "critical", "background", "5s", "1m", "30",
    "86400", "2592000", "2592001", "99999999999999999999", "redis://u:secret@h:6379/0", "rediss://h", "redis://",
    "sqlite:///tmp/x.db", "/tmp/llmshim-review-x", "relative/path", "~/x", "http://h", "gpt-4o=60/1000",
    "gpt-4o=60", "*=10/100", "a=1/2,b=3/4", "a=1/2;b=3/4", "=1/2", "a=", "authorization", "x-a, x-b", "requests",
    "httpx,requests", "aiohttp httpx", "nope", "console", "otlp", "10.0.0.1", "localhost,10.0.0.1", "\t1\n",
]) | st.text(max_size=12)


def _masked(answer: dict[str, Any]) -> dict[str, Any]:
    """Display values as both trees show them: a store value typed by the redesign shows as text."""
    return {name: (str(value) if value is not None and not isinstance(value, (bool, int, float, list, dict)) else value)
            for name, value in answer.get("masked", {}).items()}


@settings(max_examples=500, deadline=None)
@given(data=st.data(), value=SETTING_VALUES, second=SETTING_VALUES)
def test_every_setting_accepts_and_refuses_as_before(probes: tuple[Probe, Probe], data: st.DataObject, value: str,
                                                     second: str) -> None:
    names = probes[0].ask("variables", None)
    first_name, second_name = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
    environ = {first_name: value, second_name: second}
    old, new = _both(probes, "settings", environ)
    if "refused" in new and "not a URL" in new["refused"] and "masked" in old:
        return  # named fix (31e88f8): a path setting refuses a URL (it was shown unmasked by status())
    assert ("refused" in old) == ("refused" in new), (environ, old.get("refused"), new.get("refused"))
    if "masked" in old:
        shown_old, shown_new = _masked(old), _masked(new)
        assert shown_old == {name: shown_new.get(name) for name in shown_old}, environ


# -- whole scenarios: stats, spans, metric points, hooks, warnings --------------------------------

def _scenario(tree: Path, name: str, telemetry: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env["PYTHONPATH"] = str(tree)
    done = subprocess.run([sys.executable, str(PROBE), "scenario", json.dumps({"name": name, "telemetry": telemetry})],
                          capture_output=True, text=True, env=env, cwd=str(tree), timeout=100)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    for hook in answer["hooks"]:
        if hook[0] == "call_started":  # test_redesign_review::test_a_started_call_has_no_error_type
            hook[4] = None
    if name.startswith("limits_store"):  # a store round trip over 1 ms counts as throttled, in both trees
        answer["stats"].pop("throttled_calls")
    return answer


SCENARIOS = ["plain", "cache", "retry", "replay_miss", "queue_timeout", "reset", "dropped_stream", "broken_cache_file",
             "error_statuses", "redis_down", "limits_store_broken", "limits_store_healthy", "aiohttp",
             "uninstall_mid_stream", "install_churn", "reset_retried", "throttled_retries"]
REGRESSIONS = {
    ("reset_retried", True): "a call that succeeded after a retried transport error carries error.type on its span "
                             "and its duration metric (facts.error_type reads call.error before the outcome)",
    ("throttled_retries", True): "throttled_calls and llmshim.ratelimit.wait count once per call, were per attempt",
    ("throttled_retries", False): "throttled_calls counts once per call, was once per throttled attempt",
}


@pytest.mark.parametrize("telemetry", [True, False], ids=["telemetry", "no-telemetry"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_reports_as_before(name: str, telemetry: bool, request: pytest.FixtureRequest) -> None:
    if (name, telemetry) in REGRESSIONS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=REGRESSIONS[name, telemetry]))
    old, new = _scenario(OLD, name, telemetry), _scenario(ROOT, name, telemetry)
    for part in ("results", "stats", "hooks", "warnings", "warning_count", "spans", "metrics"):
        assert old[part] == new[part], part
