"""Bounded per-role work queues.

Every role runs its model calls on its own small thread pool, so a long image job never holds
up chat, and the event loop never blocks on a model. A role accepts at most ``max_queue`` jobs
(waiting + running); beyond that the caller gets 503 with a Retry-After estimated from how long
recent jobs took.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from engine.errors import overloaded

T = TypeVar("T")

# Weight of the newest job in the moving average of job durations.
EWMA_ALPHA = 0.2
# Retry-After when nothing has finished yet to estimate from.
DEFAULT_RETRY_SECONDS = 2.0


class Admission:
    """Counts jobs in flight for one role and refuses more than ``capacity``."""

    def __init__(self, role: str, capacity: int, workers: int = 1) -> None:
        self.role = role
        self.capacity = capacity
        self.workers = max(1, workers)
        self._lock = threading.Lock()
        self._depth = 0
        self._avg_seconds: float | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._depth

    def retry_after(self) -> float:
        """Seconds a refused client should wait: the queue ahead of it, drained by the workers."""
        if self._avg_seconds is None:
            return DEFAULT_RETRY_SECONDS
        return max(1.0, self._avg_seconds * self._depth / self.workers)

    def enter(self) -> None:
        """Take a slot or raise the 503 APIError."""
        with self._lock:
            if self._depth >= self.capacity:
                raise overloaded(
                    self.retry_after(),
                    f"The {self.role} queue is full ({self.capacity} jobs); retry later.",
                )
            self._depth += 1

    def leave(self, seconds: float | None = None) -> None:
        """Give the slot back; ``seconds`` (the job's duration) feeds the Retry-After estimate."""
        with self._lock:
            self._depth -= 1
            if seconds is not None:
                prev = self._avg_seconds
                self._avg_seconds = seconds if prev is None else (
                    EWMA_ALPHA * seconds + (1 - EWMA_ALPHA) * prev
                )


class RoleQueue(Admission):
    """An :class:`Admission` with its own thread pool for blocking model calls."""

    def __init__(self, role: str, capacity: int, workers: int = 1) -> None:
        super().__init__(role, capacity, workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=role)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on this role's threads; 503 when the queue is full."""
        self.enter()
        start = time.perf_counter()
        done = False
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, fn, *args)
            done = True
            return result
        finally:
            self.leave(time.perf_counter() - start if done else None)

    def shutdown(self) -> None:
        """Stop the threads once their current jobs end."""
        self._executor.shutdown(wait=False, cancel_futures=True)
