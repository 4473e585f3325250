"""A circuit breaker, so that a Redis outage costs nothing per operation once it is noticed."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import forks


def _never() -> bool:
    return False


def _in_thread(probe: Callable[[], None]) -> None:
    threading.Thread(target=probe, name="writethrough-breaker", daemon=True).start()


def weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a bound method) called through a weak reference to its object: what a
    prober reaches must not keep the cache alive (a prober runs until Redis answers, which
    for a cache dropped while Redis was away may be never), and does nothing once the object
    was collected."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        found = ref()
        return None if found is None else found(*args)

    return call


class CircuitBreaker:
    """Closed: calls go through. After ``threshold`` consecutive failures it opens, and no
    operation waits on Redis any more. While it is open a background prober (never a user's
    operation) probes Redis every ``cooldown`` seconds, doubling up to ``max_cooldown``; the
    first probe that succeeds closes the breaker and calls ``on_close`` (which replays the
    journal of keys written while Redis was away).

    The prober is a thread for a synchronous client; an asyncio backend sets :attr:`launch`
    and :attr:`pause` so that it is a task on the event loop instead."""

    def __init__(self, threshold: int = 3, cooldown: float = 0.25, max_cooldown: float = 1.0):
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        #: a cheap call that raises (or returns False) while Redis is unwell: set by the backend
        self.probe: Callable[[], bool] | None = None
        #: called, from the probing thread, when the breaker closes again
        self.on_close: Callable[[], object] | None = None
        #: called when the breaker opens (counted in the stats)
        self.on_open: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self._stopped = threading.Event()
        self._probing = False
        #: starts ``probe_until_closed`` in the background (a thread, or an event loop's task)
        self.launch: Callable[[Callable[[], None]], None] = _in_thread
        #: waits between two probes; True when the breaker was stopped meanwhile
        self.pause: Callable[[float], bool] = self._stopped.wait
        #: whether the prober started cannot run now while the caller could start another
        #: (an asyncio prober's loop left idle, another loop running): set with ``launch``
        self.stranded: Callable[[], bool] = _never
        forks.renew_in_child(self, "_lock")

    def _after_fork(self) -> None:
        """In a forked child: the parent's prober is not there, so the next call starts a
        prober of the child's own while the breaker is open."""
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open

    def allow(self) -> bool:
        if not self._open:
            return True
        if self._probing and self.stranded():
            with self._lock:  # another starts here; the stranded one ends if its loop runs
                self._probing = False
        if not self._probing and self.probe is not None:  # its prober could not start
            with self._lock:
                start = not self._probing
                self._probing = True
            if start:
                self._relaunch()
        return False

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
            if self.on_open is not None:
                self.on_open()
            if self.probe is None or self._probing:
                return
            self._probing = True
        self._relaunch()

    def probe_until_closed(self) -> None:
        cut_short = True  # until it ends by itself: not cancelled with its event loop
        try:
            cooldown = self.base_cooldown
            while self._open and not self.pause(cooldown) and not self._stopped.is_set():
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
                    cut_short = False
                    return
                cooldown = min(cooldown * 2, self.max_cooldown)
            cut_short = False
        finally:
            with self._lock:
                # reopened while this prober was finishing: probe again. A prober cut short
                # (an asyncio task cancelled, in its probe or its pause, by ``asyncio.run()``
                # ending) starts none: one started on a loop being shut down would never run
                # and the breaker would wait for it for ever; the next call starts one
                again = not cut_short and self._open and not self._stopped.is_set()
                self._probing = again
            if again:
                self._relaunch()

    def _relaunch(self) -> None:
        """Start a prober; when none can start (no running loop), the next call tries."""
        try:
            self.launch(self.probe_until_closed)
        except Exception:
            self._probing = False

    def stop(self) -> None:
        """Stop probing (the process is shutting the cache down)."""
        self._stopped.set()
