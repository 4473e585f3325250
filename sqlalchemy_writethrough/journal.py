"""Keys whose locks could not be taken (``degrade`` mode), invalidated before reads resume.

While Redis was unreachable a commit went ahead without locking its entries, so Redis may still
hold their old values. Until those entries are invalidated, this process serves no read from
Redis. The journal is bounded: past ``limit`` keys it keeps only the buckets (generation keys)
they fall in, and replaces those buckets' generations, which invalidates every entry in them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import RedisBackend


class Journal:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._buckets: set[str] = set()
        self.pending = False

    def __len__(self) -> int:
        return len(self._keys) + len(self._buckets)

    def add_pairs(self, pairs: Sequence[str]) -> None:
        with self._lock:
            for i in range(0, len(pairs), 2):
                if pairs[i + 1] in self._buckets:
                    continue
                self._keys[pairs[i]] = pairs[i + 1]
            if len(self._keys) > self.limit:
                self._buckets.update(self._keys.values())
                self._keys.clear()
            self.pending = True

    def add_model(self, layout: Any) -> None:
        self.add_buckets(layout.keys.generation_keys())

    def add_buckets(self, gen_keys: Sequence[str]) -> None:
        with self._lock:
            self._buckets.update(gen_keys)
            self.pending = True

    def replay(self, backend: RedisBackend) -> bool:
        """Invalidate everything journaled; True when nothing is left to invalidate."""
        with self._lock:
            if not self.pending:
                return True
            keys = dict(self._keys)
            buckets = set(self._buckets)
        if keys:
            flat: list[str] = []
            for key, gen_key in keys.items():
                flat += (key, gen_key)
            if not backend.invalidate(flat):
                return False
        if buckets and not backend.bump_generations(sorted(buckets)):
            return False
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)
            self._buckets.difference_update(buckets)
            self.pending = bool(self._keys or self._buckets)
            return not self.pending
