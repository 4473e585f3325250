"""Keys whose locks could not be taken (``degrade`` mode), invalidated before reads resume.

While Redis was unreachable a commit went ahead without locking its entries, so Redis may still
hold their old values. Until those entries are invalidated, this process serves no read from
Redis. The journal is bounded: past ``limit`` keys it keeps only the buckets (generation keys)
they fall in, and replaces those buckets' generations, which invalidates every entry in them.

A transaction that has ended (committed or rolled back) journals its keys with its owner token:
a lock it may have taken without hearing the reply, or could not publish or release, then ends
at the replay (the last owner leaving a miss) instead of holding its entries as misses until
``lock_timeout``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from . import forks

if TYPE_CHECKING:
    from .backend import Backend


class Journal:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._buckets: set[str] = set()
        #: owner tokens of ended transactions whose locks the replay may drop
        self._owners: set[str] = set()
        #: each key, bucket and owner token journaled -> the number of the add that journaled
        #: it last: a replay forgets only what nothing journaled again while it ran (another
        #: thread's failed publish, after the replay read the journal)
        self._added: dict[str, int] = {}
        self._adds = 0
        self.pending = False
        forks.renew_in_child(self, "_lock")

    def __len__(self) -> int:
        return len(self._keys) + len(self._buckets)

    def add_pairs(self, pairs: Sequence[str], ended_owner: str | None = None) -> None:
        """Journal (entity key, generation key) pairs; ``ended_owner`` is the token of the
        transaction that wrote them once it has ended (None while it may still commit)."""
        with self._lock:
            self._adds += 1
            added = self._added
            if ended_owner is not None:
                self._owners.add(ended_owner)
                added[ended_owner] = self._adds
            for i in range(0, len(pairs), 2):
                if pairs[i + 1] in self._buckets:
                    added[pairs[i + 1]] = self._adds
                    continue
                self._keys[pairs[i]] = pairs[i + 1]
                added[pairs[i]] = self._adds
            if len(self._keys) > self.limit:
                for key, gen_key in self._keys.items():
                    del added[key]
                    self._buckets.add(gen_key)
                    added[gen_key] = self._adds
                self._keys.clear()
            self.pending = True

    def add_buckets(self, gen_keys: Sequence[str]) -> None:
        with self._lock:
            self._adds += 1
            self._buckets.update(gen_keys)
            for gen_key in gen_keys:
                self._added[gen_key] = self._adds
            self.pending = True

    def replay(
        self,
        backend: Backend,
        siblings: Callable[[list[str], list[str]], tuple[list[str], list[str]] | None]
        | None = None,
    ) -> bool:
        """Invalidate everything journaled; True when nothing is left to invalidate.
        ``siblings(pairs, buckets)``: the same rows' and buckets' keys in the other keyspaces
        of their tables (see :mod:`.siblings`), invalidated with them; None from it: they
        cannot be known now, and the replay is left for later."""
        with self._lock:
            if not self.pending:
                return True
            keys = dict(self._keys)
            buckets = set(self._buckets)
            owners = sorted(self._owners)
            seen = dict(self._added)
        flat: list[str] = []
        for key, gen_key in keys.items():
            flat += (key, gen_key)
        bumped = sorted(buckets)
        if siblings is not None and (flat or bumped):
            found = siblings(flat, bumped)
            if found is None:
                return False
            flat += found[0]
            bumped += found[1]
        if flat and not backend.invalidate(flat, owners):
            return False
        if bumped and not backend.bump_generations(bumped):
            return False
        with self._lock:
            added = self._added

            def forgotten(names: Iterable[str]) -> list[str]:
                """Those of ``names`` nothing journaled again since the snapshot above."""
                done = [name for name in names if added.get(name) == seen[name]]
                for name in done:
                    del added[name]
                return done

            for key in forgotten(keys):
                self._keys.pop(key, None)
            self._buckets.difference_update(forgotten(buckets))
            self._owners.difference_update(forgotten(owners))
            self.pending = bool(self._keys or self._buckets)
            return not self.pending
