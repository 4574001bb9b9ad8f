"""Admission control: at most N RPCs in flight; the rest are shed at once, with a reason, and counted."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any


class InFlight:
    """A count of RPCs handed to the server's thread pools and not yet finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self, delta: int) -> None:
        with self._lock:
            self._count += delta

    @property
    def count(self) -> int:
        return self._count


def lower_thread_priority(niceness: int) -> None:
    """Add `niceness` to the calling thread's nice value (only its own: Linux schedules threads one by one).

    Elsewhere, setpriority would apply to the whole process, so nothing is done there.
    """
    if sys.platform == "linux":
        thread = threading.get_native_id()
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness)
            )


class CountingExecutor(futures.ThreadPoolExecutor):
    """A thread pool that counts its unfinished work in an InFlight shared with the other pools.

    grpc hands every admitted RPC to a pool, and the future completes whatever happens to the call
    (even one cancelled before a thread picked it up), so the count never leaks.
    """

    def __init__(
        self, in_flight: InFlight, max_workers: int, thread_name_prefix: str, *, niceness: int = 0
    ) -> None:
        super().__init__(
            max_workers=max_workers,
            thread_name_prefix=thread_name_prefix,
            initializer=(lambda: lower_thread_priority(niceness)) if niceness else None,
        )
        self._in_flight = in_flight
        # This pool's own count, for `full`.
        self._mine = InFlight()
        self._size = max_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        self._in_flight.add(1)
        self._mine.add(1)
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._in_flight.add(-1)
            self._mine.add(-1)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: futures.Future[Any]) -> None:
        self._in_flight.add(-1)
        self._mine.add(-1)

    def full(self) -> bool:
        """Every thread has work: one more call would wait for one to finish."""
        return self._mine.count >= self._size


class Admission:
    """Decides, before an RPC is queued, whether the server takes it.

    grpc's own `maximum_concurrent_rpcs` refuses calls before any interceptor can see them, so those
    refusals reached neither the metrics nor the caller as a documented reason. This limit is checked
    in the interceptor (grpc calls it under the server's lock, so admissions are serialised), and a
    shed call runs on a pool of its own so that a busy server still answers it at once.
    """

    def __init__(self, in_flight: InFlight, limit: int, shed_pool: futures.ThreadPoolExecutor) -> None:
        self.in_flight = in_flight
        self.limit = limit
        self.shed_pool = shed_pool

    def full(self) -> bool:
        return self.in_flight.count >= self.limit
