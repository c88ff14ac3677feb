"""A circuit breaker for engine integrations: a failing daemon costs one deadline, then
calls are skipped (answered as misses by the caller) until a backoff has passed, and the
next call probes the daemon again. The backoff doubles up to `max_backoff_s` and resets
on the first success."""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    def __init__(self, base_backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        self.base = base_backoff_s
        self.max = max_backoff_s
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._backoff = base_backoff_s
        self.failures = 0
        self.skipped = 0

    def allow(self) -> bool:
        """False while open (the caller answers a miss without calling the daemon)."""
        with self._lock:
            if time.monotonic() < self._open_until:
                self.skipped += 1
                return False
            return True

    def success(self) -> None:
        with self._lock:
            self._open_until = 0.0
            self._backoff = self.base

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self._open_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.max)

    @property
    def is_open(self) -> bool:
        with self._lock:
            return time.monotonic() < self._open_until
