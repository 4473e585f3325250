"""A circuit breaker, so that a Redis outage costs one short timeout, not one per operation."""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    """Closed: calls go through. After ``threshold`` consecutive failures it opens for
    ``cooldown`` seconds (doubling up to ``max_cooldown`` while probes keep failing); then one
    probe call is let through, and its success closes the breaker."""

    def __init__(self, threshold: int = 3, cooldown: float = 1.0, max_cooldown: float = 5.0):
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self._cooldown = cooldown
        self._probing = False
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self) -> bool:
        if not self._open:
            return True
        with self._lock:
            if not self._open:
                return True
            if self._probing or time.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> bool:
        """Record a successful call; True when this closed an open breaker."""
        if self._failures or self._open:
            with self._lock:
                reopened = self._open
                self._failures = 0
                self._open = False
                self._probing = False
                self._cooldown = self.base_cooldown
                return reopened
        return False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing:
                self._probing = False
                self._cooldown = min(self._cooldown * 2, self.max_cooldown)
                self._open_until = time.monotonic() + self._cooldown
            elif not self._open and self._failures >= self.threshold:
                self._open = True
                self._open_until = time.monotonic() + self._cooldown
