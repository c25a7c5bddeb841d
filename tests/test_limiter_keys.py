"""The limiter holds one key per (server, credential, model): a process serving many users' own API
keys (or many fine-tuned models) makes them without end. Keys at rest are dropped once many are
held, and dropping one never changes a decision: the same calls get the same grants at the same
times with keys dropped as eagerly as possible as with none dropped (Hypothesis), a 429's block
and a server's limits survive a key dropped mid-call, and a process with thousands of credentials
holds a bounded number of keys (a real server, real requests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_scheduler
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st

from llmshim.dialects import ServerLimits
from llmshim.policies.limiter import Limiter
from llmshim.policies.scheduler import RELEARN_AFTER, Key, Waiter
from llmshim.values import Limits


class Clock(test_scheduler.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def advance(self, seconds: float) -> None:
        """Move on, firing every wake-up that falls due on the way, in order."""
        end = self.now + seconds
        while self.wakeups:
            self.wakeups.sort(key=lambda item: item[0])
            due, fn = self.wakeups[0]
            if due > end:
                break
            self.wakeups.pop(0)
            self.now = max(self.now, due)
            fn()
        self.now = end


def _limiter(keep_keys: int, burst: float = 1.0) -> tuple[Limiter, Clock]:
    clock = Clock()
    return Limiter(burst, clock=clock, schedule=clock.schedule, keep_keys=keep_keys), clock


def _served(limiter: Limiter, clock: Clock, name: str, limits: Limits, level: str = "normal",
            tokens: float = 0.0, concurrency: int | None = None) -> tuple[Key, Waiter]:
    waiter = Waiter(level, 1.0, tokens, clock())
    key = limiter.enqueue(limiter.key(name, limits, concurrency), waiter)
    return key, waiter


LIMITS = Limits(rpm=60, tpm=600)

# One step: (seconds to move on, the name called, priority, tokens, what the server said after)
STEP = st.tuples(st.sampled_from([0.0, 0.01, 0.3, 1.0, 7.0, 700.0]), st.integers(0, 5),
                 st.sampled_from(["critical", "normal", "low"]), st.sampled_from([0.0, 5.0, 50.0, 900.0]),
                 st.sampled_from(["nothing", "429", "limits", "remaining 0"]))


def _forgets_a_learned_limit(steps: list[tuple[float, int, str, float, str]]) -> bool:
    """Whether a key that learned a server's limit sees RELEARN_AFTER seconds of quiet (then it may
    be dropped with what it learned, by design: the next answer teaches it again)."""
    learned_at: dict[int, float] = {}
    now = 0.0
    for pause, name, _, _, said in steps:
        now += pause
        if any(now - at >= RELEARN_AFTER for at in learned_at.values()):
            return True
        if said == "limits":
            learned_at[name] = now
    return False


# No explain phase: its tracing made a shrink on a loaded machine outlast the test timeout.
@settings(max_examples=150, deadline=None, phases=[p for p in Phase if p is not Phase.explain])
@given(st.lists(STEP, min_size=1, max_size=40))
def test_dropping_keys_at_rest_never_changes_a_grant(steps: list[tuple[float, int, str, float, str]]) -> None:
    # Two limiters, one dropping keys at rest at every new key (keep_keys=1), one never: the same
    # calls must be granted at the same moments. The one designed exception: a limit learned from
    # a server is forgotten with its key after RELEARN_AFTER seconds of quiet (the bucket is whole by
    # then; only the first wave's burst can differ until the next answer teaches it again).
    assume(not _forgets_a_learned_limit(steps))
    runs = []
    for keep in (1, 10**9):
        limiter, clock = _limiter(keep)
        granted: list[tuple[int, float]] = []
        pending: list[tuple[int, Key, Waiter, str]] = []
        for index, (pause, name, level, tokens, said) in enumerate(steps):
            clock.advance(pause)
            key, waiter = _served(limiter, clock, f"k{name}", LIMITS, level, tokens)
            pending.append((index, key, waiter, said))
            for entry in list(pending):
                position, held, w, answer = entry
                if w.granted:
                    granted.append((position, round(clock(), 6)))
                    pending.remove(entry)
                    if answer == "429":
                        limiter.block(held, clock() + 2.0)
                    elif answer == "limits":
                        limiter.learn(held, ServerLimits(requests_limit=30, tokens_limit=300))
                    elif answer == "remaining 0":
                        limiter.learn(held, ServerLimits(requests_remaining=0))
        clock.advance(10_000.0)
        granted += [(position, round(clock(), 6)) for position, _, w, _ in pending if w.granted]
        runs.append((sorted(granted), limiter.count()))
    (dropping, dropped_count), (keeping, kept_count) = runs
    assert dropping == keeping
    assert dropped_count <= kept_count


def test_keys_at_rest_are_dropped_once_many_are_held_and_busy_ones_kept() -> None:
    limiter, clock = _limiter(keep_keys=100)
    busy = []
    for user in range(3000):
        key, waiter = _served(limiter, clock, f"user-{user}", Limits(rpm=6000))
        assert waiter.granted
        if user % 500 == 0:  # a few keys stay busy: blocked by a 429 (at most MAX_BLOCK, 60 s)
            limiter.block(key, clock() + 60.0)
            busy.append(key)
        clock.advance(0.01)  # each bucket is whole again 10 ms after its call
    assert limiter.count() <= 2 * 100
    for key in busy:  # still held: a new call on its name waits out the block
        assert limiter.key(key.name, key.limits) is key


@pytest.mark.parametrize("state", ["queued", "slot held", "blocked", "bucket not whole", "watching",
                                   "capacity halved", "limits learned lately"])
def test_a_key_is_not_at_rest_while_anything_about_it_differs_from_a_new_one(state: str) -> None:
    clock = Clock()
    key = Key(Limits(rpm=60), burst=1.0, name="k", concurrency=4)
    assert key.at_rest(clock())
    if state == "queued":
        key.queues["low"].append(Waiter("low", 1.0, 0.0, clock()))
    elif state == "slot held":
        key.in_flight = 1
    elif state == "blocked":
        key.blocked_until = clock() + 1.0
    elif state == "bucket not whole":
        key.try_take(clock(), Waiter("normal", 1.0, 0.0, clock()))
        key.release(200)
    elif state == "watching":
        key.watching = True
    elif state == "capacity halved":
        key.release(503)
    elif state == "limits learned lately":
        key.learn(ServerLimits(requests_limit=30), clock())
        clock.now += 5.0  # the bucket is whole again, the learned limit still fresh
    assert not key.at_rest(clock())
    if state == "limits learned lately":
        assert key.at_rest(clock() + RELEARN_AFTER)


def test_a_key_dropped_during_its_call_keeps_the_429_block_and_the_learned_limits() -> None:
    limiter, clock = _limiter(keep_keys=1)
    key, waiter = _served(limiter, clock, "mine", Limits(rpm=60))
    assert waiter.granted
    clock.advance(5.0)  # the call is in flight; its key is at rest meanwhile
    limiter.key("someone-else", Limits(rpm=60))  # ... and dropped by this new key
    limiter.block(key, clock() + 30.0)  # the answer was a 429
    limiter.learn(key, ServerLimits(requests_limit=6))
    again, second = _served(limiter, clock, "mine", Limits(rpm=60))
    assert not second.granted
    clock.advance(29.0)
    assert not second.granted
    clock.advance(1.5)
    assert second.granted  # after the block, not before
    assert again.requests is not None and again.requests.rate == pytest.approx(6 / 60)


def test_a_process_calling_with_thousands_of_credentials_holds_a_bounded_number_of_keys(tmp_path: Path) -> None:
    from conftest import run_python

    out = run_python("""
