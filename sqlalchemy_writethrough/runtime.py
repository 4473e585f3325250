"""What the session hooks work with: one small object per cache, instead of the cache itself.

The read path (:mod:`.loading`), the write path (:mod:`.writing`) and statement tracking
(:mod:`.dml`) see a :class:`Runtime`: the registry of cached models, the :class:`~.backend.Backend`
that talks to Redis, the counters, the outage journal and the settings. Nothing else of
:class:`~.cache.WriteThroughCache`, so the hooks do not change when the cache's public surface
does, and a backend (sync, asyncio, Cluster) is one attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from . import _rng as random
from . import _sa_compat
from .retiring import Retirement
from .siblings import Siblings
from .tracking import SessionTracker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .backend import Backend
    from .journal import Journal
    from .model import ModelLayout
    from .near import NearCache
    from .registry import Models
    from .stats import Counters


@dataclasses.dataclass(frozen=True)
class Settings:
    """The cache-wide settings the hooks read (the per-model ones live in each layout)."""

    prefix: str
    #: a reader's lease on a missing entry, in milliseconds
    lease_ms: int
    #: seconds a reader waits for another reader's fill (0: never waits)
    fill_wait: float
    #: the fraction of an entry's TTL taken off at random
    ttl_jitter: float
    #: the key under which a session's tracker lives in ``session.info`` (one per cache)
    info_key: str


class Runtime:
    """The cache as its hooks see it."""

    __slots__ = (
        "backend",
        "counters",
        "journal",
        "models",
        "near",
        "owner",
        "retirement",
        "settings",
        "siblings",
        "tracer",
    )

    def __init__(
        self,
        models: Models,
        backend: Backend,
        counters: Counters,
        journal: Journal,
        settings: Settings,
    ) -> None:
        self.models = models
        self.backend = backend
        self.counters = counters
        self.journal = journal
        self.settings = settings
        #: the other keyspaces of the tables this process writes (rolling deploys)
        self.siblings = Siblings(
            settings.prefix,
            models.used_keyspaces,
            self._entry_lifetime_ms,
            self._entry_lifetime_stamp,
            lambda: counters.add("registries_made_whole"),
        )
        #: an OpenTelemetry tracer once ``otel.instrument(cache)`` was called, else None
        #: (the hooks then emit their spans: see :mod:`.tracing`)
        self.tracer: Any = None
        #: the near cache in front of Redis (opt-in: see :mod:`.near`), else None
        self.near: NearCache | None = None
        #: whether this flavour's listeners are still installed for a session (see
        #: :mod:`.retiring`)
        self.retirement = Retirement()
        #: the cache, while it is installed somewhere: an application may keep only the
        #: factory, whose listeners reach this runtime (and the cache through it, so that
        #: it lives); None once uninstalled everywhere, so that the listeners uninstall()
        #: leaves behind (for the sessions made before) do not keep a dropped cache alive
        self.owner: Any = None

    def _entry_lifetime_ms(self, fields: tuple[str, ...]) -> int:
        """How long after a registration of these keyspaces (see :mod:`.siblings`) an entry of
        one, or a near-cache copy of one, may exist: a lease (or a lock) taken right after it,
        the fill (or publish) at its end at the latest, the entry's TTL, a near copy's
        staleness bound; and as much again, up to a minute, for the round trip's delays and
        the server's clock steps."""
        ttl, lock = self.models.longest_holds(fields)
        near = self.near
        need = ttl + max(lock, self.settings.lease_ms / 1000) + (near.staleness if near else 0)
        return int((need + min(60.0, need)) * 1000)

    def _entry_lifetime_stamp(self) -> tuple[int, bool]:
        return self.models.generation, self.near is not None

    def peek(
        self, layout: ModelLayout, key: str, gen_key: str
    ) -> memoryview | bytes | Literal[False] | None:
        """An entry's payload when it is a VALUE of the current generation (False when not,
        None when Redis failed): from the near cache for a model that uses it, else from
        Redis (:meth:`Backend.peek`)."""
        near = self.near
        if near is not None and layout.options.near_cache:
            found = near.get(key)
            if found is not None:
                self.counters.add("near_hits", 1, layout.entity_name)
                return found
            return near.read_through(self.backend, key, gen_key)
        return self.backend.peek(key, gen_key)

    def peek_many(
        self, layout: ModelLayout, pairs: Sequence[tuple[str, str]]
    ) -> Sequence[memoryview | bytes | Literal[False]] | None:
        """:meth:`peek` of many entries (None when Redis failed): those in the near cache
        from memory, the others in one MGET (none when all are in memory), under the same
        rules."""
        near = self.near
        if near is not None and layout.options.near_cache:
            read = near.read_many(self.backend, pairs)
            if read is None:
                return None
            found, hits = read
            if hits:
                self.counters.add("near_hits", hits, layout.entity_name)
            return found
        return self.backend.peek_many(pairs)

    def tracker(self, session: Session) -> SessionTracker:
        """The session's tracker, made at its first use."""
        key = self.settings.info_key
        tracker: SessionTracker | None = session.info.get(key)
        if tracker is None:
            tracker = session.info[key] = SessionTracker(session)
        return tracker

    def peek_tracker(self, session: Session) -> SessionTracker | None:
        """The session's tracker, if its transaction did anything yet."""
        info = _sa_compat.info_if_made(session)  # a session nobody gave info to has none
        if info is None:
            return None
        tracker: SessionTracker | None = info.get(self.settings.info_key)
        return tracker

    def _replay_siblings(
        self, pairs: list[str], gen_keys: list[str]
    ) -> tuple[list[str], list[str]] | None:
        """What a journal replay invalidates besides its keys and buckets: theirs in the
        siblings the registry lists now (read again: Redis just came back). A registry Redis
        forgot meanwhile may not list them all: it is made whole first (see .siblings); None
        when it cannot be now (another process is at it, without waiting for it here, or
        Redis failed): the replay is left for later, the journal kept, rather than gone by a
        list that may lack a sibling (were that process to die, nothing would reach it)."""
        siblings = self.siblings
        known = siblings.refresh(self.backend) or siblings.known
        if known.read and not known.whole:
            if not siblings.make_whole(self.backend, wait=False):
                return None
            known = siblings.known  # the whole list, as making it whole read it
        return siblings.extra(pairs, known), siblings.extra_buckets(gen_keys, known)

    def ttl_ms(self, layout: ModelLayout) -> int:
        """An entry's TTL, less its random jitter, so entries written together do not expire
        together."""
        ttl_ms = layout.options.ttl * 1000
        return max(1, int(ttl_ms - ttl_ms * self.settings.ttl_jitter * random.random()))

    def ttl_spread(self, layout: ModelLayout) -> tuple[float, float]:
        """(TTL, its largest jitter), in ms: :meth:`ttl_ms` is ``max(1, int(ttl - spread *
        random.random()))``, for callers that compute many (a flush's rows)."""
        ttl_ms = layout.options.ttl * 1000
        return ttl_ms, ttl_ms * self.settings.ttl_jitter

    def journal_replayed(self) -> bool:
        """Whether nothing journaled while Redis was away is left to invalidate (replaying it
        now if Redis answers): until then this process reads nothing from Redis."""
        journal = self.journal
        if not journal.pending:
            return True
        journaled = len(journal)
        replayed = journal.replay(self.backend, self._replay_siblings)
        if replayed:
            self.counters.invalidated("journal", journaled)
        return replayed
