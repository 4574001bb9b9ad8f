"""A small thread-safe circuit breaker for optional dependencies (Redis cache, Hunter)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures and stays open for `reset_after` seconds.

    While open, `allow()` is False, so callers skip the dependency instead of waiting on its
    timeouts. After `reset_after`, one caller at a time is let through (half-open); its success
    closes the breaker, its failure re-opens it.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_after: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or self._monotonic() - self._opened_at < self.reset_after:
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self.failure_threshold:
                self._opened_at = self._monotonic()
            self._probing = False