import httpx, llmshim
from llmshim.policies import limiter
from llmshim.testing import FakeLLMServer
server = FakeLLMServer().start()
llmshim.install(cache="off", telemetry=False, rpm=6000)  # below the server's own limit: nothing learned
with httpx.Client() as client:
    for user in range(2500):
        r = client.post(server.openai_base_url + "/chat/completions",
                        headers={"authorization": f"Bearer sk-user-{user}"},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
print(max(l.count() for l in list(limiter._LIMITERS)))
""", timeout=300)
    assert int(out.strip()) <= 2 * 1024


def test_a_key_dropped_between_its_lookup_and_the_queue_is_taken_back_or_its_successor_used() -> None:
    limiter, clock = _limiter(keep_keys=1)
    looked_up = limiter.key("mine", Limits(rpm=60))
    limiter.key("other", Limits(rpm=60))  # another thread's new key drops "mine" (at rest) meanwhile
    successor = limiter.key("mine", Limits(rpm=60))  # ... and a third thread made it afresh
    assert successor is not looked_up
    first = Waiter("normal", 1.0, 0.0, clock())
    assert limiter.enqueue(looked_up, first) is successor  # one budget per name, never two
    second = Waiter("normal", 1.0, 0.0, clock())
    limiter.enqueue(successor, second)
    assert first.granted and not second.granted  # 60 a minute, burst 1: the second waits its turn
    clock.advance(1.01)
    assert second.granted


# -- callers that will not wait (LLMSHIM_QUEUE_TIMEOUT=0) ------------------------------------------
@pytest.mark.parametrize("budget", ["memory", "sqlite"])
def test_a_caller_that_will_not_wait_is_told_at_once_granted_or_not(budget: str, tmp_path: Path) -> None:
    # With a shared budget the take runs on the store thread after the enqueue: a caller that will
    # not wait is woken by that answer (granted or not), never left to wait, never refused unasked.
    import threading

    from llmshim.policies import shared_budget
    from llmshim.store.limits_sqlite import SQLiteLimitStore

    store = SQLiteLimitStore(str(tmp_path / "limits.sqlite3")) if budget == "sqlite" else None
    limiter = Limiter(10.0, shared=store, store_thread=shared_budget.StoreThread())
    try:
        key = limiter.key("k", Limits(rpm=6))  # a burst of 10 s: one request now
        patient = Waiter("normal", 1.0, 0.0, 0.0, event=threading.Event())
        first = Waiter("normal", 1.0, 0.0, 0.0, event=threading.Event(), impatient=True)
        limiter.enqueue(key, first)
        assert first.event is not None and first.event.wait(10) and first.granted
        limiter.enqueue(key, patient)  # queued: its turn is 10 s away
        behind = Waiter("normal", 1.0, 0.0, 0.0, event=threading.Event(), impatient=True)
        limiter.enqueue(key, behind)
        assert behind.event is not None and behind.event.wait(10)  # told at once ...
        assert not behind.granted  # ... that nothing is free: it leaves (the caller answers 429)
        assert limiter.withdraw(key, behind) and limiter.withdraw(key, patient)
    finally:
        if store is not None:
            store.close()
