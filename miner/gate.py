"""At most `capacity` forwards at once; waiters enter highest priority first, ties in arrival order.

bittensor's own priority hook only orders a no-op task in the Axon's thread pool (the forward runs after it, on the
event loop), so stake order takes effect here. Single event loop; not thread-safe."""
from __future__ import annotations

import asyncio
import heapq
import itertools


class PriorityGate:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.running = 0
        self._waiters: list[tuple[float, int, asyncio.Future]] = []
        self._arrival = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(not future.done() for _, _, future in self._waiters)

    async def acquire(self, priority: float, timeout_s: float) -> None:
        """Take a slot within timeout_s, else TimeoutError."""
        if self.running < self.capacity and not self.waiting:
            self.running += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._arrival), future))
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await future
        except BaseException:
            if future.done() and not future.cancelled():  # the slot arrived as we gave up: pass it on
                self.release()
            raise

    def release(self) -> None:
        """Hand the slot to the best live waiter, else free it."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        assert self.running > 0, "release without acquire"
        self.running -= 1
