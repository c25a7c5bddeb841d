"""The README's front door works: the demo, the examples, the server's command line."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OPENAI_LIBRARY, ROOT
from llmshim import demo


def test_demo_sees_every_library_and_dialect_with_tokens_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSHIM_CACHE")  # the demo's own default: on, in a fresh cache
    out = io.StringIO()
    assert demo.run(out, chunk_delay=0.0) == 0
    text = out.getvalue()
    assert "LLM calls seen by llmshim, 0 failures" in text
    assert "caller saw: HTTP 200, 'Echo: Retry me' after 2 attempts on the wire" in text
    order = text.split("order the server saw: ")[1].split("\n")[0].split(", ")
    assert len(order) == 5 and order.index("critical") <= 1
    assert text.count("| cache hit |") == 1 and "same question again" in text
    gemini = importlib.util.find_spec("google") is not None and importlib.util.find_spec("google.genai") is not None
    for seen in (f"{OPENAI_LIBRARY} | openai chat", f"{OPENAI_LIBRARY} | openai embeddings", "requests | ollama chat",
                 "requests | ollama text_completion", "aiohttp | llama_cpp text_completion",
                 "httpx | ollama embeddings", "httpx | ollama chat", "| anthropic chat",
                 "| gcp.gemini generate_content"):
        if seen == "| gcp.gemini generate_content" and not gemini:
            assert "skipped google-genai SDK" in text  # no google-genai for Python 3.10: said so, not failed
            continue
        assert seen in text, seen
    assert "tokens in=None" not in text
    assert text.count("| ok") == (13 if gemini else 12)
    assert text.count("outcome=ok") == (19 if gemini else 18)  # a span per call: above, the retry, 5 prioritised
    assert "  demo: OpenAI SDK chat (" in text and "\n    chat gpt-4o-mini (" in text  # nested under the app span
    assert "(estimated: " in text  # the stream sent without usage
    assert f"total_calls        {19 if gemini else 18}" in text
    assert "cache_hits         1" in text and "retries            1" in text


@pytest.mark.parametrize("script", ["call_hooks.py", "local_llm_client.py"])
def test_examples_run_against_the_bundled_server(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OLLAMA_HOST", "LLAMACPP_HOST")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("[llmshim]") >= 2
    assert "None in" not in done.stdout and "None+" not in done.stdout


def test_cli_status_reports_patches() -> None:
    done = subprocess.run([sys.executable, "-m", "llmshim", "status"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"requests.adapters.HTTPAdapter.send"' in done.stdout


def test_cli_status_rejects_a_bad_setting() -> None:
    env = {**os.environ, "LLMSHIM_LIBRARIES": "curl"}
    done = subprocess.run([sys.executable, "-m", "llmshim", "status"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 2
    assert "LLMSHIM_LIBRARIES" in done.stderr and "'curl'" in done.stderr


def test_otel_export_example_prints_spans_and_metrics() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OPENAI_"))}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "otel_export.py")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count('"name": "chat gpt-4o-mini"') == 2 and '"name": "answer a question"' in out
    for metric in ("gen_ai.client.operation.duration", "gen_ai.client.token.usage",
                   "gen_ai.client.operation.time_to_first_chunk"):
        assert f'"name": "{metric}"' in out


def test_aio_example_runs_calls_concurrently() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST" and not k.startswith("LLMSHIM_")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "aio_local_client.py")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("-> 'Echo: Give me fact number") == 8
    seconds = float(done.stdout.split(" answers in ")[1].split("s;")[0])
    assert seconds < 1.2  # 8 calls of 0.2 s each, concurrently (sequential would take 1.6 s)


def test_llm_test_suite_example_replays_offline_from_committed_cassettes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSHIM_", "LLM_", "OPENAI_"))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "examples/llm_tests", "--llmshim-replay",
                           "-p", "no:cacheprovider", "--rootdir", str(ROOT)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr  # nothing listens on the recorded port: offline
    assert "2 passed" in done.stdout
    text = "".join(p.read_text() for p in (ROOT / "cassettes" / "test_answers").glob("*.json"))
    assert "sk-local" not in text and "Authorization" not in text


def test_unmodified_client_under_llmshim_run_is_cached(tmp_path: Path) -> None:
    import json as json_module

    from llmshim.testing import FakeLLMServer

    with FakeLLMServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
        env.update(LLM_HOST=server.url, LLMSHIM_CACHE_PATH=str(tmp_path / "c.sqlite3"),
                   LLMSHIM_STATS_FILE=str(tmp_path / "stats.json"))
        outputs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-m", "llmshim", "run", "--", sys.executable,
                                   str(ROOT / "examples" / "unmodified_client.py")], capture_output=True, text=True,
                                  env=env, timeout=60)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
        assert outputs[0] == outputs[1] and "Echo: Why is the sky blue?" in outputs[0]
        assert len(server.received) == 2  # the second run was answered from the cache
        stats = json_module.loads((tmp_path / "stats.json").read_text())
        assert stats["cache_hits"] == 2 and stats["tokens_saved"] > 0


def test_batch_priorities_example_serves_the_critical_call_early() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSHIM_", "LLM_", "OPENAI_"))}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "batch_priorities.py")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    position = int(done.stdout.split("critical finished ")[1].split(" of ")[0])
    assert position <= 4  # 13 calls at 4/s: the critical one does not wait behind the batch
