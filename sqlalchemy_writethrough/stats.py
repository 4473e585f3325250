"""Counters, so that what the cache did is observable (``cache.stats()``)."""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """A snapshot of the counters since the cache was created (or ``stats(reset=True)``)."""

    hits: int = 0
    """primary-key loads served from Redis"""
    misses: int = 0
    """primary-key loads that went to the database"""
    fills: int = 0
    """rows written to Redis after a miss"""
    fills_refused: int = 0
    """fills refused because a writer or an invalidation took the key meanwhile"""
    publishes: int = 0
    """rows written to Redis after a commit"""
    invalidations: int = 0
    """entries left as a miss after a commit, rollback or invalidate() instead of a value"""
    restores: int = 0
    """previous values put back by a rollback"""
    bypasses: int = 0
    """primary-key loads sent to the database without asking Redis (options, locks, types)"""
    errors: int = 0
    """Redis calls that failed (connection, timeout, server error) or were skipped by the breaker"""
    decode_errors: int = 0
    """entries that could not be decoded (garbage, another version): served as a miss"""
    lock_failures: int = 0
    """flushes whose locks could not be taken (journaled in degrade mode, raised in strict)"""


_FIELDS = tuple(f.name for f in dataclasses.fields(CacheStats))


class Counters:
    __slots__ = ("_lock", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(_FIELDS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self, reset: bool = False) -> CacheStats:
        with self._lock:
            snap = CacheStats(**self._values)
            if reset:
                self._values = dict.fromkeys(_FIELDS, 0)
        return snap
