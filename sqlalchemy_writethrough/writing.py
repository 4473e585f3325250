"""The write path: lock before COMMIT, publish after it, restore after a rollback.

``before_flush``  the entries of rows the flush is about to write, as far as their keys are
                  known now (updated and deleted rows, inserts with their primary key set),
                  get their lock script *sent*; its reply is read in ``after_flush``, so the
                  Redis round trip runs while the database executes the flush.
``after_flush``   the rows a flush wrote are snapshotted from ``state.dict`` (never by reading
                  attributes, which could emit SQL) and their entries locked, before COMMIT.
                  Rows the database changes by itself (``ON DELETE CASCADE`` with
                  ``passive_deletes``, ``ON UPDATE CASCADE``, declared trigger effects) get
                  their whole model locked (:mod:`.dml` does the same for statements).
``before_commit`` locks that may have expired during a long transaction are taken again.
``after_commit``  the root transaction's entries are published in one round trip, and its
                  locked models get new generations.
``after_transaction_end``  a savepoint hands its changes to its parent; the root, if it did not
                  commit (rollback, failed flush, ``close()``), releases its locks, which restores
                  the previous values where nobody else touched them.

After the database COMMIT nothing here raises: the data is safe in the database, and an entry
whose publish failed is still locked, so it expires into a miss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
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

    def before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        tracker = self.cache._tracker(session)
        tracker.in_flush = True
        if not (tracker.began or tracker.external):
            # only a transaction's first database activity needs a look at its binds
            for obj in session.new or session.dirty or session.deleted:
                tracker.note_first_activity(session, instance_state(obj).mapper)
                break
        if tracker.pending_lock is not None:  # the last flush stopped before after_flush
            self._finish_locks(tracker)
        if (
            not tracker.reassert_on_flush
            # the transaction that will end (and finish the reply) if the flush never runs
            and session.get_transaction() is not None
        ):
            self._send_locks(session, tracker)

    def _send_locks(self, session: Session, tracker: SessionTracker) -> None:
        """Send the locks of the entries this flush will write, as far as their keys are known
        before it runs; after_flush reads the reply and locks whatever else it wrote. A key
        locked here that the flush does not write after all ends as a miss."""
        cache = self.cache
        pairs: list[str] = []
        seen: set[str] = set()
        for collection in (session.dirty, session.deleted, session.new):
            for obj in collection:
                state = instance_state(obj)
                layout = cache._layout_for(state.mapper)
                if layout is None:
                    continue
                if state.key is not None:
                    pk = list(state.key[1])
                else:
                    dict_ = state.dict
                    pk = [dict_.get(a) for a in layout.pk_attrs]
                    if None in pk or not layout.pk_is_cacheable(pk):
                        continue  # the database assigns it: after_flush locks it
                key, gen_key = layout.keys.pair(pk)
                if key in tracker.locked or key in seen:
                    continue
                self._involve(tracker, layout)
                seen.add(key)
                pairs += (key, gen_key)
        if not pairs:
            return
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        tracker.pending_lock = cache._backend.send_lock(
            pairs, tracker.owner_token(), tracker.lock_ms
        )

    def _finish_locks(self, tracker: SessionTracker) -> None:
        """Read the reply of the locks before_flush sent: after the flush's statements, or,
        when the flush stopped early (nothing to write after all, a listener raising, a
        failure), at the next flush, before COMMIT, or at the end of the transaction. A key
        locked for a row that was not written then ends as a miss, or is restored."""
        pending = tracker.pending_lock
        if pending is None:
            return
        tracker.pending_lock = None
        pairs = list(pending.keys)
        for i in range(0, len(pairs), 2):
            tracker.locked[pairs[i]] = pairs[i + 1]
        if self.cache._backend.finish(pending) is None:
            self._lock_failed(tracker, pairs=pairs)

    def after_flush(self, session: Session, flush_context: Any) -> None:
        cache = self.cache
        if cache._journal.pending:
            cache._journal_replayed()  # a process that only writes replays here
        tracker = cache._tracker(session)
        tracker.in_flush = False
        tracker.wrote = True
        self._finish_locks(tracker)
        transaction = session.get_nested_transaction() or session.get_transaction()
        contexts: dict[Any, FlushContext] = {}
        layout_contexts: dict[ModelLayout, FlushContext] = {}
        touched: list[tuple[str, str]] = []
        models: list[ModelLayout] = []

        def context_for(layout: ModelLayout) -> FlushContext:
            ctx = layout_contexts.get(layout)
            if ctx is None:  # get_bind() once per model and flush, not per row
                bind = session.get_bind(mapper=layout.mapper)
                ctx = contexts.get(bind)
                if ctx is None:
                    mapper = layout.mapper
                    ctx = contexts[bind] = FlushContext(
                        bind.dialect,
                        lambda: session.connection(bind_arguments={"mapper": mapper}),
                    )
                layout_contexts[layout] = ctx
            return ctx

        changes = tracker.changes.setdefault(transaction, {})
        statement_keys = tracker.statement_keys
        involved: set[ModelLayout] = set()

        def involve(layout: ModelLayout) -> None:
            """Once per model and flush: its options, and the models its rows change too."""
            involved.add(layout)
            self._involve(tracker, layout)
            models.extend(cache._also_invalidated(layout))

        def record(layout: ModelLayout, pk: Any, payload: bytes | None) -> None:
            key, gen_key = layout.keys.pair(pk)
            if key in statement_keys:
                payload = None
            changes[key] = Change(gen_key, payload, cache._ttl_ms(layout))
            touched.append((key, gen_key))

        for obj in session.deleted:
            state = instance_state(obj)
            mapper = state.mapper
            models += cache._cascades(mapper.local_table, deleted=True, orm_handles=mapper)
            layout = cache._layout_for(mapper)
            if layout is None or state.key is None:
                continue
            if layout not in involved:
                involve(layout)
            record(layout, state.key[1], None)

        for collection, inserted in ((session.new, True), (session.dirty, False)):
            for obj in collection:
                state = instance_state(obj)
                layout = cache._layout_for(state.mapper)
                old = state.key[1] if state.key is not None else None
                if layout is None:
                    if old is not None and _key_changed(state):
                        models += cache._cascades(
                            state.mapper.local_table, deleted=False, orm_handles=state.mapper
                        )
                    continue
                if layout not in involved:
                    involve(layout)
                variant = layout.variant(state.mapper)
                assert variant is not None  # _layout_for rebuilds a layout missing a class
                dict_ = variant.inserted_values(state) if inserted else _as_updated(state)
                pk = [dict_.get(a) for a in layout.pk_attrs]
                if old is not None and old != tuple(pk):
                    record(layout, old, None)  # the primary key itself changed
                    models += cache._cascades(
                        layout.table, deleted=False, orm_handles=layout.mapper
                    )
                if None in pk or not layout.pk_is_cacheable(pk):
                    if old is None or old != tuple(pk):
                        models.append(layout)  # no key we can name holds this row
                    continue
                if layout.options.strategy == "invalidate":
                    payload = None
                else:
                    payload = variant.encode_flushed(dict_, context_for(layout))
                    if payload is not None:
                        cache._register(layout)
                record(layout, pk, payload)

        if models:
            self.lock_models(tracker, models)
        pairs: list[str] = []
        for key, gen_key in touched:
            if key not in tracker.locked:
                tracker.locked[key] = gen_key
                pairs += (key, gen_key)
        if tracker.reassert_on_flush:
            tracker.reassert_on_flush = False
            self._reassert(tracker)
        elif pairs:
            self._lock(tracker, pairs)

    def _involve(self, tracker: SessionTracker, layout: ModelLayout) -> None:
        options = layout.options
        tracker.strict = tracker.strict or options.on_redis_error == "strict"
        tracker.lock_ms = max(tracker.lock_ms, int(options.lock_timeout * 1000))

    # -- statements (called by .dml) -------------------------------------------------------

    def invalidate_rows(
        self, tracker: SessionTracker, layout: ModelLayout, keys: Iterable[Sequence[Any]]
    ) -> None:
        """Rows a statement is about to change, named by primary key: locked now, left as a
        miss at commit, restored by a rollback."""
        self._involve(tracker, layout)
        transaction = tracker.current_transaction()
        ttl_ms = self.cache._ttl_ms(layout)
        pairs: list[str] = []
        for pk in keys:
            if None in pk or not layout.pk_is_cacheable(pk):
                self.lock_models(tracker, [layout])
                return
            key, gen_key = layout.keys.pair(pk)
            tracker.statement_keys.add(key)
            tracker.record(transaction, key, Change(gen_key, None, ttl_ms))
            if key not in tracker.locked:
                tracker.locked[key] = gen_key
                pairs += (key, gen_key)
        if pairs:
            self._lock(tracker, pairs)

    def lock_models(self, tracker: SessionTracker, layouts: Iterable[ModelLayout]) -> None:
        """Every row of these models may change: lock their generations until the end of the
        transaction, which replaces them (after COMMIT) or puts them back (after ROLLBACK)."""
        gen_keys: list[str] = []
        for layout in dict.fromkeys(layouts):
            self._involve(tracker, layout)
            for gen_key in layout.keys.generation_keys():
                if gen_key not in tracker.locked_gens:
                    tracker.locked_gens[gen_key] = None
                    gen_keys.append(gen_key)
        if not gen_keys:
            return
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        ok = self.cache._backend.lock_generations(gen_keys, tracker.owner_token(), tracker.lock_ms)
        if not ok:
            self._lock_failed(tracker, generations=gen_keys)

    # -- locks ------------------------------------------------------------------------------

    def before_commit(self, session: Session) -> None:
        if session.get_nested_transaction() is not None:
            return
        tracker = self.cache._peek_tracker(session)
        if tracker is None:
            return
        # a flush that stopped early left its locks' reply unread: they count from here,
        # and are acknowledged before COMMIT
        self._finish_locks(tracker)
        if not (tracker.locked or tracker.locked_gens):
            return
        # locks older than half their timeout might expire before COMMIT: take them again
        if time.monotonic() - tracker.first_lock_at < tracker.lock_ms / 2000:
            return
        if _sa_compat.session_is_clean(session):
            self._reassert(tracker)
        else:
            tracker.reassert_on_flush = True  # in the same round trip as the final flush

    def _reassert(self, tracker: SessionTracker) -> None:
        if tracker.locked:
            self._lock(tracker, _flatten(tracker.locked))
        if tracker.locked_gens:
            gen_keys = list(tracker.locked_gens)
            backend = self.cache._backend
            if not backend.lock_generations(gen_keys, tracker.owner_token(), tracker.lock_ms):
                self._lock_failed(tracker, generations=gen_keys)

    def _lock(self, tracker: SessionTracker, pairs: list[str]) -> None:
        if not tracker.first_lock_at:
            tracker.first_lock_at = time.monotonic()
        if not self.cache._backend.lock(pairs, tracker.owner_token(), tracker.lock_ms):
            self._lock_failed(tracker, pairs=pairs)

    def _lock_failed(
        self, tracker: SessionTracker, pairs: Sequence[str] = (), generations: Sequence[str] = ()
    ) -> None:
        cache = self.cache
        cache._counters.add("lock_failures")
        if tracker.strict:
            raise CacheUnavailableError(
                "Redis could not lock the cache entries this transaction changes, and the model "
                "is configured on_redis_error='strict'; the statement was not applied"
            )
        # degrade: the commit goes ahead; these keys are invalidated before this process
        # reads from Redis again (and once more after COMMIT: see after_commit)
        if pairs:
            cache._journal.add_pairs(pairs)
            tracker.unlocked += pairs
        if generations:
            cache._journal.add_buckets(generations)
            tracker.unlocked_gens += generations

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
        if tracker.pending_lock is not None:
            # the commit's own flush found nothing to write after all (it returned before
            # after_flush): no row changed under these locks; they end as misses
            try:
                self._finish_locks(tracker)
            except Exception:  # strict mode's error: never raise after COMMIT
                log.debug("writethrough: lock of an empty flush failed", exc_info=True)
        if tracker.external:
            # commit() did not COMMIT: the outer transaction may still roll back. The locks
            # stay and expire into misses (lock_timeout), which is all that is safe here.
            log.debug("writethrough: session joined an outer transaction; nothing published")
            return
        try:
            self._publish(session, tracker)
        except Exception:  # never raise after COMMIT: the locks expire into misses
            log.exception("writethrough: publish failed after commit")
        if tracker.unlocked or tracker.unlocked_gens:
            # a reader may have filled these from the pre-commit rows after an early replay
            if tracker.unlocked:
                self.cache._journal.add_pairs(tracker.unlocked)
            if tracker.unlocked_gens:
                self.cache._journal.add_buckets(tracker.unlocked_gens)

    def _publish(self, session: Session, tracker: SessionTracker) -> None:
        cache = self.cache
        if tracker.locked:
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
        if tracker.locked_gens:
            gen_keys = list(tracker.locked_gens)
            if cache._backend.release_generations(gen_keys, tracker.owner_token(), True):
                cache._counters.add("invalidations")
            else:
                cache._journal.add_buckets(gen_keys)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        tracker = self.cache._peek_tracker(session)
        if tracker is None:
            return
        if tracker.pending_lock is not None:  # a flush failed before after_flush
            try:
                self._finish_locks(tracker)
            except Exception:  # strict mode's error: the transaction is ending anyway
                log.debug("writethrough: lock failed during a failed flush", exc_info=True)
        if transaction.nested:
            tracker.end_savepoint(transaction, transaction.parent)
            return
        if transaction.parent is not None:
            tracker.in_flush = False  # a flush's subtransaction (it may have failed)
            return
        try:
            if not tracker.committed:
                self._release(tracker)
        except Exception:  # the locks expire into misses
            log.exception("writethrough: releasing locks after rollback failed")
        finally:
            infos = tracker.infos
            tracker.reset()
            key = self.cache._info_key
            for info in infos:
                if info.get(key) is tracker:
                    del info[key]

    def _release(self, tracker: SessionTracker) -> None:
        cache = self.cache
        if tracker.locked:
            restored = cache._backend.release(_flatten(tracker.locked), tracker.owner_token())
            if restored is not None:
                cache._counters.add("restores", restored)
                cache._counters.add("invalidations", len(tracker.locked) - restored)
        if tracker.locked_gens:
            cache._backend.release_generations(
                list(tracker.locked_gens), tracker.owner_token(), False
            )

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        cache = self.cache
        tracker = cache._tracker(session)
        tracker.began = True
        info = connection.info
        info[cache._info_key] = tracker
        tracker.infos.append(info)
        cache._statements.watch(connection.engine)


def _as_updated(state: Any) -> dict[str, Any]:
    """The row as the UPDATE left it: SQLAlchemy leaves out of the UPDATE an attribute whose
    new value equals the old one (``-0.0`` over ``0.0``, ``1.500`` over ``1.5``), so the
    database keeps the old value's form, which is what a load returns."""
    dict_: dict[str, Any] = state.dict
    committed = state.committed_state
    if not committed:
        return dict_
    kept: dict[str, Any] | None = None
    for key, old in committed.items():
        if key in dict_ and old is not _sa_compat.NO_VALUE and old is not dict_[key]:
            try:
                unchanged = bool(old == dict_[key])
            except Exception:  # an uncomparable value: the UPDATE sent it
                unchanged = False
            if unchanged:
                if kept is None:
                    kept = dict(dict_)
                kept[key] = old
    return dict_ if kept is None else kept


def _key_changed(state: Any) -> bool:
    """Whether a flushed row's primary key changed (history is intact at after_flush)."""
    mapper = state.mapper
    for column in mapper.primary_key:
        if state.attrs[mapper.get_property_by_column(column).key].history.deleted:
            return True
    return False


def _flatten(locked: dict[str, str]) -> list[str]:
    pairs: list[str] = []
    for key, gen_key in locked.items():
        pairs += (key, gen_key)
    return pairs
