"""A program's tests that fake time (freezegun, time-machine) must not hang llmshim or skew what it measures.

freezegun's ``freeze_time`` stops ``time.monotonic`` and ``time.perf_counter``; time-machine moves
the wall clock. llmshim's rate-limit waits, queue deadlines, retry budget and call durations are
measured on the machine's monotonic clock, so under either tool a paced call still goes out once its
turn comes (no hang), a queue timeout still fires, and durations are real. Each case runs in a fresh
interpreter (the tools patch modules process-wide) with a deadline, so a hang fails fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("freezegun")
pytest.importorskip("time_machine")

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import asyncio, functools, json, sys, time
real = functools.partial(time.clock_gettime, time.CLOCK_MONOTONIC)  # neither tool touches it
import llmshim, requests, httpx
from llmshim.testing import FakeLLMServer
server = FakeLLMServer().start()
records = []
llmshim.on("call_completed", records.append)
llmshim.install(**{"cache": "off", "telemetry": False, **SETTINGS})

def fake_time():
    if TOOL == "freezegun":
        import freezegun
        return freezegun.freeze_time("2024-01-01", real_asyncio=True)
    import time_machine
    return time_machine.travel("2024-01-01", tick=False)

def body(i):
    return {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}

def call_sync(i):
    r = requests.post(server.openai_base_url + "/chat/completions", json=body(i), timeout=30)
    return r.status_code

async def call_async(i):
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(server.openai_base_url + "/chat/completions", json=body(i))
        return r.status_code

def call(i):
    return call_sync(i) if CLIENT == "requests" else asyncio.run(call_async(i))
"""


def run(script: str, *, tool: str, client: str, settings: dict[str, object], deadline: float = 40) -> dict:
    code = (f"TOOL = {tool!r}\nCLIENT = {client!r}\nSETTINGS = {settings!r}\n" + PRELUDE + script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=deadline)
    except subprocess.TimeoutExpired as exc:
        hung = f"hung under {tool} ({client}): no answer in {deadline} s"
        raise AssertionError(f"{hung}\n{exc.stdout}\n{exc.stderr}") from None
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


TOOLS = ["freezegun", "time_machine"]
CLIENTS = ["requests", "httpx-async"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("first_call", ["inside", "before"], ids=["built-inside", "built-before"])
def test_paced_calls_go_out_at_their_turn_while_time_is_faked(tool: str, client: str, first_call: str) -> None:
    # 120 a minute, no burst: one call every 0.5 s of real time. The pipeline (and its limiter) is
    # built by the first call, inside the faked time or before it.
    out = run("""
if FIRST == "before":
    call(0)
with fake_time():
    start = real()
    statuses = [call(i) for i in (1, 2, 3)]
    took = real() - start
print(json.dumps({"statuses": statuses, "took": took, "sent": len(server.received)}))
""".replace("FIRST", repr(first_call)), tool=tool, client=client,
              settings={"rpm": 120, "ratelimit_burst": 0})
    assert out["statuses"] == [200, 200, 200]
    assert out["sent"] == (4 if first_call == "before" else 3)
    # Three calls one per 0.5 s: the last cannot leave before 1 s of real time has passed
    # (2 waits of 0.5 s, or 1.5 s when a call was made just before).
    assert out["took"] >= 0.95, out


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("tool", TOOLS)
def test_a_queue_timeout_fires_while_time_is_faked(tool: str, client: str) -> None:
    # One a minute: the second call waits for a permit 60 s away; the queue timeout (1 s) answers
    # 429 instead, on the real clock.
    out = run("""
with fake_time():
    statuses = [call(1)]
    start = real()
    statuses.append(call(2))
    took = real() - start
print(json.dumps({"statuses": statuses, "took": took, "sent": len(server.received)}))
""", tool=tool, client=client, settings={"rpm": 1, "ratelimit_burst": 0, "queue_timeout": 1.0})
    assert out["statuses"] == [200, 429]
    assert out["sent"] == 1
    assert out["took"] >= 0.95, out


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("tool", TOOLS)
def test_durations_are_real_while_time_is_faked(tool: str, client: str) -> None:
    # A streamed answer whose chunks come 0.1 s apart: the call's duration and time to first chunk
    # are real seconds, not a frozen clock's zero.
    out = run("""
server.chunk_delay = 0.1
def stream_sync():
    with requests.post(server.openai_base_url + "/chat/completions", stream=True, timeout=30,
                       json={**body(1), "stream": True}) as r:
        return r.status_code, b"".join(r.iter_content(None))
async def stream_async():
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", server.openai_base_url + "/chat/completions",
                                 json={**body(1), "stream": True}) as r:
            return r.status_code, b"".join([piece async for piece in r.aiter_bytes()])
with fake_time():
    start = real()
    status, data = stream_sync() if CLIENT == "requests" else asyncio.run(stream_async())
    took = real() - start
record = records[-1]
print(json.dumps({"status": status, "took": took, "duration": record.duration,
                  "chunks": data.count(b"data: ")}))
""", tool=tool, client=client, settings={})
    assert out["status"] == 200
    assert out["chunks"] >= 3
    # The answer took (chunks - 1) x 0.1 s at least; the record says so, within what the caller saw.
    assert 0.1 * (out["chunks"] - 2) <= out["duration"] <= out["took"], out


def test_a_machine_wide_budget_on_sqlite_paces_calls_while_freezegun_freezes_time(tmp_path: Path) -> None:
    # The shared budget reads the wall clock (every process shares it): freezegun does not stop it.
    out = run("""
with fake_time():
    start = real()
    statuses = [call(i) for i in (1, 2, 3)]
    took = real() - start
print(json.dumps({"statuses": statuses, "took": took, "sent": len(server.received)}))
""", tool="freezegun", client="requests",
              settings={"rpm": 120, "ratelimit_burst": 0, "queue_timeout": 10.0,
                        "ratelimit_store": f"sqlite:///{tmp_path}/limits.sqlite3"})
    assert out == {**out, "statuses": [200, 200, 200], "sent": 3}
    assert out["took"] >= 0.95, out


@pytest.mark.parametrize("frozen_at", ["2030-01-01", "2020-01-01"])
def test_an_answer_cached_while_freezegun_froze_time_keeps_its_real_ttl(tmp_path: Path, frozen_at: str) -> None:
    # Cached inside a freeze, asked again outside it: a hit while its TTL (real time) runs, a miss
    # once it has passed, whichever date the test froze (2030 must not keep it for years, 2020 must
    # not expire it at once).
    out = run("""
import freezegun
with freezegun.freeze_time(FROZEN):
    call(1)
cached_at = real()
call(1)                      # within the TTL: a hit
hit_within = len(server.received) == 1
while real() - cached_at < 2.2:  # the TTL (2 s) passes in real time
    time.sleep(0.1)
call(1)                      # after it: upstream again
print(json.dumps({"hit_within": hit_within, "sent": len(server.received)}))
""".replace("FROZEN", repr(frozen_at)), tool="freezegun", client="requests",
              settings={"cache": "on", "cache_path": str(tmp_path / "cache.sqlite3"), "cache_ttl": "2s"})
    assert out == {"hit_within": True, "sent": 2}
