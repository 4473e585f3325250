"""The write path: lock at flush, publish after COMMIT, restore after ROLLBACK.

``after_flush``   the rows a flush wrote are snapshotted from ``state.dict`` (never by reading
                  attributes, which could emit SQL) and their entries locked, before COMMIT.
``before_commit`` locks that may have expired during a long transaction are taken again.
``after_commit``  the root transaction's entries are published in one round trip.
``after_transaction_end``  a savepoint hands its changes to its parent; the root, if it did not
                  commit (rollback, failed flush, ``close()``), releases its locks, which restores
                  the previous values where nobody else touched them.

After the database COMMIT nothing here raises: the data is safe in the database, and an entry
whose publish failed is still locked, so it expires into a miss.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state

from . import _sa_compat
from .codec import FlushContext
from .exc import CacheUnavailableError
from .tracking import Change, SessionTracker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, SessionTransaction

    from .cache import WriteThroughCache
    from .model import ModelLayout

log = logging.getLogger("sqlalchemy_writethrough")


class WritePath:
    def __init__(self, cache: WriteThroughCache) -> None:
        self.cache = cache

    # -- flush ---------------------------------------------------------------------------

    def after_flush(self, session: Session, flush_context: Any) -> None:
        cache = self.cache
        tracker = cache._tracker(session)
        tracker.wrote = True
        transaction = session.get_nested_transaction() or session.get_transaction()
        contexts: dict[Any, FlushContext] = {}
        strict = False
        touched: list[tuple[str, str]] = []

        def context_for(layout: ModelLayout) -> FlushContext:
            bind = session.get_bind(mapper=layout.mapper)
            ctx = contexts.get(bind)
            if ctx is None:
                connection = session.connection(bind_arguments={"mapper": layout.mapper})
                ctx = contexts[bind] = FlushContext(bind.dialect, connection)
            return ctx

        def record(layout: ModelLayout, pk: Any, payload: bytes | None) -> None:
            key, gen_key = layout.keys.pair(pk)
            tracker.record(transaction, key, Change(gen_key, payload, cache._ttl_ms(layout)))
            touched.append((key, gen_key))

        for obj in session.deleted:
            state = instance_state(obj)
            layout = cache._layout_for(state.mapper)
            if layout is None or state.key is None:
                continue
            strict = strict or layout.options.on_redis_error == "strict"
            tracker.lock_ms = max(tracker.lock_ms, int(layout.options.lock_timeout * 1000))
            record(layout, state.key[1], None)

        for collection, inserted in ((session.new, True), (session.dirty, False)):
            for obj in collection:
                state = instance_state(obj)
                layout = cache._layout_for(state.mapper)
                if layout is None:
                    continue
                strict = strict or layout.options.on_redis_error == "strict"
                tracker.lock_ms = max(tracker.lock_ms, int(layout.options.lock_timeout * 1000))
                dict_ = layout.inserted_values(state) if inserted else state.dict
                pk = [dict_.get(a) for a in layout.pk_attrs]
                old = state.key[1] if state.key is not None else None
                if old is not None and list(old) != pk:
                    record(layout, old, None)  # the primary key itself changed
                if None in pk or not layout.pk_is_cacheable(pk):
                    if old is None or list(old) != pk:
                        # no key we can name holds this row: forget the whole model
                        tracker.stale_models.add(layout)
                    continue
                if layout.options.strategy == "invalidate":
                    payload = None
                else:
                    payload = layout.encode_flushed(dict_, context_for(layout))
                record(layout, pk, payload)

        if not touched and not tracker.reassert_on_flush:
            return
        pairs: list[str] = []
        for key, gen_key in touched:
            if key not in tracker.locked:
                tracker.locked[key] = gen_key
                pairs += (key, gen_key)
        if tracker.reassert_on_flush:
            tracker.reassert_on_flush = False
            pairs = _flatten(tracker.locked)
        if pairs:
            self._lock(tracker, pairs, strict)

    def before_commit(self, session: Session) -> None:
        if session.get_nested_transaction() is not None:
            return
        tracker = self.cache._peek_tracker(session)
        if tracker is None or not tracker.locked:
            return
        # locks older than half their timeout might expire before COMMIT: take them again
        if time.monotonic() - tracker.first_lock_at < tracker.lock_ms / 2000:
            return
        if _sa_compat.session_is_clean(session):
            self._lock(tracker, _flatten(tracker.locked), tracker.strict)
        else:
            tracker.reassert_on_flush = True  # in the same round trip as the final flush

    def _lock(self, tracker: SessionTracker, pairs: list[str], strict: bool) -> None:
        cache = self.cache
        tracker.strict = tracker.strict or strict
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        if cache._backend.lock(pairs, tracker.owner_token(), tracker.lock_ms):
            return
        cache._counters.add("lock_failures")
        if tracker.strict:
            raise CacheUnavailableError(
                "Redis could not lock the cache entries this flush changes, and the model is "
                "configured on_redis_error='strict'; the flush was not applied"
            )
        # degrade: the commit goes ahead; these keys are invalidated before this process
        # reads from Redis again
        cache._journal.add_pairs(pairs)

    # -- end of transaction ----------------------------------------------------------------

    def after_commit(self, session: Session) -> None:
        tracker = self.cache._peek_tracker(session)
        if tracker is None:
            return
        nested = session.get_nested_transaction()
        if nested is not None:
            tracker.released_savepoints.add(id(nested))
            return
        tracker.committed = True
        try:
            self._publish(session, tracker)
        except Exception:  # never raise after COMMIT: the locks expire into misses
            log.exception("writethrough: publish failed after commit")

    def _publish(self, session: Session, tracker: SessionTracker) -> None:
        cache = self.cache
        if tracker.stale_models:
            for layout in tracker.stale_models:
                if not cache._backend.new_generations(layout.keys.generation_keys()):
                    cache._journal.add_model(layout)
        if not tracker.locked:
            return
        changes = tracker.changes.get(session.get_transaction(), {})
        pairs: list[str] = []
        items: list[Any] = []
        for key, gen_key in tracker.locked.items():
            change = changes.get(key)
            pairs += (key, gen_key)
            if change is None or change.payload is None:
                items += (b"", 0)
            else:
                items += (change.payload, change.ttl_ms)
        written = cache._backend.publish(pairs, tracker.owner_token(), items)
        if written is not None:
            cache._counters.add("publishes", written)
            cache._counters.add("invalidations", len(tracker.locked) - written)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        tracker = self.cache._peek_tracker(session)
        if tracker is None:
            return
        if transaction.nested:
            tracker.end_savepoint(transaction, transaction.parent)
            return
        if transaction.parent is not None:
            return  # a flush's internal subtransaction
        try:
            if not tracker.committed and tracker.locked:
                restored = self.cache._backend.release(
                    _flatten(tracker.locked), tracker.owner_token()
                )
                if restored is not None:
                    self.cache._counters.add("restores", restored)
                    self.cache._counters.add("invalidations", len(tracker.locked) - restored)
        except Exception:  # the locks expire into misses
            log.exception("writethrough: releasing locks after rollback failed")
        finally:
            tracker.reset()

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        self.cache._tracker(session).began = True


def _flatten(locked: dict[str, str]) -> list[str]:
    pairs: list[str] = []
    for key, gen_key in locked.items():
        pairs += (key, gen_key)
    return pairs
