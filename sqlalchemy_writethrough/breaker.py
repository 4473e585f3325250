"""A circuit breaker, so that a Redis outage costs nothing per operation once it is noticed."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CircuitBreaker:
    """Closed: calls go through. After ``threshold`` consecutive failures it opens, and no
    operation waits on Redis any more. While it is open a background thread (never a user's
    operation) probes Redis every ``cooldown`` seconds, doubling up to ``max_cooldown``; the
    first probe that succeeds closes the breaker and calls ``on_close`` (which replays the
    journal of keys written while Redis was away)."""

    def __init__(self, threshold: int = 3, cooldown: float = 0.25, max_cooldown: float = 1.0):
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        #: a cheap call that raises (or returns False) while Redis is unwell: set by the backend
        self.probe: Callable[[], bool] | None = None
        #: called, from the probing thread, when the breaker closes again
        self.on_close: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self._stopped = threading.Event()
        self._prober: threading.Thread | None = None

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self) -> bool:
        return not self._open

    def success(self) -> bool:
        """Record a successful call; True when this closed an open breaker."""
        if self._failures or self._open:
            with self._lock:
                reopened = self._open
                self._failures = 0
                self._open = False
                return reopened
        return False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._open or self._failures < self.threshold:
                return
            self._open = True
            if self.probe is not None and (self._prober is None or not self._prober.is_alive()):
                self._prober = threading.Thread(
                    target=self._probe_until_closed, name="writethrough-breaker", daemon=True
                )
                self._prober.start()

    def _probe_until_closed(self) -> None:
        cooldown = self.base_cooldown
        while self._open and not self._stopped.wait(cooldown):
            try:
                healthy = bool(self.probe()) if self.probe is not None else True
            except Exception:
                healthy = False
            if healthy:
                if self.success() and self.on_close is not None:
                    try:
                        self.on_close()
                    except Exception:  # the next operation's replay tries again
                        pass
                return
            cooldown = min(cooldown * 2, self.max_cooldown)

    def stop(self) -> None:
        """Stop probing (the process is shutting the cache down)."""
        self._stopped.set()
