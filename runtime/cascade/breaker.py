"""Circuit breaker for one cascade stage: stop calling a stage that keeps failing, probe it again later.

closed     the stage runs; `failure_threshold` consecutive failures open the breaker.
open       the stage is skipped (its images keep the previous stage's answer, marked degraded) until
           `cooldown_s` seconds have passed since it opened ...
half_open  ... then the next call is a probe: success closes the breaker, failure opens it for another cool-down.

A failure is one stage call (one batch) that raised or overran its time budget. Calls come from one worker
thread, so a half-open breaker never has two probes in flight."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Breaker:
    name: str
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    state: str = field(default=CLOSED, init=False)
    failures: int = field(default=0, init=False)  # consecutive
    opened_at: float = field(default=0.0, init=False)

    def __post_init__(self):
        assert self.failure_threshold >= 1 and self.cooldown_s >= 0, (self.failure_threshold, self.cooldown_s)

    def allow(self) -> bool:
        """May the stage run now? Moves open -> half_open once the cool-down is over."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self.state, self.failures = HALF_OPEN, 0  # the probe alone decides
            log.info("stage '%s': cool-down over, probing (half_open)", self.name)
        return self.state != OPEN

    def record_success(self) -> None:
        if self.state != CLOSED:
            log.info("stage '%s': probe succeeded, breaker closed", self.name)
        self.state, self.failures = CLOSED, 0

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            if self.state != OPEN:
                log.warning("stage '%s': breaker open after %d consecutive failure(s); retry in %.3g s",
                            self.name, self.failures, self.cooldown_s)
            self.state, self.opened_at = OPEN, self.clock()
