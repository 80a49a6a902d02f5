"""Breaker state machine on a hand-driven clock (cascade tests cover it on a real failing stage)."""
from __future__ import annotations

import pytest

from runtime.cascade.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only():
    b = Breaker("s", failure_threshold=3, cooldown_s=10, clock=Clock())
    for _ in range(5):  # a success in between resets the count
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state == CLOSED and b.allow()
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED and b.allow()
    b.record_failure()
    assert b.state == OPEN and not b.allow()


def test_cooldown_probe_and_recovery():
    clock = Clock()
    b = Breaker("s", failure_threshold=1, cooldown_s=10, clock=clock)
    b.record_failure()
    assert b.state == OPEN
    clock.now += 9.99
    assert not b.allow() and b.state == OPEN
    clock.now += 0.01
    assert b.allow() and b.state == HALF_OPEN
    b.record_failure()  # failed probe: open again, with a fresh cool-down
    assert b.state == OPEN and not b.allow()
    clock.now += 10
    assert b.allow() and b.state == HALF_OPEN
    b.record_success()
    assert b.state == CLOSED and b.failures == 0 and b.allow()


def test_half_open_failure_reopens_even_below_threshold():
    clock = Clock()
    b = Breaker("s", failure_threshold=5, cooldown_s=0, clock=clock)
    for _ in range(5):
        b.record_failure()
    assert b.allow() and b.state == HALF_OPEN  # zero cool-down: the next call probes at once
    b.record_failure()  # one failed probe, though the threshold is 5
    assert b.state == OPEN and b.failures == 1


def test_rejects_bad_settings():
    with pytest.raises(AssertionError):
        Breaker("s", failure_threshold=0)
    with pytest.raises(AssertionError):
        Breaker("s", cooldown_s=-1)
