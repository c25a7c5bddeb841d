"""Who goes next under a limit: the scheduler's decisions as pure tests (a fake clock, no sockets,
no sleeps, no threads). ``Key`` decides; ``Limiter`` (here with an injected clock and schedule)
hands the permits out and asks for one wake-up at the next due time."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llmshim.dialects import ServerLimits
from llmshim.policies.limiter import Limiter
from llmshim.policies.scheduler import SHARE_EVERY, Key, Waiter
from llmshim.values import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.wakeups: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        self.wakeups.append((self.now + delay, fn))

    def advance_to_next_wakeup(self) -> None:
        due, fn = self.wakeups.pop(0)
        self.now = due
        fn()


def _limiter(limits: Limits, burst: float = 1.0) -> tuple[Limiter, Key, Clock]:
    clock = Clock()
    limiter = Limiter(burst, clock=clock, schedule=clock.schedule)
    return limiter, limiter.key("k", limits), clock


def _waiter(level: str, tokens: float = 0.0) -> Waiter:
    return Waiter(level, 1.0, tokens, 0.0)


def test_highest_class_first_and_first_come_first_served_within_a_class_whatever_the_size() -> None:
    limiter, key, clock = _limiter(Limits(rpm=60, tpm=6000))
    order: list[str] = []
    waiters = {"big normal": _waiter("normal", 90), "small normal": _waiter("normal", 1),
               "low": _waiter("low", 1), "critical": _waiter("critical", 1)}
    limiter.enqueue(key, _waiter("normal", 100))  # spends the burst: everyone below waits
    for waiter in waiters.values():
        limiter.enqueue(key, waiter)
    while len(order) < len(waiters):
        clock.advance_to_next_wakeup()
        order += [name for name, w in waiters.items() if w.granted and name not in order]
    assert order == ["critical", "big normal", "small normal", "low"]  # the small one never overtakes
    assert len(clock.wakeups) <= 1  # one wake-up at a time, never a poll


@pytest.mark.parametrize("lower", ["high", "normal", "low"])
def test_a_waiting_lower_class_gets_its_share_of_the_grants(lower: str) -> None:
    key = Key(Limits(rpm=60), burst=1.0)
    for _ in range(100):
        key.queues["critical"].append(_waiter("critical"))
    key.queues[lower].append(_waiter(lower))
    served = []
    while key.queues[lower]:
        waiter = key.next_waiter()
        assert waiter is not None
        key.granted(waiter)
        served.append(waiter.priority)
    assert served == ["critical"] * (SHARE_EVERY[lower] - 1) + [lower]


def test_concurrency_capacity_halves_on_503_and_regrows_one_per_capacity_successes() -> None:
    key = Key(Limits(), burst=1.0, concurrency=4)
    held = [_waiter("normal") for _ in range(4)]
    assert [key.try_take(0.0, w) for w in held] == [0.0] * 4
    assert key.try_take(0.0, _waiter("normal")) == float("inf")  # full: woken by a release, not by time
    key.release(503)
    assert key.capacity == 2.0 and key.in_flight == 3 and key.full()
    key.release(503)
    key.release(503)
    assert key.capacity == 1.0  # never below one
    key.release(200)
    assert key.capacity == 2.0 and key.in_flight == 0
    key.release(200)
    key.release(200)
    key.release(500)  # a server error other than 503 says nothing about capacity
    assert key.capacity == pytest.approx(2.9)  # 2 + 1/2 + 1/2.5: about one per `capacity` successes
    for _ in range(10):
        key.release(200)
    assert key.capacity == 4.0  # never above the configured maximum


def test_a_block_is_waited_out_then_the_bucket_decides() -> None:
    key = Key(Limits(rpm=60), burst=1.0)
    key.blocked_until = 5.0
    assert key.try_take(2.0, _waiter("critical")) == 3.0
    assert key.requests is not None and key.requests.tat == 0.0  # nothing taken while blocked
    assert key.try_take(5.0, _waiter("critical")) == 0.0
    assert key.try_take(5.0, _waiter("critical")) == pytest.approx(1.0)


def test_the_shared_budget_decides_and_when_it_failed_this_process_takes_its_share() -> None:
    class Shared:
        instances = 3

    key = Key(Limits(rpm=60), burst=3.0, shared=Shared())
    assert key.try_take(0.0, _waiter("normal"), shared_wait=0.0) == 0.0
    assert key.try_take(0.0, _waiter("normal"), shared_wait=2.5) == 2.5
    assert key.requests is not None and key.requests.tat == 0.0  # the store's answer: local buckets untouched
    assert key.try_take(0.0, _waiter("normal"), shared_wait=None) == 0.0  # failed: 3 of the 3 s burst
    assert key.try_take(0.0, _waiter("normal"), shared_wait=None) == pytest.approx(3.0)
    key.blocked_until = 4.0
    assert key.try_take(0.0, _waiter("normal"), shared_wait=0.0) == 4.0  # a local block still holds


def test_the_servers_own_limits_tighten_never_loosen() -> None:
    key = Key(Limits(rpm=600, tpm=60_000), burst=10.0)
    key.learn(ServerLimits(requests_limit=120, requests_remaining=2, tokens_remaining=0), now=50.0)
    assert key.requests is not None and key.tokens is not None
    assert key.requests.rate == 2.0
    assert key.requests.wait(50.0, 1.0) == 0.0 and key.tokens.wait(50.0, 1.0) == pytest.approx(0.001)
    key.learn(ServerLimits(requests_limit=6000, requests_remaining=1000), now=50.0)
    assert key.requests.rate == 2.0  # a higher limit than configured is not taken
    assert key.blocked_until == 0.0  # reset times are not blocks


def test_the_pump_asks_for_one_wakeup_at_the_next_due_time() -> None:
    limiter, key, clock = _limiter(Limits(rpm=60))
    first, second, third = _waiter("normal"), _waiter("normal"), _waiter("normal")
    for waiter in (first, second, third):
        limiter.enqueue(key, waiter)
    assert first.granted and not second.granted
    assert [due for due, _ in clock.wakeups] == [1.0]  # one wake-up, though two wait
    clock.advance_to_next_wakeup()
    assert second.granted and not third.granted and [due for due, _ in clock.wakeups] == [2.0]
    assert limiter.withdraw(key, third) is True  # leaves: nothing more to wake for
    clock.advance_to_next_wakeup()
    assert clock.wakeups == [] and limiter.held() == (0, 0)
