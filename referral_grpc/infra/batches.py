"""Work queued by RPC threads without a lock and done in batches by one background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class DelayedDrain(Generic[T]):
    """A queue whose items one thread drains `delay` seconds after the first of a batch is queued.

    On a busy server, work done on the RPC's own thread costs far more throughput than a
    micro-benchmark of it says (grpc's hand-offs between its threads wait on it), so what need not
    delay the answer is queued here (a deque append, no lock) and done in batches: the thread calls
    `drain()`, which takes the items (`take`) and does the work. The owner may also take and do
    them on its own thread at any time (when the queue is long, or to keep an order), under a lock
    of its own that `drain` takes too.

    Past `limit` queued items, `put` refuses new ones; nothing is ever lost otherwise.
    """

    def __init__(
        self, drain: Callable[[], None], *, delay: float, name: str, limit: int | None = None
    ) -> None:
        self._drain = drain
        self._delay = delay
        self._name = name
        self._limit = limit
        self._queued: deque[T] = deque()
        self._due = threading.Event()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._queued)

    def put(self, item: T) -> bool:
        """Queue one item (any thread, no lock); False if the queue is full and it was refused."""
        if self._limit is not None and len(self._queued) >= self._limit:
            return False
        self._queued.append(item)
        if not self._due.is_set():
            # Set after the append, and the thread clears the flag before it drains: an item whose
            # caller saw the flag set is taken by that thread's next drain.
            self._ensure_thread()
            self._due.set()
        return True

    def take(self, most: int | None = None) -> list[T]:
        """Remove and return the queued items, oldest first (at most `most`)."""
        queued = self._queued
        count = len(queued) if most is None else min(most, len(queued))
        return [queued.popleft() for _ in range(count)]

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty and no drain is under way; whether that happened in time."""
        deadline = time.monotonic() + timeout
        while self._queued or self._busy:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._busy = True
            try:
                time.sleep(self._delay)
                self._due.clear()
                self._drain()
            except Exception:  # never lose the thread; the drain reports its own failures
                log.exception("%s: a drain failed", self._name)
            finally:
                self._busy = False
