"""A wall clock that steps back (NTP correcting a drifted clock, a VM resumed from a snapshot, an
operator's `date -s`) while a machine- or fleet-wide rate-limit budget holds wall-clock times.

The SQLite and Redis budgets keep theoretical arrival times and 429 blocks in epoch seconds (the
one clock every process shares). After a step back of an hour, every time written before it lies
an hour in the future: taken at face value, each call would wait for the clock to catch up, and
with `LLMSHIM_QUEUE_TIMEOUT` below that, every call got a 429 for an hour. A bucket further ahead
than a take can leave it is forgotten (as after a quiet spell), and a block further ahead than a
block may ever be is over (``gcra.take``; the table of ``test_gcra_table`` runs the same cases
against the Lua script on a real Redis).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmshim.store import limits_sqlite
from llmshim.store.limits_sqlite import MAX_BLOCK, SQLiteLimitStore

EPOCH = 1_764_000_000.0
CALLS = [("r", 1.0, 2.0, 1.0)]  # one request a second, a 2 s burst, one request


def test_a_machine_wide_budget_paces_on_after_the_wall_clock_steps_back(tmp_path: Path) -> None:
    """End to end, real clock shifts (time-machine moves the wall clock llmshim reads): calls made
    while the clock ran an hour ahead, then the clock set right; the next call is answered."""
    pytest.importorskip("time_machine")
    code = textwrap.dedent(f"""
        import time, requests, time_machine, llmshim
        from llmshim.testing import FakeLLMServer
        server = FakeLLMServer().start()
        llmshim.install(cache="off", telemetry=False, retry_mode="off", rpm=60, ratelimit_burst="2s",
                        queue_timeout=5, ratelimit_store="sqlite:///{tmp_path / 'budget.sqlite3'}")
        body = {{"model": "m", "messages": [{{"role": "user", "content": "hi"}}]}}
        with time_machine.travel(time.time() + 3600, tick=True):  # the clock an hour ahead
            ahead = [requests.post(server.openai_base_url + "/chat/completions", json=body).status_code
                     for _ in range(3)]
        # the clock set right: an hour back
        after = requests.post(server.openai_base_url + "/chat/completions", json=body).status_code
        print(ahead, after)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("]")[-1].strip() == "200", done.stdout  # was 429: a wait of an hour


def test_a_bucket_written_before_a_step_back_is_forgotten_then_paces_as_ever(tmp_path: Path) -> None:
    store = SQLiteLimitStore(str(tmp_path / "budget.sqlite3"))
    try:
        ahead = EPOCH + 3600.0
        waits = [store.try_take("k", ahead, CALLS, "critical") for _ in range(3)]
        assert waits[:2] == [0.0, 0.0] and waits[2] > 0  # the burst spent, an hour ahead
        after = [store.try_take("k", EPOCH, CALLS, "critical") for _ in range(3)]
        assert after[:2] == [0.0, 0.0]  # was ~3602 s: an hour's wait
        assert after[2] == pytest.approx(1.0)  # then the usual pace
        assert store.try_take("k", EPOCH + 1.0, CALLS, "critical") == 0.0
    finally:
        store.close()


def test_a_block_written_before_a_step_back_is_over_and_a_new_one_replaces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteLimitStore(str(tmp_path / "budget.sqlite3"))
    try:
        monkeypatch.setattr(limits_sqlite, "wall", lambda: EPOCH + 3600.0)
        store.block_for("k", 30.0)  # a 429 while the clock ran an hour ahead
        assert store.try_take("k", EPOCH + 3600.0, CALLS, "critical") == pytest.approx(30.0)
        monkeypatch.setattr(limits_sqlite, "wall", lambda: EPOCH)  # the clock set right
        assert store.try_take("k", EPOCH, CALLS, "critical") == 0.0  # was MAX_BLOCK, for an hour
        store.block_for("k", 10.0)  # a new 429 now: it must count, not lose to the stale block
        assert store.try_take("k", EPOCH, CALLS, "critical") == pytest.approx(10.0)
        assert MAX_BLOCK > 10.0
    finally:
        store.close()
